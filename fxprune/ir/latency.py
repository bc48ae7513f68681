"""Latency payloads: a layer's measured table, what the latency pass leaves on a layer and on the graph."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class LatencyTable:
    """Latency (ms) of one layer as its engine runs it, measured over a grid of kept widths.

    Widths are tensor extents along the channel axis (what the engine sees). ``ms[i, j]`` is the
    latency with ``widths_in[i]`` input and ``widths_out[j]`` output channels. A *tied* table belongs to
    a grouped or depthwise convolution, whose input width follows its output width: it has one row.
    Between grid points the table is interpolated linearly along each width; outside, it is clamped.
    """

    widths_in: np.ndarray
    widths_out: np.ndarray
    ms: np.ndarray
    tied: bool = False

    def __post_init__(self) -> None:
        self.widths_in = np.asarray(self.widths_in, dtype=np.float64).reshape(-1)
        self.widths_out = np.asarray(self.widths_out, dtype=np.float64).reshape(-1)
        self.ms = np.asarray(self.ms, dtype=np.float64)
        rows = 1 if self.tied else self.widths_in.size
        if self.ms.shape != (rows, self.widths_out.size):
            raise ValueError(f"latency table of shape {self.ms.shape} does not match its grid "
                             f"({rows} x {self.widths_out.size})")
        for axis in (self.widths_in, self.widths_out):
            if axis.size == 0 or np.any(np.diff(axis) <= 0):
                raise ValueError(f"table widths must be non-empty and strictly ascending, got {axis.tolist()}")
        if not np.all(np.isfinite(self.ms)) or np.any(self.ms < 0):
            raise ValueError("table latencies must be finite and non-negative")

    def affine(self, scale: float, offset: float = 0.0) -> "LatencyTable":
        """This table with every entry ``scale * entry + offset``."""
        return LatencyTable(self.widths_in, self.widths_out, self.ms * scale + offset, self.tied)

    def monotone(self) -> "LatencyTable":
        """This table with no entry above one at wider widths (both axes). Pruning only narrows a layer,
        and the planner keeps the most important channels it can pay for: a narrower width that measured
        slower (noise, or a kernel switch) is worth no more than the wider one, whose cost it takes."""
        suffix_min = np.minimum.accumulate(np.minimum.accumulate(self.ms[::-1, ::-1], axis=0), axis=1)
        return LatencyTable(self.widths_in, self.widths_out, suffix_min[::-1, ::-1], self.tied)

    def at(self, width_in, width_out):
        """Latency at kept widths (floats or arrays that broadcast together), interpolated bilinearly."""
        j, t_out = _bracket(self.widths_out, width_out)
        if self.tied:
            i, t_in = np.zeros_like(j), np.zeros_like(t_out)
        else:
            i, t_in = _bracket(self.widths_in, width_in)
        last_i, last_j = self.ms.shape[0] - 1, self.ms.shape[1] - 1
        i1, j1 = np.minimum(i + 1, last_i), np.minimum(j + 1, last_j)
        value = ((1 - t_in) * (1 - t_out) * self.ms[i, j] + t_in * (1 - t_out) * self.ms[i1, j]
                 + (1 - t_in) * t_out * self.ms[i, j1] + t_in * t_out * self.ms[i1, j1])
        return float(value) if np.ndim(value) == 0 else value

    def to_dict(self) -> dict:
        return {"widths_in": self.widths_in.tolist(), "widths_out": self.widths_out.tolist(),
                "ms": self.ms.tolist(), "tied": self.tied}

    @classmethod
    def from_dict(cls, data: dict) -> "LatencyTable":
        return cls(np.asarray(data["widths_in"]), np.asarray(data["widths_out"]), np.asarray(data["ms"]),
                   bool(data["tied"]))


def _bracket(grid: np.ndarray, width) -> tuple[np.ndarray, np.ndarray]:
    """Index of the grid interval holding each width, and the position inside it (0..1), clamped."""
    x = np.clip(np.asarray(width, dtype=np.float64), grid[0], grid[-1])
    if grid.size == 1:
        return np.zeros(x.shape, dtype=np.int64), np.zeros(x.shape)
    index = np.clip(np.searchsorted(grid, x, side="right") - 1, 0, grid.size - 2)
    return index, (x - grid[index]) / (grid[index + 1] - grid[index])


@dataclass
class LayerLatency:
    """What the latency pass leaves on a layer's node: its unit as deployed and its latency table.

    ``table`` is the unit's measured table (kept relative to the engine's reference unit) calibrated on the
    whole model (``LatencyCalibration.context`` and ``offset_ms``): milliseconds inside this model.
    """

    unit: Any  # fxprune.rules.units.Unit: the layer, the ops fused after it, its channel spaces
    table: LatencyTable


# A warm compile whose whole model's fastest round is over this x the cached timing's ran on a busy machine
# (a quiet one's fastest of 4 rounds moves by about a tenth between runs: docs/machine_noise.md)
BUSY_SLOWDOWN = 1.3


@dataclass
class LatencyCalibration:
    """The graph-level result of the latency pass (``gm.meta["fxprune_latency"]``)."""

    engine: dict[str, Any]
    step: int  # channel count the engine's latency moves in
    granularity: dict[int, int]  # per prunable group: keep counts are multiples of this
    measured_ms: float  # the whole model, full width
    units_ms: float  # its units' table entries at full width (the layers' share of ``measured_ms``)
    memory_ms: float  # memory-bound ops between layers (the engine's attribution), scaled with widths
    overhead_ms: float = 0.0  # time between kernels (the engine's attribution)
    context: float = 1.0  # ms per reference unit inside this model (tables are scaled by it) ...
    offset_ms: float = 0.0  # ... plus this per layer (see _fit)
    reduced_ms: float = 0.0  # the second calibration point: the model with every group at REDUCED_SHARE
    reduced: Any = None  # that model's Plan (built once, read again by the closed loop)
    tables: int = 0  # distinct unit tables the model needs ...
    layers: int = 0  # ... for this many layers (layers of one configuration share a table)
    tables_measured: int = 0  # tables (and the step probe) timed in this call, not read from the cache
    tables_checked: int = 0  # layers whose table was checked against the whole model's profile taken now
    healed: list[str] = field(default_factory=list)  # tables timed again, and why
    busy_points: int = 0  # points timed in this call whose repeats still scattered after their retries ...
    busy_spread: float = 0.0  # ... the largest such scatter (interquartile range over median)
    model_timing_cached: bool = False  # the whole models ran as an earlier compile timed them: its timing used
    slowdown: float = 1.0  # the whole model's fastest round in this call over the cached timing's (1: none cached)
    seconds: float = 0.0

    @property
    def busy(self) -> bool:
        """The machine was busy in this call: timed points stayed scattered, or the whole model ran slower."""
        return self.busy_points > 0 or self.slowdown > BUSY_SLOWDOWN

    def summary(self) -> str:
        """How the tables were had: shared, timed now or read, checked against the whole model; the step."""
        read = max(self.tables - self.tables_measured, 0)
        checked = (f"; {self.tables_checked} of {self.layers} layers checked against the whole model profiled in "
                   f"this run" if self.tables_checked else "")
        healed = f", {len(self.healed)} tables timed again" if self.healed else ""
        busy = (f"; the machine was busy: {self.busy_points} points kept with their scatter (up to "
                f"{self.busy_spread:.0%}) after their retries, and the whole-model timings decide"
                if self.busy_points else "")
        if self.slowdown > BUSY_SLOWDOWN:  # nothing timed scattered, but the whole model itself ran slower
            busy += (f"; the machine was busy: the whole model ran {self.slowdown:.1f}x as slow as when an earlier "
                     "compile timed it")
        cached = ("; the reduced copy's share of the whole model agreed with an earlier compile's timing, which "
                  "scales the tables" if self.model_timing_cached else "")
        return (f"{self.layers} layers share {self.tables} tables, {self.tables - read} timed in this run and {read} "
                f"read from the cache{checked}{healed}; latency step {self.step} channels{busy}{cached}")

    @property
    def fixed_ms(self) -> float:
        """What no width changes: the overhead between kernels, and layers whose widths are frozen."""
        return self.measured_ms - self.units_ms - self.memory_ms
