"""A whole torchvision detector pruned while it fine-tunes (HALP's schedule), on a COCO-format folder.

    python -m examples.detection.train --data ~/datasets/mycoco --budget 0.6 --epochs 12 -o detector.pt
    python -m examples.detection.train --data ~/datasets/mycoco --weights fasterrcnn.pth --onnx detector.onnx

``--data`` holds ``annotations.json`` (COCO: ``images`` with ``file_name``, ``annotations`` with
``image_id``, ``bbox`` as ``[x, y, w, h]`` and ``category_id``) and the images it names; nothing is
downloaded. The detector (``--model``, a torchvision detection model) is captured in parts by
``fxprune`` (its backbone and heads; anchors, ROI pooling and NMS run as written), and
``fxprune.Pruner`` prunes it a little every ``--every`` iterations over ``--steps`` steps, by HALP's
Taylor importance, to ``--budget`` of the FLOPs of its captured parts, while the detection losses
train it. The result is the detector with physically smaller parts: saved with ``fxprune.save`` and,
with ``--onnx``, exported whole (verified on its heads' raw outputs in onnxruntime).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torchvision.transforms.functional import to_tensor

import fxprune


class CocoFolder(torch.utils.data.Dataset):
    """Images and boxes of a COCO-format folder, as torchvision's detectors take them in training."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        file = self.root / "annotations.json"
        if not file.exists():
            raise SystemExit(f"{file} not found: --data must hold a COCO-format annotations.json and its images")
        coco = json.loads(file.read_text())
        self.images = coco["images"]
        self.boxes: dict[int, list] = {image["id"]: [] for image in self.images}
        for annotation in coco["annotations"]:
            self.boxes[annotation["image_id"]].append(annotation)
        self.classes = 1 + max((a["category_id"] for a in coco["annotations"]), default=0)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        image = self.images[index]
        pixels = to_tensor(Image.open(self.root / image["file_name"]).convert("RGB"))
        found = [a for a in self.boxes[image["id"]] if a["bbox"][2] > 0 and a["bbox"][3] > 0]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in found)],
                             dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([a["category_id"] for a in found], dtype=torch.int64)
        return pixels, {"boxes": boxes, "labels": labels}


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a COCO-format folder (annotations.json and its images)")
    parser.add_argument("--model", default="fasterrcnn_mobilenet_v3_large_320_fpn",
                        help="a torchvision detection model (default: %(default)s)")
    parser.add_argument("--weights", help="a state_dict to start from (default: random weights)")
    parser.add_argument("--budget", type=float, default=0.6, help="share of the FLOPs to keep (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--steps", type=int, default=10, help="pruning steps of the schedule (default: %(default)s)")
    parser.add_argument("--every", type=int, default=20, help="iterations between pruning steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--size", type=int, default=320, help="the detector's input size (min_size and max_size)")
    parser.add_argument("-o", "--output", default="detector.pt", help="where fxprune.save writes the result")
    parser.add_argument("--onnx", help="also export the pruned detector to this ONNX file")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    data = CocoFolder(args.data)
    model = torchvision.models.get_model(args.model, weights=None, weights_backbone=None, num_classes=data.classes,
                                         min_size=args.size, max_size=args.size)
    if args.weights:
        model.load_state_dict(torch.load(args.weights, map_location="cpu"))
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True,
                                         collate_fn=lambda batch: tuple(zip(*batch)))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=args.lr, momentum=0.9,
                                weight_decay=1e-4)
    example = ([data[0][0]],)
    pruner = fxprune.Pruner(model, fxprune.FLOPs(args.budget), example, steps=args.steps, optimizer=optimizer)
    model.train()
    iteration, losses = 0, []
    for _ in range(args.epochs):
        for images, targets in loader:
            loss = sum(model(list(images), list(targets)).values())
            loss.backward()
            optimizer.step()  # the pruner reads the gradients before, and re-zeroes pruned channels after
            optimizer.zero_grad()
            losses.append(float(loss))
            iteration += 1
            if iteration % args.every == 0 and not pruner.done:
                pruner.step()
    while not pruner.done:  # a short run: the rest of the schedule at once, so the budget is met
        pruner.step()
    pruned = pruner.compile().eval()
    fxprune.save(pruned, args.output)
    figures = {"iterations": iteration, "first_loss": losses[0] if losses else None,
               "last_loss": losses[-1] if losses else None, "flops_before": fxprune.count_flops(model.eval(), example),
               "flops_after": fxprune.count_flops(pruned, example), "params_before": fxprune.count_params(model),
               "params_after": fxprune.count_params(pruned), "saved": args.output}
    if args.onnx:
        figures["onnx_max_abs_diff"] = fxprune.export_onnx(pruned, args.onnx, example).max_abs_diff
    print(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()
