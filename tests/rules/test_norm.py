"""Normalizations: per-channel, grouped, layer norm; shared across call sites even without affine tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.testing import masked_forward, randomize_parameters


def _prunes_exactly(model: nn.Module, inputs: tuple, seed: int = 0) -> torch.fx.GraphModule:
    gm = fxprune.analyze(randomize_parameters(model.eval()), inputs)
    plan = fxprune.random_plan(gm, 0.5, seed=seed, include_norm_coupled=False)
    assert plan.keep, "nothing was prunable"
    pruned = fxprune.prune(gm, plan)
    with torch.no_grad():
        torch.testing.assert_close(pruned(*inputs), masked_forward(gm, plan, *inputs), rtol=1e-4, atol=1e-5)
    return gm


def test_a_prelu_with_one_slope_is_an_activation():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.PReLU(), nn.Conv2d(8, 4, 1))
    _prunes_exactly(model, (torch.randn(1, 3, 6, 6),))


def test_a_prelu_with_a_slope_per_channel_loses_the_pruned_slopes():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.PReLU(8), nn.Conv2d(8, 4, 1))
    gm = _prunes_exactly(model, (torch.randn(1, 3, 6, 6),))
    pruned = fxprune.prune(gm, fxprune.random_plan(gm, 0.5))
    assert pruned.get_submodule("1").num_parameters == pruned.get_submodule("1").weight.numel() < 8


class SharedNorm(nn.Module):
    """One normalization module called on two branches."""

    def __init__(self, norm: nn.Module, conv: bool):
        super().__init__()
        layer = (lambda i, o: nn.Conv2d(i, o, 1)) if conv else nn.Linear
        self.a, self.b, self.norm = layer(3, 8), layer(3, 8), norm
        self.ca, self.cb = layer(8, 4), layer(8, 4)

    def forward(self, x):
        return self.ca(self.norm(self.a(x))) + self.cb(self.norm(self.b(x)))


@pytest.mark.parametrize("norm, conv", [(nn.GroupNorm(4, 8, affine=False), True), (nn.GroupNorm(4, 8), True),
                                        (nn.BatchNorm2d(8), True), (nn.LayerNorm(8, elementwise_affine=False), False)],
                         ids=["groupnorm", "groupnorm-affine", "batchnorm", "layernorm"])
def test_a_norm_called_at_two_sites_couples_them(norm, conv):
    """One module has one width: the two branches it normalizes are one group (before, a norm without
    affine tensors kept one group per site and the rewrite gave it the first site's width)."""
    inputs = (torch.randn(2, 3, 4, 4) if conv else torch.randn(2, 5, 3),)
    gm = fxprune.analyze(randomize_parameters(SharedNorm(norm, conv).eval()), inputs)
    group = next(g for g in fxprune.groups(gm) if any(m.node == "a" for m in g.members))
    assert {"a", "b"} <= {m.node for m in group.members}
    if not isinstance(norm, nn.LayerNorm):
        _prunes_exactly(SharedNorm(norm, conv), inputs)
    else:  # statistics over the channels change when some go: shapes and finite values are what hold
        pruned = fxprune.prune(gm, fxprune.random_plan(gm, 0.5))
        assert pruned.norm.normalized_shape[0] < 8 and torch.isfinite(pruned(*inputs)).all()
