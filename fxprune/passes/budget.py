"""Plan pass: solve for the plan that meets the budget, under the cost model of the budget's metric.

FLOPs and parameter budgets are solved once under the cost pass's exact models. Latency budgets are
solved under the latency tables and, with ``refine`` > 0, through the closed loop that times the solved
plans on the engine (``passes/refine.py``). A budget under every plan that keeps whole steps of channels
is solved again with groups allowed under one step (``solve_plan(below_step=True)``), unless the user
set ``round_to``. A graph captured in parts is solved for the parts' budget the whole-model budget pass
left (``passes/whole.py``). Writes ``gm.meta["fxprune_solution"]``.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxprune.budgets import Amount, Budget
from fxprune.errors import AnalysisRequiredError, BudgetError, FxpruneError
from fxprune.ir.cost import CostModel
from fxprune.ir.keys import COST_KEY, IMPORTANCE_KEY, LATENCY_KEY, SOLUTION_KEY, WHOLE_KEY
from fxprune.ir.solution import Solution
from fxprune.ir.whole import WholeModel
from fxprune.passes.context import Context
from fxprune.passes.latency import channel_granularity, latency_cost
from fxprune.passes.refine import check_refine, solve_measured
from fxprune.solvers.planner import Depth, check_solver, solve_plan

DEFAULT_STEP = 8  # FLOPs and parameter budgets: widths on multiples of 8 channels unless round_to says


class PlanPass(PassBase):
    """The plan for ``budget`` (an ``fxprune`` budget), with ``solver``; see the module docstring."""

    def __init__(self, context: Context, budget: Budget, *, solver: str = "sp_lamp", resolution: int = 4000,
                 round_to: int | None = None, refine: int = 0, depth: Depth = False) -> None:
        super().__init__()
        check_solver(solver, round_to, resolution, depth)
        check_refine(refine, FxpruneError)
        self.context, self.budget, self.solver, self.resolution = context, budget, solver, resolution
        self.round_to, self.refine, self.depth = round_to, refine, depth

    def requires(self, graph_module: torch.fx.GraphModule) -> None:
        needed = [IMPORTANCE_KEY, LATENCY_KEY if self.budget.metric == "latency" else COST_KEY]
        missing = [key for key in needed if key not in graph_module.meta]
        if missing:
            raise AnalysisRequiredError(f"the plan pass needs {', '.join(missing)} on the graph: run the score "
                                        "pass and the cost (or latency) pass first")

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        whole: WholeModel | None = graph_module.meta.get(WHOLE_KEY)  # a partitioned model's parts' budget
        budget = self.budget if whole is None else whole.budget
        cost = cost_of(graph_module, budget.metric)
        try:
            graph_module.meta[SOLUTION_KEY] = solve_budget(
                graph_module, cost, budget.capacity(cost.baseline), self.context, solver=self.solver,
                resolution=self.resolution, round_to=self.round_to, refine=self.refine, depth=self.depth)
        except BudgetError as error:  # a partitioned model's parts out of reach: say so of the whole model
            if whole is None or (restated := whole.unreachable(error, self.budget)) is error:
                raise
            raise restated from error
        return PassResult(graph_module, modified=False)

    def ensures(self, graph_module: torch.fx.GraphModule) -> None:
        assert isinstance(graph_module.meta[SOLUTION_KEY], Solution)


def cost_of(gm: torch.fx.GraphModule, metric: str) -> CostModel:
    """The cost model a budget of ``metric`` is solved under: the latency tables', or the cost pass's."""
    return latency_cost(gm) if metric == "latency" else gm.meta[COST_KEY][metric]


def grid(gm: torch.fx.GraphModule, metric: str, round_to: int | None) -> int | Mapping[int, int]:
    """The keep-count grid: for latency the latency pass's (the engine's step); else ``round_to`` given (in
    group channels), by default every layer's width on multiples of 8 channels (an attention head, a conv
    group: one group channel spans several)."""
    if metric == "latency":
        return gm.meta[LATENCY_KEY].granularity
    return round_to or channel_granularity(gm, DEFAULT_STEP)


def solve_budget(gm: torch.fx.GraphModule, cost: CostModel, capacity: float, context: Context, *,
                 solver: str = "sp_lamp", resolution: int = 4000, round_to: int | None = None, refine: int = 0,
                 depth: Depth = False, importance: Mapping[int, np.ndarray] | None = None) -> Solution:
    """The plan under ``capacity`` of ``cost`` (latency with ``refine`` > 0: through the closed loop), on the
    grid ``grid`` gives; under every plan of whole steps, solved again with groups under one step, unless
    the user set ``round_to``. What the plan pass and the training-time methods solve with."""
    options = dict(round_to=grid(gm, cost.metric, round_to), solver=solver, resolution=resolution, depth=depth,
                   importance=importance)
    try:
        return _solve(gm, cost, capacity, context, refine, options)
    except BudgetError as error:  # under the smallest plan on the step grid
        if round_to is not None or error.smallest_share is None:  # the user chose the grid
            raise
        step_grid_smallest = error.smallest_share
    solution = _solve(gm, cost, capacity, context, refine, {**options, "below_step": True})
    solution.below_step = step_grid_smallest
    return solution


def _solve(gm: torch.fx.GraphModule, cost: CostModel, capacity: float, context: Context, refine: int,
           options: dict) -> Solution:
    if cost.metric == "latency" and refine:
        measured = solve_measured(gm, cost, capacity, context, steps=refine, **options)
        return Solution(measured.result, cost, capacity, measured)
    return Solution(solve_plan(gm, cost, capacity, **options), cost, capacity)


def parts_budget(budget: Budget, parts: float, whole: float, unit: str = "") -> Amount:
    """The budget of a partitioned model's captured parts, which cost ``parts`` of the ``whole`` model's
    ``budget.metric``: the rest (post-processing, what no front end captured) does not shrink."""
    fixed = max(whole - parts, 0.0)
    target = budget.capacity(whole)
    if target <= fixed * (1 + 1e-9):
        raise BudgetError(
            f"the budget {budget} cannot be met: only {min(parts / whole, 1.0):.1%} of the model's {budget.metric}"
            f" ({parts:.4g}{unit} of {whole:.4g}{unit}) is in the parts fxprune captured and can prune; the rest "
            f"({fixed:.4g}{unit}: post-processing, code no front end captured) stays. Ask for more than "
            f"{fixed / whole:.3f} of the model.", smallest=fixed, smallest_share=fixed / whole)
    return Amount(budget.metric, target - fixed)
