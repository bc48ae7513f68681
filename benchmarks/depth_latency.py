"""Depth and width against width only, at latency budgets under the width-only floor, timed independently.

    python benchmarks/depth_latency.py --engine onnxruntime-int8 --models mobilenet_v2 --budgets 0.3
    python benchmarks/depth_latency.py --engine onnxruntime --models resnet18 --budgets 0.2 0.3

For each model (torchvision, random weights, batch 1, 224x224) and budget: ``fxprune.compile`` with
``depth=False`` and ``depth=True`` on the engine (a refusal is recorded with the smallest share). Each
returned model is then timed here, not by fxprune's timer: exported by ``torch.onnx.export(dynamo=False)``
(FP32), or for the INT8 engine by ``fxprune.export_onnx(..., quantize="int8")`` (fxprune's own static
quantization, the files a user deploys), and run in onnxruntime sessions of this script, round-robin with
the unpruned model: per round each session's 20% quantile of ``--calls`` calls, per-round ratios to the
unpruned model, their median. Appends one row per case to ``--out`` (a markdown table).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torchvision

import fxprune
from returned_latency import round_robin_ratios  # this folder's scripts run as scripts

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _session(model: torch.nn.Module, x: torch.Tensor, folder: Path, name: str, int8: bool, threads: int):
    path = folder / f"{name}.onnx"
    if int8:
        fxprune.export_onnx(model, path, (x,), quantize="int8", dynamic_batch=False, dynamic_sizes=False)
    else:
        torch.onnx.export(model.eval(), (x,), str(path), dynamo=False, opset_version=17)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.3])
    parser.add_argument("--engine", default="onnxruntime-int8", choices=("onnxruntime", "onnxruntime-int8"))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--out", default=str(DOCS / "depth_latency.md"))
    parser.add_argument("--cache", default=None, help="latency cache folder (default: fxprune's)")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    out = Path(args.out)
    if not out.exists():
        out.write_text("| model | engine | budget | plan | compile s | blocks removed | fxprune's closed loop | "
                       "independent timing (rounds' quartiles) | within budget x |\n|---|---|---|---|---|---|---|---|---|\n")
    int8 = args.engine == "onnxruntime-int8"
    for name in args.models:
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)().eval()
        x = torch.randn(1, 3, 224, 224)
        for budget in args.budgets:
            for depth in (False, True):
                plan = "depth + width" if depth else "width only"
                start = time.perf_counter()
                try:
                    pruned = fxprune.compile(model, fxprune.Latency(budget), x, engine=args.engine, depth=depth,
                                             progress=False, cache=args.cache)
                except fxprune.BudgetError as error:
                    row = (f"| {name} | {args.engine} | {budget} | {plan} | {time.perf_counter() - start:.0f} | | "
                           f"refused (smallest {error.smallest_share:.3f}) | | |")
                    print(row, flush=True)
                    with out.open("a") as file:
                        file.write(row + "\n")
                    continue
                seconds = time.perf_counter() - start
                report = fxprune.report(pruned)
                loop = report.predicted_latency_ms_after / report.predicted_latency_ms_before
                with tempfile.TemporaryDirectory() as folder:
                    runners = [_session(model, x, Path(folder), "full", int8, threads),
                               _session(pruned, x, Path(folder), "pruned", int8, threads)]
                    ratios = np.asarray(round_robin_ratios(runners, args.rounds, args.calls)[1])
                share = float(np.median(ratios))
                low, high = np.quantile(ratios, [0.25, 0.75])
                row = (f"| {name} | {args.engine} | {budget} | {plan} | {seconds:.0f} | {len(report.blocks_removed)} | "
                       f"{loop:.3f} ({report.latency_prediction}) | {share:.3f} ({low:.3f}-{high:.3f}) | "
                       f"{share / budget:.3f} |")
                print(row, flush=True)
                with out.open("a") as file:
                    file.write(row + "\n")


if __name__ == "__main__":
    main()
