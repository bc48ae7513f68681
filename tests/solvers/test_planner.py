"""The planner: solve_plan around the knapsack solvers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fxprune.errors import BudgetError
from fxprune.ir.keys import COST_KEY
from fxprune.passes.cost import CostPass
from fxprune.passes.pipeline import analyze, run_passes
from fxprune.passes.score import ScorePass
from fxprune.solvers import planner
from fxprune.solvers.knapsack import solve_group_knapsack


def test_a_budget_at_the_smallest_plan_never_fails_when_re_solves_overshoot(monkeypatch):
    """The planner tightens its target while no solved plan fits; at a budget equal to the smallest plan
    that target falls below every plan and the solver raises. The planner must still return the smallest
    plan (a closed-loop latency compile on a busy machine asked for exactly that and got a BudgetError)."""
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 3))
    inputs = (torch.randn(1, 3, 16, 16),)
    gm = run_passes(analyze(model, inputs), [ScorePass("l1"), CostPass(inputs)])
    cost = gm.meta[COST_KEY]["flops"]
    try:
        planner.solve_plan(gm, cost, 0.0, round_to=4)
    except BudgetError as error:
        smallest = error.smallest
    calls = []

    def overshooting(classes, capacity, resolution):  # every feasible solve picks the widest options
        calls.append(capacity)
        result = solve_group_knapsack(classes, capacity, resolution=resolution)
        result.keep = [int(c.options[-1]) for c in classes]
        return result

    monkeypatch.setitem(planner.SOLVERS, "sp_lamp", overshooting)
    result = planner.solve_plan(gm, cost, smallest, round_to=4)
    assert len(calls) > 1 and min(calls) < max(calls)  # the target was tightened
    assert result.predicted_cost <= smallest * (1 + 1e-9)


def test_an_unreachable_budget_says_the_shares_and_how_to_go_narrower():
    """The message speaks in shares of the model, as the user gave the budget, and names the step that
    keeps every group at least one multiple wide."""
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 3))
    inputs = (torch.randn(1, 3, 16, 16),)
    gm = run_passes(analyze(model, inputs), [ScorePass("l1"), CostPass(inputs)])
    cost = gm.meta[COST_KEY]["flops"]
    for round_to, hint in ((8, "a smaller round_to (now 8)"), (1, None)):
        with pytest.raises(BudgetError) as raised:
            planner.solve_plan(gm, cost, 0.01 * cost.baseline, round_to=round_to)
        message, error = str(raised.value), raised.value
        assert "the flops budget 0.010 of the model (" in message and " FLOPs) cannot be met" in message
        smallest = planner.solve_plan(gm, cost, error.smallest, round_to=round_to).predicted_cost
        assert f"the smallest achievable is {smallest / cost.baseline:.3f} of the model" in message
        assert error.smallest_share == pytest.approx(smallest / cost.baseline)  # for code that reads it
        assert (hint in message) if hint else "round_to" not in message
