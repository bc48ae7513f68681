"""The recipe behind the papers' tables, shared by examples/cifar10 and examples/imagenet.

Train (or load) a base model, prune it to a budget with one of fxprune's methods, fine-tune, evaluate,
and save the pruned GraphModule and its ONNX export. Runs on one process, or on several under
``torchrun`` (DDP: gloo on CPUs, NCCL on GPUs):

- ``sp_lamp``: ``fxprune.compile`` once (SP-LAMP importance, group knapsack), then fine-tune;
- ``halp``: ``fxprune.Pruner`` (Taylor importance, augmented knapsack) prunes every ``--prune-every``
  iterations for ``--prune-steps`` steps at the start of fine-tuning, on HALP's geometric schedule;
- ``ssr``: ``fxprune.SSR`` (L2,1, AULM) regularizes for the first half of fine-tuning, ``compile``
  removes the weakest rows to the budget, the second half fine-tunes.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

import fxprune
from examples.training import accuracy, loader, make_optimizer, train

METHODS = ("sp_lamp", "halp", "ssr")


def as_command(main: Callable[[], object]) -> None:
    """Run a recipe's ``main`` as a command: an fxprune error (a budget out of reach) is one line, no traceback."""
    try:
        main()
    except fxprune.FxpruneError as error:
        raise SystemExit(f"error: {error}") from None


def parser(description: str, models: tuple[str, ...], default_model: str,
           default_budget: float = 0.5) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="the dataset's folder (nothing is downloaded)")
    p.add_argument("--fake-data", action="store_true", help="torchvision FakeData instead of --data (a smoke test)")
    p.add_argument("--fake-size", type=int, default=64, help="images in the fake training set")
    p.add_argument("--model", choices=models, default=default_model)
    p.add_argument("--checkpoint", help="base model weights to start from (else the base is trained first)")
    p.add_argument("--method", choices=METHODS, default="halp")
    p.add_argument("--budget", type=float, default=default_budget,
                   help=f"share of the base model's latency (or --metric; default {default_budget})")
    p.add_argument("--metric", choices=("latency", "flops", "params"), default="latency")
    p.add_argument("--engine", default="onnxruntime", help="latency engine (onnxruntime, torch, cuda)")
    p.add_argument("--base-epochs", type=int, default=160)
    p.add_argument("--epochs", type=int, default=60, help="fine-tuning epochs")
    p.add_argument("--batch-size", type=int, default=128, help="per process")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--prune-every", type=int, default=40)
    p.add_argument("--prune-steps", type=int, default=30)
    p.add_argument("--ssr-strength", type=float, default=1e-4)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="data loading processes (default: 4, at most one per core)")
    p.add_argument("--out", default="out", help="where the pruned model and its ONNX export go")
    return p


def budget_of(args) -> object:
    return {"latency": fxprune.Latency, "flops": fxprune.FLOPs, "params": fxprune.Params}[args.metric](args.budget)


def setup() -> tuple[int, str]:
    """Start torch.distributed when run by torchrun; returns (rank, device)."""
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        cuda = torch.cuda.is_available()
        dist.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        return dist.get_rank(), f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
    return 0, "cuda" if torch.cuda.is_available() else "cpu"


def run(args, build: Callable[[str], nn.Module], datasets: Callable, example: tuple) -> dict:
    """Train or load, prune with ``args.method``, fine-tune, evaluate and save; returns the figures."""
    rank, device = setup()
    try:
        torch.manual_seed(0)
        train_set, test_set = datasets(args)
        train_data = loader(train_set, args.batch_size, train=True, workers=args.workers)
        test_data = loader(test_set, args.batch_size, train=False, workers=args.workers)
        model = build(args.model).to(device)
        if args.checkpoint:
            model.load_state_dict(torch.load(args.checkpoint, map_location=device))
        else:
            train(_ddp(model), train_data, make_optimizer(model, args.lr), args.base_epochs, lr=args.lr, device=device)
        base_accuracy = accuracy(model, test_data, device)
        pruned = PRUNERS[args.method](args, model, train_data, device, example)
        pruned_accuracy = accuracy(pruned, test_data, device)
        figures = {"method": args.method, "budget": str(budget_of(args)), "base_accuracy": base_accuracy,
                   "accuracy": pruned_accuracy, "params_before": sum(p.numel() for p in model.parameters()),
                   "params_after": sum(p.numel() for p in pruned.parameters())}
        if rank == 0:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            pruned = pruned.cpu().eval()
            torch.save(pruned, out / "pruned.pt")
            fxprune.export_onnx(pruned, out / "pruned.onnx", example)
            print(figures, flush=True)
        return figures
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _ddp(model: nn.Module) -> nn.Module:
    if dist.is_available() and dist.is_initialized():
        return nn.parallel.DistributedDataParallel(model)
    return model


def _sp_lamp(args, model, train_data, device, example) -> nn.Module:
    # fxprune.compile, in one step of a Pruner: under DDP rank 0 solves and every rank gets its plan
    pruner = fxprune.Pruner(_ddp(model), budget_of(args), example, steps=1, importance="sp_lamp", solver="sp_lamp",
                            engine=args.engine)
    pruner.step()
    pruned = pruner.compile()
    train(_ddp(pruned), train_data, make_optimizer(pruned, args.lr / 10), args.epochs, lr=args.lr / 10, device=device)
    return pruned


def _halp(args, model, train_data, device, example) -> nn.Module:
    wrapped = _ddp(model)
    optimizer = make_optimizer(model, args.lr / 10)
    pruner = fxprune.Pruner(wrapped, budget_of(args), example, steps=args.prune_steps, optimizer=optimizer,
                            engine=args.engine)

    def step(iteration: int) -> None:
        if iteration % args.prune_every == 0 and not pruner.done:
            pruner.step()
    train(wrapped, train_data, optimizer, args.epochs, lr=args.lr / 10, callback=step, device=device)
    while not pruner.done:  # a short run: finish the schedule
        pruner.step()
    return pruner.compile()


def _ssr(args, model, train_data, device, example) -> nn.Module:
    wrapped = _ddp(model)
    optimizer = make_optimizer(model, args.lr / 10, weight_decay=0.0)
    ssr = fxprune.SSR(wrapped, example, optimizer=optimizer, strength=args.ssr_strength, penalty=1e-2, every=10)
    half = max(1, args.epochs // 2)
    train(wrapped, train_data, optimizer, half, lr=args.lr / 10, device=device)
    ssr.remove_hooks()
    pruned = ssr.compile(budget_of(args), engine=args.engine)
    train(_ddp(pruned), train_data, make_optimizer(pruned, args.lr / 10), args.epochs - half, lr=args.lr / 10,
          device=device)
    return pruned


PRUNERS = {"sp_lamp": _sp_lamp, "halp": _halp, "ssr": _ssr}
