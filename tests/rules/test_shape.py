"""Shape ops by label replay: what the rewrite changes, and what it leaves alone."""

from __future__ import annotations

import torch
import torch.nn as nn

import fxprune
from fxprune.testing import masked_forward, randomize_parameters


class NamedLikeAMethod(nn.Module):
    """A module attribute called ``reshape``: a call_module node whose target is the string 'reshape'."""

    def __init__(self):
        super().__init__()
        self.conv, self.reshape, self.head = nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        return self.head(self.reshape(torch.relu(self.conv(x))))


def test_a_module_named_like_a_view_method_is_not_resized_as_one():
    inputs = (torch.randn(1, 3, 6, 6),)
    gm = fxprune.analyze(randomize_parameters(NamedLikeAMethod().eval()), inputs)
    plan = fxprune.random_plan(gm, 0.5)
    pruned = fxprune.prune(gm, plan)
    with torch.no_grad():
        torch.testing.assert_close(pruned(*inputs), masked_forward(gm, plan, *inputs))
    assert pruned.head.in_features < 8 * 4 * 4
