"""The plan pass: it says which pass it is missing, and solves each budget under its own metric's model."""

from __future__ import annotations

import pytest
import torch

import fxprune
from fxprune.errors import AnalysisRequiredError, SolverError
from fxprune.ir.keys import COST_KEY, SOLUTION_KEY
from fxprune.passes.budget import PlanPass
from fxprune.passes.context import Context
from fxprune.passes.cost import CostPass
from fxprune.passes.pipeline import run_passes
from fxprune.passes.score import ScorePass
from tests.doubles import tiny_cnn

INPUTS = (torch.randn(1, 3, 32, 32),)


def test_the_plan_pass_names_the_passes_it_needs():
    gm = fxprune.analyze(tiny_cnn().eval(), INPUTS)
    with Context(INPUTS) as context, pytest.raises(AnalysisRequiredError, match="score pass"):
        run_passes(gm, [PlanPass(context, fxprune.FLOPs(0.5))])


@pytest.mark.parametrize("budget", [fxprune.FLOPs(0.5), fxprune.Params(0.3)])
def test_the_plan_meets_the_budget_under_its_metric(budget):
    gm = fxprune.analyze(tiny_cnn().eval(), INPUTS)
    with Context(INPUTS) as context:
        run_passes(gm, [ScorePass(), CostPass(INPUTS), PlanPass(context, budget, round_to=4)])
    solution = gm.meta[SOLUTION_KEY]
    assert solution.cost is gm.meta[COST_KEY][budget.metric]
    assert solution.capacity == pytest.approx(budget.fraction * solution.cost.baseline)
    assert solution.result.predicted_cost <= solution.capacity
    assert all(count % 4 == 0 or count == gm.meta["fxprune"].groups[gid].size
               for gid, count in solution.result.keep_counts.items())


@pytest.mark.parametrize("options", [dict(solver="knapsack"), dict(round_to=0), dict(round_to=2.5),
                                     dict(resolution=0)])
def test_solver_settings_are_checked_before_anything_runs(options):
    with Context(INPUTS) as context, pytest.raises(SolverError):
        PlanPass(context, fxprune.FLOPs(0.5), **options)


def test_a_budget_under_every_whole_step_plan_lets_groups_keep_less_than_a_step():
    """With the grid left to fxprune, a budget no plan of whole steps reaches is solved with groups under
    one step (multiples of a quarter step) and the report says so; a grid the user set is kept."""
    model = tiny_cnn().eval()
    with pytest.raises(fxprune.BudgetError) as raised:
        fxprune.compile(model, fxprune.FLOPs(0.001), INPUTS, round_to=8)
    floor = raised.value.smallest_share  # every group at one 8-channel step
    budget = fxprune.FLOPs(0.8 * floor)
    with pytest.raises(fxprune.BudgetError, match="round_to"):
        fxprune.compile(model, budget, INPUTS, round_to=8)
    pruned = fxprune.compile(model, budget, INPUTS)
    report = fxprune.report(pruned)
    assert report.flops_after <= 0.8 * floor * report.flops_before
    kept = [g.kept for g in report.groups]
    assert min(kept) < 8 and all(k % 2 == 0 for k in kept)  # under one step, on quarter steps
    assert any("whole 8-channel steps" in note for note in report.notes)
    assert not any("whole" in note for note in fxprune.report(fxprune.compile(model, fxprune.FLOPs(0.5), INPUTS)).notes)
