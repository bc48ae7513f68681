"""Shape ops by label replay: what the rewrite changes, and what it leaves alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.rules.shape import reshape_target
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


@pytest.mark.parametrize("old_in, old_out, new_in, want", [
    ((1, 64, 1, 1), (1, 64), (1, 48, 1, 1), [1, 48]),  # flatten of a pooled tensor
    ((1, 32, 7, 7), (1, 1568), (1, 24, 7, 7), [1, 1176]),  # flatten of a feature map
    ((1, 64, 5, 5), (1, 64, 25), (1, 40, 5, 5), [1, 40, 25]),  # tokens out of a feature map
    ((1, 64, 5, 5), (1, 64, 5, 5), (1, 40, 5, 5), [1, 40, 5, 5]),
    ((1, 116, 7, 7), (1, 2, 58, 7, 7), (1, 88, 7, 7), None),  # channel shuffle: which factor shrank?
    ((1, 64, 5, 5), (1, 64, 5, 5), (1, 40, 5, 5, 1), None),
])
def test_an_exported_reshapes_target_follows_runs_of_axes(old_in, old_out, new_in, want):
    assert reshape_target(old_in, old_out, new_in) == want
