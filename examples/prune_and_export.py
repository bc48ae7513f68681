"""Analyse a torchvision model, look at its channel groups, prune it with a plan, export it to ONNX.

    python examples/prune_and_export.py mobilenet_v3_large --keep 0.6
"""

from __future__ import annotations

import argparse

import torch
import torchvision

import fxprune
from fxprune.testing import masked_forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="mobilenet_v3_large")
    parser.add_argument("--keep", type=float, default=0.6, help="share of each group's channels to keep")
    parser.add_argument("--output", default=None, help="ONNX path (default: <model>_pruned.onnx)")
    args = parser.parse_args()

    model = torchvision.models.get_model(args.model, weights=None).eval()
    example = (torch.randn(1, 3, 224, 224),)
    gm = fxprune.analyze(model, example)

    groups = fxprune.groups(gm)
    frozen = [g for g in groups if not g.prunable]
    print(f"{args.model}: {len(groups)} channel groups, {len(groups) - len(frozen)} prunable")
    for group in frozen:
        print("  " + group.describe())

    plan = fxprune.random_plan(gm, keep_ratio=args.keep, seed=0)
    pruned = fxprune.prune(gm, plan)
    with torch.no_grad():
        difference = (pruned(*example) - masked_forward(gm, plan, *example)).abs().max()
    params = [sum(p.numel() for p in m.parameters()) for m in (model, pruned)]
    print(f"parameters {params[0]:,} -> {params[1]:,}; max |pruned - masked reference| = {difference:.2e}")
    print("(groups through a LayerNorm differ from the masked reference by design; CNNs match exactly)")

    result = fxprune.export_onnx(pruned, args.output or f"{args.model}_pruned.onnx", example)
    print(f"wrote {result.path}: {result.num_nodes} ONNX nodes, onnxruntime max abs diff {result.max_abs_diff:.1e}")


if __name__ == "__main__":
    main()
