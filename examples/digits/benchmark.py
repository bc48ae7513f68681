"""fxprune against Torch-Pruning and uniform pruning on real data, at onnxruntime latency budgets.

    python -m examples.digits.benchmark                      # writes docs/digits.md, docs/digits.png, docs/digits.json
    python -m examples.digits.benchmark --seeds 1 --budgets 0.5 --epochs 2 --docs out/quick   # a quick look
    python -m examples.digits.benchmark --engine onnxruntime-int8    # docs/digits_int8.md: budgets on INT8

Needs the benchmark extras (Torch-Pruning, scikit-learn, matplotlib): ``pip install -e '.[benchmarks]'``;
without Torch-Pruning, ``--methods`` without its two methods runs the rest.

Data: scikit-learn's handwritten digits (1437 train / 360 test images), upsampled to 32x32.
Model: a CIFAR-style ResNet-20 at twice the standard width (32/64/128 channels): onnxruntime computes in
blocks of 16 channels, so a standard ResNet-20's 16-channel stage has nothing to remove and its
smallest reachable latency is 0.62 of the model (measured with ``fxprune.compile``).
For every seed a base model is trained, then each method prunes it to each latency budget (a share of
the base model's latency on onnxruntime, batch 1, 2 threads) and gets the same fine-tuning:

- fxprune sp_lamp: ``fxprune.compile(model, Latency(b))`` once, then fine-tuning;
- fxprune sp_lamp + depth: the same with ``depth=True`` (the plan may remove whole residual blocks);
- fxprune halp: ``fxprune.Pruner`` (Taylor importance, HALP's solver) prunes in steps during the first
  half of fine-tuning;
- fxprune ssr: ``fxprune.SSR`` (L2,1, AULM) regularizes during the first half, ``compile(Latency(b))``
  removes the weakest rows, the second half fine-tunes;
- Torch-Pruning magnitude / lamp: ``tp.pruner.MetaPruner`` with global magnitude importance (L2) and its
  LAMP normalizer, its pruning ratio searched until the measured latency matches the budget;
- uniform: every prunable group keeps the same share, searched until fxprune's predicted latency matches.

Reported: test accuracy after fine-tuning (mean and standard deviation over seeds) and the latency of
the pruned model measured in interleaved rounds against the base model.

``--engine onnxruntime-int8``: the budgets are shares of the base model's latency quantized to INT8, the
deployment most users ship. fxprune's methods build their tables and closed loop on the INT8 engine,
Torch-Pruning's ratio is searched against the INT8 latency measured the same way, and every fine-tuned
model is quantized alike (``export_onnx(..., quantize="int8")``: QDQ, int8 weights per channel, uint8
activations calibrated on 8 training batches of 32) and its INT8 test accuracy computed in onnxruntime
(written to docs/digits_int8.md).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn as nn

import fxprune
from examples.digits.data import digits
from examples.models import resnet20
from examples.training import accuracy, loader, make_optimizer, train
from fxprune.ir import Plan
from fxprune.ir.keys import LATENCY_KEY
from fxprune.passes.context import Context
from fxprune.passes.cost import count_flops
from fxprune.passes.latency import LatencyPass, latency_cost
from fxprune.backends.registry import get_engine

METHODS = ("fxprune sp_lamp", "fxprune sp_lamp + depth", "fxprune halp", "fxprune ssr", "torch-pruning magnitude",
           "torch-pruning lamp", "uniform")
BUDGETS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
DOCS = Path(__file__).resolve().parents[2] / "docs"
ENGINES = ("onnxruntime", "onnxruntime-int8")
CALIBRATION_BATCHES, CALIBRATION_SIZE = 8, 32
EXAMPLE = (torch.zeros(1, 1, 32, 32),)
BATCH, LR = 64, 0.05


class Bench:
    """Shared state of one run: data, engine, latency cache, options."""

    def __init__(self, args) -> None:
        self.args = args
        self.train_set, self.test_set = digits()
        self.engine = get_engine(args.engine)
        self.int8 = args.engine == "onnxruntime-int8"
        self.cache = fxprune.LatencyCache(args.cache) if args.cache else fxprune.LatencyCache()

    def data(self, seed: int):
        return loader(self.train_set, BATCH, train=True, seed=seed), loader(self.test_set, 256, train=False)

    def base(self, seed: int) -> nn.Module:
        path = Path(self.args.out) / f"base-seed{seed}.pt"
        torch.manual_seed(seed)
        model = resnet20(in_channels=1, width=32)
        if path.exists():
            model.load_state_dict(torch.load(path))
            return model.eval()
        train_data, _ = self.data(seed)
        train(model, train_data, make_optimizer(model, LR), self.args.base_epochs, lr=LR)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
        return model.eval()

    def latency_share(self, base: nn.Module, pruned: nn.Module, rounds: int = 8) -> float:
        before, after = self.engine.compare([base, pruned], EXAMPLE, rounds=rounds)
        return after / before

    def int8_accuracy(self, model: nn.Module) -> tuple[float, float]:
        """Test accuracy of ``model`` exported quantized to INT8 (as every method's model is) and run in
        onnxruntime, and the share of test images where it predicts what the FP32 model predicts."""
        images, labels = self.test_set.tensors
        train_images = self.train_set.tensors[0]
        calibration = [train_images[i * CALIBRATION_SIZE:(i + 1) * CALIBRATION_SIZE] for i in range(CALIBRATION_BATCHES)]
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "int8.onnx"
            fxprune.export_onnx(model, path, EXAMPLE, quantize="int8", calibration=calibration)
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            predicted = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0].argmax(1)
        with torch.no_grad():
            fp32 = model.eval()(images).argmax(1).numpy()
        return float((predicted == labels.numpy()).mean()), float((predicted == fp32).mean())

    def finetune(self, model: nn.Module, seed: int, epochs: int, callback=None) -> nn.Module:
        torch.manual_seed(seed)
        train_data, _ = self.data(seed)
        train(model, train_data, make_optimizer(model, LR / 5), epochs, lr=LR / 5, callback=callback)
        return model.eval()


# --- the methods -----------------------------------------------------------------------------------------
def fxprune_sp_lamp(bench: Bench, base: nn.Module, budget: float, seed: int, depth: bool = False) -> nn.Module:
    pruned = fxprune.compile(base, fxprune.Latency(budget), EXAMPLE, cache=bench.cache, progress=False,
                             engine=bench.args.engine, depth=depth)
    return bench.finetune(pruned, seed, bench.args.epochs)


def fxprune_depth(bench: Bench, base: nn.Module, budget: float, seed: int) -> nn.Module:
    return fxprune_sp_lamp(bench, base, budget, seed, depth=True)


def fxprune_halp(bench: Bench, base: nn.Module, budget: float, seed: int) -> nn.Module:
    model = copy.deepcopy(base).train()
    optimizer = make_optimizer(model, LR / 5)
    steps = 10
    pruner = fxprune.Pruner(model, fxprune.Latency(budget), EXAMPLE, steps=steps, optimizer=optimizer,
                            cache=bench.cache, engine=bench.args.engine)
    train_data, _ = bench.data(seed)
    every = max(1, bench.args.epochs * len(train_data) // (2 * steps))  # the steps span the first half

    def step(iteration: int) -> None:
        if iteration % every == 0 and not pruner.done:
            pruner.step()
    torch.manual_seed(seed)
    train(model, train_data, optimizer, bench.args.epochs, lr=LR / 5, callback=step)
    while not pruner.done:  # too few iterations for the schedule: finish it
        pruner.step()
    return pruner.compile().eval()


def fxprune_ssr(bench: Bench, base: nn.Module, budget: float, seed: int) -> nn.Module:
    model = copy.deepcopy(base).train()
    optimizer = make_optimizer(model, LR / 5, weight_decay=0.0)
    ssr = fxprune.SSR(model, EXAMPLE, optimizer=optimizer, strength=bench.args.ssr_strength, penalty=1e-2, every=10)
    half = max(1, bench.args.epochs // 2)
    torch.manual_seed(seed)
    train(model, bench.data(seed)[0], optimizer, half, lr=LR / 5)
    ssr.remove_hooks()
    pruned = ssr.compile(fxprune.Latency(budget), cache=bench.cache, engine=bench.args.engine)
    return bench.finetune(pruned, seed, bench.args.epochs - half)


def _torch_pruning(bench: Bench, base: nn.Module, budget: float, seed: int, normalizer: str) -> nn.Module:
    import torch_pruning as tp

    def pruned_at(ratio: float) -> nn.Module:
        model = copy.deepcopy(base)
        importance = tp.importance.MagnitudeImportance(p=2, normalizer=normalizer)
        pruner = tp.pruner.MetaPruner(model, EXAMPLE, importance=importance, global_pruning=True,
                                      pruning_ratio=ratio, ignored_layers=[model.fc])
        pruner.step()
        return model.eval()

    low, high, best = 0.0, 0.95, None  # the ratio whose measured latency share is closest above to the budget
    for _ in range(bench.args.search_steps):
        ratio = (low + high) / 2
        model = pruned_at(ratio)
        if bench.latency_share(base, model, rounds=4) > budget:
            low = ratio
        else:
            high, best = ratio, model
    return bench.finetune(best if best is not None else pruned_at(high), seed, bench.args.epochs)


def torch_pruning_magnitude(bench, base, budget, seed):
    return _torch_pruning(bench, base, budget, seed, "mean")


def torch_pruning_lamp(bench, base, budget, seed):
    return _torch_pruning(bench, base, budget, seed, "lamp")


def uniform(bench: Bench, base: nn.Module, budget: float, seed: int) -> nn.Module:
    """Every prunable group keeps the same share, on the engine's channel grid, searched with fxprune's
    predicted latency."""
    gm = fxprune.analyze(base, EXAMPLE)
    with Context(EXAMPLE, bench.engine, cache=bench.cache, progress=False) as context:
        LatencyPass(context)(gm)
    cost, step = latency_cost(gm), gm.meta[LATENCY_KEY].step
    groups = fxprune.analysis(gm)

    def plan_at(share: float) -> Plan:
        keep = {}
        for group in groups.prunable_groups():
            count = min(group.size, max(step, int(round(group.size * share / step)) * step))
            if count < group.size:
                keep[group.id] = np.arange(count)
        return Plan(keep)

    def predicted(share: float) -> float:
        plan = plan_at(share)
        masks = {g: np.isin(np.arange(x.size), plan.keep.get(g, np.arange(x.size))) for g, x in groups.groups.items()}
        return cost.total({s.id: len(s.kept_positions(masks[s.group_id])) / s.size for s in groups.spaces})

    low, high = 0.0, 1.0
    for _ in range(20):
        mid = (low + high) / 2
        low, high = (mid, high) if predicted(mid) <= budget * cost.baseline else (low, mid)
    return bench.finetune(fxprune.prune(gm, plan_at(low)), seed, bench.args.epochs)


RUNNERS = {"fxprune sp_lamp": fxprune_sp_lamp, "fxprune sp_lamp + depth": fxprune_depth,
           "fxprune halp": fxprune_halp, "fxprune ssr": fxprune_ssr,
           "torch-pruning magnitude": torch_pruning_magnitude, "torch-pruning lamp": torch_pruning_lamp,
           "uniform": uniform}


# --- running and reporting -----------------------------------------------------------------------------
def run(args) -> list[dict]:
    bench = Bench(args)
    results_path = Path(args.out) / ("results-int8.json" if bench.int8 else "results.json")
    results = json.loads(results_path.read_text()) if results_path.exists() else []
    done = {(r["seed"], r["method"], r["budget"]) for r in results}
    for seed in range(args.seeds):
        base = bench.base(seed)
        _, test_data = bench.data(seed)
        base_accuracy = accuracy(base, test_data)
        base_int8 = bench.int8_accuracy(base)[0] if bench.int8 else None
        for budget in args.budgets:
            for method in args.methods:
                if (seed, method, budget) in done:
                    continue
                start = time.perf_counter()
                try:
                    pruned = RUNNERS[method](bench, copy.deepcopy(base), budget, seed)
                except fxprune.BudgetError as error:  # the engine's smallest plan is over the budget
                    results.append({"seed": seed, "method": method, "budget": budget, "unreachable": str(error)})
                    results_path.write_text(json.dumps(results, indent=1))
                    print(f"seed {seed} {method:24s} budget {budget}: {error}", flush=True)
                    continue
                result = {"seed": seed, "method": method, "budget": budget, "base_accuracy": base_accuracy,
                          "accuracy": accuracy(pruned, test_data),
                          "latency_share": bench.latency_share(base, pruned),
                          "flops_share": count_flops(pruned, EXAMPLE) / count_flops(base, EXAMPLE),
                          "seconds": time.perf_counter() - start}
                if bench.int8:
                    result["base_int8_accuracy"] = base_int8
                    result["int8_accuracy"], result["int8_agreement"] = bench.int8_accuracy(pruned)
                results.append(result)
                results_path.write_text(json.dumps(results, indent=1))
                int8 = f", INT8 {result['int8_accuracy']:.3f}" if bench.int8 else ""
                print(f"seed {seed} {method:24s} budget {budget}: accuracy {result['accuracy']:.3f}{int8} "
                      f"(base {base_accuracy:.3f}), latency {result['latency_share']:.3f}, "
                      f"FLOPs {result['flops_share']:.3f} ({result['seconds']:.0f} s)", flush=True)
    return results


def summarize(results: list[dict], args) -> None:
    unreachable = [r for r in results if "unreachable" in r]
    results = [r for r in results if "unreachable" not in r]
    table: dict[tuple[str, float], list[dict]] = {}
    for r in results:
        table.setdefault((r["method"], r["budget"]), []).append(r)

    def cell(rows: list[dict], key: str, digits: int = 3) -> str:
        values = [r[key] for r in rows]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"

    def section(heading: str, key: str) -> list[str]:
        """A table of ``key`` (mean ± std over seeds): one row per budget, one column per method."""
        rows = [f"## {heading}", "", "| budget | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
        rows += [f"| {budget} | " + " | ".join(cell(table[(m, budget)], key) if (m, budget) in table else ""
                                                for m in methods) + " |" for budget in budgets]
        return rows + [""]

    methods = [m for m in METHODS if any(k[0] == m for k in table)]
    budgets = sorted({k[1] for k in table})
    seeds = sorted({r["seed"] for r in results})
    base = statistics.mean(r["base_accuracy"] for r in results)
    int8 = args.engine == "onnxruntime-int8"
    stem, engine = ("digits_int8", "INT8 onnxruntime") if int8 else ("digits", "onnxruntime")
    key = "int8_accuracy" if int8 else "accuracy"  # what the methods are compared by
    title = "fxprune vs Torch-Pruning" + (" vs uniform" if "uniform" in methods else "")
    lines = [f"# Digits: {title}, at {engine} latency budgets", "",
             f"Generated by `{_command(args)}` ({os.cpu_count()} CPU cores, torch "
             f"{torch.__version__}, {time.strftime('%Y-%m-%d')}); the methods and the setting are in the script's "
             f"docstring. Seeds: {len(seeds)}; base training {args.base_epochs} epochs, then {args.epochs} epochs "
             f"of fine-tuning for every method. Base model test accuracy: {base:.3f} (mean over seeds)"
             + (f", quantized to INT8 {statistics.mean(r['base_int8_accuracy'] for r in results):.3f}" if int8 else "")
             + ".", ""]
    if int8:
        lines += ["Budgets and measured latencies are shares of the base model quantized to INT8 (fxprune's "
                  "`onnxruntime-int8` engine); every fine-tuned model is quantized alike (`export_onnx(..., "
                  f"quantize=\"int8\")`, calibrated on {CALIBRATION_BATCHES} training batches of {CALIBRATION_SIZE}) "
                  "and its test accuracy computed in onnxruntime.", ""]
        lines += section("INT8 test accuracy after pruning, fine-tuning and quantization (mean ± std over seeds)",
                         "int8_accuracy")
        lines += section("INT8 model's top-1 agreement with its FP32 model on the test set (mean ± std)", "int8_agreement")
    lines += section("Test accuracy after pruning and fine-tuning" + (" (FP32)" if int8 else "") + " (mean ± std over seeds)",
                     "accuracy")
    lines += section(f"Measured latency share of the base model ({engine}, batch 1, mean ± std)", "latency_share")
    lines += section("FLOPs kept (share of the base model, mean ± std): what each method's widths cost at that latency",
                     "flops_share")
    lines += ["## Best fxprune method against best Torch-Pruning method", "",
              f"Per budget, the method with the highest mean {'INT8 ' if int8 else ''}accuracy on each side, and its "
              "measured latency share; the paired difference is per seed (fxprune's best minus Torch-Pruning's best).", "",
              "| budget | best fxprune (accuracy, latency) | best Torch-Pruning (accuracy, latency) | accuracy difference "
              "| per seed |", "|---|---|---|---|---|"]
    for budget in budgets:
        sides = [_best(table, budget, prefix, key) for prefix in ("fxprune", "torch-pruning")]
        if None in sides:
            continue
        (ours, our_rows), (theirs, their_rows) = sides
        mean = lambda rows, name: statistics.mean(r[name] for r in rows)  # noqa: E731
        theirs_by_seed = {r["seed"]: r[key] for r in their_rows}
        paired = ", ".join(f"{r[key] - theirs_by_seed[r['seed']]:+.3f}" for r in sorted(our_rows, key=lambda r: r["seed"])
                           if r["seed"] in theirs_by_seed)
        lines.append(f"| {budget} | {ours}: {mean(our_rows, key):.3f}, {mean(our_rows, 'latency_share'):.3f} | "
                     f"{theirs}: {mean(their_rows, key):.3f}, {mean(their_rows, 'latency_share'):.3f} | "
                     f"{mean(our_rows, key) - mean(their_rows, key):+.3f} | {paired} |")
    if unreachable:
        lines += ["", "Budgets a method could not reach (left out above): " + "; ".join(
            f"{r['method']} at {r['budget']}, seed {r['seed']} ({r['unreachable'].split(';')[0]})" for r in unreachable)
            + "."]
    lines += ["", f"![accuracy vs measured latency]({stem}.png)", ""]
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (docs / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    _plot(table, methods, budgets, docs, stem, key, engine)


def _command(args) -> str:
    """The command line that reproduces this run (options that differ from the defaults)."""
    parts = ["python -m examples.digits.benchmark"]
    if getattr(args, "seeds", 3) != 3:
        parts.append(f"--seeds {args.seeds}")
    if list(getattr(args, "budgets", BUDGETS)) != list(BUDGETS):
        parts.append("--budgets " + " ".join(map(str, args.budgets)))
    if list(getattr(args, "methods", METHODS)) != list(METHODS):
        parts.append("--methods " + " ".join(f'"{m}"' for m in args.methods))
    if args.base_epochs != 20:
        parts.append(f"--base-epochs {args.base_epochs}")
    if args.epochs != 6:
        parts.append(f"--epochs {args.epochs}")
    if getattr(args, "engine", "onnxruntime") != "onnxruntime":
        parts.append(f"--engine {args.engine}")
    return " ".join(parts)


def _best(table, budget: float, prefix: str, key: str = "accuracy"):
    """(method, rows) of the method starting with ``prefix`` with the highest mean ``key`` at ``budget``."""
    candidates = [(statistics.mean(r[key] for r in rows), method, rows)
                  for (method, b), rows in table.items() if b == budget and method.startswith(prefix)]
    return max(candidates)[1:] if candidates else None


def _plot(table, methods, budgets, docs: Path, stem: str = "digits", key: str = "accuracy",
          engine: str = "onnxruntime") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for method in methods:
        rows = [table[(method, b)] for b in budgets if (method, b) in table]
        latency = [statistics.mean(r["latency_share"] for r in group) for group in rows]
        acc = [statistics.mean(r[key] for r in group) for group in rows]
        err = [statistics.stdev([r[key] for r in group]) if len(group) > 1 else 0 for group in rows]
        axes.errorbar(latency, acc, yerr=err, marker="o", capsize=3, label=method)
    axes.set_xlabel(f"measured latency / base model latency ({engine}, batch 1)")
    axes.set_ylabel("INT8 test accuracy after fine-tuning" if key == "int8_accuracy" else "test accuracy after fine-tuning")
    axes.set_title("Digits, ResNet-20 (2x width)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(docs / f"{stem}.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--base-epochs", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=6, help="fine-tuning epochs, the same for every method")
    parser.add_argument("--engine", default="onnxruntime", choices=ENGINES,
                        help="the engine whose latency the budgets are shares of (onnxruntime-int8: INT8 models)")
    parser.add_argument("--ssr-strength", type=float, default=2e-4)
    parser.add_argument("--search-steps", type=int, default=7, help="bisection steps of Torch-Pruning's ratio")
    parser.add_argument("--out", default="out/digits", help="base models and partial results (resumable)")
    parser.add_argument("--cache", default=None, help="latency cache folder (default: fxprune's)")
    parser.add_argument("--docs", default=str(DOCS), help="where the table, plot and results go")
    args = parser.parse_args()
    check_dependencies(args.methods)
    torch.set_num_threads(2)
    summarize(run(args), args)


def check_dependencies(methods: list[str]) -> None:
    """Stop before any training when a method's package is missing, saying what to install."""
    needing = [m for m in methods if m.startswith("torch-pruning")]
    missing = [name for name, module in (("Torch-Pruning", "torch_pruning"), ("scikit-learn", "sklearn"),
                                         ("matplotlib", "matplotlib"))
               if (module != "torch_pruning" or needing) and importlib.util.find_spec(module) is None]
    if missing:
        raise SystemExit(f"examples.digits.benchmark needs {', '.join(missing)}: pip install -e '.[benchmarks]'"
                         + (f" (or leave out --methods {' '.join(repr(m) for m in needing)})"
                            if missing == ["Torch-Pruning"] else ""))


if __name__ == "__main__":
    main()
