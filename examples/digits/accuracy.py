"""Which channels each method keeps: accuracy at equal measured latency, one-shot and fine-tuned.

    python -m examples.digits.accuracy                          # writes docs/accuracy.md, .json, .png
    python -m examples.digits.accuracy --seeds 1 --budgets 0.5 --methods "fxprune sp_lamp" uniform --base-epochs 3 --docs out/quick

Needs the benchmark extras (Torch-Pruning, scikit-learn, matplotlib): ``pip install -e '.[benchmarks]'``.

Data: scikit-learn's handwritten digits (no download). The base model is a CIFAR-style ResNet (``--depth``,
``--width``, ``--size``, ``--base-epochs``) that should leave its test accuracy off the ceiling, so that what a
method keeps of it shows. The digits as they come are too easy for that (12 epochs: ResNet-8 at width 8
reaches 0.97-0.99, ResNet-20 at width 32 0.99-1.00), so by default (``--jitter``) every image is moved once
by its own random affine transform, in the training and the test set alike: ResNet-20 at width 32 then
reaches 0.97-0.98 and ResNet-8 at width 16 0.91-0.92, a task on which capacity shows.

For every seed a base model is trained; every method prunes it to every latency budget (a share of the base model's onnxruntime latency, batch 1, 2 threads) and accuracy is taken at three
points: **one-shot** (right after pruning, with only the BatchNorm statistics estimated again on 8 training
batches, no weight changed: with the base model's statistics, the SP-LAMP and uniform plans of a
trial, on a ResNet-20 trained 3 epochs, predicted one class, uniform even keeping 90% of the channels), after a **short** fine-tune and after the
**full** fine-tune (the short one continued, with the learning rate restarted; the same for every method). Every
point is scored with the BatchNorm statistics estimated again the same way (training goes on with its own): after
one epoch at momentum 0.1 some of the unpruned model's statistics remain, and scored with them a pruned model lost
much of its accuracy (a one-off check, seed 0, fxprune l2 at 0.5: 0.369 as trained, 0.925 estimated again): it measured how
stale the statistics were, not which channels were kept. Beside test
accuracy, the pruned model's top-1 agreement with the base model and the KL divergence of its predictions
from the base model's, on the test set: what was kept of the model itself, independent of labels.

Every pruned model's latency is measured here, by plain onnxruntime sessions in round-robin pairs of
rounds against the base model (a round's latency is the 10% quantile of its runs; the share is the median
of the per-pair ratios), not by fxprune. Methods:

- fxprune IMPORTANCE [+ halp solver]: ``fxprune.compile(model, Latency(b), importance=..., solver=...,
  depth=False)`` with each importance criterion and SP-LAMP's group knapsack, and HALP's augmented knapsack
  (compile's closed loop times its plans on onnxruntime: up to four, ``refine=4``): width only;
- fxprune sp_lamp + depth: ``compile(..., depth=True)``, the plan may remove whole residual blocks too
  (compile's default since issue 28);
- fxprune halp schedule: ``fxprune.Pruner`` prunes in steps during the first half of the short fine-tune
  (no one-shot point);
- fxprune ssr: ``fxprune.SSR`` regularizes through the short fine-tune, then ``compile(Latency(b))``
  removes the weakest rows: its short point is read right after the removal (no one-shot point).
  Both time their last solve's plans on onnxruntime (the closed loop, ``refine=4``), as compile does;
- Torch-Pruning magnitude / lamp / taylor / hessian: ``tp.pruner.MetaPruner`` (global pruning) with
  that importance, its pruning ratio searched until the latency measured here is within the budget;
- uniform: every prunable group keeps its first channels, the same share, searched the same way.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import statistics
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import fxprune
from examples.digits.data import digits, jittered
from examples.models import CifarResNet
from examples.training import loader, make_optimizer, train
from fxprune.solvers.planner import uniform_plan

IMPORTANCES = ("sp_lamp", "lamp", "l1", "l2", "bn_scale", "taylor")
TORCH_PRUNING = ("magnitude", "lamp", "taylor", "hessian")
METHODS = (*(f"fxprune {name}" for name in IMPORTANCES), "fxprune sp_lamp + halp solver",
           "fxprune taylor + halp solver", "fxprune sp_lamp + depth", "fxprune halp schedule", "fxprune ssr",
           *(f"torch-pruning {name}" for name in TORCH_PRUNING), "uniform")
DEFAULT = "fxprune sp_lamp + depth"  # what fxprune.compile does unless told otherwise (depth=True since issue 28)
WIDTH_ONLY = "fxprune sp_lamp"  # compile(..., depth=False): the default before issue 28
POINTS = ("one-shot", "short", "full")
BUDGETS = (0.2, 0.3, 0.5)
DOCS = Path(__file__).resolve().parents[2] / "docs"
BATCH, LR, CALIBRATION_BATCHES = 64, 0.05, 4
DEFAULTS = {"seeds": 5, "depth": 20, "width": 32, "size": 32, "jitter": True, "base_epochs": 12, "short_epochs": 1, "epochs": 5,
            "budgets": list(BUDGETS), "methods": list(METHODS)}


# --- independent timing --------------------------------------------------------------------------------
class Timer:
    """Latency shares of models against one base model, timed by plain onnxruntime sessions in
    round-robin pairs of rounds (only the base and the candidate loaded)."""

    def __init__(self, base: nn.Module, example: torch.Tensor, round_seconds: float = 0.05) -> None:
        self.example, self.round_seconds = example, round_seconds
        self.folder = tempfile.TemporaryDirectory()
        self.base = self._session(base, "base")

    def _session(self, model: nn.Module, name: str) -> ort.InferenceSession:
        path = Path(self.folder.name) / f"{name}.onnx"
        with warnings.catch_warnings():  # the TorchScript exporter, on purpose: one that is not fxprune's
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(copy.deepcopy(model).eval(), (self.example,), str(path), input_names=["x"], dynamo=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for _ in range(3):
            session.run(None, {"x": self.example.numpy()})
        return session

    def _round(self, session: ort.InferenceSession) -> float:
        feed, times, start = {"x": self.example.numpy()}, [], time.perf_counter()
        while len(times) < 3 or time.perf_counter() - start < self.round_seconds:
            begin = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - begin)
        return float(np.quantile(times, 0.1))

    def share(self, model: nn.Module, pairs: int = 8) -> float:
        """``model``'s latency over the base model's: the median of ``pairs`` per-pair ratios."""
        candidate, ratios = self._session(model, "candidate"), []
        for pair in range(pairs):
            if pair % 2:
                after, before = self._round(candidate), self._round(self.base)
            else:
                before, after = self._round(self.base), self._round(candidate)
            ratios.append(after / before)
        return float(np.median(ratios))


# --- the setting ---------------------------------------------------------------------------------------
@dataclass
class Run:
    """One seed's data, base model and timer, and the run's options."""

    args: argparse.Namespace
    seed: int
    train_set: TensorDataset
    test_set: TensorDataset
    base: nn.Module
    timer: Timer
    cache: fxprune.LatencyCache
    prepared: dict = field(default_factory=dict)  # Torch-Pruning's importances with their gradients, per name

    @property
    def example(self) -> tuple[torch.Tensor]:
        return (torch.zeros(1, 1, self.args.size, self.args.size),)

    def train_data(self):
        return loader(self.train_set, BATCH, train=True, seed=self.seed)

    def calibration(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        images, labels = self.train_set.tensors
        return [(images[i * BATCH:(i + 1) * BATCH], labels[i * BATCH:(i + 1) * BATCH]) for i in range(CALIBRATION_BATCHES)]

    def finetune(self, model: nn.Module, epochs: int, callback=None) -> nn.Module:
        """``epochs`` of SGD from LR / 5 on a cosine schedule (the same for every method)."""
        torch.manual_seed(self.seed)
        if epochs > 0:
            train(model, self.train_data(), make_optimizer(model, LR / 5), epochs, lr=LR / 5, callback=callback)
        return model.eval()

    def with_batch_statistics(self, model: nn.Module, batches: int = 8) -> nn.Module:
        """A copy of ``model`` whose BatchNorm statistics are estimated again on training batches, no weight
        changed (EagleEye's adaptive BN): with the base model's statistics a pruned ResNet predicts one class."""
        model = copy.deepcopy(model).train()
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
                module.momentum = None  # a plain average over the batches
        images = self.train_set.tensors[0]
        with torch.no_grad():
            for index in range(batches):
                model(images[index * BATCH:(index + 1) * BATCH])
        return model.eval()

    def compile(self, model: nn.Module, budget: float, **options) -> nn.Module:
        return fxprune.compile(model, fxprune.Latency(budget), self.example, cache=self.cache, progress=False, **options)


def base_model(args, seed: int, train_set: TensorDataset) -> nn.Module:
    """The seed's trained base model (saved under ``--out`` and read back on a rerun)."""
    torch.manual_seed(seed)
    model = CifarResNet(args.depth, in_channels=1, width=args.width)
    path = Path(args.out) / f"base-d{args.depth}-w{args.width}-s{args.size}-j{int(args.jitter)}-e{args.base_epochs}-seed{seed}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path))
        return model.eval()
    train(model, loader(train_set, BATCH, train=True, seed=seed), make_optimizer(model, LR), args.base_epochs, lr=LR)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


@torch.no_grad()
def scores(model: nn.Module, base: nn.Module, test_set: TensorDataset) -> dict[str, float]:
    """Test accuracy, top-1 agreement with ``base`` and mean KL(base || model) over the test set."""
    images, labels = test_set.tensors
    logits, reference = model.eval()(images), base.eval()(images)
    kl = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(reference, 1), log_target=True, reduction="batchmean")
    return {"accuracy": float((logits.argmax(1) == labels).float().mean()),
            "agreement": float((logits.argmax(1) == reference.argmax(1)).float().mean()), "kl": float(kl)}


# --- the methods ---------------------------------------------------------------------------------------
class Unreachable(Exception):
    """A searched method found no pruning ratio whose measured latency is within the budget."""


def searched(run: Run, budget: float, pruned_at: Callable[[float], nn.Module]) -> nn.Module:
    """The model ``pruned_at(share removed)`` whose measured latency is the largest within ``budget``
    (bisection over the share, ``--search-steps`` timings)."""
    low, high, best = 0.0, 0.97, None
    for _ in range(run.args.search_steps):
        ratio = (low + high) / 2
        model = pruned_at(ratio)
        if run.timer.share(model, pairs=4) > budget:
            low = ratio
        else:
            high, best = ratio, model
    if best is None:
        raise Unreachable(f"removing {high:.0%} of the channels still measured over the budget")
    return best


def torch_pruning(run: Run, budget: float, name: str) -> nn.Module:
    import torch_pruning as tp

    if name not in run.prepared:  # a model with its importance's gradients, once per seed: copied for each ratio
        model = copy.deepcopy(run.base).eval()
        importance = {"magnitude": lambda: tp.importance.MagnitudeImportance(p=2, normalizer="mean"),
                      "lamp": lambda: tp.importance.MagnitudeImportance(p=2, normalizer="lamp"),
                      "taylor": tp.importance.TaylorImportance, "hessian": tp.importance.HessianImportance}[name]()
        if name in ("taylor", "hessian"):  # gradients of the training loss, on the same batches fxprune's Taylor sees
            model.zero_grad()
            for images, labels in run.calibration():
                if name == "taylor":  # gradients summed over the batches
                    F.cross_entropy(model(images), labels).backward()
                    continue
                losses = F.cross_entropy(model(images), labels, reduction="none")
                for loss in losses:  # Hessian (OBD-style) importance accumulates per-sample gradients
                    model.zero_grad()
                    loss.backward(retain_graph=True)
                    importance.accumulate_grad(model)
        run.prepared[name] = (model, importance)

    def pruned_at(ratio: float) -> nn.Module:
        source = run.prepared[name]
        model, importance = copy.deepcopy(source)  # one copy: the importance's state follows the model's parameters
        for kept, copied in zip(source[0].parameters(), model.parameters()):  # deepcopy leaves .grad behind
            copied.grad = None if kept.grad is None else kept.grad.clone()
        pruner = tp.pruner.MetaPruner(model, run.example, importance=importance, global_pruning=True,
                                      pruning_ratio=ratio, ignored_layers=[model.fc])
        pruner.step()
        model.zero_grad(set_to_none=True)
        return model.eval()

    return searched(run, budget, pruned_at)


def uniform(run: Run, budget: float) -> nn.Module:
    gm = fxprune.analyze(run.base, run.example)
    return searched(run, budget, lambda ratio: fxprune.prune(gm, uniform_plan(gm, 1 - ratio, round_to=4)))


def fxprune_one_shot(run: Run, budget: float, importance: str, solver: str, depth: bool = False) -> nn.Module:
    return run.compile(run.base, budget, importance=importance, solver=solver, calibration=run.calibration(),
                       loss_fn=F.cross_entropy, depth=depth)


def halp_schedule(run: Run, budget: float) -> nn.Module:
    """HALP's schedule: ``steps`` pruning steps over the first half of the short fine-tune."""
    model = copy.deepcopy(run.base).train()
    optimizer, steps = make_optimizer(model, LR / 5), 10
    pruner = fxprune.Pruner(model, fxprune.Latency(budget), run.example, steps=steps, optimizer=optimizer, cache=run.cache)
    every = max(1, run.args.short_epochs * len(run.train_data()) // (2 * steps))

    def step(iteration: int) -> None:
        if iteration % every == 0 and not pruner.done:
            pruner.step()
    torch.manual_seed(run.seed)
    train(model, run.train_data(), optimizer, run.args.short_epochs, lr=LR / 5, callback=step)
    while not pruner.done:  # too few iterations for the schedule: finish it
        pruner.step()
    return pruner.compile().eval()


def ssr(run: Run, budget: float) -> nn.Module:
    """SSR: regularize through the short fine-tune, then ``compile(Latency(b))`` removes the weakest rows."""
    model = copy.deepcopy(run.base).train()
    optimizer = make_optimizer(model, LR / 5, weight_decay=0.0)
    regularizer = fxprune.SSR(model, run.example, optimizer=optimizer, strength=run.args.ssr_strength, penalty=1e-2, every=5)
    torch.manual_seed(run.seed)
    train(model, run.train_data(), optimizer, run.args.short_epochs, lr=LR / 5)
    regularizer.remove_hooks()
    return regularizer.compile(fxprune.Latency(budget), cache=run.cache).eval()


def prune(run: Run, method: str, budget: float) -> tuple[nn.Module, bool]:
    """The method's pruned model and whether it has had the short fine-tune's training already."""
    if method == "fxprune halp schedule":
        return halp_schedule(run, budget), True
    if method == "fxprune ssr":
        return ssr(run, budget), True
    if method == "uniform":
        return uniform(run, budget), False
    kind, _, name = method.partition(" ")
    if kind == "torch-pruning":
        return torch_pruning(run, budget, name), False
    importance, _, extra = name.partition(" + ")
    return fxprune_one_shot(run, budget, importance, "halp" if extra == "halp solver" else "sp_lamp",
                            depth=extra == "depth"), False


# --- running -------------------------------------------------------------------------------------------
def measure(run: Run, method: str, budget: float) -> dict:
    """One method at one budget: its measured latency share and its scores at the three points."""
    start = time.perf_counter()
    pruned, trained = prune(run, method, budget)
    row = {"seed": run.seed, "method": method, "budget": budget, "latency_share": run.timer.share(pruned),
           "params_share": fxprune.count_params(pruned) / fxprune.count_params(run.base)}
    score = lambda model: scores(run.with_batch_statistics(model), run.base, run.test_set)  # noqa: E731
    if not trained:
        row["one-shot"] = score(pruned)
    pruned = run.finetune(pruned, 0 if trained else run.args.short_epochs)
    row["short"] = score(pruned)
    row["full"] = score(run.finetune(pruned, run.args.epochs - run.args.short_epochs))
    row["seconds"] = time.perf_counter() - start
    return row


def run_all(args) -> list[dict]:
    if any(m.startswith("torch-pruning") for m in args.methods) and importlib.util.find_spec("torch_pruning") is None:
        raise SystemExit("the Torch-Pruning methods need torch_pruning: pip install -e '.[benchmarks]', or leave "
                         "them out of --methods")
    results_path = Path(args.out) / (f"results-d{args.depth}-w{args.width}-s{args.size}-j{int(args.jitter)}-e{args.base_epochs}-"
                                     f"{args.short_epochs}-{args.epochs}.json")  # one file per setting
    results = json.loads(results_path.read_text()) if results_path.exists() else []
    if args.again:  # these methods at these budgets run again: their rows from earlier runs go
        results = [r for r in results if not (r["method"] in args.methods and r["budget"] in args.budgets)]
    done = {(r["seed"], r["method"], r["budget"]) for r in results}
    label = f"{run_label()}, `{command(args)}`"
    cache = fxprune.LatencyCache(args.cache) if args.cache else fxprune.LatencyCache()
    train_set, test_set = digits(size=args.size)
    if args.jitter:
        train_set, test_set = jittered(train_set, seed=100), jittered(test_set, seed=101)
    for seed in range(args.seeds):
        base = base_model(args, seed, train_set)
        run = Run(args, seed, train_set, test_set, base, Timer(base, torch.zeros(1, 1, args.size, args.size)), cache)
        base_scores = scores(base, base, test_set)
        for budget in args.budgets:
            for method in args.methods:
                if (seed, method, budget) in done:
                    continue
                try:
                    row = measure(run, method, budget)
                except (fxprune.BudgetError, Unreachable) as error:  # the smallest model is over the budget
                    row = {"seed": seed, "method": method, "budget": budget, "unreachable": str(error).split(";")[0],
                           "smallest_share": getattr(error, "smallest_share", None)}
                row["base_accuracy"], row["run"] = base_scores["accuracy"], label
                results.append(row)
                results_path.parent.mkdir(parents=True, exist_ok=True)
                results_path.write_text(json.dumps(results, indent=1))
                print(_progress(row), flush=True)
    return results


def _progress(row: dict) -> str:
    head = f"seed {row['seed']} {row['method']:30s} budget {row['budget']}:"
    if "unreachable" in row:
        return f"{head} {row['unreachable']}"
    points = ", ".join(f"{p} {row[p]['accuracy']:.3f}" for p in POINTS if p in row)
    return f"{head} {points} (base {row['base_accuracy']:.3f}), latency {row['latency_share']:.3f} ({row['seconds']:.0f} s)"


# --- reporting -----------------------------------------------------------------------------------------
def paired(rows: list[dict], others: list[dict], point: str, key: str = "accuracy") -> list[float]:
    """Per-seed differences ``rows`` minus ``others`` at ``point``, over the seeds both have."""
    theirs = {r["seed"]: r[point][key] for r in others if point in r}
    return [r[point][key] - theirs[r["seed"]] for r in sorted(rows, key=lambda r: r["seed"])
            if point in r and r["seed"] in theirs]


def beyond_spread(differences: list[float]) -> bool:
    """A mean paired difference more than twice its standard error (and at least two seeds)."""
    if len(differences) < 2:
        return False
    error = statistics.stdev(differences) / len(differences) ** 0.5
    return abs(statistics.mean(differences)) > 2 * error


def _mean_std(values: list[float], digits: int = 3) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def _mean(rows: list[dict], point: str, key: str = "accuracy") -> float:
    return statistics.mean(r[point][key] for r in rows if point in r)


def summarize(results: list[dict], args, seconds: float | None = None) -> str:
    """docs/accuracy.md (tables, paired comparisons), accuracy.json and accuracy.png; returns the markdown."""
    unreachable = [r for r in results if "unreachable" in r]
    table: dict[tuple[str, float], list[dict]] = {}
    for r in results:
        if "unreachable" not in r:
            table.setdefault((r["method"], r["budget"]), []).append(r)
    missing = {(r["method"], r["budget"]) for r in unreachable}
    methods = [m for m in METHODS if any(k[0] == m for k in (*table, *missing))]
    budgets = sorted({k[1] for k in (*table, *missing)})
    seeds = sorted({r["seed"] for r in results})
    base = statistics.mean({r["seed"]: r["base_accuracy"] for r in results}.values())
    took = f"; the command took {seconds / 60:.0f} min" if seconds else ""
    case_minutes = sum(r.get("seconds", 0) for r in results) / 60
    lines = ["# Accuracy at equal measured latency: one-shot, short and full fine-tune", "",
             f"Generated by `{command(args)}` ({os.cpu_count()} CPU cores, torch {torch.__version__}, "
             f"{time.strftime('%Y-%m-%d')}); pruning and fine-tuning took {case_minutes:.0f} min over all cases{took}. "
             f"The setting and the methods are in `examples/digits/accuracy.py`'s docstring. ResNet-{args.depth} at "
             f"width {args.width}, {args.size}x{args.size} inputs{' (jittered)' if args.jitter else ''}, trained {args.base_epochs} epochs: base test "
             f"accuracy {base:.3f} (mean over {len(seeds)} seeds). Fine-tuning: short {args.short_epochs} epoch(s), "
             f"full {args.epochs} epochs in all. Latency: measured here by onnxruntime against the base model, not by "
             "fxprune. *Beyond the seeds' spread*: a mean per-seed paired difference more than twice its standard "
             "error. Every point is scored with the BatchNorm statistics estimated again on 8 training batches "
             "(no weight changed).", ""]
    lines += _runs(results)
    lines += _default_vs_torch_pruning(table, budgets, unreachable)
    lines += _depth_vs_width(table, budgets, unreachable)
    lines += _discrimination(table, methods, budgets)
    for point in POINTS:
        for key, label in (("accuracy", "test accuracy"), ("agreement", "top-1 agreement with the base model"),
                           ("kl", "KL(base || pruned), nats")):
            lines += _section(f"{point}: {label} (mean ± std over seeds)", table, methods, budgets,
                              lambda rows, p=point, k=key: _mean_std([r[p][k] for r in rows if p in r])
                              if any(p in r for r in rows) else "—", missing)
    lines += _section("Measured latency share of the base model (onnxruntime, batch 1, mean ± std)", table, methods,
                      budgets, lambda rows: _mean_std([r["latency_share"] for r in rows]), missing)
    lines += _section("Parameters kept (share of the base model, mean ± std)", table, methods, budgets,
                      lambda rows: _mean_std([r["params_share"] for r in rows]), missing)
    lines += _unreachable(unreachable)
    lines += ["![accuracy against measured latency](accuracy.png)", ""]
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines)
    (docs / "accuracy.md").write_text(text)
    (docs / "accuracy.json").write_text(json.dumps(results, indent=1) + "\n")
    _plot(table, methods, budgets, docs / "accuracy.png")
    return text


def _unreachable(rows: list[dict]) -> list[str]:
    """Budgets a method could not reach, one line per method and budget: on how many seeds, and the
    smallest latency share its plans reach where fxprune said it."""
    if not rows:
        return []
    grouped: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        grouped.setdefault((r["method"], r["budget"]), []).append(r)
    lines = ["## Budgets a method could not reach (left out of the tables above)", "",
             "| method | budget | seeds | why |", "|---|---|---|---|"]
    for (method, budget), group in sorted(grouped.items(), key=lambda item: (item[0][1], METHODS.index(item[0][0]))):
        why = _unreachable_why(group)
        lines.append(f"| {method} | {budget} | {', '.join(str(r['seed']) for r in sorted(group, key=lambda r: r['seed']))} | {why} |")
    return lines + [""]


def _unreachable_why(rows: list[dict]) -> str:
    """The smallest plans fxprune reported for unreachable rows, or the first row's reason."""
    smallest = [r["smallest_share"] for r in rows if r.get("smallest_share") is not None]
    if smallest:
        return f"smallest plan {min(smallest):.3f}-{max(smallest):.3f} of the model (fxprune's tables or timing)"
    return rows[0]["unreachable"]


def _section(heading: str, table, methods, budgets, cell: Callable[[list[dict]], str],
             missing: set[tuple[str, float]] = frozenset()) -> list[str]:
    """One row per method, one column per budget; a budget the method reached on no seed (``missing``) reads
    "unreachable", one it was not run at stays empty."""
    rows = [f"## {heading}", "", "| method | " + " | ".join(str(b) for b in budgets) + " |",
            "|---" * (len(budgets) + 1) + "|"]
    rows += [f"| {m} | " + " | ".join(cell(table[(m, b)]) if (m, b) in table else "unreachable" if (m, b) in missing
                                      else "" for b in budgets) + " |" for m in methods]
    return rows + [""]


def _torch_pruning_best(table, budget: float, point: str) -> tuple[float, str, list[dict]] | None:
    """(mean accuracy, method, rows) of the Torch-Pruning importance with the highest mean at that budget and
    point, or None where none has that point."""
    candidates = [(_mean(rows, point), method, rows) for (method, b), rows in table.items()
                  if b == budget and method.startswith("torch-pruning") and any(point in r for r in rows)]
    return max(candidates) if candidates else None


def _default_vs_torch_pruning(table, budgets, unreachable: list[dict]) -> list[str]:
    """fxprune's default against Torch-Pruning's best (by mean accuracy at that budget and point)."""
    lines = ["## fxprune's default against Torch-Pruning's best", "",
             f"`{DEFAULT}` (`fxprune.compile` as it comes) against the Torch-Pruning importance with the highest mean "
             "test accuracy at that budget and point (picked after the fact, which favours Torch-Pruning); differences "
             "are fxprune minus Torch-Pruning, per seed.", "",
             "| budget | point | fxprune default | Torch-Pruning best | mean difference | per seed | beyond spread |",
             "|---|---|---|---|---|---|---|"]
    for budget in budgets:
        ours = table.get((DEFAULT, budget))
        refused = [r for r in unreachable if r["method"] == DEFAULT and r["budget"] == budget]
        if not ours and refused:
            theirs = [f"{point} {best[0]:.3f}" for point in POINTS if (best := _torch_pruning_best(table, budget, point))]
            lines.append(f"| {budget} | all | unreachable on {len(refused)} of {len(refused)} seeds "
                         f"({_unreachable_why(refused)}) | {', '.join(theirs) or 'unreachable too'} | — | — | — |")
            continue
        for point in POINTS:
            best = _torch_pruning_best(table, budget, point)
            if not ours or not best or not any(point in r for r in ours):
                continue
            _, theirs, their_rows = best
            differences = paired(ours, their_rows, point)
            lines.append(f"| {budget} | {point} | {_mean(ours, point):.3f} | {theirs}: {_mean(their_rows, point):.3f} | "
                         f"{statistics.mean(differences):+.3f} | {', '.join(f'{d:+.3f}' for d in differences)} | "
                         f"{'yes' if beyond_spread(differences) else 'no'} |")
    return lines + [""]


def _depth_vs_width(table, budgets, unreachable: list[dict]) -> list[str]:
    """``compile(..., depth=True)`` against the default (width only) and against Torch-Pruning's best, paired
    per seed (present when both ran)."""
    depth = DEFAULT
    if not any(method == depth for method, _ in table):
        return []
    lines = ["## Depth and width in one plan against width only", "",
             f"`{depth}` (`compile(..., depth=True)`: the plan may also remove whole residual blocks) minus `{WIDTH_ONLY}` "
             "(width only), and minus Torch-Pruning's best importance at that budget and point (picked after the "
             "fact), per seed.", "",
             "| budget | point | depth + width | width only | difference | per seed | beyond spread | "
             "Torch-Pruning best | difference | beyond spread |", "|---|---|---|---|---|---|---|---|---|---|"]
    for budget in budgets:
        ours, width = table.get((depth, budget)), table.get((WIDTH_ONLY, budget))
        if not ours:
            refused = [r for r in unreachable if r["method"] == depth and r["budget"] == budget]
            if refused:
                lines.append(f"| {budget} | all | unreachable on {len(refused)} seeds ({_unreachable_why(refused)}) "
                             "| | | | | | | |")
            continue
        for point in POINTS:
            if not any(point in r for r in ours):
                continue
            row = f"| {budget} | {point} | {_mean(ours, point):.3f} | "
            if width and any(point in r for r in width):
                differences = paired(ours, width, point)
                row += (f"{_mean(width, point):.3f} | {statistics.mean(differences):+.3f} | "
                        f"{', '.join(f'{d:+.3f}' for d in differences)} | {'yes' if beyond_spread(differences) else 'no'} | ")
            else:
                row += "unreachable | | | | "
            best = _torch_pruning_best(table, budget, point)
            if best:
                differences = paired(ours, best[2], point)
                row += (f"{best[1]}: {_mean(best[2], point):.3f} | {statistics.mean(differences):+.3f} | "
                        f"{'yes' if beyond_spread(differences) else 'no'} |")
            else:
                row += "| | |"
            lines.append(row)
    return lines + [""]


def _discrimination(table, methods, budgets) -> list[str]:
    """Per budget and point: the best method, and how many are behind it beyond the seeds' spread."""
    lines = ["## Do the methods differ beyond the seeds' spread?", "",
             "Per budget and point, the method with the highest mean test accuracy, and the methods behind it by a "
             "paired difference beyond the seeds' spread.", "",
             "| budget | point | best | range of method means | largest std over seeds | behind the best beyond spread |",
             "|---|---|---|---|---|---|"]
    for budget in budgets:
        for point in POINTS:
            present = [(m, table[(m, budget)]) for m in methods
                       if (m, budget) in table and any(point in r for r in table[(m, budget)])]
            if len(present) < 2:
                continue
            means = {m: _mean(rows, point) for m, rows in present}
            best = max(means, key=means.get)
            behind = [m for m, rows in present if m != best and beyond_spread(paired(table[(best, budget)], rows, point))]
            spread = max(statistics.stdev([r[point]["accuracy"] for r in rows if point in r])
                         if sum(point in r for r in rows) > 1 else 0.0 for _, rows in present)
            lines.append(f"| {budget} | {point} | {best} ({means[best]:.3f}) | {min(means.values()):.3f}-"
                         f"{max(means.values()):.3f} | {spread:.3f} | {len(behind)} of {len(present) - 1}"
                         + (f": {', '.join(behind)}" if behind else "") + " |")
    return lines + [""]


def _plot(table, methods, budgets, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(POINTS), figsize=(15, 4.8), sharey=True)
    colors = plt.get_cmap("tab20")
    for axis, point in zip(axes, POINTS):
        for method in methods:
            groups = [table[(method, b)] for b in budgets if (method, b) in table
                      and any(point in r for r in table[(method, b)])]
            if groups:
                axis.plot([statistics.mean(r["latency_share"] for r in g) for g in groups],
                          [_mean(g, point) for g in groups], marker="o", label=method,
                          color=colors(METHODS.index(method)),  # one colour per method in every panel
                          linestyle="--" if method.startswith("torch-pruning") else ":" if method == "uniform" else "-",
                          linewidth=2.5 if method == DEFAULT else 1)
        axis.set_title(f"{point}")
        axis.set_xlabel("measured latency / base model (onnxruntime, batch 1)")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[-1].legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def run_label() -> str:
    """This run, as rows record it: the date and the repository's commit (``+`` when it has changes)."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return time.strftime("%Y-%m-%d")
    return f"{time.strftime('%Y-%m-%d')} at {head}{'+' if dirty else ''}"


def _runs(results: list[dict]) -> list[str]:
    """A line per run the rows come from, where more than one did: its label, and its methods at budgets."""
    runs: dict[str, list[dict]] = {}
    for r in results:
        runs.setdefault(r.get("run", "an earlier run (before rows recorded theirs)"), []).append(r)
    if len(runs) < 2:
        return []
    lines = ["Rows come from more than one run of this setting (`--again` runs methods at budgets again):"]
    for label, rows in runs.items():
        budgets = sorted({r["budget"] for r in rows})
        methods = sorted({r["method"] for r in rows}, key=METHODS.index)
        lines.append(f"- {label}: {len(rows)} rows; budgets {', '.join(map(str, budgets))}; "
                     f"{len(methods)} methods ({', '.join(methods) if len(methods) <= 4 else 'see the tables'})")
    return lines + [""]


def command(args) -> str:
    """The command line that reproduces this run (options that differ from the defaults)."""
    parts = ["python -m examples.digits.accuracy"]
    for name, default in DEFAULTS.items():
        value = getattr(args, name)
        if value == default:
            continue
        flag = "--" + name.replace("_", "-")
        if name == "methods":
            parts.append(flag + " " + " ".join(f'"{m}"' for m in value))
        elif isinstance(value, bool):
            parts.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            parts.append(flag + " " + " ".join(map(str, value)))
        else:
            parts.append(f"{flag} {value}")
    if getattr(args, "again", False):
        parts.append("--again")
    return " ".join(parts)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=DEFAULTS["seeds"])
    parser.add_argument("--budgets", nargs="+", type=float, default=DEFAULTS["budgets"])
    parser.add_argument("--methods", nargs="+", default=DEFAULTS["methods"], choices=METHODS)
    parser.add_argument("--depth", type=int, default=DEFAULTS["depth"], help="ResNet depth, 6n + 2")
    parser.add_argument("--width", type=int, default=DEFAULTS["width"], help="first stage's channels")
    parser.add_argument("--size", type=int, default=DEFAULTS["size"], help="input images are size x size")
    parser.add_argument("--jitter", action=argparse.BooleanOptionalAction, default=DEFAULTS["jitter"],
                        help="move every image once by a random affine transform (data.jittered): a harder task")
    parser.add_argument("--base-epochs", type=int, default=DEFAULTS["base_epochs"])
    parser.add_argument("--short-epochs", type=int, default=DEFAULTS["short_epochs"], help="the short fine-tune")
    parser.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="the full fine-tune, short included")
    parser.add_argument("--ssr-strength", type=float, default=2e-4)
    parser.add_argument("--search-steps", type=int, default=7, help="bisection steps of a searched pruning ratio")
    parser.add_argument("--out", default="out/accuracy", help="base models and partial results (resumable)")
    parser.add_argument("--cache", default=None, help="latency cache folder (default: fxprune's)")
    parser.add_argument("--docs", default=str(DOCS), help="where accuracy.md, .json and .png go")
    parser.add_argument("--again", action="store_true", help="run --methods at --budgets again where the results "
                        "file has them (their earlier rows are replaced); the report says which rows come from which run")
    args = parser.parse_args(argv)
    if not 0 <= args.short_epochs <= args.epochs:
        parser.error("--short-epochs must be between 0 and --epochs")
    torch.set_num_threads(2)
    start = time.perf_counter()
    results = run_all(args)
    summarize(results, args, time.perf_counter() - start)
    return results


if __name__ == "__main__":
    main()
