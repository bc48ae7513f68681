"""Property test: random architectures (DAGs of conv, batchnorm, activation, add, cat, split, depthwise and
grouped conv, linear) compile to a FLOPs budget, and any plan prunes them to exactly what the masked
reference computes."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import fxprune
from fxprune.passes.cost import count_flops
from fxprune.solvers.planner import with_every_member
from fxprune.testing import masked_forward, randomize_parameters

ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "hardswish": nn.Hardswish, "gelu": nn.GELU}


class RandomNet(nn.Module):
    """A network built from a recipe: each step reads earlier tensors by index and appends new ones."""

    def __init__(self, recipe: list[tuple], in_channels: int, classes: int = 5) -> None:
        super().__init__()
        self.recipe = recipe
        self.layers = nn.ModuleList()
        widths = [in_channels]
        for op, *args in recipe:
            if op in ("conv", "depthwise", "grouped"):
                src, out, kernel = args
                groups = {"conv": 1, "depthwise": widths[src], "grouped": 2}[op]
                self.layers.append(nn.Conv2d(widths[src], out, kernel, padding=kernel // 2, groups=groups))
                widths.append(out)
            elif op == "bn":
                self.layers.append(nn.BatchNorm2d(widths[args[0]]))
                widths.append(widths[args[0]])
            elif op in ACTIVATIONS:
                self.layers.append(ACTIVATIONS[op]())
                widths.append(widths[args[0]])
            elif op == "add":
                self.layers.append(nn.Identity())
                widths.append(widths[args[0]])
            elif op == "cat":
                self.layers.append(nn.Identity())
                widths.append(widths[args[0]] + widths[args[1]])
            elif op == "split":
                self.layers.append(nn.Identity())
                widths += [args[1], widths[args[0]] - args[1]]
        self.widths = widths  # channels of every tensor, by index (static: fx traces no width reads)
        self.head = nn.Linear(widths[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tensors = [x]
        for layer, (op, *args) in zip(self.layers, self.recipe):
            if op == "add":
                tensors.append(tensors[args[0]] + tensors[args[1]])
            elif op == "cat":
                tensors.append(torch.cat([tensors[args[0]], tensors[args[1]]], dim=1))
            elif op == "split":
                parts = torch.split(tensors[args[0]], [args[1], self.widths[args[0]] - args[1]], dim=1)
                tensors += [parts[0], parts[1]]
            else:
                tensors.append(layer(tensors[args[0]]))
        return self.head(tensors[-1].mean((2, 3)))


@st.composite
def recipes(draw) -> tuple[list[tuple], int]:
    """A random recipe; tensors are referred to by index and widths are tracked to keep every op valid."""
    in_channels = draw(st.sampled_from([3, 4]))
    widths, recipe = [in_channels], []
    for _ in range(draw(st.integers(2, 9))):
        src = draw(st.integers(0, len(widths) - 1))
        same = [i for i, w in enumerate(widths) if w == widths[src] and i != src]
        choices = ["conv", "bn", "depthwise", "relu", "silu", "hardswish", "gelu", "cat"]
        choices += ["add"] * bool(same) + ["split"] * (widths[src] >= 4) + ["grouped"] * (widths[src] % 2 == 0)
        op = draw(st.sampled_from(choices))
        if op in ("conv", "grouped"):
            out = draw(st.sampled_from([4, 6, 8, 12, 16]))
            recipe.append((op, src, out, draw(st.sampled_from([1, 3]))))
            widths.append(out)
        elif op == "depthwise":
            recipe.append((op, src, widths[src], 3))
            widths.append(widths[src])
        elif op == "add":
            recipe.append((op, src, draw(st.sampled_from(same))))
            widths.append(widths[src])
        elif op == "cat":
            other = draw(st.integers(0, len(widths) - 1))
            recipe.append((op, src, other))
            widths.append(widths[src] + widths[other])
        elif op == "split":
            first = draw(st.integers(1, widths[src] - 1))
            recipe.append((op, src, first))
            widths += [first, widths[src] - first]
        else:
            recipe.append((op, src))
            widths.append(widths[src])
    recipe.append(("conv", len(widths) - 1, draw(st.sampled_from([8, 16])), 3))  # the head reads a conv's output
    return recipe, in_channels


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recipe=recipes(), data=st.data())
def test_random_architectures_compile_and_prune_to_the_masked_model(recipe, data):
    steps, in_channels = recipe
    model = randomize_parameters(RandomNet(steps, in_channels).eval(), seed=0)
    inputs = (torch.randn(2, in_channels, 6, 6, generator=torch.Generator().manual_seed(0)),)
    gm = fxprune.analyze(model, inputs)
    keep = {}
    for group in fxprune.groups(gm):
        if group.prunable:
            mask = np.asarray(data.draw(st.lists(st.booleans(), min_size=group.size, max_size=group.size)))
            keep[group.id] = np.flatnonzero(mask)
    plan = with_every_member(gm, {g: k for g, k in keep.items() if k.size < fxprune.analysis(gm).groups[g].size})
    with torch.no_grad():
        expected = masked_forward(gm, plan, *inputs)
        got = fxprune.prune(gm, plan)(*inputs)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)

    try:
        pruned = fxprune.compile(model, fxprune.FLOPs(0.7), inputs, round_to=1)
    except fxprune.BudgetError as err:  # legitimate only when frozen channels alone cost more than the budget
        assert err.smallest_share is not None and err.smallest_share > 0.7
        event("FLOPs(0.7) unreachable: frozen channels cost more")
        return
    event("compiled to FLOPs(0.7)")
    assert count_flops(pruned, inputs) <= 0.7 * count_flops(model, inputs) * (1 + 1e-9)
    with torch.no_grad():
        assert pruned(*inputs).shape == model(*inputs).shape
