"""The trace pass: what it records, and how it fails."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.ir.keys import VALUE_KEY


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.conv(x))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # control flow on a tensor value: not traceable
            return x
        return -x


def test_untraceable_model_names_the_module_and_the_fix():
    with pytest.raises(fxprune.FxpruneTraceError) as info:
        fxprune.analyze(DataDependent(), (torch.randn(1, 3, 4, 4),), capture="fx")
    assert "Gate" in str(info.value) and "leaf_modules" in str(info.value)


def test_leaf_module_makes_it_traceable_and_freezes_its_channels():
    gm = fxprune.analyze(DataDependent(), (torch.randn(1, 3, 4, 4),), leaf_modules=[Gate])
    conv_group = next(g for g in fxprune.groups(gm) if any(m.node == "conv" for m in g.members))
    assert not conv_group.prunable and "Gate" in conv_group.frozen_reason


@pytest.mark.parametrize("inputs, message", [
    ("not a tensor", "tensor or a tuple"),
    ((torch.randn(1, 3, 4, 4), torch.randn(1)), "takes 1 input"),
    ((torch.randn(1, 5, 4, 4),), "failed on the example inputs"),
])
def test_wrong_example_inputs_say_what_to_pass(inputs, message):
    with pytest.raises(fxprune.ExampleInputsError, match=message):
        fxprune.analyze(nn.Sequential(nn.Conv2d(3, 4, 1)), inputs)


def test_missing_example_inputs():
    with pytest.raises(fxprune.ExampleInputsError, match="required"):
        fxprune.analyze(nn.Conv2d(3, 4, 1), None)


def test_shapes_and_sizes_are_recorded_on_nodes():
    class Sized(nn.Module):
        def forward(self, x):
            return x.view(x.size(0), -1)

    gm = fxprune.analyze(Sized(), (torch.randn(2, 3, 4),))
    size_node = next(n for n in gm.graph.nodes if n.target == "size")
    assert size_node.meta[VALUE_KEY] == 2
    assert tuple(gm.graph.find_nodes(op="output")[0].args[0].meta["tensor_meta"].shape) == (2, 12)


def test_the_users_model_is_not_modified():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = fxprune.analyze(model, (torch.randn(2, 3, 4, 4),))
    fxprune.prune(gm, fxprune.random_plan(gm, 0.5))
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


class CachesOnSelf(nn.Module):
    """A forward that caches a derived tensor on the module, as timm's attention-bias caches do."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bias_table = nn.Parameter(torch.randn(4))
        self.cache = {}

    def forward(self, x):
        if "bias" not in self.cache:
            self.cache["bias"] = self.bias_table.view(1, -1, 1, 1) * 2
        return self.conv(x) + self.cache["bias"]


def test_a_forward_that_caches_on_self_leaves_no_trace_in_the_users_model():
    model = CachesOnSelf().eval()
    inputs = (torch.randn(1, 3, 4, 4),)
    for _ in range(2):  # a proxy left in the cache by the first trace would break the second
        gm = fxprune.analyze(model, inputs)
        assert model.cache == {}
    torch.testing.assert_close(gm(*inputs), model(*inputs))


class OptionalMask(nn.Module):
    """``if mask is not None`` on a forward argument the caller leaves out, as in timm's Hiera."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x, mask=None, scale=2.0):
        y = self.conv(x)
        if mask is not None:
            y = y * mask
        return self.head(y) * scale


def test_arguments_the_example_inputs_leave_out_are_traced_at_their_defaults():
    model = OptionalMask().eval()
    inputs = (torch.randn(1, 3, 4, 4),)
    gm = fxprune.analyze(model, inputs)
    pruned = fxprune.prune(gm, fxprune.random_plan(gm, 0.5))
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), model(*inputs))
        assert pruned(*inputs).shape == model(*inputs).shape
    assert any(group.prunable for group in fxprune.groups(gm))


def test_an_argument_given_in_the_example_inputs_is_traced_as_an_input():
    model = OptionalMask().eval()
    inputs = (torch.randn(1, 3, 4, 4), torch.rand(1, 8, 4, 4))
    gm = fxprune.analyze(model, inputs)
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), model(*inputs))
