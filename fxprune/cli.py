"""The ``fxprune`` command: analyse a model's channel groups, prune it, export it to ONNX."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

import fxprune
from fxprune.errors import FxpruneError


class ModelNotFoundError(FxpruneError):
    """The MODEL argument names no torchvision model and no importable factory."""


def load_model(spec: str) -> torch.nn.Module:
    """A torchvision model name (random weights, no download) or ``package.module:factory``."""
    if ":" in spec:
        module_name, _, factory = spec.partition(":")
        try:
            return getattr(importlib.import_module(module_name), factory)()
        except (ImportError, AttributeError) as err:
            raise ModelNotFoundError(f"cannot load {spec!r}: {err}. Use package.module:factory, where "
                                     "factory() returns an nn.Module.") from err
    import torchvision

    names = torchvision.models.list_models()
    if spec not in names:
        close = [n for n in names if n.startswith(spec[:4])][:6]
        raise ModelNotFoundError(f"{spec!r} is not a torchvision model (close: {', '.join(close) or 'none'}). "
                                 "Run `fxprune models` for the list, or pass package.module:factory.")
    kwargs = {"weights_backbone": None} if spec.startswith(("fcn_", "deeplabv3_", "lraspp_")) else {}
    return torchvision.models.get_model(spec, weights=None, **kwargs)


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-shape must be comma-separated integers, got {text!r}")
    if not shape or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"--input-shape needs positive sizes, got {text!r}")
    return shape


def _analyse(args) -> tuple[torch.nn.Module, torch.fx.GraphModule, tuple]:
    model = load_model(args.model).eval()
    inputs = (torch.randn(*args.input_shape),)
    return model, fxprune.analyze(model, inputs), inputs


def cmd_analyze(args) -> None:
    _, gm, _ = _analyse(args)
    groups = fxprune.groups(gm)
    print(f"{args.model}: {len(groups)} channel groups, {sum(g.prunable for g in groups)} prunable")
    for group in groups:
        print("  " + group.describe())


def cmd_prune(args) -> None:
    model, gm, inputs = _analyse(args)
    plan = fxprune.random_plan(gm, args.keep, seed=args.seed)
    pruned = fxprune.prune(gm, plan)
    params_before = sum(p.numel() for p in model.parameters())
    params_after = sum(p.numel() for p in pruned.parameters())
    groups = {g.id: g for g in fxprune.groups(gm)}
    print(f"{args.model}: pruned {len(plan.keep)} of {len(groups)} channel groups "
          f"(random plan, keep {args.keep:.0%}, seed {args.seed})")
    print(f"{'group':>6} {'channels':>16}  first member")
    for gid, kept in sorted(plan.keep.items()):
        print(f"{gid:>6} {groups[gid].size:>7} -> {len(kept):<6}  {groups[gid].members[0].node}")
    print(f"parameters: {params_before:,} -> {params_after:,} ({params_after / params_before:.1%})")
    if args.output:
        output = Path(args.output)
        if output.suffix == ".onnx":
            result = fxprune.export_onnx(pruned, output, inputs)
            print(f"wrote {output} ({result.file_bytes / 1e6:.1f} MB, {result.num_nodes} nodes, "
                  f"onnxruntime max abs diff vs torch {result.max_abs_diff:.1e})")
        else:
            torch.save(pruned, output)
            print(f"wrote {output} (torch.save of the GraphModule)")


def cmd_models(args) -> None:
    import torchvision

    print("\n".join(torchvision.models.list_models()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, help_text in (("analyze", cmd_analyze, "list a model's channel groups"),
                                  ("prune", cmd_prune, "prune a model with a random plan and export it")):
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("model", help="torchvision model name (random weights) or package.module:factory")
        cmd.add_argument("--input-shape", type=parse_shape, default=(1, 3, 224, 224),
                         help="example input shape (default 1,3,224,224)")
        cmd.set_defaults(func=func)
        if name == "prune":
            cmd.add_argument("--keep", type=float, default=0.5, help="share of each group's channels to keep")
            cmd.add_argument("--seed", type=int, default=0, help="seed of the random plan")
            cmd.add_argument("-o", "--output", help="write the pruned model: .onnx exports, else torch.save")
    sub.add_parser("models", help="list torchvision model names").set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "keep", 0.5) is not None and not 0 < getattr(args, "keep", 0.5) <= 1:
        print("fxprune: error: --keep must be in (0, 1]", file=sys.stderr)
        return 2
    try:
        args.func(args)
    except FxpruneError as err:
        print(f"fxprune: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
