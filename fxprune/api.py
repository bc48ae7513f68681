"""The public calls: analyze a model, inspect its channel groups, prune it with a plan."""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch
import torch.fx

from fxprune.errors import AnalysisRequiredError, ExampleInputsError
from fxprune.ir import META_KEY, ChannelGroup, Plan
from fxprune.passes.dependency import Analysis, DependencyPass
from fxprune.passes.rewrite import PLAN_KEY, RewritePass
from fxprune.passes.trace import propagate_shapes, trace


def analyze(
    model: torch.nn.Module,
    example_inputs: Any,
    *,
    leaf_modules: Iterable[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
) -> torch.fx.GraphModule:
    """Trace ``model``, propagate shapes and find its channel groups; the model is not modified.

    The result is fxprune's own GraphModule: it shares nothing writable with the passes that follow
    (the rewrite copies before it writes).
    """
    if example_inputs is None:
        raise ExampleInputsError("example_inputs is required: pass e.g. (torch.randn(1, 3, 224, 224),)")
    gm = trace(model, leaf_modules=leaf_modules, concrete_args=concrete_args)
    propagate_shapes(gm, example_inputs)
    DependencyPass()(gm)
    return gm


def analysis(gm: torch.fx.GraphModule) -> Analysis:
    if META_KEY not in gm.meta:
        raise AnalysisRequiredError("this GraphModule has not been analysed; call fxprune.analyze(model, inputs)")
    return gm.meta[META_KEY]


def groups(gm: torch.fx.GraphModule) -> list[ChannelGroup]:
    """All channel groups of an analysed GraphModule, prunable or frozen."""
    return list(analysis(gm).groups.values())


def random_plan(gm: torch.fx.GraphModule, keep_ratio: float = 0.5, seed: int = 0,
                include_norm_coupled: bool = True) -> Plan:
    """Keep a random ``keep_ratio`` share of every prunable group's channels.

    At least one channel of every member survives (a concat member may own only a few channels), so
    the share kept can be slightly above ``keep_ratio``.
    """
    rng = np.random.default_rng(seed)
    result = analysis(gm)
    keep = {}
    for group in result.groups.values():
        if not group.prunable or (group.norm_coupled and not include_norm_coupled):
            continue
        count = max(1, int(round(group.size * keep_ratio)))
        kept = set(rng.choice(group.size, size=count, replace=False).tolist())
        for channels in result.member_channels(group.id):
            if not kept.intersection(channels.tolist()):
                kept.add(int(rng.choice(channels)))
        keep[group.id] = np.array(sorted(kept), dtype=np.int64)
    return Plan(keep)


def prune(gm: torch.fx.GraphModule, plan: Plan) -> torch.fx.GraphModule:
    """A new, physically smaller GraphModule keeping ``plan``'s channels; ``gm`` is left as it was."""
    return RewritePass(plan)(gm).graph_module


def plan_of(gm: torch.fx.GraphModule) -> Plan | None:
    """The plan a pruned GraphModule was made with, or None for an unpruned one."""
    return gm.meta.get(PLAN_KEY)
