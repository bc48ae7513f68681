"""The convolution rule serves every form a convolution takes: a module, a subclass of one, a function
call with parameters read through get_attr, and ATen's conv2d / convolution in torch.export's graphs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import fxprune
from fxprune.frontends.fx_trace import propagate_shapes
from fxprune.passes.dependency import DependencyPass
from fxprune.rules import RULES
from fxprune.testing import masked_forward, randomize_parameters


def _prunes_exactly(gm: torch.fx.GraphModule, inputs: tuple, seed: int = 0) -> torch.fx.GraphModule:
    plan = fxprune.random_plan(gm, 0.5, seed=seed)
    assert plan.keep, "nothing was prunable"
    pruned = fxprune.prune(gm, plan)
    with torch.no_grad():
        expected, actual = masked_forward(gm, plan, *inputs), pruned(*inputs)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in gm.parameters())
    return pruned


class Subclassed(nn.Conv3d):
    """A subclass that adds nothing to its forward (torchvision's Conv3DSimple is one)."""


class OwnForward(nn.Conv2d):
    """A subclass with a forward of its own: traced through, down to F.conv2d."""

    def forward(self, x):
        return super().forward(x) * 2.0


def test_a_subclass_of_a_known_module_resolves_to_its_base_rule():
    assert RULES.module_rule(Subclassed(2, 2, 1)) is RULES.module_rule(nn.Conv3d(2, 2, 1))
    model = nn.Sequential(Subclassed(3, 8, 3, padding=1), nn.ReLU(), Subclassed(8, 4, 1)).eval()
    inputs = (torch.randn(1, 3, 4, 6, 6),)
    gm = fxprune.analyze(model, inputs)
    assert [n.op for n in gm.graph.nodes if n.op.startswith("call")] == ["call_module"] * 3
    _prunes_exactly(gm, inputs)


def test_a_convolution_reached_through_a_forward_of_its_own_is_pruned_as_a_call():
    model = nn.Sequential(OwnForward(3, 8, 3, padding=1, groups=1), nn.ReLU(), OwnForward(8, 8, 3, groups=4),
                          nn.ReLU(), OwnForward(8, 4, 1)).eval()
    inputs = (torch.randn(1, 3, 9, 9),)
    gm = fxprune.analyze(model, inputs)
    assert sum(n.target is F.conv2d for n in gm.graph.nodes) == 3
    pruned = _prunes_exactly(gm, inputs)
    groups = [n.args[6] for n in pruned.graph.nodes if n.target is F.conv2d]
    assert groups[0] == 1 and groups[1] < 4  # the grouped call lost whole groups and says so


def test_r3d_18_is_prunable_through_the_conv3d_rule():
    model = randomize_parameters(torchvision.models.video.r3d_18(weights=None).eval())
    inputs = (torch.randn(1, 3, 4, 32, 32),)
    gm = fxprune.analyze(model, inputs)
    convs = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Conv3d)]
    assert len(convs) == 20
    prunable = [g for g in fxprune.groups(gm) if g.prunable]
    assert len(prunable) >= 9, [g.describe() for g in fxprune.groups(gm)]  # was 0 of 14: every conv frozen
    _prunes_exactly(gm, inputs, seed=1)


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))) + 1)


@pytest.mark.parametrize("decomposed", [False, True])
def test_aten_convolutions_from_torch_export_are_pruned_by_the_same_rule(decomposed):
    """torch.export's graph: aten.conv2d (or aten.convolution once decomposed), weights from get_attr."""
    inputs = (torch.randn(1, 3, 8, 8),)
    program = torch.export.export(randomize_parameters(Small().eval()), inputs)
    exported = (program.run_decompositions() if decomposed else program).module()
    gm = torch.fx.GraphModule(exported, exported.graph)
    target = torch.ops.aten.convolution.default if decomposed else torch.ops.aten.conv2d.default
    assert sum(n.target is target for n in gm.graph.nodes) == 3
    propagate_shapes(gm, inputs)
    DependencyPass()(gm)
    assert [g.size for g in fxprune.groups(gm) if g.prunable] == [2]  # conv a's output: two groups of conv b
    _prunes_exactly(gm, inputs)


class StandardizedWeight(nn.Module):
    """timm's StdConv2d in small: the convolution's weight is computed in the graph, not a parameter."""

    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.w = nn.Parameter(torch.randn(8, 8, 3, 3))

    def forward(self, x):
        w = (self.w - self.w.mean()) / (self.w.std() + 1e-5)
        return self.c(F.conv2d(torch.relu(self.a(x)), w, None, 1, 1))


class WidthAsGroups(nn.Module):
    """A depthwise call whose groups argument is a width read at run time."""

    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.w = nn.Parameter(torch.randn(8, 1, 3, 3))

    def forward(self, x):
        h = self.a(x)
        return self.c(F.conv2d(h, self.w, None, 1, 1, 1, h.shape[1]))


@pytest.mark.parametrize("model", [StandardizedWeight(), WidthAsGroups()], ids=["computed-weight", "traced-groups"])
def test_a_convolution_call_the_rule_cannot_read_is_frozen_and_the_rest_still_prunes(model):
    inputs = (torch.randn(1, 3, 6, 6),)
    gm = fxprune.analyze(model.eval(), inputs)
    conv = next(n for n in gm.graph.nodes if n.target is F.conv2d)
    assert any(m.node == conv.args[0].name for g in fxprune.groups(gm) if not g.prunable for m in g.members)
    fxprune.prune(gm, fxprune.Plan({}))  # the frozen call is left as it is
    with torch.no_grad():
        assert torch.equal(fxprune.prune(gm, fxprune.Plan({}))(*inputs), model(*inputs))
