"""Whole torchvision detectors under latency budgets, checked by a timing fxprune did not do.

For each detector: ``fxprune.compile(detector, Latency(budget), [image])`` on onnxruntime (captured in
parts, the budget read end to end), or the BudgetError that states the prunable share; then both the
unpruned and the pruned detector exported whole with ``fxprune.export_onnx`` and timed here in
onnxruntime, round-robin (per round, the lower quartile of a few runs of each; the share is the median
of the per-round ratios). Writes docs/detectors_latency.json and docs/detectors_latency.md.

    python benchmarks/detectors_latency.py                        # ssdlite320 and RetinaNet at 0.6
    python benchmarks/detectors_latency.py --budget 0.8 --models ssdlite320_mobilenet_v3_large
    python benchmarks/detectors_latency.py --score-thresh 0.05   # post-processing of few boxes, as trained weights

With random weights every anchor's class scores are near 1/classes: at ssdlite's default score
threshold (0.001) every box goes through top-k and NMS, which then cost most of the latency; a trained
detector passes few boxes on. ``--score-thresh`` sets the threshold so that few pass here too.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import fxprune
from fxprune import zoo

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def independent_share(before: Path, after: Path, image: torch.Tensor, rounds: int = 15, runs: int = 5) -> float:
    """The pruned file's latency as a share of the unpruned one's, timed round-robin here."""
    sessions = [_session(before), _session(after)]
    feeds = [{s.get_inputs()[0].name: image.numpy()} for s in sessions]
    for session, feed in zip(sessions, feeds):
        session.run(None, feed)
    ratios = []
    for round_ in range(rounds):
        times = []
        for index in ((0, 1) if round_ % 2 == 0 else (1, 0)):
            samples = []
            for _ in range(runs):
                start = time.perf_counter()
                sessions[index].run(None, feeds[index])
                samples.append(time.perf_counter() - start)
            times.append((index, float(np.quantile(samples, 0.25))))
        measured = dict(times)
        ratios.append(measured[1] / measured[0])
    return float(np.median(ratios))


def measure(name: str, budget: float, score_thresh: float | None = None) -> dict:
    model, inputs = zoo.build("detectors", name)
    if score_thresh is not None:
        model.score_thresh = score_thresh  # SSD, RetinaNet, FCOS read it in post-processing
    record: dict = {"model": name, "budget": budget, "score_thresh": getattr(model, "score_thresh", None)}
    start = time.perf_counter()
    try:
        pruned = fxprune.compile(model, fxprune.Latency(budget), inputs, progress=False)
    except fxprune.BudgetError as error:
        record.update(result="BudgetError", message=str(error), compile_s=round(time.perf_counter() - start, 1))
        return record
    record["compile_s"] = round(time.perf_counter() - start, 1)
    report = fxprune.report(pruned)
    record["fxprune_measured_share"] = report.measured_latency_ms_after / report.measured_latency_ms_before
    record["notes"] = [n for n in report.notes if "latency" in n]
    with tempfile.TemporaryDirectory() as tmp:
        fxprune.export_onnx(model, Path(tmp) / "before.onnx", inputs)
        fxprune.export_onnx(pruned, Path(tmp) / "after.onnx", inputs)
        record["independent_share"] = independent_share(Path(tmp) / "before.onnx", Path(tmp) / "after.onnx",
                                                        inputs[0][0])
    record["within_1_05"] = record["independent_share"] <= 1.05 * budget
    record["result"] = "ok"
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=0.6)
    parser.add_argument("--models", nargs="*", default=["ssdlite320_mobilenet_v3_large", "retinanet_resnet50_fpn"])
    parser.add_argument("--score-thresh", type=float, help="the detectors' score threshold (default: their own)")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the .json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = DOCS / "detectors_latency.json"
    records = json.loads(results.read_text()) if results.exists() else []
    if args.render:
        _write_markdown(records)
        return
    for name in args.models:
        record = measure(name, args.budget, args.score_thresh)
        records = [r for r in records if (r["model"], r["budget"], r.get("score_thresh")) !=
                   (record["model"], record["budget"], record["score_thresh"])] + [record]
        print(json.dumps(record), flush=True)
    results.write_text(json.dumps(records, indent=1) + "\n")
    _write_markdown(records)


def _write_markdown(records: list[dict]) -> None:
    lines = ["# Whole detectors under latency budgets", "",
             "Generated by `python benchmarks/detectors_latency.py` (2 "
             "threads, onnxruntime CPU, random weights; `fxprune.zoo` builds each detector, RetinaNet at 320x320). "
             "The independent share is the pruned detector's ONNX latency over the unpruned one's, both exported whole "
             "and timed round-robin by this script. With random weights every anchor scores near 1/classes, so at a "
             "detector's own low threshold (ssdlite: 0.001) all boxes reach top-k and NMS; rows with a higher "
             "threshold pass few boxes on, as a trained detector does.", "",
             "| model | score threshold | budget | result | fxprune's end-to-end share | independent share | "
             "within 1.05x | compile s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        head = f"| {r['model']} | {r.get('score_thresh')} | {r['budget']} |"
        if r["result"] != "ok":
            lines.append(f"{head} {r['message']} | – | – | – | {r['compile_s']} |")
            continue
        lines.append(f"{head} ok | {r['fxprune_measured_share']:.3f} | {r['independent_share']:.3f} | "
                     f"{'yes' if r['within_1_05'] else 'no'} | {r['compile_s']} |")
    (DOCS / "detectors_latency.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
