"""Rewrite pass: build a new, physically smaller GraphModule from an analysed one and a Plan.

Works on a deep copy, so the analysed graph (and the user's model behind it) is only read. Every tensor
axis a rule lists (``rules/params.py``) is indexed with ``index_select`` into a new tensor; then each
node's rule updates the op's own fields (``in_channels``, ``groups``, view sizes, split sizes).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxprune.errors import AnalysisRequiredError, PlanError
from fxprune.ir.channels import Block, Plan
from fxprune.ir.keys import ANALYSIS_KEY, CAPTURE_KEY, PLAN_KEY
from fxprune.rules import RULES, Kept
from fxprune.rules.params import tensor_axes


def keep_masks(gm: torch.fx.GraphModule, plan: Plan) -> dict[int, np.ndarray]:
    """Boolean keep mask per group, checked against the analysis; raises PlanError on a bad plan."""
    analysis = gm.meta.get(ANALYSIS_KEY)
    if analysis is None:
        raise AnalysisRequiredError("this GraphModule has not been analysed; call fxprune.analyze(model, inputs)")
    masks = {gid: np.ones(g.size, dtype=bool) for gid, g in analysis.groups.items()}
    for gid, kept in plan.keep.items():
        group = analysis.groups.get(gid)
        if group is None:
            raise PlanError(f"the plan names group {gid}, which does not exist; valid ids are 0..{len(masks) - 1} "
                            "(see fxprune.groups(gm))")
        kept = np.asarray(kept, dtype=np.int64).reshape(-1)
        if kept.size == 0:
            raise PlanError(f"the plan keeps no channel of group {gid}; keep at least one channel per group")
        if kept.min() < 0 or kept.max() >= group.size or np.unique(kept).size != kept.size:
            raise PlanError(f"the plan for group {gid} must list distinct channel indices in [0, {group.size}); "
                            f"got {kept.size} indices from {kept.min()} to {kept.max()}")
        if kept.size < group.size and not group.prunable:
            raise PlanError(f"group {gid} is frozen ({group.frozen_reason or 'a single unit'}) and cannot be "
                            "pruned; leave it out of the plan")
        if group.fixed is not None and not np.isin(group.fixed, kept).all():
            raise PlanError(f"the plan drops channels {sorted(set(group.fixed.tolist()) - set(kept.tolist()))[:8]} "
                            f"of group {gid}, which must stay ({group.fixed_reason}); keep them, e.g. with "
                            "fxprune.with_every_member(gm, keep)")
        masks[gid] = np.zeros(group.size, dtype=bool)
        masks[gid][kept] = True
    for nest in analysis.nests:
        if (why := nest.violation(masks[nest.inner], masks[nest.outer])) is not None:
            raise PlanError(f"the plan breaks grouped-query attention: {why} (query heads under key-value heads); "
                            "keep as many under each kept one, none under a dropped one, e.g. with "
                            "fxprune.with_every_member(gm, keep)")
    blocks = len(analysis.blocks)
    if any(not 0 <= b < blocks for b in plan.drop):
        raise PlanError(f"the plan removes blocks {sorted(plan.drop)}; this model's removable blocks are "
                        f"0..{blocks - 1} (see fxprune.blocks(gm))" if blocks else
                        f"the plan removes blocks {sorted(plan.drop)}, and this model has no removable block")
    return masks


def kept_shares(gm: torch.fx.GraphModule, plan: Plan) -> dict[int, float]:
    """Per channel space id: the share of its positions ``plan`` keeps (what cost models price); per
    removed block, its space at 0."""
    analysis = gm.meta[ANALYSIS_KEY]
    masks = keep_masks(gm, plan)
    shares = {s.id: len(s.kept_positions(masks[s.group_id])) / s.size for s in analysis.spaces}
    shares.update({analysis.blocks[b].space: 0.0 for b in plan.drop})
    return shares


class RewritePass(PassBase):
    """Apply a Plan: returns a new GraphModule; the input GraphModule is left as it was."""

    def __init__(self, plan: Plan) -> None:
        super().__init__()
        self.plan = plan

    def requires(self, graph_module: torch.fx.GraphModule) -> None:
        if ANALYSIS_KEY not in graph_module.meta:  # the plan itself is checked by keep_masks in call
            raise AnalysisRequiredError("this GraphModule has not been analysed; call fxprune.analyze(model, inputs)")

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        kept = kept_positions(graph_module, keep_masks(graph_module, self.plan))
        meta, graph_module.meta = graph_module.meta, {}  # the passes' results describe the old model
        try:
            new_gm = copy.deepcopy(graph_module)
        finally:
            graph_module.meta = meta
        unused = {n.name for n in new_gm.graph.nodes if not n.users and n.op != "output"}
        _index_tensors(new_gm, kept)
        updated_modules: set[str] = set()
        for node in list(new_gm.graph.nodes):
            rule = RULES.recorded(node)
            if rule is None or (node.op == "call_module" and node.target in updated_modules):
                continue
            if node.op == "call_module":
                updated_modules.add(node.target)
            rule.update(new_gm, node, kept)
        removed = _remove_blocks(new_gm, [meta[ANALYSIS_KEY].blocks[b] for b in self.plan.drop])
        # what the rewrite left unused goes; a call the model already ignored the result of stays: it is
        # there for what it does in place (torchvision's mvit: _add_shortcut adds the residual into its input)
        new_gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.name in unused or n.is_impure())
        _delete_unread_tensors(new_gm, removed)
        new_gm.delete_all_unused_submodules()
        for node in new_gm.graph.nodes:  # shapes and channel spaces describe the old model now
            for key in [k for k in node.meta if k.startswith("fxprune") or k == "tensor_meta"]:
                del node.meta[key]
        new_gm.meta[PLAN_KEY] = self.plan
        if CAPTURE_KEY in meta:  # the inputs' and outputs' structure does not change
            new_gm.meta[CAPTURE_KEY] = meta[CAPTURE_KEY]
        new_gm.graph.lint()
        new_gm.recompile()
        return PassResult(new_gm, modified=True)


def kept_positions(gm: torch.fx.GraphModule, masks: dict[int, np.ndarray]) -> Kept:
    """Kept positions of every channel space that loses channels, keyed by space id.

    Keyed by space rather than node name so a rule that replaces a node (the gather) keeps working for
    the nodes after it: the replacement carries the same ``node.meta``.
    """
    kept: Kept = {}
    for space in gm.meta[ANALYSIS_KEY].spaces:
        if masks[space.group_id].all():
            continue
        positions = space.kept_positions(masks[space.group_id])
        if positions.size == space.size:
            continue  # this space keeps all it has (a frozen one always does)
        if positions.size == 0:
            raise PlanError(f"the plan removes every channel of {space.node} (group {space.group_id}); "
                            "keep at least one of the group channels that feed it")
        kept[space.id] = torch.as_tensor(positions)
    return kept


def _remove_blocks(gm: torch.fx.GraphModule, blocks: list[Block]) -> set[str]:
    """Each block's add reads as its skip input; its nodes, unread now, go with the dead code after.
    Returns the names of the tensors (get_attr targets) the removed nodes read."""
    nodes = {n.name: n for n in gm.graph.nodes}
    read: set[str] = set()
    instead: dict[str, torch.fx.Node] = {}  # a removed add -> the node its users read now
    for block in sorted(blocks, key=lambda b: b.id):  # graph order: a block's skip may be the add of the one before
        skip = instead.get(block.skip, nodes[block.skip])
        nodes[block.add].replace_all_uses_with(skip)
        instead[block.add] = skip
        for name in block.nodes:
            read.update(a.target for a in nodes[name].all_input_nodes if a.op == "get_attr")
    for block in blocks:
        for name in reversed(block.nodes):
            if not nodes[name].users:
                gm.graph.erase_node(nodes[name])
    return read


def _delete_unread_tensors(gm: torch.fx.GraphModule, names: set[str]) -> None:
    """The tensors of removed blocks that no node reads any more leave the module (torch.export's graphs
    read parameters through get_attr; their submodules go with ``delete_all_unused_submodules``)."""
    still = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in names - still:
        owner, _, attr = name.rpartition(".")
        module = gm.get_submodule(owner)
        if hasattr(module, attr):
            delattr(module, attr)


def _index_tensors(gm: torch.fx.GraphModule, kept: Kept) -> None:
    """Replace every tensor a rule lists by its kept positions along each listed axis."""
    by_tensor: dict[str, list] = {}
    for axis in tensor_axes(gm, include_replaced=False):
        if axis.space.id in kept:
            by_tensor.setdefault(axis.name, []).append(axis)
    for name, axes in by_tensor.items():
        owner_path, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_path)
        tensor = getattr(owner, attr).detach()
        for axis in axes:
            tensor = tensor.index_select(axis.dim, kept[axis.space.id])
        _replace_tensor(owner, attr, tensor.clone())


def _replace_tensor(owner: nn.Module, name: str, new: torch.Tensor) -> None:
    """Swap a parameter or buffer for a smaller one, keeping its kind and requires_grad."""
    old = getattr(owner, name)
    if isinstance(old, nn.Parameter):
        setattr(owner, name, nn.Parameter(new, requires_grad=old.requires_grad))
    elif name in owner._buffers:
        owner._buffers[name] = new
    else:
        setattr(owner, name, new)
