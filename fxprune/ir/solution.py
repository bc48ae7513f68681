"""What the plan pass decides (``gm.meta["fxprune_solution"]``): the plan, its predicted cost, and for
latency budgets what the closed loop timed on the engine on the way."""

from __future__ import annotations

from dataclasses import dataclass, field

from fxprune.ir.channels import Plan
from fxprune.ir.cost import CostModel


@dataclass
class PlanResult:
    """One solve: the plan, its keep count per group, its cost under the cost model solved with."""

    plan: Plan
    keep_counts: dict[int, int]
    predicted_cost: float
    capacity: float
    iterations: int
    solver_seconds: float


@dataclass(frozen=True)
class LatencyPoint:
    """A whole model measured on the engine: the tables' predicted share of the full model's latency,
    and the share measured."""

    predicted: float
    measured: float
    source: str  # "full", "reduced" or "plan"


@dataclass
class MeasuredSolve:
    """The plan the closed loop settled on, what it is predicted to take, and how it got there."""

    result: PlanResult
    tables_share: float  # the tables' own predicted share for the plan
    predicted_share: float  # through the correction, or the plan's measurement where it was measured
    measured: bool  # the plan was timed on the engine while solving ...
    points: list[LatencyPoint] = field(default_factory=list)
    timed_now: bool = False  # ... in this call (not a trusted timing read from the cache)
    busy_spread: float = 0.0  # the largest scatter of a plan timing taken in this call that stayed noisy


@dataclass
class Solution:
    """The plan pass's result: the plan solved, the cost model of the budget's metric it was solved
    under, and the closed loop's record where one ran."""

    result: PlanResult
    cost: CostModel
    capacity: float  # the budget in the cost model's unit
    measured_solve: MeasuredSolve | None = None
    below_step: float | None = None  # where groups keep less than one step: the step grid's smallest share
