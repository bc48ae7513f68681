"""The rewrite pass: plans are checked, the source graph is only read, pruned = masked."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import fxprune
from fxprune.ir import Plan
from fxprune.testing import masked_forward


class Block(nn.Module):
    """Residual add, concat, split, depthwise and flatten->linear in one small graph."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.side = nn.Conv2d(8, 4, 1)
        self.mix = nn.Conv2d(12, 12, 1)
        self.fc = nn.Linear(12 * 4, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = x + self.dw(x)
        y = torch.cat([x, self.side(x)], dim=1)
        a, b = torch.split(self.mix(y), [6, 6], dim=1)
        y = torch.cat([b, a], dim=1)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 2), 1))


@pytest.fixture(scope="module")
def analysed():
    torch.manual_seed(0)
    model = Block().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
    inputs = (torch.randn(2, 3, 6, 6),)
    return model, fxprune.analyze(model, inputs), inputs


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_any_keep_set_prunes_to_the_masked_model(analysed, data):
    model, gm, inputs = analysed
    keep = {}
    for group in fxprune.groups(gm):
        if group.prunable:
            mask = data.draw(st.lists(st.booleans(), min_size=group.size, max_size=group.size))
            kept = np.flatnonzero(mask)
            keep[group.id] = kept if kept.size else np.array([data.draw(st.integers(0, group.size - 1))])
    plan = Plan(keep)
    try:
        pruned = fxprune.prune(gm, plan)
    except fxprune.PlanError as err:  # a plan may empty one concat member: that must be reported
        assert "removes every channel" in str(err)
        return
    with torch.no_grad():
        torch.testing.assert_close(pruned(*inputs), masked_forward(gm, plan, *inputs), rtol=1e-4, atol=1e-5)


def test_keep_everything_is_bit_identical(analysed):
    model, gm, inputs = analysed
    with torch.no_grad():
        assert torch.equal(fxprune.prune(gm, Plan({}))(*inputs), model(*inputs))


def test_pruning_reads_but_never_writes_the_source(analysed):
    model, gm, inputs = analysed
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    code_before = gm.code
    pruned = fxprune.prune(gm, fxprune.random_plan(gm, 0.5))
    assert gm.code == code_before
    for key, value in gm.state_dict().items():
        assert torch.equal(value, before[key])
    assert all(p.data_ptr() != q.data_ptr() for p in pruned.parameters() for q in model.parameters())
    assert fxprune.plan_of(pruned) is not None and fxprune.plan_of(gm) is None


def test_pruned_parameters_are_physically_smaller(analysed):
    _, gm, _ = analysed
    pruned = fxprune.prune(gm, fxprune.random_plan(gm, 0.5))
    width = pruned.stem.weight.shape[0]
    assert width < 8 and pruned.bn.running_mean.shape == (width,)
    assert pruned.dw.groups == pruned.dw.out_channels == width and pruned.dw.weight.shape[1] == 1
    assert pruned.fc.in_features < 48 and pruned.fc.in_features % 4 == 0


def test_plan_json_round_trip(analysed):
    _, gm, _ = analysed
    plan = fxprune.random_plan(gm, 0.5, seed=3)
    again = Plan.from_json(plan.to_json())
    assert plan.keep.keys() == again.keep.keys()
    assert all(np.array_equal(plan.keep[g], again.keep[g]) for g in plan.keep)


@pytest.mark.parametrize("keep, message", [
    ({999: [0]}, "does not exist"),
    ({"first_prunable": []}, "keeps no channel"),
    ({"first_prunable": [0, 0]}, "distinct channel indices"),
    ({"first_prunable": [10_000]}, "distinct channel indices"),
    ({"frozen": [0]}, "is frozen"),
])
def test_bad_plans_raise_plan_error(analysed, keep, message):
    _, gm, _ = analysed
    groups = fxprune.groups(gm)
    ids = {"first_prunable": next(g.id for g in groups if g.prunable),
           "frozen": next(g.id for g in groups if not g.prunable and g.size > 1)}
    plan = Plan({ids.get(k, k): np.asarray(v, dtype=np.int64) for k, v in keep.items()})
    with pytest.raises(fxprune.PlanError, match=message):
        fxprune.prune(gm, plan)


def test_prune_needs_an_analysed_graph():
    gm = torch.fx.symbolic_trace(nn.Conv2d(3, 4, 1))
    with pytest.raises(fxprune.AnalysisRequiredError, match="fxprune.analyze"):
        fxprune.prune(gm, Plan({}))


def add_into(x: torch.Tensor, y: torch.Tensor) -> None:
    """Adds y into x in place and returns nothing (torchvision's mvit: ``_add_shortcut``)."""
    x.add_(y)


torch.fx.wrap("add_into")


class InPlaceShortcut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        out = self.a(x)
        add_into(out, self.b(x))  # its result is unused: it is there for what it does
        return self.head(out)


def test_a_call_kept_for_its_side_effect_survives_the_rewrite():
    model, inputs = InPlaceShortcut().eval(), (torch.randn(1, 3, 4, 4),)
    gm = fxprune.analyze(model, inputs)
    with torch.no_grad():
        torch.testing.assert_close(fxprune.prune(gm, fxprune.Plan({}))(*inputs), model(*inputs))
