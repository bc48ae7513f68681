"""INT8: pruning for the INT8 model's latency, against pruning for FP32 latency and quantizing afterwards.

    python benchmarks/int8.py                                     # writes docs/int8.md and docs/int8.json
    python benchmarks/int8.py --models resnet18 --budgets 0.5

For each model (random weights, batch 1, 224x224, onnxruntime CPU, 2 threads) and budget b:

1. *INT8-aware*: ``fxprune.compile(model, Latency(b), engine="onnxruntime-int8")`` (tables, step and closed
   loop on the quantized models);
2. *FP32-aware at equal FLOPs*: ``fxprune.compile(model, Latency(b'), engine="onnxruntime", refine=0)``
   with b' bisected until the plan keeps the FLOPs the INT8-aware plan kept (``fxprune.count_flops``);
3. the unpruned model and both plans exported and quantized the same way
   (``export_onnx(..., quantize="int8")``, calibrated on 8 random batches) and timed here, not by
   fxprune: one onnxruntime session per file, rounds of 0.1 s round-robin over the three files, the 10%
   quantile of each round, a plan's share the median over rounds of its round / the unpruned round.

The INT8-aware plan's prediction is what its report says (``predicted_latency_ms_after`` over
``predicted_latency_ms_before``), its error that against the share measured here.
"""

from __future__ import annotations

import argparse
import json
import os
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
    """Each plan's latency over the reference's, timed round-robin by plain onnxruntime sessions."""
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
    sessions = [ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for p in [reference, *plans]]
    feeds = [{s.get_inputs()[0].name: INPUTS[0].numpy()} for s in sessions]
    for session, feed in zip(sessions, feeds):
        for _ in range(3):
            session.run(None, feed)
    ratios: list[list[float]] = [[] for _ in plans]
    for _ in range(rounds):
        quiet = []
        for session, feed in zip(sessions, feeds):
            times, start = [], time.perf_counter()
            while len(times) < 3 or time.perf_counter() - start < seconds:
                begin = time.perf_counter()
                session.run(None, feed)
                times.append(time.perf_counter() - begin)
            quiet.append(float(np.quantile(times, 0.1)))
        for index in range(len(plans)):
            ratios[index].append(quiet[index + 1] / quiet[0])
    return [float(np.median(r)) for r in ratios]


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
            aware = fxprune.compile(model, fxprune.Latency(budget), INPUTS, engine="onnxruntime-int8",
                                    cache=cache, calibration=[(x, None) for x in calibration], progress=False)
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


def write_docs(results: list[dict], args, seconds: float) -> None:
    cases = [(r["model"], c) for r in results for c in r["cases"]]
    faster = sum(c["int8_aware_faster"] for _, c in cases)
    within = sum(c["within_1_05"] for _, c in cases)
    errors = [abs(c["error"]) for _, c in cases]
    ratios = [c["int8_aware_share"] / c["fp32_aware_share"] for _, c in cases]
    command = "python benchmarks/int8.py" + (f" --models {' '.join(args.models)}" if args.models != list(MODELS) else "")
    command += f" --budgets {' '.join(map(str, args.budgets))}" if args.budgets != list(BUDGETS) else ""
    lines = [
        "# INT8: pruning for the quantized model's latency", "",
        f"Generated by `{command}` (torch {torch.__version__}, onnxruntime {ort.__version__}, {os.cpu_count()} CPU "
        f"cores, 2 threads, {time.strftime('%Y-%m-%d')}, {seconds / 60:.0f} min). Random weights, batch 1, 224x224. "
        "Every file is quantized the same way (`export_onnx(..., quantize=\"int8\")`: QDQ, int8 weights per channel, "
        "uint8 activations calibrated on 8 random batches) and timed by this script, not by fxprune: one onnxruntime "
        "session per file, 2 threads, rounds of 0.1 s round-robin over the unpruned INT8 model and the two plans, "
        f"the 10% quantile of each round, a share the median over {args.rounds} rounds of plan / unpruned.", "",
        "*INT8-aware*: `fxprune.compile(model, Latency(b), engine=\"onnxruntime-int8\")`. *FP32-aware*: "
        "`fxprune.compile(model, Latency(b'), engine=\"onnxruntime\", refine=0)`, b' bisected until the plan keeps "
        "the FLOPs the INT8-aware plan kept, then quantized the same way.", "",
        "## Summary", "",
        f"- INT8-aware plan faster on the INT8 engine than the FP32-aware plan at equal FLOPs: **{faster} of "
        f"{len(cases)}** (median ratio INT8-aware / FP32-aware {statistics.median(ratios):.3f}, range "
        f"{min(ratios):.3f}-{max(ratios):.3f}).",
        f"- INT8-aware plan's measured INT8 share within 1.05 x budget: **{within} of {len(cases)}**.",
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
    parser.add_argument("--out", default="out/int8", help="per-model results; a model found there is not re-run")
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start, results = time.perf_counter(), []
    with tempfile.TemporaryDirectory() as cache_root:
        for name in args.models:
            saved = out / f"{name}.json"
            result = json.loads(saved.read_text()) if saved.exists() else {}
            if [c["budget"] for c in result.get("cases", [])] != args.budgets:
                result = run_model(name, args.budgets, args.rounds, Path(cache_root), args.steps)
                saved.write_text(json.dumps(result, indent=1) + "\n")
            results.append(result)
    write_docs(results, args, time.perf_counter() - start)


if __name__ == "__main__":
    main()
