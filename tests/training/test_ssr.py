"""fxprune.SSR: AULM drives whole channel groups to exactly zero, and removing them changes nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.modules import Skip
from fxprune.passes.cost import count_params
from fxprune.passes.refine import MARGIN
from fxprune.training.ssr import SSRError
from tests.doubles import CountingCurvedEngine, CurvedEngine


class Residual(nn.Module):
    """A residual stream (one group across three layers) and two inner groups."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.inner = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
                                   nn.Conv2d(24, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.inner(x))
        return self.head(x.mean((2, 3)))


def _regularize(norm: str, strength: float, iterations: int = 150):
    torch.manual_seed(0)
    model = Residual()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ssr = fxprune.SSR(model, (torch.randn(1, 3, 8, 8),), optimizer=optimizer, strength=strength, penalty=0.1,
                      every=5, norm=norm)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 8, 8, generator=generator)
    y = (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long()
    for _ in range(iterations):
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, ssr


@pytest.mark.parametrize("norm, strength", [("l21", 0.03), ("l20", 0.1)])
def test_aulm_zeroes_whole_groups_and_removing_them_changes_nothing(norm, strength):
    model, ssr = _regularize(norm, strength)
    zero = ssr.zero_channels()
    assert sum(len(c) for c in zero.values()) >= 4, "the regularizer should have emptied some channels"
    for axis in ssr.rows:  # a zero channel is zero in every layer that produces it: the whole row set
        channels = zero.get(axis.space.group_id, np.array([], dtype=int))
        positions = np.flatnonzero(np.isin(axis.space.channel_index, channels))
        row = ssr.auxiliary[axis.name].index_select(axis.dim, torch.as_tensor(positions, dtype=torch.long))
        assert torch.count_nonzero(row) == 0
    small = ssr.compile()  # sets the live rows to exactly zero, then removes them
    assert count_params(small) < count_params(model)
    model.eval()
    small.eval()
    x = torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-6)


def test_ssr_then_a_budget_removes_the_weakest_rows_first():
    model, ssr = _regularize("l21", 0.03)
    zero = {gid: set(c.tolist()) for gid, c in ssr.zero_channels().items()}
    small = ssr.compile(fxprune.Params(0.5), round_to=1)
    assert count_params(small) <= 0.5 * count_params(Residual())
    plan = fxprune.plan_of(small)
    for gid, channels in zero.items():
        assert not channels & set(plan.keep.get(gid, np.arange(1000)).tolist()) or len(plan.keep.get(gid, [])) == 1


def test_a_latency_budget_after_ssr_is_met_as_the_engine_runs_the_model(tmp_path):
    engine, inputs, shares = CurvedEngine(), (torch.randn(1, 3, 8, 8),), []
    for refine in (0, 4):  # the tables alone; compile's closed loop, four plans timed
        model, ssr = _regularize("l21", 0.03)
        small = ssr.compile(fxprune.Latency(0.6), engine=engine, cache=tmp_path, round_to=1, refine=refine)
        shares.append(engine.model_ms(small, inputs) / engine.model_ms(Residual(), inputs))
    assert shares[0] < shares[1] <= 0.6 * (1 - MARGIN / 2)  # 0.514, 0.559 when this test was written: closer,
    # not on the aim (0.582): a larger plan timed faster than the one returned, and the loop stops there
    with pytest.raises(SSRError, match="refine"):
        ssr.plan(fxprune.Latency(0.6), refine=-1)



def test_a_latency_plan_deploys_the_analysed_model_once_and_releases_it(tmp_path):
    """The latency pass and the closed loop of one plan share one Context, as in compile; it is closed after."""
    model, ssr = _regularize("l21", 0.03, iterations=20)
    engine = CountingCurvedEngine()
    plan = ssr.plan(fxprune.Latency(0.6), engine=engine, cache=tmp_path, round_to=1, refine=2)
    assert plan.keep and engine.traced_deployments == 1 and ssr.live.context is None


def test_bad_settings_are_explained():
    model = Residual()
    with pytest.raises(SSRError, match="norm"):
        fxprune.SSR(model, (torch.randn(1, 3, 8, 8),), norm="l1")
    with pytest.raises(SSRError, match="strength"):
        fxprune.SSR(model, (torch.randn(1, 3, 8, 8),), strength=-1)
    with pytest.raises(SSRError, match="every"):
        fxprune.SSR(model, (torch.randn(1, 3, 8, 8),), every=0)


def test_with_depth_a_budget_after_ssr_removes_the_block_that_adds_least(residual_net):
    torch.manual_seed(0)
    model = residual_net(scales=(1.0, 1e-3, 1.0))
    x = torch.randn(4, 3, 16, 16)
    regularizer = fxprune.SSR(model, x[:1], depth=True)
    with pytest.raises(fxprune.BudgetError):  # width alone keeps one 32-channel step per group
        fxprune.SSR(model, x[:1]).compile(fxprune.FLOPs(0.5), round_to=32)
    pruned = regularizer.compile(fxprune.FLOPs(0.5), round_to=32).eval()
    assert type(pruned) is residual_net and isinstance(pruned.blocks[1], Skip)
    assert model.blocks[1].bn2.weight.abs().sum() == 0  # the live model's branch computes zero, as the pruned one
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), rtol=1e-4, atol=1e-5)
