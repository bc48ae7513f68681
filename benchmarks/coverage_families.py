"""Coverage by family: models users ship beyond torchvision classification, through fxprune.compile.

Families (``fxprune.zoo``, random weights, built from configs or yaml, nothing downloaded): Hugging Face
vision and text models, ultralytics YOLO (the whole detection model), segmentation_models_pytorch,
torchvision video, torchvision detection backbones, whole torchvision detectors (captured in parts) and
RAFT; ``--timm`` adds one model of every timm family.

Per model, each in its own subprocess: which capture path took it; ``fxprune.compile(model, FLOPs(0.7))``
and its FLOPs ratio; whether the user's model was left untouched (every tensor of its state_dict
compared) and the pruned model returns the same output structure; parity with the masked reference for
a random plan on the groups no normalization mixes; ``fxprune.export_onnx`` and its max difference in
onnxruntime; compile and export seconds; the reason for any failure. Writes docs/coverage_families.json
and docs/coverage_families.md.

    python benchmarks/coverage_families.py                      # every family (about 15 minutes on 2 cores)
    python benchmarks/coverage_families.py hf_text/gpt2 yolo/yolov8n   # a few models
    python benchmarks/coverage_families.py --timm --resume      # add timm's families (hours)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"
RESULTS = DOCS / "coverage_families.json"
BUDGET = 0.7


def _leaves(value) -> list:
    import torch.utils._pytree as pytree

    return [x for x in pytree.tree_leaves(value) if hasattr(x, "shape")]


def measure(key: str) -> dict:
    """One model through capture, compile, parity and export; every figure is measured here."""
    import torch
    import torch.utils._pytree as pytree

    import fxprune
    from fxprune import zoo
    from fxprune.passes.pipeline import analyze_inputs
    from fxprune.passes.pipeline import prune as prune_graph
    from fxprune.testing import masked_forward, randomize_parameters

    torch.set_num_threads(2)
    family, name = key.split("/")
    record: dict = {"family": family, "model": name}
    if family == "timm":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from coverage import build_timm

        model, inputs = build_timm(name)
    else:
        model, inputs = zoo.build(family, name)
        model = randomize_parameters(model)
    args, kwargs = (inputs, {}) if isinstance(inputs, tuple) else ((), inputs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(*args, **kwargs)
    start = time.perf_counter()
    pruned = fxprune.compile(model, fxprune.FLOPs(BUDGET), inputs, progress=False)
    record["compile_s"] = round(time.perf_counter() - start, 1)
    report = fxprune.report(pruned)
    record["capture"] = report.capture + (f" ({len(report.parts)} parts)" if report.parts else "")
    record["flops_ratio"] = round(report.flops_after / report.flops_before, 4)
    record["groups_pruned"] = sum(g.kept < g.total for g in report.groups)
    record["heads"] = next((n.split(": ", 1)[1] for n in report.notes if n.startswith("attention heads kept")), None)
    record["untouched"] = all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    record["returned"] = type(pruned).__name__
    record["returned_why"] = next((n for n in report.notes if n.startswith("returned ") and "fail verification" in n),
                                  None)
    record["own_class"] = type(pruned) is type(model) and record["returned_why"] is None
    record["shapes_checked"] = report.shapes_checked
    with torch.no_grad():
        actual = pruned(*args, **kwargs)
    record["same_structure"] = pytree.tree_structure(actual) == pytree.tree_structure(expected)

    gm, flat = analyze_inputs(model, inputs)
    groups = fxprune.groups(gm)
    record["groups"], record["prunable_groups"] = len(groups), sum(g.prunable for g in groups)
    frozen: dict[str, int] = {}
    for g in groups:  # channels frozen, by first reason, the model's own inputs and outputs left out
        reason = _short_reason(g.frozen_reason) if g.frozen_reason else None
        if reason and not reason.startswith(("model input", "model output")):
            frozen[reason] = frozen.get(reason, 0) + g.size
    record["frozen"] = dict(sorted(frozen.items(), key=lambda item: -item[1])[:4])
    plan = fxprune.random_plan(gm, 0.5, seed=0, include_norm_coupled=False)
    if plan.keep:
        with torch.no_grad():
            reference, masked_pruned = masked_forward(gm, plan, *flat), prune_graph(gm, plan)(*flat)
        errors = [float((a - b).abs().max() / max(float(b.abs().max()), 1e-12))
                  for a, b in zip(_leaves(masked_pruned), _leaves(reference)) if a.shape == b.shape and b.numel()]
        record["masked_rel_err"] = max(errors) if errors else None
    else:
        record["masked_rel_err"] = None
    del gm
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        try:
            result = fxprune.export_onnx(pruned, Path(tmp) / "model.onnx", inputs)
            record["export"] = f"ok ({result.exporter}, max abs diff {result.max_abs_diff:.1e})"
            record["export_ok"] = True
        except fxprune.FxpruneError as err:
            record["export"] = "failed: " + str(err).splitlines()[0][:200]
            record["export_ok"] = False
        record["export_s"] = round(time.perf_counter() - start, 1)
    record["ok"] = passes(record)
    return record


def passes(record: dict) -> bool:
    """Every check: the budget met, the model untouched, its output structure, the masked reference (to
    1e-4, where a plan could be drawn), the export matching in onnxruntime."""
    return bool("error" not in record and record["untouched"] and record["same_structure"] and record["export_ok"]
                and (record.get("own_class") or record.get("returned_why") is not None)
                and len(record.get("shapes_checked", [])) >= 3
                and record["flops_ratio"] <= BUDGET + 1e-6
                and (record["masked_rel_err"] is None or record["masked_rel_err"] < 1e-4))


def _short_reason(reason: str) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from coverage import _short_reason as short

    return short(reason)


def _all_models(timm: bool) -> list[str]:
    from fxprune import zoo

    keys = [f"{family}/{name}" for family, models in zoo.FAMILIES.items() for name in models]
    if timm:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from coverage import timm_families

        keys += [f"timm/{name}" for name in timm_families().values()]
    return keys


def _write_markdown(records: list[dict]) -> None:
    import torch
    import transformers

    lines = [
        "# Coverage by family: models users ship, through `fxprune.compile`",
        "",
        f"Generated by `python benchmarks/coverage_families.py` (torch {torch.__version__}, transformers "
        f"{transformers.__version__}, {os.cpu_count()} CPU cores). Random weights; Hugging Face models from small "
        "configs, YOLO from its yaml, nothing downloaded (`fxprune/zoo.py` builds each). No wrapper code: each "
        "model and its example inputs (a tuple, or a dict of keyword inputs) go to `fxprune.compile` as they are.",
        "",
        "- **capture**: the path that took the model (`auto` tries torch.fx, then torch.export non-strict, then strict).",
        f"- **FLOPs**: after/before for `compile(model, FLOPs({BUDGET}))`; **groups**: groups pruned / prunable.",
        "- **heads**: attention heads kept per layer, where heads are a group.",
        "- **untouched**: every tensor of the user's state_dict unchanged; **structure**: the pruned model "
        "returns the same pytree (a `ModelOutput`, dicts, tuples) as the original.",
        "- **masked err**: max relative difference between the model pruned to a random plan (half of every group "
        "no normalization mixes) and the unpruned model with those channels masked: the equivalence check.",
        "- **returned**: the class compile returned: the model's own (its modules pruned on a copy), or the pruned "
        "graph with the reason; **shapes checked**: the input shapes at which the returned model was verified "
        "(the example against the pruned graph; the others against the masked original model).",
        "- **export**: `fxprune.export_onnx` on the compiled model, checked and compared in onnxruntime.",
        "- **frozen**: channels kept whole, by first reason (the model's own inputs and outputs left out); an "
        "op no rule knows appears as `consumed by <op>`.",
        "",
        "| family | model | capture | FLOPs | groups | heads | untouched | structure | returned | shapes checked | "
        "masked err | compile s | export | export s | frozen |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['family']} | {r['model']} | – | – | – | – | – | – | – | – | – | – | **failed**: {r['error']} "
                         "| – | – |")
            continue
        err = ("–" if r["masked_rel_err"] is None else "nan (reference not finite)" if r["masked_rel_err"] != r["masked_rel_err"]
               else f"{r['masked_rel_err']:.1e}")
        lines.append(
            f"| {r['family']} | {r['model']} | {r['capture']} | {r['flops_ratio']:.3f} | "
            f"{r['groups_pruned']}/{r['prunable_groups']} | {r['heads'] or '–'} | {'yes' if r['untouched'] else 'NO'} | "
            f"{'same' if r['same_structure'] else 'DIFFERENT'} | {_returned(r)} | {'; '.join(r.get('shapes_checked', []))} | "
            f"{err} | {r['compile_s']} | {r['export']} | "
            f"{r['export_s']} | {'; '.join(f'{n}: {why}' for why, n in r.get('frozen', {}).items()) or '–'} |")
    lines += ["", "## Summary", "", "All checks: FLOPs within the budget, untouched, same structure, the model's own class "
              "returned (or the graph with the reason), verified at 3 shapes or more, masked err below 1e-4, export ok.", "", "| family | models | all checks pass | share |", "|---|---|---|---|"]
    families = list(dict.fromkeys(r["family"] for r in records))
    for family in families:
        rows = [r for r in records if r["family"] == family]
        good = sum(passes(r) for r in rows)
        lines.append(f"| {family} | {len(rows)} | {good} | {good / len(rows):.0%} |")
    (DOCS / "coverage_families.md").write_text("\n".join(lines) + "\n")


def _returned(record: dict) -> str:
    if "returned" not in record:
        return "–"
    if record["own_class"]:
        return f"{record['returned']} (own class)"
    return f"{record['returned']}, not its own modules: {(record['returned_why'] or '').split(': ', 2)[-1][:160]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="family/model keys (default: every family)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child process mode
    parser.add_argument("--timm", action="store_true", help="add one model of every timm family")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per model")
    parser.add_argument("--resume", action="store_true", help="skip models already in the JSON results")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return
    order = _all_models(args.timm or any(k.startswith("timm/") for k in args.models))
    keys = args.models or order
    records = {f"{r['family']}/{r['model']}": r for r in json.loads(RESULTS.read_text())} if RESULTS.exists() else {}
    for key in keys:
        if args.resume and key in records:
            continue
        start = time.perf_counter()
        family, name = key.split("/")
        try:
            proc = subprocess.run([sys.executable, __file__, "--one", key], capture_output=True, text=True,
                                  timeout=args.timeout)
            if proc.returncode == 0:
                records[key] = json.loads(proc.stdout.strip().splitlines()[-1])
            else:
                lines = [line for line in proc.stderr.strip().splitlines() if "Error" in line] or ["exit %d" % proc.returncode]
                records[key] = {"family": family, "model": name, "error": lines[-1][:300]}
        except subprocess.TimeoutExpired:
            records[key] = {"family": family, "model": name, "error": f"timed out after {args.timeout} s"}
        print(f"{key}: {time.perf_counter() - start:.0f}s {records[key].get('export', records[key].get('error'))}",
              flush=True)
        ordered = [records[k] for k in dict.fromkeys([*order, *records]) if k in records]
        RESULTS.write_text(json.dumps(ordered, indent=1) + "\n")
        _write_markdown(ordered)


if __name__ == "__main__":
    main()
