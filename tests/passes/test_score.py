"""The score pass: importance criteria checked against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.errors import ScoreError
from fxprune.ir.keys import IMPORTANCE_KEY
from fxprune.passes.score import ScorePass, TaylorAccumulator, lamp_scores


class TwoBranch(nn.Module):
    """Two convs whose outputs are added: one group fed by two producing layers."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 3, 1, bias=False)
        self.b = nn.Conv2d(1, 3, 1, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Conv2d(3, 1, 1)
        with torch.no_grad():
            self.a.weight.copy_(torch.tensor([2.0, 1.0, 3.0]).view(3, 1, 1, 1))   # energies 4, 1, 9
            self.b.weight.copy_(torch.tensor([1.0, 2.0, 0.0]).view(3, 1, 1, 1))   # energies 1, 4, 0
            self.bn.weight.copy_(torch.tensor([0.5, -2.0, 1.0]))

    def forward(self, x):
        return self.head(self.bn(self.a(x) + self.b(x)))


_INPUTS = (torch.randn(1, 1, 2, 2),)


def _scored(criterion, model=None, inputs=_INPUTS, **kwargs):
    gm = fxprune.analyze((model or TwoBranch()).eval(), inputs)
    ScorePass(criterion, **kwargs)(gm)
    first_layer = next(n.name for n in gm.graph.nodes if n.op == "call_module")
    group = next(g for g in fxprune.groups(gm) if any(m.node == first_layer for m in g.members))
    return gm, fxprune.importance(gm)[group.id]


def test_lamp_formula_by_hand():
    # ascending energies 1, 1, 4, 9 (indices 1, 3, 0, 2): 1/15, 1/14, 4/13, 9/9
    np.testing.assert_allclose(lamp_scores(np.array([4.0, 1.0, 9.0, 1.0])), [4 / 13, 1 / 15, 1.0, 1 / 14])


def test_sp_lamp_sums_coupled_layers_and_top_filter_scores_one():
    gm, scores = _scored("sp_lamp")
    # layer a: energies 4, 1, 9 -> 4/13, 1/14, 1; layer b: energies 1, 4, 0 -> 1/5, 1, 0
    np.testing.assert_allclose(scores, [4 / 13 + 1 / 5, 1 / 14 + 1.0, 1.0 + 0.0])
    assert gm.meta[IMPORTANCE_KEY].criterion == "sp_lamp"


class Heads(nn.Module):
    """Self-attention of 2 heads of 3: each head is 3 rows of q, k and v."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(4, 6, bias=False) for _ in range(3))
        self.o = nn.Linear(6, 4)

    def forward(self, x):
        batch, tokens, _ = x.shape
        q, k, v = (layer(x).view(batch, tokens, 2, 3).transpose(1, 2) for layer in (self.q, self.k, self.v))
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(batch, tokens, 6))


def test_sp_lamp_scores_each_row_of_a_head_and_sums_them():
    torch.manual_seed(0)
    model = Heads().eval()
    with torch.no_grad():  # head 0's rows: one strong, two dead; head 1's: three middling (more energy in all)
        model.q.weight.copy_(torch.tensor([3.0, 0.0, 0.0, 2.0, 2.0, 2.0]).view(6, 1).expand(6, 4))
    gm = fxprune.analyze(model, (torch.randn(1, 5, 4),))
    ScorePass("sp_lamp")(gm)
    group = next(g for g in fxprune.groups(gm) if g.size == 2 and any(m.node == "q" for m in g.members))
    assert {"q", "k", "v"} <= {m.node for m in group.members}
    expected = sum(lamp_scores((layer.weight.detach().double().numpy() ** 2).sum(1)).reshape(2, 3).sum(1)
                   for layer in (model.q, model.k, model.v))
    np.testing.assert_allclose(fxprune.importance(gm)[group.id], expected)
    by_head = lamp_scores(np.array([9.0 * 4, 12.0 * 4]))  # q's heads as single units: head 1 scores 1
    per_row = lamp_scores(np.array([9.0, 0, 0, 4, 4, 4]) * 4).reshape(2, 3).sum(1)
    assert by_head[0] < by_head[1] and per_row[0] > per_row[1]  # q alone ranks the heads the other way by rows


def test_lamp_scores_every_weight_then_sums_per_filter():
    _, scores = _scored("lamp")
    # one weight per filter here, so LAMP on weights equals LAMP on filter energies
    np.testing.assert_allclose(scores, [4 / 13 + 1 / 5, 1 / 14 + 1.0, 1.0 + 0.0])


def test_lamp_on_multi_weight_filters_differs_from_sp_lamp():
    model = TwoBranch()
    model.a = nn.Conv2d(1, 3, 2, bias=False)
    with torch.no_grad():
        model.a.weight.copy_(torch.arange(12.0).view(3, 1, 2, 2))
    model.b = nn.Conv2d(1, 3, 2, bias=False)
    with torch.no_grad():
        model.b.weight.zero_()
    _, lamp = _scored("lamp", model)
    flat = np.arange(12.0) ** 2
    per_weight = lamp_scores(flat)
    expected_a = per_weight.reshape(3, 4).sum(1)
    expected_b = lamp_scores(np.zeros(12)).reshape(3, 4).sum(1)  # only the last weight scores 1
    np.testing.assert_allclose(lamp, expected_a + expected_b)


def test_l1_l2_and_bn_scale():
    _, l1 = _scored("l1")
    np.testing.assert_allclose(l1, [3.0, 3.0, 3.0])
    _, l2 = _scored("l2")
    np.testing.assert_allclose(l2, [2 + 1, 1 + 2, 3 + 0])
    _, bn = _scored("bn_scale")
    np.testing.assert_allclose(bn, [0.5, 2.0, 1.0])


def test_taylor_needs_data_and_scores_with_it():
    with pytest.raises(ScoreError, match="calibration"):
        ScorePass("taylor")
    batches = [(torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2)) for _ in range(3)]
    gm, scores = _scored("taylor", calibration=batches, loss_fn=nn.functional.mse_loss)
    assert scores.shape == (3,) and (scores >= 0).all() and scores.sum() > 0
    assert all(p.grad is None for p in gm.parameters())


def test_dead_channels_score_lowest_under_every_criterion():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        for dead in (1, 5):
            model[0].weight[dead] = 0
            model[1].weight[dead] = 0
    for criterion in ("sp_lamp", "lamp", "l1", "l2", "bn_scale"):
        _, scores = _scored(criterion, model, inputs=(torch.randn(1, 3, 5, 5),))
        order = np.argsort(scores)
        assert set(order[:2]) == {1, 5}, criterion


def test_unknown_criterion():
    with pytest.raises(ScoreError, match="choose one of"):
        ScorePass("magic")


class Tied(nn.Module):
    """Two branches whose layers share one weight (``b.weight`` is ``a.weight``)."""

    def __init__(self):
        super().__init__()
        self.stem_a, self.stem_b = nn.Linear(6, 8), nn.Linear(6, 8)
        self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 4)
        self.b.weight = self.a.weight
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.a(torch.relu(self.stem_a(x))))
                         + torch.relu(self.b(torch.relu(self.stem_b(x)))))


def test_a_tied_weight_couples_its_users_and_is_scored_under_either_name():
    gm = fxprune.analyze(Tied().eval(), (torch.randn(2, 6),))
    stems = [g for g in fxprune.groups(gm) if {m.node for m in g.members} >= {"stem_a", "stem_b"}]
    assert len(stems) == 1 and stems[0].prunable  # the tie makes both stems' widths one group
    producers = {space.node for space, _, _ in TaylorAccumulator(gm).filters}
    assert {"a", "b", "stem_a", "stem_b"} <= producers  # b's filters read through the tie's second name
    batches = [((torch.randn(4, 6),), torch.randint(0, 3, (4,))) for _ in range(2)]
    ScorePass("taylor", batches, nn.functional.cross_entropy)(gm)
    assert fxprune.importance(gm)[stems[0].id].sum() > 0
