"""Latency pass: per-layer lookup tables measured on the deployment engine, and the model's remainder.

What it writes:

- ``node.meta["fxprune_layer_latency"]`` on every prunable convolution and linear layer: its *unit* (the
  layer with the BatchNorm folded into it and the activation after it, at the input shape it sees in
  this model) and the unit's ``LatencyTable``, measured over a grid of kept (input, output) widths and
  calibrated to milliseconds inside this model.
- ``gm.meta["fxprune_latency"]``: a ``LatencyCalibration``: the engine, the latency step found on it,
  the channel granularity per group, and the whole model measured (with a uniformly reduced copy, the
  second calibration point): its latency, the part spent in memory-bound ops between layers (which
  scales with the widths of the tensors those ops touch) and the fixed rest.

``latency_cost(gm)`` turns both into the ``CostModel`` the planner solves with: the latency of a plan is
its units' table entries + the memory-bound ops scaled by kept width + the fixed rest. At full width it
equals the measured latency. Every measurement goes through ``fxprune.cache.LatencyCache``.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from tqdm.auto import tqdm

from fxprune.backends.engines import QUANTILE, ROUNDS, KernelTime, spread
from fxprune.errors import AnalysisRequiredError, LatencyError
from fxprune.ir import graph
from fxprune.ir.channels import ChannelSpace, Plan
from fxprune.ir.cost import CostModel, CostTerm, TableTerm
from fxprune.ir.keys import ANALYSIS_KEY, LATENCY_KEY, LAYER_LATENCY_KEY
from fxprune.ir.latency import BUSY_SLOWDOWN, LatencyCalibration, LatencyTable, LayerLatency
from fxprune.ir.units import UnitSpec
from fxprune.passes.blocks import block_spaces
from fxprune.passes.context import Context
from fxprune.passes.rewrite import kept_shares
from fxprune.rules import RULES
from fxprune.rules.params import tensor_axes
from fxprune.rules.units import REFERENCE, Unit, find_units
from fxprune.solvers.planner import uniform_plan

GRID_POINTS = 8  # kept widths measured per axis (plus one channel); the rest is interpolated
REDUCED_SHARE = 0.35  # the second calibration point: every group at this share of its channels
WARM_ROUNDS = 4  # rounds of the whole model and its reduced copy when every table came from the cache
HISTORY = 8  # the reduced copy's shares of the whole model kept from earlier compiles: this machine's scatter
MODEL_AGREEMENT = 0.03  # ... and the reduced copy's share of the whole model within this (or twice the spread
# of this run's per-round shares) of the cached timing's, that timing is used: the tables scale as they did
STEP_PROBE = REFERENCE  # timed at widths 1..64 to find the step
STEP_CANDIDATES = (64, 32, 16, 8, 4, 2)
STEP_TOLERANCE = 0.10  # rounding a width up to a step may cost this much more before the step is rejected
# Retiming is bounded. A point whose repeats scatter more than SPREAD_LIMIT (interquartile range over median,
# of its ratios to the reference timed in the same runs, in its table's largest latency: ``_Timed.noisy``)
# was timed while the machine was busy: it is timed
# again, at most RETRIES more times, keeping the quietest attempt, and then used with its spread recorded
# (the report says the machine was busy; the closed loop's whole-model timings decide). A cached table is
# read as it was stored: a later compile times nothing again for noise alone. A layer that runs
# DISAGREEMENT x faster or slower inside the whole model (its kernel in a profile taken now) than its table
# says, relative to the other layers, has its table timed again when the difference is MATERIAL of the
# layers' time; a new table within CONFIRMED of the old one says the layer does run differently in the
# model, and is kept.
SPREAD_LIMIT = 0.10
RETRIES = 2
DISAGREEMENT = 2.5
MATERIAL = 0.01
CONFIRMED = 0.2

__all__ = ["LATENCY_KEY", "LatencyCalibration", "LatencyPass", "detect_step", "latency_cost"]


def detect_step(latency_ms: np.ndarray, tolerance: float = STEP_TOLERANCE, agreement: float = 0.9) -> int:
    """The engine's latency step from a probe timed at widths 1..K: the largest step s such that, for at
    least ``agreement`` of the widths above s, rounding up to a multiple of s costs at most ``tolerance``
    more (widths between multiples buy nothing). Widths below the first step are not checked (one channel
    is cheaper than sixteen), and a few exceptions are allowed: a probe on a busy machine has outliers."""
    widths = np.arange(1, latency_ms.size + 1)
    for step in STEP_CANDIDATES:
        if 2 * step > latency_ms.size:
            continue
        rounded = -(-widths // step) * step
        inside = (rounded <= latency_ms.size) & (widths > step)
        free = latency_ms[rounded[inside] - 1] <= latency_ms[inside] * (1 + tolerance) + 1e-4
        if free.mean() >= agreement:
            return step
    return 1


def channel_granularity(gm: torch.fx.GraphModule, step: int) -> dict[int, int]:
    """Keep-count granularity per prunable group, in group channels, for tensor widths on multiples of
    ``step``: a group channel may span several positions (a conv group of 8 channels is one unit, an
    attention head its head width). Counted on the axes layers produce (a weight's rows), where the step
    applies, so a head, one position of the attention's own head axis, still spans its projection rows."""
    analysis = gm.meta[ANALYSIS_KEY]
    produced = {axis.space.id for axis in tensor_axes(gm) if axis.produces}
    every: dict[int, int] = {}
    layers: dict[int, int] = {}  # a group no layer produces (a stream of parameters) is counted on every axis
    for space in analysis.spaces:
        per_channel = space.size // max(1, np.unique(space.channel_index).size)
        every[space.group_id] = min(every.get(space.group_id, per_channel), per_channel)
        if space.id in produced:
            layers[space.group_id] = min(layers.get(space.group_id, per_channel), per_channel)
    positions = {**every, **layers}
    return {g.id: max(1, step // math.gcd(step, positions.get(g.id, 1))) for g in analysis.prunable_groups()}


def _kept_counts(size: int, granularity: int, points: int) -> np.ndarray:
    """Keep counts a table measures for a group of ``size``: one, and up to ``points`` multiples of
    ``granularity`` spread evenly up to the full size."""
    multiples = size // granularity
    if multiples <= 1:
        chosen = np.array([granularity] if multiples == 1 else [], dtype=np.int64)
    else:
        steps = np.round(np.linspace(1, multiples, min(points - 1, multiples))).astype(np.int64)
        chosen = np.unique(steps) * granularity
    return np.unique(np.concatenate([[1], chosen[chosen <= size], [size]])).astype(np.int64)


class LatencyPass(PassBase):
    """Measure (or load) the latency tables of every unit and the model's remainder on the context's
    engine, through its cache; the full model is deployed through the context (shared with the closed loop)."""

    def __init__(self, context: Context, *, round_to: int | None = None, grid_points: int = GRID_POINTS) -> None:
        super().__init__()
        if context.engine is None:
            raise LatencyError("latency tables need an engine: make the Context with engine='onnxruntime' (or "
                               "'torch', 'cuda', an Engine)")
        self.context, self.engine, self.cache = context, context.engine, context.cache
        self.example_inputs, self.progress = context.example_inputs, context.progress
        self.round_to = round_to
        self.grid_points = grid_points

    def requires(self, graph_module: torch.fx.GraphModule) -> None:
        if ANALYSIS_KEY not in graph_module.meta:
            raise AnalysisRequiredError("latency tables need channel groups: run fxprune.analyze(model, inputs) first")

    def ensures(self, graph_module: torch.fx.GraphModule) -> None:
        calibration = graph_module.meta[LATENCY_KEY]
        assert calibration.measured_ms > 0 and calibration.step >= 1
        assert all(LAYER_LATENCY_KEY in unit.layer.meta for unit in find_units(graph_module))

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        start = time.perf_counter()
        self.healed: list[str] = []
        self.model_timing_reused = self.model_timing_stored = False
        self.slowdown = 1.0
        self.busy: list[float] = []  # spreads of the points that stayed noisy through their retries in this run
        measured_before = self.cache.measured
        step = self.step()
        granularity = (channel_granularity(graph_module, step) if self.round_to is None else
                       {g.id: self.round_to for g in graph_module.meta[ANALYSIS_KEY].prunable_groups()})
        units = find_units(graph_module)
        keys = {id(unit): self._table_key(unit, *self._grid(graph_module, unit, granularity)) for unit in units}
        reduced = uniform_plan(graph_module, REDUCED_SHARE, granularity)
        tables, timing, kernels = self._measure(graph_module, keys, reduced)
        checked = self._check(units, keys, tables, kernels)
        for unit in units:
            unit.layer.meta[LAYER_LATENCY_KEY] = LayerLatency(unit, tables[_digest(keys[id(unit)])])
        reduced_sum = latency_sum(graph_module, kept_shares(graph_module, reduced))
        scale, offset = _fit(latency_sum(graph_module, {}), reduced_sum,
                             timing, len(units), min((t.ms.min() for t in tables.values()), default=0.0))
        for unit in units:  # the tables, in the reference unit's latency, become ms inside this model
            table = unit.layer.meta[LAYER_LATENCY_KEY].table
            unit.layer.meta[LAYER_LATENCY_KEY] = LayerLatency(unit, table.affine(scale, offset))
        graph_module.meta[LATENCY_KEY] = LatencyCalibration(
            engine=self.engine.identity(), step=step, granularity=granularity, measured_ms=timing["ms"],
            units_ms=latency_sum(graph_module, {}), memory_ms=timing["memory_ms"], overhead_ms=timing["overhead_ms"],
            context=scale, offset_ms=offset, reduced_ms=timing["reduced_ms"], reduced=reduced, tables=len(tables),
            layers=len(units), tables_checked=checked,  # the model timing, where stored, is no table
            tables_measured=self.cache.measured - measured_before - self.model_timing_stored,
            healed=self.healed, busy_points=len(self.busy), busy_spread=max(self.busy, default=0.0),
            model_timing_cached=self.model_timing_reused, slowdown=self.slowdown,
            seconds=time.perf_counter() - start)
        return PassResult(graph_module, modified=False)

    def _measure(self, gm: torch.fx.GraphModule, keys: dict[int, dict],
                 reduced: Plan) -> tuple[dict[str, LatencyTable], dict, list[KernelTime] | None]:
        """Every distinct table (from the cache or measured, with a progress bar), the timing of the whole
        model and of a copy ``reduced`` prunes, and the whole model's kernels as profiled now.

        The whole models are timed in every compile: they scale the tables into this model's milliseconds
        now, and their profile checks the tables. Both are timed in interleaved rounds spread over the
        table build: on a machine whose speed comes and goes, the fastest of rounds far apart is the quiet
        latency. Where every table came from the cache and the reduced copy's share of the whole model is
        within MODEL_AGREEMENT (or twice the scatter of this run's per-round shares) of the shares earlier
        compiles measured (``_same_share``: the cached one's, and the last quiet ones'), the cached timing is
        used as it is: a machine uniformly faster or slower changes no share,
        while contention, which slows a small model more than a large one, moves this one. The tables then
        scale as they did, the same plans are solved, and their cached timings stand (a warm compile times
        no plan). So they do where the whole model ran over BUSY_SLOWDOWN x as slow as cached: a busy run's
        share is no measure, and plans timed under load read high and cost minutes (the README command beside
        two busy processes: 57-77 s, where warm compiles that kept the cached timing took 18-21 s).
        """
        distinct = {_digest(key): key for key in keys.values()}
        tables: dict[str, LatencyTable] = {}
        rounds: list[list[float]] = []
        with ExitStack() as stack:
            models = [self.context.deployed(gm)]
            models.append(stack.enter_context(self.engine.deploy_pruned(models[0], self.context.pruned(gm, reduced),
                                                                        self.example_inputs)))

            def time_a_round() -> None:
                warmup = 1 if rounds else self.engine.warmup
                rounds.append([self.engine.time_round(model.run, warmup=warmup) for model in models])

            for digest, key in tqdm(distinct.items(), desc=f"fxprune latency tables ({self.engine.name}, "
                                    f"{self.engine.threads} threads)", unit="layer", disable=not self.progress):
                measured = self.cache.measured
                tables[digest] = self._table(key)
                if self.cache.measured > measured:  # rounds spread over the time tables take to measure
                    time_a_round()
            wanted = ROUNDS if rounds else WARM_ROUNDS  # fewer when no table was measured
            while len(rounds) < wanted:
                time_a_round()
            fastest = np.min(rounds, axis=0)
            key = {"kind": "model", "engine": self.engine.identity(), "model": self.context.digest(gm),
                   "reduced": reduced.to_json(), "protocol": self._protocol()}
            kernels = models[0].kernels()
            previous = self.cache.lookup(key, _model_timing)
            history = _history(previous, rounds)
            cached = previous if len(rounds) == WARM_ROUNDS else None
            if cached is not None:
                self.slowdown = float(fastest[0]) / float(cached["ms"])
            busy = self.slowdown > BUSY_SLOWDOWN  # a busy run's share is no measure: the quiet one cached stands
            if cached is not None and (busy or _same_share(rounds, cached)):
                self.model_timing_reused = True  # the machine runs both as it did (or is busy): the same scale
                if busy or history == cached["shares"]:
                    return tables, cached, kernels
                self.model_timing_stored = True  # this quiet run's share joins the history
                return tables, self.cache.store(key, {**cached, "shares": history}, _model_timing), kernels
            self.model_timing_stored = True
            parts: dict = {"shares": history}
            for prefix, ms, model in zip(("", "reduced_"), fastest, models):
                memory, overhead = model.split()
                parts.update({f"{prefix}ms": float(ms), f"{prefix}memory_ms": ms * memory,
                              f"{prefix}overhead_ms": ms * overhead})
        return tables, self.cache.store(key, parts, _model_timing), kernels

    def _check(self, units: list[Unit], keys: dict[int, dict], tables: dict[str, LatencyTable],
               kernels: list[KernelTime] | None) -> int:
        """Check the tables against the whole model's kernels profiled now (``disagreeing``); time again
        every table that disagrees and keep the new one. Returns how many layers were checked."""
        if not kernels:
            return 0
        found = _layer_kernels(units, kernels)
        suspects: dict[str, Unit] = {}
        for index in disagreeing([(float(tables[_digest(keys[id(unit)])].ms[-1, -1]), us) for unit, us in found]):
            unit = found[index][0]
            suspects.setdefault(_digest(keys[id(unit)]), unit)
        for digest, unit in suspects.items():
            key = keys[id(unit)]
            old = tables[digest]
            tables[digest] = self._table(key, again=True)
            change = float(tables[digest].ms[-1, -1] / old.ms[-1, -1])
            verdict = "it runs so in the model" if abs(change - 1) <= CONFIRMED else "the old table was off"
            self.healed.append(f"{unit.layer.name} ({unit.spec.describe()}): its table disagreed with the whole "
                               f"model; timed again at {change:.2f}x the old ({verdict})")
        return len(found)

    def _protocol(self) -> dict:
        protocol = {"warmup": self.engine.warmup, "repeats": self.engine.repeats, "quantile": QUANTILE,
                    "reference": REFERENCE.to_key(), "quality": {"spread": SPREAD_LIMIT, "retries": RETRIES}}
        return {**protocol, "units": self.engine.unit_protocol} if self.engine.unit_protocol else protocol

    def _table_key(self, unit: Unit, widths_in: np.ndarray, widths_out: np.ndarray) -> dict:
        return {"kind": "table", "engine": self.engine.identity(), "unit": unit.spec.to_key(), "tied": unit.spec.tied,
                "widths_in": widths_in.tolist(), "widths_out": widths_out.tolist(), "protocol": self._protocol()}

    def step(self) -> int:
        """The engine's latency step, from a probe convolution timed at widths 1..64 (cached)."""
        points = [(k, k) for k in range(1, STEP_PROBE.out_channels + 1)]
        key = {"kind": "step", "engine": self.engine.identity(), "probe": STEP_PROBE.to_key(),
               "protocol": self._protocol()}
        return detect_step(self._points(key, STEP_PROBE, points).ms)

    def _grid(self, gm: torch.fx.GraphModule, unit: Unit, granularity: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Kept input and output widths (tensor extents) to measure; one width where it cannot change."""
        groups = gm.meta[ANALYSIS_KEY].groups

        def widths(space: ChannelSpace | None, full: int) -> np.ndarray:
            if space is None or space.group_id not in granularity:
                return np.array([full])
            group = groups[space.group_id]
            counts = _kept_counts(group.size, granularity[space.group_id], self.grid_points)
            return np.unique(np.maximum(1, np.round(counts * full / group.size))).astype(np.int64)

        widths_out = widths(unit.out_space, unit.spec.out_channels)
        if unit.spec.tied:  # the input follows the output: one input width per output width
            return np.round(widths_out * unit.spec.in_channels / unit.spec.out_channels).astype(np.int64), widths_out
        return widths(unit.in_space, unit.spec.in_channels), widths_out

    def _table(self, key: dict, again: bool = False) -> LatencyTable:
        """The unit's table in units of the reference unit's latency in the same runs (``rules/units.REFERENCE``),
        made monotone (``LatencyTable.monotone``: no plan is then predicted slower than the full model);
        ``again``: timed anew whatever the cache holds."""
        spec = UnitSpec.from_key(key["unit"])
        widths_in, widths_out = np.asarray(key["widths_in"]), np.asarray(key["widths_out"])
        points = (list(zip(widths_in, widths_out)) if key["tied"]
                  else [(i, o) for i in widths_in for o in widths_out])
        timed = self._points(key, spec, points, again)
        rows = 1 if key["tied"] else widths_in.size
        return LatencyTable(widths_in[:1] if key["tied"] else widths_in, widths_out,
                            (timed.ms / timed.reference_ms).reshape(rows, widths_out.size), key["tied"]).monotone()

    def _points(self, key: dict, spec: UnitSpec, points: list[tuple[int, int]], again: bool = False) -> "_Timed":
        """``spec`` timed at ``points``: from the cache as stored, else (or ``again``) timed now, each point
        up to RETRIES more times while its repeats scatter over SPREAD_LIMIT, keeping its quietest attempt."""
        parse = lambda value: _Timed.parse(value, len(points))  # noqa: E731
        found = None if again else self.cache.lookup(key, parse)
        if found is not None:
            return found
        timed, todo = _Timed.empty(len(points)), np.arange(len(points))
        for _ in range(1 + RETRIES):
            if not todo.size:
                break
            timed.merge(todo, self.engine.measure_units(spec, [points[i] for i in todo]))
            todo = np.intersect1d(todo, timed.noisy())
        # points still noisy, but for layers too small to time (their scatter is unreadable, not the machine's)
        self.busy += [float(timed.spread[i]) for i in todo if timed.spread[i] < UNMEASURED_SPREAD]
        return self.cache.store(key, timed.to_value(), parse)


@dataclass
class _Timed:
    """A unit timed at a list of points: latency, the reference's latency in the same runs, spread, and how
    many times each point was timed."""

    ms: np.ndarray
    reference_ms: np.ndarray
    spread: np.ndarray
    attempts: np.ndarray

    @classmethod
    def empty(cls, count: int) -> "_Timed":
        return cls(np.full(count, np.nan), np.full(count, np.nan), np.full(count, np.inf), np.zeros(count))

    @classmethod
    def parse(cls, value: dict, count: int) -> "_Timed":
        """A cached timing, validated: ``count`` finite latencies, positive references, spreads, attempts."""
        ms, reference, spreads, attempts = (_checked_ms(value[name], count)
                                            for name in ("ms", "reference_ms", "spread", "attempts"))
        if np.any(reference <= 0):
            raise ValueError("a reference latency is not positive")
        return cls(ms, reference, spreads, attempts)

    def to_value(self) -> dict:
        return {"ms": self.ms.tolist(), "reference_ms": self.reference_ms.tolist(), "spread": self.spread.tolist(),
                "attempts": self.attempts.tolist()}

    def noisy(self) -> np.ndarray:
        """Indices of points timed while the machine was busy: their repeats scattered over SPREAD_LIMIT of
        the table's largest latency. A layer's narrowest widths take a few µs, whose scatter is wide however
        quiet the machine (the timer's, not the machine's: 10-40% on resnet50's 3-10 µs points) and moves the
        table by little; timing them again cost a profiled session each, 40 s of a cold resnet50 compile."""
        timed = np.isfinite(self.ms)
        scale = float(self.ms[timed].max()) if timed.any() else 0.0
        weight = np.where(timed, self.ms / scale, 1.0) if scale > 0 else np.ones_like(self.ms)
        return np.flatnonzero(~(self.spread * weight <= SPREAD_LIMIT))

    def merge(self, indices: np.ndarray, timing) -> None:
        """Take the new timing of the points at ``indices`` where it scattered less than the one held."""
        self.attempts[indices] += 1
        better = ~(np.asarray(timing.spread) >= self.spread[indices]) | ~np.isfinite(self.ms[indices])  # untimed: any
        for name in ("ms", "reference_ms", "spread"):
            getattr(self, name)[indices[better]] = np.asarray(getattr(timing, name))[better]
        # a layer too small to time apart from its reference can read at or under zero, with a scatter over a
        # median of zero (infinite): it costs nothing measurable, and its timing is kept as a noisy one
        unmeasurable = self.ms[indices] < 0
        self.ms[indices] = np.maximum(self.ms[indices], 0.0)
        self.spread[indices] = np.where(unmeasurable | ~np.isfinite(self.spread[indices]), UNMEASURED_SPREAD,
                                        self.spread[indices])


def _layer_kernels(units: list[Unit], kernels: list[KernelTime]) -> list[tuple[Unit, float]]:
    """Each unit found among a whole model's profiled kernels (same input, weight and output shapes;
    units of one shape share their kernels' median), with that kernel's µs. The weight is the first input
    after the data with two axes or more (``Conv``, ``Gemm``, ``MatMul``); kernels that show no weight shape
    (each unit kind's ``weightless_kernels``: INT8's fused kernels, onnxruntime's ``ConvTranspose``) and may
    run channels-last are matched by their data and output shapes, as they are or from NHWC."""
    weightless = {op for unit in units for op in unit.spec.weightless_kernels}
    by_shape: dict[tuple, list[float]] = {}
    for kernel in kernels:
        if not (kernel.inputs and kernel.outputs):
            continue
        data, output = tuple(kernel.inputs[0]), tuple(kernel.outputs[0])
        keys: set[tuple[tuple[int, ...], tuple[int, ...] | None, tuple[int, ...]]]
        if kernel.op in weightless:
            keys = {(data, None, output), (_from_nhwc(data), None, _from_nhwc(output))}
        else:
            weight = next((tuple(shape) for shape in kernel.inputs[1:] if len(shape) >= 2), None)
            keys = {(data, weight, output)} if weight is not None else set()
        for key in keys:
            by_shape.setdefault(key, []).append(kernel.us)
    found = []
    for unit in units:
        spec = unit.spec
        times = [us for weight in [*spec.weight_shapes, None]
                 for us in by_shape.get((spec.input_shape, weight, spec.output_shape), [])]
        if times:
            found.append((unit, float(np.median(times))))
    return found


def _from_nhwc(shape: tuple) -> tuple:
    return (shape[0], shape[-1], *shape[1:-1]) if len(shape) >= 3 else shape


def disagreeing(pairs: list[tuple[float, float]]) -> list[int]:
    """Indices of (table entry, kernel time in the model) pairs whose ratio is over DISAGREEMENT x from
    the pairs' median ratio either way, by more than MATERIAL of all kernels' time. A single layer's
    table is checked against the others: what scales them all alike (the machine's speed) is no error."""
    if len(pairs) < 3:
        return []
    table, kernel = (np.array(values, dtype=np.float64) for values in zip(*pairs))
    usable = (table > 0) & (kernel > 0)
    if usable.sum() < 3:
        return []
    center = float(np.median(kernel[usable] / table[usable]))
    ratio = np.where(usable, kernel / np.maximum(table * center, 1e-12), 1.0)
    material = np.abs(kernel - table * center) > MATERIAL * kernel[usable].sum()
    return np.flatnonzero(usable & material & ((ratio > DISAGREEMENT) | (ratio < 1 / DISAGREEMENT))).tolist()


def _model_timing(value: dict) -> dict:
    """A timing of a model and its reduced copy, validated: every part finite, within its whole; with the
    reduced copy's shares of the whole model in the quiet compiles that timed them (``_history``)."""
    parts: dict = {f"{prefix}{name}": float(value[f"{prefix}{name}"]) for prefix in ("", "reduced_")
                   for name in ("ms", "memory_ms", "overhead_ms")}
    parts["shares"] = [float(share) for share in value.get("shares", [])][-HISTORY:]
    if not all(np.isfinite(share) and share > 0 for share in parts["shares"]):
        raise ValueError(f"implausible model timing {value}")
    for prefix in ("", "reduced_"):
        ms, memory, overhead = (parts[f"{prefix}{name}"] for name in ("ms", "memory_ms", "overhead_ms"))
        if not (np.isfinite([ms, memory, overhead]).all() and ms > 0 and memory >= 0 and overhead >= 0
                and memory + overhead <= ms * (1 + 1e-9)):
            raise ValueError(f"implausible model timing {value}")
    return parts


def _same_share(rounds: list[list[float]], cached: dict) -> bool:
    """Whether the reduced copy's share of the whole model, per round of this run (their median), is within
    MODEL_AGREEMENT, or twice the scatter of those shares, of the shares this machine has measured: the
    ``cached`` timing's and those of earlier quiet compiles (its run-to-run scatter, 3-4% for resnet50 here)."""
    shares = _reduced_shares(rounds)
    tolerance = max(MODEL_AGREEMENT, 2 * spread(shares))
    seen = [*cached.get("shares", []), cached["reduced_ms"] / cached["ms"]]
    return min(seen) * (1 - tolerance) <= float(np.median(shares)) <= max(seen) * (1 + tolerance)


def _reduced_shares(rounds: list[list[float]]) -> list[float]:
    """The reduced copy's share of the whole model in each round (full, reduced) of a timing."""
    return [reduced_ms / full_ms for full_ms, reduced_ms in rounds]


def _history(cached: dict | None, rounds: list[list[float]]) -> list[float]:
    """The reduced copy's shares of the whole model measured by quiet compiles, the latest HISTORY: the cached
    ones, and this run's where its rounds agree within MODEL_AGREEMENT (a busy run's share is no measure)."""
    seen = list(cached.get("shares", [])) if cached is not None else []
    shares = _reduced_shares(rounds)
    if spread(shares) <= MODEL_AGREEMENT:
        seen.append(float(np.median(shares)))
    return seen[-HISTORY:]


def _fit(full: float, reduced: float, timing: dict, units: int, smallest: float) -> tuple[float, float]:
    """Scale and per-layer offset that turn table entries (reference units) into ms inside the model:
    the layers' time in the whole model and in its reduced copy, timed in the same rounds, against the
    tables' sums for both (``full``, ``reduced``). One point fixes the scale; the second finds what a
    layer costs in the model beyond its table alone (or less), whatever its width. The offset is kept
    where no table entry turns negative; with no usable second point it is zero."""
    layers = timing["ms"] - timing["memory_ms"] - timing["overhead_ms"]
    layers_reduced = timing["reduced_ms"] - timing["reduced_memory_ms"] - timing["reduced_overhead_ms"]
    if not (full > 0 and layers > 0):
        return 1.0, 0.0
    if units and full - reduced > 1e-9 * full:
        scale = (layers - layers_reduced) / (full - reduced)
        offset = (layers - scale * full) / units
        if scale > 0 and scale * smallest + offset >= 0:
            return scale, offset
    return layers / full, 0.0


UNMEASURED_SPREAD = 1e6  # the spread recorded for a timing whose scatter could not be read (over SPREAD_LIMIT)


def _checked_ms(values, count: int) -> np.ndarray:
    """Latencies as measured: ``count`` finite, non-negative numbers, or ValueError."""
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size != count or not np.all(np.isfinite(array)) or np.any(array < 0):
        raise ValueError(f"expected {count} finite non-negative latencies, got {array.size}")
    return array


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


# --- the cost model ---------------------------------------------------------------------------------
def _is_free(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Nodes that move no data as deployed (their rule's ``Rule.deployed``: views, metadata reads, dropout
    in eval); layers outside units (frozen widths) too, which are timed in the fixed part (``Rule.layer``)."""
    if node.op in ("placeholder", "get_attr", "output"):
        return True
    rule = RULES(gm, node)
    return rule.deployed(gm, node) != "data" or (node.op == "call_module" and rule.layer)


def _runs(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Ops an engine launches (views and layers too, which are ops of their own as deployed); not metadata
    reads, dropout in eval, or identities."""
    return node.op not in ("placeholder", "get_attr", "output") and RULES(gm, node).deployed(gm, node) != "none"


def _traffic(gm: torch.fx.GraphModule, units_nodes: set[str]) -> list[tuple[str, float, ChannelSpace | None]]:
    """(node, elements read or written, channel space of that tensor) for every memory-moving node
    outside the units."""
    found = []
    for node in gm.graph.nodes:
        if node.name in units_nodes or _is_free(gm, node):
            continue
        tensors = [node] + [a for a in node.all_input_nodes if hasattr(a.meta.get("tensor_meta"), "shape")]
        for tensor in tensors:
            meta = tensor.meta.get("tensor_meta")
            if hasattr(meta, "shape"):
                found.append((node.name, float(np.prod(meta.shape)), graph.space(tensor)))
    return found


def latency_sum(gm: torch.fx.GraphModule, kept_share: dict[int, float]) -> float:
    """The units' table entries at the given kept shares (space id -> share; missing: all), summed."""
    blocks, _ = block_spaces(gm)
    return sum((float(_table_term(node, blocks).price(kept_share)) for node in gm.graph.nodes
                if LAYER_LATENCY_KEY in node.meta), 0.0)


def _table_term(node: torch.fx.Node, blocks: dict[str, int]) -> TableTerm:
    unit, table = node.meta[LAYER_LATENCY_KEY].unit, node.meta[LAYER_LATENCY_KEY].table
    return TableTerm(node.name, table, unit.in_space.id if unit.in_space else None, unit.out_space.id,
                     unit.spec.in_channels, unit.spec.out_channels, blocks.get(node.name))


def latency_cost(gm: torch.fx.GraphModule) -> CostModel:
    """Latency in ms as a function of kept widths, read from the latency pass's results on the graph."""
    if LATENCY_KEY not in gm.meta:
        raise AnalysisRequiredError("no latency tables on this graph: run LatencyPass(example_inputs)(gm) first")
    calibration: LatencyCalibration = gm.meta[LATENCY_KEY]
    model = CostModel("latency")
    units_nodes: set[str] = set()
    blocks, _ = block_spaces(gm)
    for node in gm.graph.nodes:
        if LAYER_LATENCY_KEY in node.meta:
            units_nodes.update(node.meta[LAYER_LATENCY_KEY].unit.nodes)
            model.terms.append(_table_term(node, blocks))
    traffic = _traffic(gm, units_nodes)
    total = sum(elements for _, elements, _ in traffic)
    for name, elements, space in traffic:
        share = calibration.memory_ms * elements / total if total else 0.0
        block = (blocks[name],) if name in blocks else ()  # a removed block's adds and activations go with it
        model.terms.append(CostTerm(f"{name} (memory)", share, block + ((space.id,) if space is not None else ())))
    if not total:
        model.terms.append(CostTerm("memory-bound ops", calibration.memory_ms))
    model.terms += _fixed_terms(gm, calibration.fixed_ms, blocks)
    model.baseline = model.total({})
    return model


def _fixed_terms(gm: torch.fx.GraphModule, fixed_ms: float, blocks: dict[str, int]) -> list[CostTerm]:
    """What no width changes, spread over the ops the engine runs: each op's launch and the time between
    kernels are paid per op, so a removed block takes its ops' part with it (on a decoder's step, where
    most of the time is that, depth would be undervalued otherwise). One term per block, one for the rest."""
    ops = [node.name for node in gm.graph.nodes if _runs(gm, node)]
    per_op = fixed_ms / len(ops) if ops else 0.0
    in_block = Counter(blocks[name] for name in ops if name in blocks)
    terms = [CostTerm(f"fixed (ops of block space {space})", per_op * count, (space,))
             for space, count in sorted(in_block.items())]
    return terms + [CostTerm("fixed (overhead, frozen layers)", fixed_ms - per_op * sum(in_block.values()))]
