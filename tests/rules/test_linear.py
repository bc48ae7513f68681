"""Linear layers and embeddings: modules, function calls on parameters, and ATen's linear."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.testing import masked_forward, randomize_parameters


def _prunes_exactly(gm: torch.fx.GraphModule, inputs: tuple) -> torch.fx.GraphModule:
    plan = fxprune.random_plan(gm, 0.5, seed=0)
    assert plan.keep, "nothing was prunable"
    pruned = fxprune.prune(gm, plan)
    with torch.no_grad():
        torch.testing.assert_close(pruned(*inputs), masked_forward(gm, plan, *inputs), rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in gm.parameters())
    return pruned


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.hidden = nn.Linear(16, 12)
        self.out = nn.Linear(12, 5)

    def forward(self, tokens):
        return self.out(torch.relu(self.hidden(self.embed(tokens))))


def test_an_embedding_width_is_pruned_with_the_layer_that_reads_it():
    inputs = (torch.randint(0, 50, (2, 7)),)
    gm = fxprune.analyze(randomize_parameters(Tagger().eval()), inputs)
    widths = sorted(g.size for g in fxprune.groups(gm) if g.prunable)
    assert widths == [12, 16]  # the embedding's columns with hidden's inputs; hidden's outputs with out's inputs
    pruned = _prunes_exactly(gm, inputs)
    assert pruned.embed.embedding_dim == pruned.embed.weight.shape[1] == pruned.hidden.in_features < 16


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(10, 6)), nn.Parameter(torch.randn(10))
        self.w2 = nn.Parameter(torch.randn(3, 10))

    def forward(self, x):
        return F.linear(F.gelu(F.linear(x, self.w1, self.b1)), self.w2)


def test_a_linear_call_on_parameters_is_pruned_like_the_module():
    inputs = (torch.randn(4, 6),)
    gm = fxprune.analyze(Functional().eval(), inputs)
    assert [g.size for g in fxprune.groups(gm) if g.prunable] == [10]
    pruned = _prunes_exactly(gm, inputs)
    assert pruned.w1.shape[0] == pruned.b1.shape[0] == pruned.w2.shape[1] < 10
