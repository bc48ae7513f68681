"""Compile time of fxprune.compile on 224x224 torchvision models: FLOPs budgets, and latency budgets cold
and warm.

    python benchmarks/compile_speed.py            # writes docs/compile_speed.md
    python benchmarks/compile_speed.py --repeats 5

FLOPs: each model is compiled ``--repeats`` times (after one warm-up compile); the table gives medians.
The FLOPs columns are measured on the returned module with FlopCounterMode.

Latency (``Latency(0.5)`` on onnxruntime, the default closed loop): the first compile into an empty cache
folder (cold: every table and plan timed), then ``--repeats`` compiles more (warm), with what each timed
anew: tables (from the report's note) and whether the returned plan's timing was taken in that run.

The README's command (``fxprune prune resnet18 --budget 0.5 --measure``, its own cache folder): cold, warm
twice on the quiet machine, then warm twice more with two processes spinning on the CPU beside it (issue
30: at most 3x the quiet warm time, and the report says the machine was busy).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from busy import Busy

import fxprune
from fxprune.passes.cost import count_flops

MODELS = ("resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0")
DOCS = Path(__file__).resolve().parent.parent / "docs"


def run(name: str, fraction: float, repeats: int, solver: str) -> dict:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    inputs = (torch.randn(1, 3, 224, 224),)
    budget = fxprune.FLOPs(fraction)
    fxprune.compile(model, budget, inputs, solver=solver)  # warm-up
    totals, solves, reports = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        pruned = fxprune.compile(model, budget, inputs, solver=solver)
        totals.append(time.perf_counter() - start)
        report = fxprune.report(pruned)
        solves.append(report.solver_seconds)
        reports.append(report)
    report = reports[-1]
    return {"model": name, "solver": solver, "budget": fraction, "compile_s": statistics.median(totals),
            "solver_s": statistics.median(solves), "solves": report.iterations,
            "flops_share": count_flops(pruned, inputs) / count_flops(model, inputs),
            "params_share": report.params_after / report.params_before}


LATENCY_MODELS = ("resnet18", "resnet50")


def run_latency(name: str, share: float, repeats: int) -> dict:
    """A cold compile into an empty cache, then ``repeats`` warm ones: seconds, and what each timed anew."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    inputs = (torch.randn(1, 3, 224, 224),)
    with tempfile.TemporaryDirectory() as cache:
        seconds, tables, plans, shares = [], [], [], []
        for _ in range(1 + repeats):
            start = time.perf_counter()
            pruned = fxprune.compile(model, fxprune.Latency(share), inputs, cache=cache, progress=False)
            seconds.append(time.perf_counter() - start)
            report = fxprune.report(pruned)
            note = next(n for n in report.notes if n.startswith("latency tables"))
            tables.append(int(re.search(r"(\d+) timed in this run", note).group(1)))
            plans.append(report.plan_timed_now)
            shares.append(report.predicted_latency_ms_after / report.predicted_latency_ms_before)
            print(f"  {name} compile {len(seconds)}: {seconds[-1]:.1f} s, {tables[-1]} tables and "
                  f"{'the plan' if plans[-1] else 'no plan'} timed, share {shares[-1]:.3f}", flush=True)
    return {"model": name, "cold_s": seconds[0], "warm_s": statistics.median(seconds[1:]), "warm_all": seconds[1:],
            "cold_tables": tables[0], "warm_tables": tables[1:], "warm_plans": sum(plans[1:]), "shares": shares}


README_COMMAND = ["prune", "resnet18", "--budget", "0.5", "--measure"]


def run_readme_command(quiet_warm: int = 2, busy_warm: int = 2) -> list[dict]:
    """The README's command into an empty cache folder: cold, ``quiet_warm`` warm, ``busy_warm`` warm beside
    two spinning processes. Seconds, and whether its output says the machine was busy."""
    runs = []
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "FXPRUNE_CACHE_DIR": cache}
        for label in ["cold"] + ["quiet warm"] * quiet_warm + ["busy warm"] * busy_warm:
            with Busy(2 if label.startswith("busy") else 0):
                start = time.perf_counter()
                done = subprocess.run([sys.executable, "-m", "fxprune.cli", *README_COMMAND], env=env,
                                      capture_output=True, text=True, timeout=1800)
                seconds = time.perf_counter() - start
            out = done.stdout + done.stderr
            measured = re.search(r"measured after compiling\s+([0-9.]+)", out)
            runs.append({"label": label, "seconds": seconds, "rc": done.returncode, "busy_said": "busy" in out,
                         "plans": re.search(r"(\d+) plans? timed while solving", out) is not None,
                         "measured": float(measured.group(1)) if measured else None,
                         "plan_from_cache": "this plan timed in an earlier run (cache)" in out,
                         "tables_timed": int(tables.group(1)) if (tables := re.search(r"(\d+) timed in this run and",
                                                                                      out)) else None})
            print(f"  README command, {label}: {seconds:.1f} s, exit {done.returncode}, says busy: "
                  f"{runs[-1]['busy_said']}, tables timed {runs[-1]['tables_timed']}, plan from the cache "
                  f"{runs[-1]['plan_from_cache']}", flush=True)
    return runs


def readme_lines(runs: list[dict]) -> list[str]:
    quiet = statistics.median(r["seconds"] for r in runs if r["label"] == "quiet warm")
    lines = ["## The README command on a quiet and a busy machine", "",
             f"`fxprune {' '.join(README_COMMAND)}` into an empty cache folder (`FXPRUNE_CACHE_DIR`): cold, warm "
             "on the quiet machine, then warm with two processes spinning on the CPU beside it (this machine has "
             "2 cores). *x quiet warm*: seconds over the quiet warm compiles' median; *says busy*: whether its "
             "output says the machine was busy; *tables timed*, *plan from the cache*: what the run timed anew "
             "(its report's notes).", "",
             "| run | seconds | x quiet warm | exit | says busy | tables timed | plan from the cache | measured after "
             "compiling |", "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        measured = f"{r['measured']:.3f}" if r["measured"] is not None else ""
        lines.append(f"| {r['label']} | {r['seconds']:.1f} | {r['seconds'] / quiet:.2f} | {r['rc']} | "
                     f"{'yes' if r['busy_said'] else 'no'} | {r.get('tables_timed', '')} | "
                     f"{'yes' if r.get('plan_from_cache') else 'no'} | {measured} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--latency-only", action="store_true", help="only the latency rows (the FLOPs rows as in docs)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    readme = readme_lines(run_readme_command())
    latency = [run_latency(name, args.budget, args.repeats) for name in LATENCY_MODELS]
    latency_lines = [
        "## Latency budgets, cold and warm", "",
        f"`fxprune.Latency({args.budget})` on onnxruntime (2 threads), default closed loop, into an empty cache "
        f"folder: the first compile is cold (every table and plan timed), then {args.repeats} compiles more "
        "(warm, median and each). *Tables timed* and *plan timed* say what each warm compile timed anew; "
        "*share* is each compile's predicted share of the unpruned model (the closed loop's timing).", "",
        "| model | cold (s) | tables timed cold | warm (s, median) | warm (s, each) | tables timed warm | plan timed "
        "warm | share (each compile) |", "|---|---|---|---|---|---|---|---|"]
    for r in latency:
        latency_lines.append(
            f"| {r['model']} | {r['cold_s']:.1f} | {r['cold_tables']} | {r['warm_s']:.1f} | "
            f"{', '.join(f'{s:.1f}' for s in r['warm_all'])} | {', '.join(map(str, r['warm_tables']))} | "
            f"{r['warm_plans']} of {len(r['warm_all'])} | {', '.join(f'{s:.3f}' for s in r['shares'])} |")
        print(latency_lines[-1], flush=True)
    if args.latency_only:
        old = (DOCS / "compile_speed.md").read_text().split("\n## Latency budgets")[0].rstrip("\n")
        (DOCS / "compile_speed.md").write_text(old + "\n\n" + "\n".join(latency_lines + [""] + readme) + "\n")
        return
    rows = [run(name, args.budget, args.repeats, solver) for name in MODELS for solver in ("sp_lamp", "halp")]
    lines = ["# fxprune.compile speed", "",
             f"Generated by `python benchmarks/compile_speed.py --repeats {args.repeats} --budget {args.budget}` "
             f"(torch {torch.__version__}, {os.cpu_count()} CPU cores, 2 torch threads). Random weights, "
             f"batch 1, 224x224, `fxprune.FLOPs({args.budget})`, importance `sp_lamp`; medians of "
             f"{args.repeats} compiles after a warm-up. `compile` is the whole call (trace, shapes, groups, "
             "scores, FLOPs counting, solve, rewrite, FLOPs re-count for the report); `solver` is the plan "
             "pass alone (all knapsack solves of the width-coupling iteration).", "",
             "| model | solver | compile (s) | solver (s) | knapsack solves | FLOPs after (measured) | params after |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['solver']} | {r['compile_s']:.2f} | {r['solver_s']:.3f} | {r['solves']} | "
                     f"{r['flops_share']:.2%} | {r['params_share']:.2%} |")
        print(lines[-1], flush=True)
    (DOCS / "compile_speed.md").write_text("\n".join(lines + [""] + latency_lines + [""] + readme) + "\n")


if __name__ == "__main__":
    main()
