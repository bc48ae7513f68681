"""An ultralytics YOLO detector pruned to a budget, then fine-tuned, validated and exported by ultralytics.

    python -m examples.yolo.train --data coco8.yaml --model yolov8n.pt --budget 0.5 --epochs 30 -o yolo_pruned.pt

``--model`` is a yaml (``yolov8n.yaml``: random weights) or a trained checkpoint (``yolov8n.pt``, a path
you give; nothing is downloaded here). ``fxprune.compile`` prunes ``YOLO(model).model`` to ``--budget``
(``flops:0.5``, or a latency share on onnxruntime) and returns the same ``DetectionModel``, smaller;
``fxprune.save`` writes it as ultralytics' own checkpoint, which ``ultralytics.YOLO`` loads at the
pruned widths. ``fxprune.yolo.pruned_trainer()`` is ultralytics' detection trainer that trains that model
itself (the stock trainer rebuilds the model from its yaml at full width); then ``.val`` and
``.export(format="onnx")``. ``--demo`` (the README's command) writes a dataset of 8 generated images with boxes (two
classes) to a temporary folder and runs the whole recipe on it in seconds.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

import fxprune
from fxprune.yolo import pruned_trainer


def demo_dataset(root: Path, count: int = 8, size: int = 64) -> Path:
    """``count`` generated images with one or two coloured boxes each (classes red and blue), in
    ultralytics' folder layout; returns its data yaml."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            lines = []
            for _ in range(1 + i % 2):
                cls, w, h = int(rng.integers(0, 2)), rng.uniform(0.2, 0.4), rng.uniform(0.2, 0.4)
                cx, cy = rng.uniform(w / 2, 1 - w / 2), rng.uniform(h / 2, 1 - h / 2)
                x0, y0, x1, y1 = (int(v * size) for v in (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
                image[y0:y1, x0:x1] = (200, 40, 40) if cls == 0 else (40, 40, 200)
                lines.append(f"{cls} {cx:.4f} {cy:.4f} {w:.4f} {h:.4f}")
            Image.fromarray(image).save(root / "images" / split / f"{i}.jpg")
            (root / "labels" / split / f"{i}.txt").write_text("\n".join(lines) + "\n")
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: red\n  1: blue\n")
    return data


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="an ultralytics data yaml (a path on disk)")
    parser.add_argument("--demo", action="store_true", help="run on 8 generated images (no --data needed)")
    parser.add_argument("--model", default="yolov8n.yaml", help="a model yaml, or a checkpoint path")
    parser.add_argument("--budget", default="flops:0.5", help="flops:F, params:F or a latency share F")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("-o", "--output", default="yolo_pruned.pt", help="the pruned checkpoint (ultralytics format)")
    args = parser.parse_args(argv)
    if not args.data and not args.demo:
        parser.error("give --data DATA.yaml, or --demo to run on generated images")
    return args


def budget_of(text: str):
    kind, _, value = text.rpartition(":")
    return {"flops": fxprune.FLOPs, "params": fxprune.Params, "": fxprune.Latency}[kind](float(value))


def main(argv=None) -> dict:
    args = parse(argv)
    from ultralytics import YOLO

    with tempfile.TemporaryDirectory() as tmp:
        data = demo_dataset(Path(tmp) / "data") if args.demo else Path(args.data)
        imgsz, epochs, batch = (64, 1, 4) if args.demo else (args.imgsz, args.epochs, args.batch)
        classes = 2 if args.demo else None
        if args.model.endswith(".yaml"):
            from ultralytics.nn.tasks import DetectionModel
            from ultralytics.utils import YAML

            classes = classes or len(YAML.load(str(data))["names"])
            model = DetectionModel(args.model, nc=classes, verbose=False).eval()
        else:
            model = YOLO(args.model).model.eval()
        example = (torch.randn(1, 3, imgsz, imgsz),)
        pruned = fxprune.compile(model, budget_of(args.budget), example, progress=False)
        print(fxprune.report(pruned))
        path = fxprune.save(pruned, args.output)
        yolo = YOLO(str(path))
        options = dict(data=str(data), imgsz=imgsz, batch=batch, device="cpu", workers=0, plots=False)
        yolo.train(epochs=epochs, trainer=pruned_trainer(), project=str(Path(tmp) / "runs"), name="train",
                   exist_ok=True, amp=False, **options)
        metrics = yolo.val(**options)
        trained = fxprune.save(yolo.model, args.output)  # the fine-tuned model, at the pruned widths
        onnx_file = YOLO(str(trained)).export(format="onnx", imgsz=imgsz)
    report = fxprune.report(pruned)
    figures = {"flops_before": report.flops_before, "flops_after": report.flops_after, "map50": float(metrics.box.map50),
               "checkpoint": str(trained), "onnx": str(onnx_file), "returned": type(pruned).__name__}
    print(figures)
    return figures


if __name__ == "__main__":
    main()
