"""Latency engines: what a model is deployed on, and how fxprune times units and whole models there.

An engine does two things: time a unit (``rules/units.py``) at a list of kept widths, and time a whole
model, saying how much of that time went to memory-bound ops between layers (pooling, elementwise
products, layout changes), which shrink with the widths around them. ``identity()`` is what makes two
measurements comparable; it is part of every cache key. A new engine (TensorRT, say) is one subclass.

- ``onnxruntime`` (default): the CPU execution provider with all graph optimizations, as export
  pipelines deploy. Units are timed from onnxruntime's profiler (kernel time of the unit's own kernels).
- ``torch``: eager PyTorch on the CPU.
- ``cuda``: eager PyTorch on a CUDA GPU; unavailable, with a message saying so, where there is none.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import platform
import time
from abc import ABC, abstractmethod
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

import numpy as np
import torch
import torch.fx
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

from fxprune.cache import LatencyCache
from fxprune.errors import EngineUnavailableError, FxpruneError
from fxprune.ir.units import UnitSpec
from fxprune.rules import RULES
from fxprune.rules.activations import torch_activation
from fxprune.rules.units import REFERENCE


@dataclass
class UnitTiming:
    """A unit's latency at each measured point, the latency of the REFERENCE unit timed in the same runs
    (tables are kept relative to it), and each point's ``spread``: the interquartile range of its repeats
    over their median (a quiet machine gives a few percent; a busy one tens)."""

    ms: np.ndarray
    reference_ms: np.ndarray
    spread: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.spread is None:
            self.spread = np.zeros(len(self.ms))


@dataclass
class KernelTime:
    """One kernel of a whole model as the engine ran it: op type, input and output shapes, quiet µs per run."""

    op: str
    inputs: list[list[int]]
    outputs: list[list[int]]
    us: float


@lru_cache(maxsize=1)
def cpu_identity() -> dict[str, str]:
    """The CPU as cache keys see it: model name, architecture and a digest of its instruction-set flags."""
    name, flags = platform.processor() or "unknown", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name in ("unknown", "", platform.machine()):
                name = value.strip()
            if key.strip() in ("flags", "Features") and not flags:
                flags = " ".join(sorted(value.split()))
    except OSError:
        pass
    return {"cpu": name, "machine": platform.machine(), "isa": hashlib.sha256(flags.encode()).hexdigest()[:16]}


# Every latency fxprune measures is this quantile of its repeats, not their median: on a shared machine
# other tenants slow some runs, and a low quantile estimates the latency of a quiet machine
# (docs/machine_noise.md). Tables, whole models and benchmarks all use it.
QUANTILE = 0.1
ROUNDS, ROUND_SECONDS = 8, 0.15  # whole-model timing: rounds of this length, interleaved between models
QUIET_SLACK = 1.15  # a round slower than this x its model's fastest ran on a contended machine


def quiet_ratios(before: list[float], after: list[float], reference_ms: float | None = None) -> list[float]:
    """Ratios after / before of the pairs whose reference round (``before``) ran within QUIET_SLACK of its
    fastest (``reference_ms`` where given); at least a quarter of the pairs (and 3), the quietest, are kept.

    Only the reference says whether the machine was contended: a pruned model's own slow rounds are part
    of its latency. Filtering them too kept the fast half of a plan whose rounds alternated between two
    speeds (efficientnet_b0 at 0.3: 0.199 by that filter, 0.226 over all pairs, 0.223-0.234 by an
    independent round-robin timing at the same moment; docs/latency.md)."""
    before_ms, after_ms = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    slowdown = before_ms / (reference_ms or before_ms.min())
    keep = slowdown <= QUIET_SLACK
    least = min(len(slowdown), max(3, len(slowdown) // 4))
    if keep.sum() < least:
        keep = np.zeros(len(slowdown), dtype=bool)
        keep[np.argsort(slowdown, kind="stable")[:least]] = True
    return (after_ms[keep] / before_ms[keep]).tolist()


def quiet(values) -> float:
    """The QUANTILE of repeated timings: what a run takes when nothing else gets in the way."""
    return float(np.quantile(np.asarray(values, dtype=np.float64), QUANTILE))


def spread(values) -> float:
    """How far repeated timings (or ratios) scatter: their interquartile range over their median."""
    q1, median, q3 = np.quantile(np.asarray(values, dtype=np.float64), [0.25, 0.5, 0.75])
    return float((q3 - q1) / median) if median > 0 else float("inf")


def _times_ms(fn: Callable[[], Any], warmup: int, repeats: int, min_seconds: float = 0.0,
              sync: Callable[[], None] = lambda: None) -> np.ndarray:
    """Wall times of ``fn`` in ms after ``warmup`` calls: at least ``repeats`` calls and ``min_seconds``."""
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_seconds:
        begin = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - begin)
    return np.asarray(times) * 1e3


def _quiet_ms(fn: Callable[[], Any], warmup: int, repeats: int, min_seconds: float = 0.0,
              sync: Callable[[], None] = lambda: None) -> float:
    """Quiet wall time of ``fn`` in ms (see ``quiet``)."""
    return quiet(_times_ms(fn, warmup, repeats, min_seconds, sync))


class Deployed(ABC):
    """A model loaded on an engine: ``run()`` runs one forward pass as deployed; ``split()`` says which
    shares of a run go to memory-bound ops between layers and to the overhead between kernels."""

    @abstractmethod
    def run(self) -> Any: ...

    @abstractmethod
    def split(self) -> tuple[float, float]: ...

    def kernels(self) -> list[KernelTime] | None:
        """Every kernel of one profiled run, where the engine's profiler names them (else None): what
        the latency pass checks its tables against."""
        return None


class Engine(ABC):
    """Times units and whole models on one deployment target, with a fixed thread count."""

    name = ""
    unit_protocol = ""  # how units are timed, where it changed since tables were first cached (cache keys)

    # profiled runs per table session: the median of 15 ratios to the reference moves by about 0.24 x their
    # spread (2% on resnet50's tables: 0.5%); 30 cost a cold resnet50 compile 20 s more for a table within it
    def __init__(self, threads: int | None = None, warmup: int = 3, repeats: int = 15) -> None:
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise FxpruneError(f"threads must be a positive integer, got {threads!r}")
        self.threads = threads or torch.get_num_threads()
        self.warmup, self.repeats = warmup, repeats

    def identity(self) -> dict[str, Any]:
        """What two measurements must share to be interchangeable: engine, version, hardware, threads."""
        return {"engine": self.name, "version": self.version(), **self.device(), "threads": self.threads}

    @abstractmethod
    def version(self) -> str: ...

    def device(self) -> dict[str, str]:
        return cpu_identity()

    def check_available(self) -> None:  # noqa: B027 - an engine that runs everywhere keeps this default
        """Raise EngineUnavailableError, saying what to do, when this engine cannot run here."""

    @abstractmethod
    def measure_units(self, spec: UnitSpec, points: list[tuple[int, int]]) -> UnitTiming:
        """Quiet latency (ms) of the unit at each (kept input width, kept output width)."""

    @abstractmethod
    def deploy(self, module: nn.Module, example_inputs: tuple) -> ContextManager["Deployed"]:
        """``module`` made ready to run on this engine (exported, loaded), for the ``with`` block."""

    def deploy_traced(self, gm: torch.fx.GraphModule, example_inputs: tuple, cache: LatencyCache,
                      digest: str) -> ContextManager["Deployed"]:
        """The analysed model deployed; an engine whose deployment is slow to build keeps it in ``cache``
        under the model's ``digest`` (``ir.graph.model_digest``)."""
        return self.deploy(gm, example_inputs)

    def deploy_pruned(self, full: "Deployed", module: nn.Module, example_inputs: tuple) -> ContextManager["Deployed"]:
        """``module``, a pruned copy of the model ``full`` runs; an engine that can derive it from ``full``
        faster than deploying it anew does."""
        return self.deploy(module, example_inputs)

    def compare(self, modules: list[nn.Module], example_inputs: tuple, rounds: int = ROUNDS,
                seconds: float = ROUND_SECONDS) -> list[float]:
        """Quiet latency (ms) of each module, timed in interleaved rounds (see ``time_interleaved``)."""
        with ExitStack() as stack:
            runs = [stack.enter_context(self.deploy(module, example_inputs)).run for module in modules]
            return self.time_interleaved(runs, rounds, seconds)

    def time_round(self, run: Callable[[], Any], seconds: float = ROUND_SECONDS, warmup: int = 1) -> float:
        """One round: the quiet latency (ms) of ``run`` over ``seconds``."""
        with torch.no_grad(), _threads(self.threads):
            return _quiet_ms(run, warmup, 3, min_seconds=seconds, sync=self._sync)

    def time_interleaved(self, runners: list[Callable[[], Any]], rounds: int = ROUNDS,
                         seconds: float = ROUND_SECONDS) -> list[float]:
        """Quiet latency (ms) of each runner: in each round every runner is timed for ``seconds``; the
        result is its fastest round. Other tenants of this machine slow it down for stretches of a
        second or more, models that rely on the shared cache most; interleaving gives every runner the
        same chances of a quiet round, so the ratios between them hold even when no single round does."""
        best = [float("inf")] * len(runners)
        for round_ in range(rounds):
            for index, run in enumerate(runners):
                best[index] = min(best[index], self.time_round(run, seconds, self.warmup if round_ == 0 else 1))
        return best

    def time_shares(self, reference: Callable[[], Any], runners: list[Callable[[], Any]], rounds: int = ROUNDS,
                    seconds: float = ROUND_SECONDS) -> tuple[float, list[float]]:
        """The reference's quiet latency (ms) and each runner's latency as a share of it: the median of
        its quiet pair ratios (``pair_ratios``)."""
        reference_ms, ratios = self.pair_ratios(reference, runners, rounds, seconds)
        return reference_ms, [float(np.median(values)) for values in ratios]

    def pair_ratios(self, reference: Callable[[], Any], runners: list[Callable[[], Any]], rounds: int = ROUNDS,
                    seconds: float = ROUND_SECONDS) -> tuple[float, list[list[float]]]:
        """The reference's quiet latency (ms) and, per runner, the ratios runner / reference of its quiet
        pairs of rounds (their median is its share, their ``spread`` says how far to trust it).

        Each runner is timed in pairs with the reference, a round of each back to back (the reference
        first in every other pair). A slowdown longer than a pair hits both sides of the ratio, so
        shares hold on a machine whose speed moves between rounds. A contended machine does not slow all
        models alike, though (threads wait on each other at every kernel, and a small model has the same
        number of kernels), so pairs whose reference round ran over QUIET_SLACK x its fastest are left out;
        a runner's own slower rounds count, as an independent round-robin timing counts them
        (``quiet_ratios``)."""
        befores: list[list[float]] = [[] for _ in runners]
        afters: list[list[float]] = [[] for _ in runners]
        for round_ in range(rounds):
            for index, run in enumerate(runners):
                warmup = self.warmup if round_ == 0 else 1
                if (round_ + index) % 2 == 0:
                    befores[index].append(self.time_round(reference, seconds, warmup))
                    afters[index].append(self.time_round(run, seconds, warmup))
                else:
                    afters[index].append(self.time_round(run, seconds, warmup))
                    befores[index].append(self.time_round(reference, seconds, warmup))
        reference_ms = min(min(values) for values in befores)
        return reference_ms, [quiet_ratios(before, after, reference_ms) for before, after in zip(befores, afters)]

    def _sync(self) -> None:  # noqa: B027 - CPU engines have nothing to wait for
        """Wait for queued device work (GPU engines)."""


# --- torch ----------------------------------------------------------------------------------------
def unit_module(spec: UnitSpec, width_in: int, width_out: int) -> tuple[nn.Module, torch.Tensor]:
    """The unit as torch runs it (its kind's layer, BatchNorm, activation), and an input of its kept width."""
    dtype = getattr(torch, spec.dtype)
    norm = spec.torch_norm(width_out) if spec.batch_norm else nn.Identity()
    module = nn.Sequential(spec.torch_layer(width_in, width_out), norm, torch_activation(spec.activation))
    return module.eval().to(dtype), torch.randn(spec.input_at(width_in)).to(dtype)


class TorchEngine(Engine):
    """Eager PyTorch on ``device``: each unit timed as its modules run, one after the other."""

    name = "torch"
    device_type = "cpu"
    unit_protocol = "interleaved pairs"  # part of a table's cache key: tables timed otherwise are timed again

    def __init__(self, threads: int | None = None, warmup: int = 3, repeats: int = 10) -> None:
        super().__init__(threads, warmup, repeats)  # each point is its own call here: fewer repeats than a profile

    def version(self) -> str:
        return torch.__version__

    def _sync(self) -> None:
        if self.device_type == "cuda":
            torch.cuda.synchronize()

    def measure_units(self, spec: UnitSpec, points: list[tuple[int, int]]) -> UnitTiming:
        """Each point timed run by run against the REFERENCE unit, alternating which runs first: its
        latency is the median ratio times the reference's quiet latency, its spread that of the ratios.
        A slowdown that spans a pair (another process, threads waiting on a shared core) hits both
        sides; timing a point's repeats and then the reference's let one such stretch put a narrow
        layer at 20x a wide one (CI, a tiny model's table under ``pytest -n 2``)."""
        reference, reference_x = unit_module(REFERENCE, REFERENCE.in_channels, REFERENCE.out_channels)
        reference, reference_x = reference.to(self.device_type), reference_x.to(self.device_type)
        run_reference = lambda: reference(reference_x)  # noqa: E731
        results, references, spreads = [], [], []
        with torch.no_grad(), _threads(self.threads):
            for width_in, width_out in points:
                module, x = unit_module(spec, int(width_in), int(width_out))
                module, x = module.to(self.device_type), x.to(self.device_type)
                run_unit = functools.partial(module, x)
                for _ in range(self.warmup):
                    run_unit(), run_reference()
                pairs = np.array([self._pair(run_unit, run_reference, unit_first=i % 2 == 0)
                                  for i in range(self.repeats)])
                ratios = pairs[:, 0] / np.maximum(pairs[:, 1], 1e-12)
                references.append(quiet(pairs[:, 1]))
                results.append(float(np.median(ratios)) * references[-1])
                spreads.append(spread(ratios))
        return UnitTiming(np.asarray(results), np.asarray(references), np.asarray(spreads))

    def _pair(self, run_unit: Callable[[], Any], run_reference: Callable[[], Any],
              unit_first: bool) -> tuple[float, float]:
        """One run of the unit and one of the reference, back to back: their wall times in ms."""
        order = (run_unit, run_reference) if unit_first else (run_reference, run_unit)
        first, second = (float(_times_ms(run, 0, 1, sync=self._sync)[0]) for run in order)
        return (first, second) if unit_first else (second, first)

    @contextmanager
    def deploy(self, module: nn.Module, example_inputs: tuple) -> Iterator[Deployed]:
        """The module as deployed: in eval mode (a copy, where it is not: its statistics must not move, and
        switching modes on every run would be timed too), on the device (a copy: .to() moves in place)."""
        if self.device_type != "cpu" or any(m.training for m in module.modules()):
            module = copy.deepcopy(module).eval().to(self.device_type)
        yield _TorchDeployed(self, module, tuple(x.to(self.device_type) for x in example_inputs))


class _TorchDeployed(Deployed):
    def __init__(self, engine: TorchEngine, module: nn.Module, inputs: tuple) -> None:
        self.engine, self.module, self.inputs = engine, module, inputs

    def run(self) -> Any:
        with torch.no_grad():
            return self.module(*self.inputs)

    def split(self) -> tuple[float, float]:
        """From torch's profiler (CPU only; on a GPU the whole time counts as the layers')."""
        if self.engine.device_type != "cpu":
            return 0.0, 0.0
        with torch.no_grad(), _threads(self.engine.threads), profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(self.engine.repeats):
                self.module(*self.inputs)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        memory = sum(e.self_cpu_time_total for e in events if e.key in RULES.memory_kernels)
        return (memory / total if total else 0.0), 0.0


class CudaEngine(TorchEngine):
    """Eager PyTorch on the first CUDA GPU (the interface a GPU engine such as TensorRT also fills)."""

    name = "cuda"
    device_type = "cuda"

    def device(self) -> dict[str, str]:
        self.check_available()
        return {"gpu": torch.cuda.get_device_name(0), "cuda": str(torch.version.cuda)}

    def check_available(self) -> None:
        if not torch.cuda.is_available():
            raise EngineUnavailableError("engine 'cuda' needs a CUDA GPU, and torch.cuda.is_available() is False "
                                         "here; use engine='onnxruntime' or engine='torch' for the CPU")


class _threads:
    """Run torch with a fixed intra-op thread count, restoring the previous count after."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __enter__(self) -> None:
        self.previous = torch.get_num_threads()
        torch.set_num_threads(self.count)

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.previous)
