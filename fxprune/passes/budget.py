"""Plan pass: solve for the plan that meets the budget, under the cost model of the budget's metric.

FLOPs and parameter budgets are solved once under the cost pass's exact models. Latency budgets are
solved under the latency tables and, with ``refine`` > 0, through the closed loop that times the solved
plans on the engine (``passes/refine.py``). A budget under every plan that keeps whole steps of channels
is solved again with groups allowed under one step (``solve_plan(below_step=True)``), unless the user
set ``round_to``. Writes ``gm.meta["fxprune_solution"]``.
"""

from __future__ import annotations

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxprune.budgets import Amount, Budget
from fxprune.errors import AnalysisRequiredError, BudgetError, FxpruneError
from fxprune.ir.keys import COST_KEY, IMPORTANCE_KEY, LATENCY_KEY, SOLUTION_KEY
from fxprune.ir.solution import Solution
from fxprune.passes.context import Context
from fxprune.passes.latency import channel_granularity, latency_cost
from fxprune.passes.refine import check_refine, solve_measured
from fxprune.solvers.planner import check_solver, solve_plan

DEFAULT_STEP = 8  # FLOPs and parameter budgets: widths on multiples of 8 channels unless round_to says


class PlanPass(PassBase):
    """The plan for ``budget`` (an ``fxprune`` budget), with ``solver``; see the module docstring."""

    def __init__(self, context: Context, budget: Budget, *, solver: str = "sp_lamp", resolution: int = 4000,
                 round_to: int | None = None, refine: int = 0, depth: bool = False) -> None:
        super().__init__()
        check_solver(solver, round_to, resolution)
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
        latency = self.budget.metric == "latency"
        cost = latency_cost(graph_module) if latency else graph_module.meta[COST_KEY][self.budget.metric]
        capacity = self.budget.capacity(cost.baseline)
        # default grid: widths of every layer on multiples of 8 channels (an attention head, a conv group:
        # one group channel spans several); a round_to given is in group channels
        round_to = graph_module.meta[LATENCY_KEY].granularity if latency else \
            self.round_to or channel_granularity(graph_module, DEFAULT_STEP)
        options = dict(round_to=round_to, solver=self.solver, resolution=self.resolution, depth=self.depth)
        step_grid_smallest = None
        try:
            solution = self._solve(graph_module, cost, capacity, options)
        except BudgetError as error:  # under the smallest plan on the step grid
            if self.round_to is not None or error.smallest_share is None:  # the user chose the grid
                raise
            step_grid_smallest = error.smallest_share
        if step_grid_smallest is not None:
            solution = self._solve(graph_module, cost, capacity, {**options, "below_step": True})
            solution.below_step = step_grid_smallest
        graph_module.meta[SOLUTION_KEY] = solution
        return PassResult(graph_module, modified=False)

    def _solve(self, graph_module: torch.fx.GraphModule, cost, capacity: float, options: dict) -> Solution:
        if cost.metric == "latency" and self.refine:
            measured = solve_measured(graph_module, cost, capacity, self.context, steps=self.refine, **options)
            return Solution(measured.result, cost, capacity, measured)
        return Solution(solve_plan(graph_module, cost, capacity, **options), cost, capacity)

    def ensures(self, graph_module: torch.fx.GraphModule) -> None:
        assert isinstance(graph_module.meta[SOLUTION_KEY], Solution)


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
