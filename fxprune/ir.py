"""The IR that passes exchange through ``node.meta["fxprune"]`` and ``GraphModule.meta["fxprune"]``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

META_KEY = "fxprune"


@dataclass
class ChannelSpace:
    """One channel axis of one tensor (the output of one fx node) and where its channels sit in a group.

    ``channel_index[j]`` is the group channel that element ``j`` of this axis belongs to. Several elements
    may share a group channel: a flatten maps one channel to a block of features, a grouped convolution
    or a GroupNorm makes a whole block one pruning unit.
    """

    node: str
    dim: int
    size: int
    output_index: int = 0  # which output of the node, for split/chunk results
    id: int = -1  # position in the dependency pass's space list
    group_id: int = -1
    channel_index: np.ndarray | None = None

    def kept_positions(self, keep_mask: np.ndarray) -> np.ndarray:
        """Positions along ``dim`` that survive, given the group's boolean keep mask over its channels."""
        return np.flatnonzero(keep_mask[self.channel_index])


@dataclass
class NodeChannels:
    """What the dependency pass learned about one node: the channel axis of each tensor it outputs.

    ``spaces`` has one entry per output (one for a plain tensor, several for split/chunk results);
    ``None`` where the output has no tracked channel axis. ``rewrite`` names the rewrite rule the
    rewrite pass must apply to the node (set by the op table), ``rewrite_args`` its parameters.
    """

    spaces: list[ChannelSpace | None] = field(default_factory=list)
    rewrite: str | None = None
    rewrite_args: dict[str, Any] = field(default_factory=dict)
    scores: np.ndarray | None = None  # this layer's contribution to its group's importance
    latency: "LayerLatency | None" = None  # this layer's measured latency table (latency pass)

    @property
    def space(self) -> ChannelSpace | None:
        return self.spaces[0] if self.spaces else None


@dataclass
class GroupMember:
    """A channel space that belongs to a group, as a reference a user can read."""

    node: str
    dim: int
    size: int


@dataclass
class ChannelGroup:
    """Channels that must be pruned together: keeping group channel i keeps it in every member."""

    id: int
    size: int
    members: list[GroupMember]
    frozen_reason: str | None = None
    norm_coupled: bool = False  # a normalization computes statistics across these channels
    importance: np.ndarray | None = None  # one score per channel, from the score pass
    criterion: str | None = None  # which importance criterion produced ``importance``

    @property
    def prunable(self) -> bool:
        return self.frozen_reason is None and self.size > 1

    def describe(self) -> str:
        state = "prunable" if self.prunable else f"frozen: {self.frozen_reason or 'single unit'}"
        names = ", ".join(m.node for m in self.members[:4]) + (" ..." if len(self.members) > 4 else "")
        return f"group {self.id}: {self.size} channels, {len(self.members)} members ({names}); {state}"


@dataclass
class Plan:
    """Kept group channels per group id: the one object a solver produces and the rewrite consumes."""

    keep: dict[int, np.ndarray]

    def to_json(self) -> str:
        return json.dumps({str(gid): [int(i) for i in idx] for gid, idx in sorted(self.keep.items())})

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        raw = json.loads(text)
        return cls({int(gid): np.asarray(idx, dtype=np.int64) for gid, idx in raw.items()})


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

    unit: Any  # fxprune.passes.units.Unit: the layer, the ops fused after it, its channel spaces
    table: LatencyTable
