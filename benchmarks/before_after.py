"""Compare two source trees of fxprune, before and after a refactor: same plans, same compile speed?

    python benchmarks/before_after.py --before /work/before --after /work/main
    python benchmarks/before_after.py --before ../old --after . --models resnet18 vit_b_32 --repeats 5

A refactor should change neither the channels compile keeps nor how long it takes. Each tree is
imported in its own subprocess (PYTHONPATH=<tree>, or <tree>/src), which asserts that every fxprune
module it loaded comes from that tree (the editable install must not shadow it). Only the public API
is used: internal module paths differ between the trees.

1. Plans: per model (``fxprune.testing.build_torchvision_model``: seed 0, small inputs) and per case in
   CASES, the plan of ``fxprune.compile`` (compared by sha256), its keep counts and report fields.
2. Speed: ``fxprune.compile`` at 1x3x224x224, FLOPs(0.5), solver sp_lamp; per tree and model one
   subprocess with a warm-up and ``--repeats`` timed compiles. The trees alternate and the order flips
   from one model (and round) to the next, so drift on a noisy machine hits both.

3. Analysis of timm models (``--timm NAME ...``: one subprocess per tree for all of them, each model
   under a time limit): channel groups, prunable groups and channels, and the masked-reference error of a
   random plan, with timm's own untraceable modules kept opaque as ``benchmarks/coverage.py`` does.

Writes <output>.md (default out/before_after: a check of one change, not a page of docs/) and the raw results
to <output>.json.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

PLAN_MODELS = ("resnet18", "mobilenet_v2", "efficientnet_b0", "densenet121", "shufflenet_v2_x1_0",
               "regnet_y_400mf", "convnext_tiny", "vit_b_32", "swin_t", "mnasnet0_5")
SPEED_MODELS = ("resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0")
CASES = (("FLOPs", "sp_lamp", "sp_lamp"), ("FLOPs", "l1", "sp_lamp"), ("Params", "sp_lamp", "sp_lamp"),
         ("Params", "l1", "sp_lamp"), ("FLOPs", "sp_lamp", "halp"))  # (budget at 0.5, importance, solver)
REPORT_FIELDS = ("flops_before", "flops_after", "params_before", "params_after", "predicted_before",
                 "predicted_after")
THREADS = 2
MARK = "RESULT "  # prefixes the child's JSON line on stdout


# --- in a subprocess, with one tree importable ------------------------------------------------------
def check_tree(tree: str) -> str:
    """Raise unless every loaded fxprune module lives in ``tree``; return fxprune.__file__."""
    import fxprune
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if name.split(".")[0] == "fxprune" and file and not Path(file).resolve().is_relative_to(tree):
            raise AssertionError(f"{name} was imported from {file}, not from {tree}")
    return fxprune.__file__


def child(spec: dict) -> dict:
    import torch
    import fxprune
    import fxprune.testing
    torch.set_num_threads(THREADS)
    result: dict = {"file": check_tree(spec["tree"]), "torch": torch.__version__, "cases": [], "times": []}
    for budget, importance, solver in CASES if spec["task"] == "plans" else ():
        case: dict = {"budget": budget, "importance": importance, "solver": solver}
        start = time.perf_counter()
        try:
            torch.manual_seed(0)
            model, inputs = fxprune.testing.build_torchvision_model(spec["model"])
            pruned = fxprune.compile(model, getattr(fxprune, budget)(0.5), inputs, importance=importance,
                                     solver=solver)
            plan, report = fxprune.plan_of(pruned).to_json(), fxprune.report(pruned)
            case.update(sha256=hashlib.sha256(plan.encode()).hexdigest(),  # the plan itself is not kept: 80 KB/model
                        keep={gid: len(idx) for gid, idx in json.loads(plan).items()},
                        **{field: getattr(report, field) for field in REPORT_FIELDS})
        except Exception as error:  # recorded: one failing case must not hide the others
            case["error"] = f"{type(error).__name__}: {error}"[:300]
        case["seconds"] = time.perf_counter() - start
        result["cases"].append(case)
    if spec["task"] == "analysis":
        result["models"] = {name: _analysis(name, spec["timeout"]) for name in spec["models"]}
    if spec["task"] == "speed":
        import torchvision
        torch.manual_seed(0)
        model = torchvision.models.get_model(spec["model"], weights=None).eval()
        inputs = (torch.randn(1, 3, 224, 224),)
        for _ in range(1 + spec["repeats"]):  # the first is the warm-up
            start = time.perf_counter()
            fxprune.compile(model, fxprune.FLOPs(0.5), inputs, solver="sp_lamp")
            result["times"].append(time.perf_counter() - start)
        result["times"] = result["times"][1:]
    check_tree(spec["tree"])  # again: compile imports its passes lazily
    return result


def _analysis(name: str, timeout: int) -> dict:
    """Groups of one timm model (random weights, seed 0) and the masked-reference error of a random plan."""
    import timm
    import timm.layers._fx as timm_fx
    import torch

    import fxprune
    from fxprune.testing import masked_forward, randomize_parameters

    def give_up(*_):
        raise TimeoutError(f"over {timeout} s")

    signal.signal(signal.SIGALRM, give_up)
    signal.alarm(timeout)
    start = time.perf_counter()
    try:
        torch.manual_seed(0)
        model = randomize_parameters(timm.create_model(name, pretrained=False).eval())
        size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
        inputs = (torch.randn(1, *size, generator=torch.Generator().manual_seed(0)),)
        gm = fxprune.analyze(model, inputs, leaf_modules=list(timm_fx.get_notrace_modules()),
                             autowrap_functions=list(timm_fx.get_notrace_functions()))
        groups = fxprune.groups(gm)
        record = {"groups": len(groups), "prunable_groups": sum(g.prunable for g in groups),
                  "prunable_channels": sum(g.size for g in groups if g.prunable)}
        plan = fxprune.random_plan(gm, 0.5, seed=0, include_norm_coupled=False)
        with torch.no_grad():
            expected, actual = masked_forward(gm, plan, *inputs), fxprune.prune(gm, plan)(*inputs)
        record["masked_rel_err"] = float((actual - expected).abs().max() / expected.abs().max())
    except Exception as error:  # noqa: BLE001 - recorded per model
        record = {"error": f"{type(error).__name__}: {error}"[:200]}
    finally:
        signal.alarm(0)
    record["seconds"] = round(time.perf_counter() - start, 1)
    return record


# --- the driver ------------------------------------------------------------------------------------
def run_child(tree: Path, **spec) -> dict:
    """``child(spec)`` in a subprocess that imports fxprune from ``tree``; {'error': ...} if it failed."""
    path = tree / "src" if (tree / "src" / "fxprune").is_dir() else tree
    try:
        done = subprocess.run([sys.executable, __file__, "--child", json.dumps({"tree": str(tree), **spec})],
                              env={**os.environ, "PYTHONPATH": str(path)}, cwd=path, capture_output=True,
                              text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        return {"error": "timed out after 1800 s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode or not lines:
        return {"error": f"exit {done.returncode}: " + (done.stderr.strip().splitlines() or [""])[-1][:300]}
    return json.loads(lines[-1][len(MARK):])


def git(tree: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True).stdout.strip()


def describe(tree: Path) -> str:
    dirty = ", with uncommitted changes" if git(tree, "status", "--porcelain", "--untracked-files=no") else ""
    return f"`{tree}` (commit {git(tree, 'rev-parse', '--short', 'HEAD') or '?'}{dirty})"


def compare(before: dict, after: dict) -> list[str]:
    """Same plan, FLOPs shares, params shares and a note, for one case in the two trees."""
    if "error" in before or "error" in after:
        errors = [f"{key}: {case['error']}" for key, case in (("before", before), ("after", after)) if "error" in case]
        return ["error", "", "", "; ".join(errors)]
    if before["sha256"] == after["sha256"]:
        differ = [f"{f} {before[f]:.4g} -> {after[f]:.4g}" for f in REPORT_FIELDS if before[f] != after[f]]
        return ["yes", "", "", "report differs: " + ", ".join(differ) if differ else ""]
    shares = [" / ".join(f"{c[what + '_after'] / c[what + '_before']:.2%}" for c in (before, after))
              for what in ("flops", "params")]
    groups = {*before["keep"], *after["keep"]}
    differ = sum(before["keep"].get(g) != after["keep"].get(g) for g in groups)
    return ["no", *shares, f"keep counts differ in {differ} of {len(groups)} groups"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="source tree of fxprune before the refactor")
    parser.add_argument("--after", type=Path, help="source tree after it")
    parser.add_argument("--models", nargs="*", default=PLAN_MODELS, help="models for the plan comparison")
    parser.add_argument("--timm", nargs="*", default=[], help="timm models for the analysis comparison")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per timm model")
    parser.add_argument("--output", type=Path, default=Path("out/before_after"), help="<output>.md and .json")
    parser.add_argument("--speed-models", nargs="*", default=SPEED_MODELS)
    parser.add_argument("--repeats", type=int, default=3, help="timed compiles per subprocess")
    parser.add_argument("--rounds", type=int, default=1, help="subprocesses per tree and speed model")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(MARK + json.dumps(child(json.loads(args.child))), flush=True)
        return
    if not (args.before and args.after):
        parser.error("--before and --after are required")
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    command = "python " + shlex.join(sys.argv)
    out: dict = {"command": command, "date": datetime.datetime.now().isoformat(timespec="seconds"),
                 "trees": {k: str(t) for k, t in trees.items()}, "plans": {k: {} for k in trees},
                 "speed": {k: {m: [] for m in args.speed_models} for k in trees}, "analysis": {}}
    for key, tree in trees.items():
        probe = run_child(tree, task="probe")
        assert "error" not in probe, f"{key} tree {tree}: {probe['error']}"
        print(f"{key}: fxprune from {probe['file']}, torch {probe['torch']}", flush=True)
    for model in args.models:
        for key, tree in trees.items():
            result = out["plans"][key][model] = run_child(tree, task="plans", model=model)
            failed = [c for c in result.get("cases", [result]) if "error" in c]
            print(f"plans {model} {key}: {len(failed)} error(s)", *(c["error"] for c in failed[:1]), flush=True)
    for key, tree in trees.items():
        if args.timm:
            result = run_child(tree, task="analysis", models=args.timm, timeout=args.timeout)
            out["analysis"][key] = result.get("models") or {m: result for m in args.timm}
            print(f"analysis {key}: {sum('error' in r for r in out['analysis'][key].values())} error(s)", flush=True)
    out["load_before_timing"] = os.getloadavg()[0]
    for r in range(args.rounds):
        for i, model in enumerate(args.speed_models):
            for key in ("before", "after")[::1 if (r + i) % 2 == 0 else -1]:
                result = run_child(trees[key], task="speed", model=model, repeats=args.repeats)
                out["speed"][key][model].append(result)
                print(f"speed {model} {key}: {result.get('error', result['times'])}", flush=True)
    out["load_after_timing"] = os.getloadavg()[0]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    text = markdown(out, args)
    args.output.with_suffix(".md").write_text(text)
    print(text)


def row(*cells: str) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def markdown(out: dict, args: argparse.Namespace) -> str:
    trees, command = {k: Path(t) for k, t in out["trees"].items()}, out["command"]
    lines = ["# fxprune before/after refactor check", "", f"`{command}`, {out['date']}.", "",
             f"Before: {describe(trees['before'])}. After: {describe(trees['after'])}.", "",
             "## Plans", "", "`fxprune.compile` of `fxprune.testing.build_torchvision_model` (seed 0, small "
             "inputs), budgets at 0.5; plans compared by sha256 of `plan_of(pruned).to_json()`. Where they "
             "differ: FLOPs and params after/before pruning (report), before / after tree.", "",
             "| model | budget | importance | solver | same plan | FLOPs share | params share | note |",
             "|---|---|---|---|---|---|---|---|"]
    for model in args.models:
        before, after = ([r] * len(CASES) if "error" in r else r["cases"] for r in
                         (out["plans"][k][model] for k in trees))
        lines += [row(model, f"{b}(0.5)", i, s, *compare(*pair)) for (b, i, s), pair in zip(CASES, zip(before, after))]
    lines += ["", "## Compile speed", "", f"`fxprune.compile` at 1x3x224x224, random weights, FLOPs(0.5), solver "
              f"sp_lamp, {THREADS} torch threads, {os.cpu_count()} CPU cores: median of {args.repeats} timed "
              f"compiles after a warm-up, in {args.rounds} subprocess(es) per tree and model, trees alternating. "
              f"1-minute load average {out['load_before_timing']:.1f} before, {out['load_after_timing']:.1f} "
              "after the timing.", "", "| model | before (s) | after (s) | after / before |", "|---|---|---|---|"]
    for model in args.speed_models:
        runs = {key: out["speed"][key][model] for key in trees}
        errors = [f"{key}: {run['error']}" for key in trees for run in runs[key] if "error" in run]
        if errors:
            lines.append(row(model, "error", "error", "; ".join(errors)))
            continue
        median = {key: statistics.median(t for run in runs[key] for t in run["times"]) for key in trees}
        lines.append(row(model, *(f"{median[k]:.2f}" for k in trees), f"{median['after'] / median['before']:.2f}"))
    if args.timm:
        lines += _analysis_markdown(out["analysis"], args.timm)
    return "\n".join(lines) + "\n"


def _analysis_markdown(analysis: dict, models: list[str]) -> list[str]:
    """One row per timm model whose analysis differs between the trees (or failed), and the count of the rest."""
    fields = ("groups", "prunable_groups", "prunable_channels")
    lines = ["", "## timm analysis", "", "Random weights (seed 0), the configured input size, timm's untraceable "
             "modules kept opaque; a random plan keeping half of every group no LayerNorm mixes, against the "
             "masked reference. Rows: the models whose groups differ between the trees, or that failed.", "",
             "| model | groups | prunable groups | prunable channels | masked error (after) | note |",
             "|---|---|---|---|---|---|"]
    same = 0
    for model in models:
        before, after = analysis["before"][model], analysis["after"][model]
        if "error" not in before and "error" not in after and all(before[f] == after[f] for f in fields):
            same += 1
            continue
        cells = [" / ".join(str(r.get(f, "-")) for r in (before, after)) for f in fields]
        error = f"{after['masked_rel_err']:.1e}" if "masked_rel_err" in after else "-"
        note = "; ".join(f"{k}: {r['error']}" for k, r in (("before", before), ("after", after)) if "error" in r)
        lines.append(row(model, *cells, error, note))
    worst = max((r["masked_rel_err"] for r in analysis["after"].values() if "masked_rel_err" in r), default=None)
    lines += ["", f"{same} of {len(models)} models: the same groups, prunable groups and prunable channels in "
              f"both trees. Largest masked-reference error after: {worst:.1e}." if worst is not None else ""]
    return lines


if __name__ == "__main__":
    main()
