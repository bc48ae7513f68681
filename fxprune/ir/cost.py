"""Cost models: a metric of the model (FLOPs, parameters, latency) as a function of its kept widths."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from fxprune.ir.latency import LatencyTable


@dataclass
class CostTerm:
    """One piece of a cost: ``full`` at full width, scaled by the kept share of ``spaces`` (a removable
    block's space among them: 1 while the block stays, 0 once it is removed)."""

    what: str
    full: float
    spaces: tuple[int, ...] = ()

    def price(self, kept_share: Mapping[int, float | np.ndarray]) -> float | np.ndarray:
        """This term when space ``s`` keeps ``kept_share[s]`` of its positions (missing: all).

        Shares may be arrays (one entry per option of a group), which gives an array of prices.
        """
        value: float | np.ndarray = self.full
        for s in self.spaces:
            value = value * kept_share.get(s, 1.0)
        return value


@dataclass
class TableTerm:
    """A layer's latency: its measured table looked up at the kept widths of its input and output."""

    what: str
    table: LatencyTable
    in_space: int | None  # None: the input width never changes
    out_space: int | None
    in_size: int
    out_size: int
    block: int | None = None  # the space of the removable block the layer is in (share 1 kept, 0 removed)

    @property
    def spaces(self) -> tuple[int, ...]:
        return tuple(s for s in (self.block, self.in_space, self.out_space) if s is not None)

    @property
    def full(self) -> float:
        return self.table.at(self.in_size, self.out_size)

    def price(self, kept_share: Mapping[int, float | np.ndarray]) -> float | np.ndarray:
        width_in = self.in_size * (kept_share.get(self.in_space, 1.0) if self.in_space is not None else 1.0)
        width_out = self.out_size * (kept_share.get(self.out_space, 1.0) if self.out_space is not None else 1.0)
        kept = kept_share.get(self.block, 1.0) if self.block is not None else 1.0
        return self.table.at(width_in, width_out) * kept


Term = CostTerm | TableTerm


@dataclass
class CostModel:
    """A metric of the model as a function of each channel space's kept width."""

    metric: str
    terms: list[Term] = field(default_factory=list)
    baseline: float = 0.0

    def total(self, kept_share: Mapping[int, float]) -> float:
        """The metric when space ``s`` keeps ``kept_share[s]`` of its positions (missing: all)."""
        return float(sum(t.price(kept_share) for t in self.terms))
