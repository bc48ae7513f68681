"""How well fxprune's latency model predicts onnxruntime, whether it meets budgets, and what it buys.

    python benchmarks/latency_accuracy.py                      # writes docs/latency.md and docs/latency.json
    python benchmarks/latency_accuracy.py --models resnet18 --budgets 0.5

For each model (random weights, batch 1, 224x224, onnxruntime CPU, 2 threads):

1. a cold latency-table build (empty cache) and warm compiles, timed;
2. ``fxprune.compile(model, Latency(b))`` for each budget b, and two FLOPs-only plans at the FLOPs the
   latency plan kept (same importance): one on the same channel grid, one with ``round_to=1``, as
   FLOPs-driven pruners pick widths;
3. the baseline and the three pruned models exported and timed in interleaved rounds (the machine's
   speed drifts; ratios measured in the same rounds are what we compare).

The prediction error is that of the predicted share of the baseline (predicted after / predicted before)
against the measured share, i.e. the prediction carried onto the baseline measured in the same rounds;
the raw error in ms is given too.
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
import torch
import torchvision

import fxprune
from fxprune.cache import LatencyCache
from fxprune.passes.engines import QUANTILE, get_engine

MODELS = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf")
BUDGETS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DOCS = Path(__file__).resolve().parent.parent / "docs"


def _build(name: str):
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None).eval(), (torch.randn(1, 3, 224, 224),)


def run_model(name: str, budgets, rounds: int, cache_root: Path) -> dict:
    model, inputs = _build(name)
    cache = LatencyCache(cache_root / name)  # empty: the first compile builds every table
    start = time.perf_counter()
    fxprune.compile(model, budgets[0], inputs, cache=cache, progress=False)
    cold_s = time.perf_counter() - start
    cases, modules = [], [model]
    for budget in budgets:
        start = time.perf_counter()
        latency_plan = fxprune.compile(model, budget, inputs, cache=cache, progress=False)
        compile_s = time.perf_counter() - start
        report = fxprune.report(latency_plan)
        flops_share = report.flops_after / report.flops_before
        flops_grid = fxprune.compile(model, fxprune.FLOPs(flops_share), inputs, round_to=report.latency_step)
        flops_free = fxprune.compile(model, fxprune.FLOPs(flops_share), inputs, round_to=1)
        modules += [latency_plan, flops_grid, flops_free]
        cases.append({"budget": budget, "compile_s": compile_s, "flops_share": flops_share,
                      "predicted_before_ms": report.predicted_latency_ms_before,
                      "predicted_after_ms": report.predicted_latency_ms_after,
                      "predicted_share": report.predicted_latency_ms_after / report.predicted_latency_ms_before,
                      "flops_grid_share": fxprune.report(flops_grid).flops_after / report.flops_before,
                      "flops_free_share": fxprune.report(flops_free).flops_after / report.flops_before})
    # Every model of this row, the baseline included, in the same interleaved rounds: each gets the same
    # chances of a quiet round, and the shares compare latencies measured side by side.
    measured = get_engine("onnxruntime").compare(modules, inputs, rounds=rounds, seconds=0.1)
    before = measured[0]
    for index, case in enumerate(cases):
        after, grid_ms, free_ms = measured[1 + 3 * index: 4 + 3 * index]
        case.update({"measured_before_ms": before, "measured_after_ms": after, "measured_share": after / before,
                     "error": case["predicted_share"] * before / after - 1,
                     "raw_error": case["predicted_after_ms"] / after - 1,
                     "within_budget": after <= 1.03 * case["budget"] * before,
                     "flops_grid_measured_share": grid_ms / before, "flops_free_measured_share": free_ms / before})
        print(f"{name} {case['budget']}: predicted {case['predicted_share']:.3f} measured {case['measured_share']:.3f} "
              f"(error {case['error']:+.1%}, raw {case['raw_error']:+.1%}); FLOPs {case['flops_share']:.2f}; "
              f"FLOPs-only plans measure {case['flops_grid_measured_share']:.3f} (grid) "
              f"{case['flops_free_measured_share']:.3f} (round_to=1); compile {case['compile_s']:.1f}s", flush=True)
    return {"model": name, "cold_build_s": cold_s, "warm_compile_s": statistics.median(c["compile_s"] for c in cases),
            "cases": cases}


def write_docs(results: list[dict], args) -> None:
    cases = [(r["model"], c) for r in results for c in r["cases"]]
    errors = [abs(c["error"]) for _, c in cases]
    raw = [abs(c["raw_error"]) for _, c in cases]
    within = [c["within_budget"] for _, c in cases]
    faster = [c["measured_share"] < c["flops_grid_measured_share"] for _, c in cases]
    faster_free = [c["measured_share"] < c["flops_free_measured_share"] for _, c in cases]
    command = "python benchmarks/latency_accuracy.py" + (f" --models {' '.join(args.models)}" if args.models != list(MODELS) else "")
    lines = [
        "# Latency model: predicted vs measured on onnxruntime", "",
        f"Generated by `{command}` (torch {torch.__version__}, onnxruntime {_ort_version()}, "
        f"{os.cpu_count()} CPU cores, 2 threads, {time.strftime('%Y-%m-%d')}). Random weights, batch 1, 224x224, "
        f"importance `sp_lamp`, `fxprune.compile(model, Latency(b))`. Latencies are the {QUANTILE:.0%} quantile "
        f"of runs in rounds of 0.1 s, the fastest of {args.rounds} rounds; all the models of one network (the "
        "baseline and every plan) are timed in the same interleaved rounds: this machine's speed drifts "
        "([machine_noise.md](machine_noise.md)).", "",
        "## Summary", "",
        f"- Prediction error, median over {len(cases)} cases: **{statistics.median(errors):.1%}** "
        f"(90th percentile {np.quantile(errors, 0.9):.1%}, worst {max(errors):.1%}); in ms, against the "
        f"baseline measured when the tables were built: median {statistics.median(raw):.1%}.",
        f"- Measured latency within 1.03 x budget: **{sum(within)} of {len(within)}** ({np.mean(within):.0%}).",
        f"- At equal FLOPs, the latency-aware plan measures faster than the FLOPs-only plan on the same channel "
        f"grid in {sum(faster)} of {len(faster)} cases, and faster than a FLOPs-only plan with `round_to=1` in "
        f"{sum(faster_free)} of {len(faster_free)}.", "",
        "| model | cold table build (s) | warm compile (s, median) |", "|---|---|---|",
    ]
    lines += [f"| {r['model']} | {r['cold_build_s']:.0f} | {r['warm_compile_s']:.1f} |" for r in results]
    lines += ["", "## Prediction and budgets", "",
              "`share` = latency / baseline latency. *error* compares the predicted share with the measured one; "
              "*ms error* compares the predicted ms with the measured ms.", "",
              "| model | budget | predicted share | measured share | error | ms error | within 1.03 x budget | FLOPs kept |",
              "|---|---|---|---|---|---|---|---|"]
    for name, c in cases:
        lines.append(f"| {name} | {c['budget']} | {c['predicted_share']:.3f} | {c['measured_share']:.3f} | "
                     f"{c['error']:+.1%} | {c['raw_error']:+.1%} | {'yes' if c['within_budget'] else '**no**'} | "
                     f"{c['flops_share']:.1%} |")
    lines += ["", "## Latency-aware vs FLOPs-only at equal FLOPs", "",
              "Same importance (`sp_lamp`), FLOPs budget = the FLOPs the latency-aware plan kept. *grid*: FLOPs-only "
              "on the same channel grid (the engine's latency step); *round_to=1*: FLOPs-only with any width. "
              "Measured shares of the baseline, in the same interleaved rounds.", "",
              "| model | budget | FLOPs kept (latency / grid / round_to=1) | latency-aware | FLOPs-only, grid | "
              "FLOPs-only, round_to=1 |", "|---|---|---|---|---|---|"]
    for name, c in cases:
        lines.append(f"| {name} | {c['budget']} | {c['flops_share']:.1%} / {c['flops_grid_share']:.1%} / "
                     f"{c['flops_free_share']:.1%} | {c['measured_share']:.3f} | {c['flops_grid_measured_share']:.3f} | "
                     f"{c['flops_free_measured_share']:.3f} |")
    (DOCS / "latency.md").write_text("\n".join(lines) + "\n")
    (DOCS / "latency.json").write_text(json.dumps(results, indent=1) + "\n")


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as cache_root:
        results = [run_model(name, args.budgets, args.rounds, Path(cache_root)) for name in args.models]
    write_docs(results, args)


if __name__ == "__main__":
    main()
