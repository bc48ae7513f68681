"""fxprune.Pruner: HALP's geometric schedule in a training loop, masks kept through optimizer steps, and a
final model that meets the budget."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.modules import Skip
from fxprune.passes.cost import count_flops, count_params
from fxprune.passes.refine import MARGIN
from fxprune.training.pruner import PrunerError, geometric_targets
from tests.doubles import CountingEngine, CurvedEngine, SyntheticEngine


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def _train(pruner, model, optimizer, iterations, every, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for iteration in range(iterations):
        x = torch.randn(8, 3, 16, 16, generator=generator)
        y = torch.randint(0, 10, (8,), generator=generator)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        if (iteration + 1) % every == 0 and not pruner.done:
            pruner.step()


def test_the_schedule_is_geometric_and_the_end_meets_a_latency_budget(tmp_path):
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    inputs = (torch.randn(1, 3, 16, 16),)
    pruner = fxprune.Pruner(model, fxprune.Latency(0.4), inputs, steps=5, optimizer=optimizer,
                            engine=SyntheticEngine(), cache=tmp_path)
    start, end = pruner.cost.baseline, 0.4 * pruner.cost.baseline
    expected = [math.exp((t / 5) * math.log(end) + (1 - t / 5) * math.log(start)) for t in range(1, 6)]
    np.testing.assert_allclose(pruner.targets, expected)
    np.testing.assert_allclose(geometric_targets(start, end, 5), expected)
    _train(pruner, model, optimizer, iterations=25, every=5)
    assert pruner.done and [s.step for s in pruner.history] == [1, 2, 3, 4, 5]
    assert all(s.predicted <= s.target * (1 + 1e-9) for s in pruner.history)
    kept = [s.kept for s in pruner.history]
    assert kept == sorted(kept, reverse=True) and kept[-1] < kept[0]  # a little more every step
    small = pruner.compile()
    engine = SyntheticEngine()
    assert engine.model_ms(small, inputs) <= 0.4 * engine.model_ms(Net(), inputs) * 1.001
    assert count_params(small) < count_params(model)


def test_a_latency_schedule_ends_on_the_budget_as_the_engine_runs_the_model(tmp_path):
    torch.manual_seed(0)
    model, engine, inputs = Net(), CurvedEngine(), (torch.randn(1, 3, 16, 16),)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    pruner = fxprune.Pruner(model, fxprune.Latency(0.5), inputs, steps=3, optimizer=optimizer, engine=engine,
                            cache=tmp_path, round_to=1)
    _train(pruner, model, optimizer, iterations=9, every=3)
    assert [s.timed for s in pruner.history] == [False, False, True]  # the last step times its plans
    share = engine.model_ms(pruner.compile(), inputs) / engine.model_ms(Net(), inputs)
    assert 0.5 * (1 - 2 * MARGIN) - 1e-6 <= share <= 0.5 * (1 - MARGIN / 2) + 1e-6  # as compile aims
    assert pruner.history[-1].predicted / pruner.cost.baseline == pytest.approx(share, rel=1e-6)
    untimed = fxprune.Pruner(Net(), fxprune.Latency(0.5), inputs, steps=1, importance="l1", engine=engine,
                             cache=tmp_path, round_to=1, refine=0)
    untimed.step()  # no plan timed: the tables read through the two whole models the latency pass timed
    assert not untimed.history[-1].timed
    tables = fxprune.compile(Net(), 0.5, inputs, engine=engine, cache=tmp_path, round_to=1, refine=0, importance="l1",
                             progress=False)  # the tables alone, as the schedule read them before
    miss = [abs(engine.model_ms(m, inputs) / engine.model_ms(Net(), inputs) / 0.5 - 1)
            for m in (untimed.compile(), tables)]
    assert miss[0] < miss[1]  # 0.442 vs 0.357 of the model when this test was written


def test_masks_survive_optimizer_steps_and_the_compiled_model_computes_the_same():
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    inputs = (torch.randn(1, 3, 16, 16),)
    pruner = fxprune.Pruner(model, fxprune.FLOPs(0.5), inputs, steps=3, optimizer=optimizer, round_to=4)
    _train(pruner, model, optimizer, iterations=12, every=3)
    conv = model.features[3]
    removed = np.flatnonzero(~pruner.masks[next(g for g, m in pruner.masks.items() if m.size == 64 and not m.all())])
    _train(pruner, model, optimizer, iterations=3, every=100, seed=1)  # more steps: momentum pushes, masks hold
    assert removed.size and torch.count_nonzero(conv.weight[removed]) == 0
    small = pruner.compile()
    assert count_flops(small, inputs) <= 0.5 * count_flops(Net(), inputs)
    model.eval()
    small.eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-5)  # removing zeros changes nothing


@pytest.mark.parametrize("importance", ["sp_lamp", "l1"])
def test_data_free_importance_needs_no_gradients(importance):
    model = Net()
    pruner = fxprune.Pruner(model, fxprune.Params(0.6), (torch.randn(1, 3, 16, 16),), steps=2, importance=importance)
    pruner.step()
    pruner.step()
    assert count_params(pruner.compile()) <= 0.6 * count_params(Net())


def test_misuse_is_explained():
    model = Net()
    with pytest.raises(PrunerError, match="steps"):
        fxprune.Pruner(model, 0.5, (torch.randn(1, 3, 16, 16),), steps=0)
    with pytest.raises(PrunerError, match="refine"):
        fxprune.Pruner(model, 0.5, (torch.randn(1, 3, 16, 16),), refine=True)
    pruner = fxprune.Pruner(model, fxprune.FLOPs(0.5), (torch.randn(1, 3, 16, 16),), steps=1)
    with pytest.raises(PrunerError, match="optimizer="):
        pruner.step()  # Taylor importance, and no gradient was read
    nn.functional.cross_entropy(model(torch.randn(4, 3, 16, 16)), torch.arange(4)).backward()
    pruner.accumulate()
    pruner.step()
    with pytest.raises(PrunerError, match="compile"):
        pruner.step()


def test_with_depth_a_step_removes_a_block_keeps_its_last_layer_zero_and_compiles_without_it(residual_net):
    torch.manual_seed(0)
    model = residual_net(scales=(1.0, 1e-3, 1.0))  # the middle block adds almost nothing
    x = torch.randn(4, 3, 16, 16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner = fxprune.Pruner(model, fxprune.FLOPs(0.5), x[:1], steps=2, optimizer=optimizer, importance="l2",
                            round_to=32, depth=True)
    for _ in range(2):
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        pruner.step()
    assert pruner.plan.drop == (1,)
    model(x).square().mean().backward()
    optimizer.step()  # the removed block's last layer stays zero through training
    assert model.blocks[1].bn2.weight.abs().sum() == 0 and model.blocks[1].bn2.bias.abs().sum() == 0
    pruned = pruner.compile().eval()
    assert type(pruned) is residual_net and isinstance(pruned.blocks[1], Skip)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), rtol=1e-4, atol=1e-5)
    assert count_flops(pruned, (x[:1],)) <= 0.5 * count_flops(residual_net(), (x[:1],))



def test_the_tables_and_the_closed_loop_share_one_context_released_after_the_last_step(tmp_path):
    """As in compile: the latency pass and the last step's closed loop deploy the analysed model once, on one
    Context the pruner keeps until its last step."""
    engine, inputs = CountingEngine(), (torch.randn(1, 3, 16, 16),)
    pruner = fxprune.Pruner(Net(), fxprune.Latency(0.5), inputs, steps=2, importance="l1", engine=engine,
                            cache=tmp_path, round_to=1)
    context = pruner.live.context
    assert context is not None and context.engine is engine
    pruner.step()
    assert pruner.live.context is context
    pruner.step()
    assert pruner.history[-1].timed and engine.traced_deployments == 1
    assert pruner.live.context is None


def test_a_flops_target_under_every_whole_step_plan_is_solved_with_groups_under_a_step():
    """The schedule solves as compile's plan pass does: with the grid left to fxprune, a target no plan of
    whole 8-channel steps reaches lets groups keep less than a step; a grid the user set is kept."""
    inputs = (torch.randn(1, 3, 16, 16),)
    with pytest.raises(fxprune.BudgetError) as raised:
        fxprune.compile(Net(), fxprune.FLOPs(0.001), inputs, round_to=8, progress=False)
    budget = fxprune.FLOPs(0.8 * raised.value.smallest_share)
    pruner = fxprune.Pruner(Net(), budget, inputs, steps=1, importance="l1")
    plan = pruner.step()
    assert min(len(kept) for kept in plan.keep.values()) < 8
    assert count_flops(pruner.compile(), inputs) <= budget.fraction * count_flops(Net(), inputs) * 1.001
    with pytest.raises(fxprune.BudgetError):
        fxprune.Pruner(Net(), budget, inputs, steps=1, importance="l1", round_to=8).step()
