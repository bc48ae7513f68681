"""INT8: pruning for the INT8 model's latency, against pruning for FP32 latency and quantizing afterwards.

    python benchmarks/int8.py                                     # writes docs/int8.md and docs/int8.json
    python benchmarks/int8.py --models resnet18 --budgets 0.5
    python benchmarks/int8.py --from-docs --models mobilenet_v2 --budgets 0.3 --again   # replaces one row

For each model (random weights, batch 1, 224x224, onnxruntime CPU, 2 threads) and budget b:

1. *INT8-aware*: ``fxprune.compile(model, Latency(b), engine="onnxruntime-int8")`` (tables, step and closed
   loop on the quantized models);
2. *FP32-aware at equal FLOPs*: ``fxprune.compile(model, Latency(b'), engine="onnxruntime", refine=0)``
   with b' bisected until the plan keeps the FLOPs the INT8-aware plan kept (``fxprune.count_flops``);
3. the unpruned model and both plans exported and quantized the same way
   (``export_onnx(..., quantize="int8")``, calibrated on 8 random batches) and timed here, not by
   fxprune: one onnxruntime session per file, each plan in its own pairs of rounds of 0.1 s with the
   unpruned model (round-robin, only those two sessions loaded), the 10% quantile of each round, a plan's
   share the median over pairs of its round / the unpruned round.

A budget the INT8 engine cannot reach (``BudgetError``: the smallest plan it can build measures over
it) is recorded with the smallest share the error names, and counted as a miss.

The INT8-aware plan's prediction is what its report says (``predicted_latency_ms_after`` over
``predicted_latency_ms_before``), its error that against the share measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torchvision

import fxprune
from fxprune.cache import LatencyCache
from fxprune.errors import BudgetError

MODELS = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf")
BUDGETS = (0.3, 0.5, 0.7)
DOCS = Path(__file__).resolve().parent.parent / "docs"
INPUTS = (torch.randn(1, 3, 224, 224),)
FLOPS_TOLERANCE = 0.05  # "equal FLOPs": the FP32-aware plan within 5% of the INT8-aware plan's FLOPs


def _build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None).eval()


def _fp32_at_flops(model, flops: float, cache: LatencyCache, steps: int) -> tuple[torch.nn.Module, float]:
    """The FP32-latency plan whose FLOPs are closest to ``flops``: its latency budget bisected."""
    low, high, best = 0.05, 1.0, None
    for _ in range(steps):
        budget = (low + high) / 2
        try:
            pruned = fxprune.compile(model, fxprune.Latency(budget), INPUTS, cache=cache, refine=0, progress=False)
        except BudgetError:
            low = budget
            continue
        kept = fxprune.count_flops(pruned, INPUTS)
        if best is None or abs(kept - flops) < abs(best[1] - flops):
            best = (pruned, kept, budget)
        low, high = (budget, high) if kept < flops else (low, budget)
    return best[0], best[2]


def _independent_shares(reference: Path, plans: list[Path], rounds: int, seconds: float = 0.1) -> list[float]:
    """Each plan's latency over the reference's, timed in its own round-robin pairs of rounds by plain
    onnxruntime sessions (only the reference and that plan loaded)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 2, 1

    def session(path: Path):
        loaded = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {loaded.get_inputs()[0].name: INPUTS[0].numpy()}
        for _ in range(3):
            loaded.run(None, feed)
        return loaded, feed

    def quiet_round(loaded, feed) -> float:
        times, start = [], time.perf_counter()
        while len(times) < 3 or time.perf_counter() - start < seconds:
            begin = time.perf_counter()
            loaded.run(None, feed)
            times.append(time.perf_counter() - begin)
        return float(np.quantile(times, 0.1))

    base, shares = session(reference), []
    for path in plans:
        plan = session(path)
        shares.append(float(np.median([quiet_round(*plan) / quiet_round(*base) for _ in range(rounds)])))
        del plan
    return shares


def run_model(name: str, budgets, rounds: int, cache_root: Path, steps: int) -> dict:
    model = _build(name)
    calibration = [torch.randn(1, 3, 224, 224) for _ in range(8)]
    cache = LatencyCache(cache_root / name)
    flops_before = fxprune.count_flops(model, INPUTS)
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        fxprune.export_onnx(model, folder / "base.onnx", INPUTS, quantize="int8", calibration=calibration)
        for budget in budgets:
            start = time.perf_counter()
            try:
                aware = fxprune.compile(model, fxprune.Latency(budget), INPUTS, engine="onnxruntime-int8",
                                        cache=cache, calibration=[(x, None) for x in calibration], progress=False)
            except BudgetError as error:
                found = re.search(r"\(([0-9.]+) of the model\)", str(error))
                smallest = float(found.group(1)) if found else None
                print(f"{name} {budget}: BudgetError on the INT8 engine (smallest plan {smallest})", flush=True)
                cases.append({"budget": budget, "unreachable": True, "smallest_share": smallest,
                              "compile_s": time.perf_counter() - start, "within_1_05": False})
                continue
            compile_s = time.perf_counter() - start
            report = fxprune.report(aware)
            flops = fxprune.count_flops(aware, INPUTS)
            fp32, fp32_budget = _fp32_at_flops(model, flops, cache, steps)
            fp32_flops = fxprune.count_flops(fp32, INPUTS)
            paths = [folder / f"{name}_{budget}_{kind}.onnx" for kind in ("int8aware", "fp32aware")]
            exports = [fxprune.export_onnx(m, p, INPUTS, quantize="int8", calibration=calibration)
                       for m, p in zip((aware, fp32), paths)]
            aware_share, fp32_share = _independent_shares(folder / "base.onnx", paths, rounds)
            predicted = report.predicted_latency_ms_after / report.predicted_latency_ms_before
            case = {"budget": budget, "compile_s": compile_s, "predicted_share": predicted,
                    "tables_share": (report.predicted_latency_ms_tables_after or report.predicted_latency_ms_after)
                    / report.predicted_latency_ms_before, "prediction": report.latency_prediction,
                    "int8_aware_share": aware_share, "fp32_aware_share": fp32_share,
                    "int8_aware_flops": flops / flops_before, "fp32_aware_flops": fp32_flops / flops_before,
                    "fp32_budget": fp32_budget, "error": predicted / aware_share - 1,
                    "within_1_05": aware_share <= 1.05 * budget, "int8_aware_faster": aware_share < fp32_share,
                    "top1_agreement": [e.int8_top1_agreement for e in exports]}
            print(f"{name} {budget}: INT8-aware {aware_share:.3f} (predicted {predicted:.3f}, FLOPs "
                  f"{case['int8_aware_flops']:.3f}) vs FP32-aware {fp32_share:.3f} (FLOPs {case['fp32_aware_flops']:.3f},"
                  f" its FP32 budget {fp32_budget:.3f}); compile {compile_s:.0f}s", flush=True)
            cases.append(case)
    return {"model": name, "cases": cases}


def _equal_flops(case: dict) -> bool:
    return abs(case["fp32_aware_flops"] / case["int8_aware_flops"] - 1) <= FLOPS_TOLERANCE


def write_docs(results: list[dict], args, seconds: float) -> None:
    unreachable = [(r["model"], c) for r in results for c in r["cases"] if c.get("unreachable")]
    cases = [(r["model"], c) for r in results for c in r["cases"] if not c.get("unreachable")]
    equal = [(n, c) for n, c in cases if _equal_flops(c)]
    faster = sum(c["int8_aware_faster"] for _, c in equal)
    within, attempted = sum(c["within_1_05"] for _, c in cases), len(cases) + len(unreachable)
    errors = [abs(c["error"]) for _, c in cases]
    ratios = [c["int8_aware_share"] / c["fp32_aware_share"] for _, c in equal]
    command = "python benchmarks/int8.py" + (f" --models {' '.join(args.models)}" if args.models != list(MODELS) else "")
    command += f" --budgets {' '.join(map(str, args.budgets))}" if args.budgets != list(BUDGETS) else ""
    command += f" --steps {args.steps}" if args.steps != 7 else ""
    command += " --from-docs" * args.from_docs + " --again" * args.again
    merged = (" Rows of other models and budgets are the previous docs/int8.json's (`--from-docs`), run with the "
              "fxprune of their day.") if args.from_docs else ""
    lines = [
        "# INT8: pruning for the quantized model's latency", "",
        f"Generated by `{command}` (torch {torch.__version__}, onnxruntime {ort.__version__}, {os.cpu_count()} CPU "
        f"cores, 2 threads, {time.strftime('%Y-%m-%d')}, {seconds / 60:.0f} min). Random weights, batch 1, 224x224. "
        "Every file is quantized the same way (`export_onnx(..., quantize=\"int8\")`: QDQ, int8 weights per channel, "
        "uint8 activations calibrated on 8 random batches) and timed by this script, not by fxprune: one onnxruntime "
        "session per file, 2 threads, each plan in its own pairs of rounds of 0.1 s with the unpruned INT8 model (only "
        f"those two sessions loaded), the 10% quantile of each round, a share the median over {args.rounds} pairs of "
        f"plan / unpruned.{merged}", "",
        "*INT8-aware*: `fxprune.compile(model, Latency(b), engine=\"onnxruntime-int8\")`. *FP32-aware*: "
        "`fxprune.compile(model, Latency(b'), engine=\"onnxruntime\", refine=0)`, b' bisected until the plan keeps "
        "the FLOPs the INT8-aware plan kept, then quantized the same way.", "",
        "## Summary", "",
        f"- INT8-aware plan faster on the INT8 engine than the FP32-aware plan at equal FLOPs: **{faster} of "
        f"{len(equal)}** (median ratio INT8-aware / FP32-aware {statistics.median(ratios):.3f}, range "
        f"{min(ratios):.3f}-{max(ratios):.3f}); cases where the bisection could not bring the FP32-aware plan within "
        f"{FLOPS_TOLERANCE:.0%} of the INT8-aware plan's FLOPs are left out of this count: "
        + (", ".join(f"{n} {c['budget']}" for n, c in cases if not _equal_flops(c)) or "none") + ".",
        f"- INT8-aware plan's measured INT8 share within 1.05 x budget: **{within} of {attempted}** "
        f"({len(unreachable)} budgets the INT8 engine refused as unreachable, counted as misses"
        + (": " + ", ".join(f"{n} {c['budget']} (smallest plan {c['smallest_share']})" for n, c in unreachable)
           if unreachable else "") + ").",
        f"- Prediction error |predicted / measured - 1| on the INT8 engine: median {statistics.median(errors):.1%}, "
        f"worst {max(errors):.1%}.", "",
        "| model | budget | INT8-aware share (predicted) | FP32-aware share | FLOPs kept: INT8-aware / FP32-aware | "
        "FP32 budget b' | error | within 1.05 x | top-1 agreement INT8 vs FP32 (aware / FP32-aware) |",
        "|---|---|---|---|---|---|---|---|---|"]
    for name, c in cases:
        agreement = " / ".join(f"{a:.0%}" if a is not None else "-" for a in c["top1_agreement"])
        lines.append(f"| {name} | {c['budget']} | {c['int8_aware_share']:.3f} ({c['predicted_share']:.3f}, "
                     f"{c['prediction']}) | {c['fp32_aware_share']:.3f} | {c['int8_aware_flops']:.1%} / "
                     f"{c['fp32_aware_flops']:.1%} | {c['fp32_budget']:.3f} | {c['error']:+.1%} | "
                     f"{'yes' if c['within_1_05'] else '**no**'} | {agreement} |")
    for name, c in unreachable:
        lines.append(f"| {name} | {c['budget']} | BudgetError: the smallest plan is {c['smallest_share']} of the "
                     "unpruned INT8 model | - | - | - | - | **no** | - |")
    lines += ["", "Top-1 agreement is over the 9 batches the file was calibrated and checked on (random inputs: a "
              "sanity check of the quantized file, not an accuracy figure)."]
    (DOCS / "int8.md").write_text("\n".join(lines) + "\n")
    (DOCS / "int8.json").write_text(json.dumps(results, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    parser.add_argument("--rounds", type=int, default=16, help="round-robin rounds per case")
    parser.add_argument("--steps", type=int, default=7, help="bisection steps for the FP32-aware plan's budget")
    parser.add_argument("--out", default="out/int8", help="per-model results; a budget found there is not re-run")
    parser.add_argument("--again", action="store_true", help="run --budgets again where results are saved")
    parser.add_argument("--from-docs", action="store_true",
                        help="start from docs/int8.json's results (so --models/--budgets replace only their rows)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start, results = time.perf_counter(), []
    documented = {r["model"]: r for r in json.loads((DOCS / "int8.json").read_text())} if args.from_docs else {}
    names = list(documented) + [name for name in args.models if name not in documented]
    with tempfile.TemporaryDirectory() as cache_root:
        for name in names:
            saved = out / f"{name}.json"
            result = json.loads(saved.read_text()) if saved.exists() else documented.get(name, {"model": name, "cases": []})
            have = {c["budget"] for c in result["cases"]} if not args.again else set()
            todo = [b for b in args.budgets if b not in have] if name in args.models else []
            if todo:  # per budget: the cases run now replace saved ones at the same budget
                ran = run_model(name, todo, args.rounds, Path(cache_root), args.steps)["cases"]
                kept = [c for c in result["cases"] if c["budget"] not in todo]
                result = {"model": name, "cases": sorted(kept + ran, key=lambda c: c["budget"])}
                saved.write_text(json.dumps(result, indent=1) + "\n")
            results.append(result)
    write_docs(results, args, time.perf_counter() - start)


if __name__ == "__main__":
    main()
