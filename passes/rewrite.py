"""Rewrite pass: build a new, physically smaller GraphModule from an analysed one and a Plan.

Works on a deep copy, so the analysed graph (and the user's model behind it) is only read. Every
parameter and buffer of a pruned layer is a new tensor made by ``index_select``; shape constants that
depend on channel counts (view sizes, split sizes, ``normalized_shape``, ``groups``) are updated.
"""

from __future__ import annotations

import copy
from typing import Callable

import numpy as np
import torch
import torch.fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxprune.errors import AnalysisRequiredError, PlanError
from fxprune.ir import META_KEY, ChannelSpace, NodeChannels, Plan
from fxprune.modules import PrunedMultiheadAttention, shifted_window_attention

PLAN_KEY = "fxprune_plan"


def keep_masks(gm: torch.fx.GraphModule, plan: Plan) -> dict[int, np.ndarray]:
    """Boolean keep mask per group, checked against the analysis; raises PlanError on a bad plan."""
    analysis = gm.meta.get(META_KEY)
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
        masks[gid] = np.zeros(group.size, dtype=bool)
        masks[gid][kept] = True
    return masks


def kept_shares(gm: torch.fx.GraphModule, plan: Plan) -> dict[int, float]:
    """Per channel space id: the share of its positions ``plan`` keeps (what cost models price)."""
    masks = keep_masks(gm, plan)
    return {s.id: len(s.kept_positions(masks[s.group_id])) / s.size for s in gm.meta[META_KEY].spaces}


def node_spaces(node: torch.fx.Node) -> list[ChannelSpace | None]:
    return node.meta.get(META_KEY, NodeChannels()).spaces


class RewritePass(PassBase):
    """Apply a Plan: returns a new GraphModule; the input GraphModule is left as it was."""

    def __init__(self, plan: Plan) -> None:
        super().__init__()
        self.plan = plan

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        masks = keep_masks(graph_module, self.plan)
        kept = _kept_positions(graph_module, masks)
        new_gm = copy.deepcopy(graph_module)
        done_modules: set[str] = set()
        for node in list(new_gm.graph.nodes):
            info = node.meta.get(META_KEY)
            if node.op == "get_attr" and _output_kept(node, kept) is not None:
                _prune_attribute(new_gm, node, _output_kept(node, kept))
            if info is None or info.rewrite is None:
                continue
            if info.rewrite == "module":
                if node.target not in done_modules:
                    done_modules.add(node.target)
                    _rewrite_module(new_gm, node, kept)
            else:
                NODE_RULES[info.rewrite](new_gm, node, kept)
        new_gm.graph.eliminate_dead_code()
        new_gm.delete_all_unused_submodules()
        for node in new_gm.graph.nodes:  # shapes and channel spaces describe the old model now
            for key in (META_KEY, "tensor_meta", "fxprune_value"):
                node.meta.pop(key, None)
        new_gm.meta.pop(META_KEY, None)
        new_gm.meta[PLAN_KEY] = self.plan
        new_gm.graph.lint()
        new_gm.recompile()
        return PassResult(new_gm, modified=True)


def _kept_positions(gm: torch.fx.GraphModule, masks: dict[int, np.ndarray]) -> dict[int, torch.Tensor]:
    """Kept positions of every channel space that loses channels, keyed by space id.

    Keyed by space rather than node name so a rule that replaces a node (the gather) keeps working for
    the nodes after it: the replacement carries the same ``node.meta``.
    """
    kept: dict[int, torch.Tensor] = {}
    for node in gm.graph.nodes:
        for space in node_spaces(node):
            if space is None or masks[space.group_id].all():
                continue
            positions = space.kept_positions(masks[space.group_id])
            if positions.size == 0:
                raise PlanError(f"the plan removes every channel of {node.name} (group {space.group_id}); "
                                "keep at least one of the group channels that feed it")
            kept[space.id] = torch.as_tensor(positions)
    return kept


def _output_kept(node: torch.fx.Node, kept: dict, index: int = 0) -> torch.Tensor | None:
    """Kept positions of output ``index`` of ``node``; None when it keeps all or is untracked."""
    spaces = node_spaces(node)
    space = spaces[index] if index < len(spaces) else None
    return None if space is None else kept.get(space.id)


def _input_kept(node: torch.fx.Node, kept: dict, arg_index: int = 0) -> torch.Tensor | None:
    src = node.args[arg_index]
    return _output_kept(src, kept) if isinstance(src, torch.fx.Node) else None


# --- parameters and modules -------------------------------------------------------------------
def _select(tensor: torch.Tensor, dim: int, index: torch.Tensor | None) -> torch.Tensor:
    return tensor if index is None else tensor.detach().index_select(dim, index).clone()


def _replace_tensor(owner: nn.Module, name: str, new: torch.Tensor) -> None:
    """Swap a parameter or buffer for a smaller one, keeping its kind and requires_grad."""
    old = getattr(owner, name)
    if isinstance(old, nn.Parameter):
        setattr(owner, name, nn.Parameter(new, requires_grad=old.requires_grad))
    elif name in owner._buffers:
        owner._buffers[name] = new
    else:
        setattr(owner, name, new)


def _prune_attribute(gm: torch.fx.GraphModule, node: torch.fx.Node, index: torch.Tensor | None) -> None:
    owner_path, _, name = node.target.rpartition(".")
    owner = gm.get_submodule(owner_path)
    _replace_tensor(owner, name, _select(getattr(owner, name), node_spaces(node)[0].dim, index))


def _prune_conv(module: nn.Module, keep_in, keep_out) -> nn.Module:
    transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
    out_dim, in_dim = (1, 0) if transposed else (0, 1)
    if module.groups == 1:
        weight = _select(_select(module.weight, out_dim, keep_out), in_dim, keep_in)
    else:  # whole conv groups go, so the per-group input width is unchanged
        rows = keep_in if transposed else keep_out
        weight = _select(module.weight, 0, rows)
        kept_out = module.out_channels if keep_out is None else len(keep_out)
        module.groups = module.groups * kept_out // module.out_channels
    return _install(module, weight, keep_in, keep_out, "in_channels", "out_channels")


def _prune_linear(module: nn.Linear, keep_in, keep_out) -> nn.Module:
    weight = _select(_select(module.weight, 0, keep_out), 1, keep_in)
    return _install(module, weight, keep_in, keep_out, "in_features", "out_features")


def _install(module: nn.Module, weight: torch.Tensor, keep_in, keep_out, in_field: str, out_field: str):
    """Put a layer's new weight and bias in place and update its width fields."""
    _replace_tensor(module, "weight", weight)
    if module.bias is not None:
        _replace_tensor(module, "bias", _select(module.bias, 0, keep_out))
    if keep_in is not None:
        setattr(module, in_field, len(keep_in))
    if keep_out is not None:
        setattr(module, out_field, len(keep_out))
    return module


def _prune_per_channel(module: nn.Module, keep_in, keep_out) -> nn.Module:
    """Norms and PReLU: every per-channel tensor is indexed; the channel-count field follows."""
    index = keep_out if keep_out is not None else keep_in
    if index is None:
        return module
    for name in ("weight", "bias", "running_mean", "running_var"):
        if getattr(module, name, None) is not None:
            _replace_tensor(module, name, _select(getattr(module, name), 0, index))
    for field in ("num_features", "num_parameters"):
        if hasattr(module, field):
            setattr(module, field, len(index))
    if isinstance(module, nn.GroupNorm):
        module.num_groups = module.num_groups * len(index) // module.num_channels
        module.num_channels = len(index)
    if isinstance(module, nn.LayerNorm):
        module.normalized_shape = (len(index),)
    return module


def _prune_attention(module: nn.MultiheadAttention, keep_in, keep_out) -> nn.Module:
    embed = torch.arange(module.embed_dim)
    return PrunedMultiheadAttention.from_attention(
        module, embed if keep_in is None else keep_in, embed if keep_out is None else keep_out)


MODULE_RULES: dict[type, Callable] = {
    nn.modules.conv._ConvNd: _prune_conv,
    nn.Linear: _prune_linear,
    nn.modules.batchnorm._NormBase: _prune_per_channel,
    nn.GroupNorm: _prune_per_channel,
    nn.LayerNorm: _prune_per_channel,
    nn.PReLU: _prune_per_channel,
    nn.MultiheadAttention: _prune_attention,
}


def _rewrite_module(gm: torch.fx.GraphModule, node: torch.fx.Node, kept: dict) -> None:
    keep_in, keep_out = _input_kept(node, kept), _output_kept(node, kept)
    if keep_in is None and keep_out is None:
        return
    module = gm.get_submodule(node.target)
    rule = next(rule for cls, rule in MODULE_RULES.items() if isinstance(module, cls))
    new_module = rule(module, keep_in, keep_out)
    if new_module is not module:
        parent_path, _, name = node.target.rpartition(".")
        setattr(gm.get_submodule(parent_path), name, new_module)


# --- node rules -------------------------------------------------------------------------------
def _new_size(node: torch.fx.Node, kept: dict) -> int | None:
    positions = _output_kept(node, kept)
    return None if positions is None else len(positions)


def _shape_sizes(gm, node: torch.fx.Node, kept: dict) -> None:
    """view/reshape/expand sizes: the kept count on the channel axis; traced literals where asked.

    A literal channel count becomes the kept count. A width read at run time that sets an axis whose
    width never changes (dependency pass: ``literal_sizes``) becomes the traced number again.
    """
    if node.target not in ("view", "reshape", "expand", torch.reshape):
        return
    packed = len(node.args) == 2 and isinstance(node.args[1], (tuple, list))
    sizes = list(node.args[1] if packed else node.args[1:])
    for position, value in node.meta[META_KEY].rewrite_args.get("literal_sizes", {}).items():
        sizes[position] = value
    new = _new_size(node, kept)
    dim = node_spaces(node)[0].dim if node_spaces(node) and node_spaces(node)[0] is not None else None
    if new is not None and isinstance(sizes[dim], int) and sizes[dim] != -1:
        sizes[dim] = new
    node.args = (node.args[0], tuple(sizes)) if packed else (node.args[0], *sizes)


def _layer_norm(gm, node: torch.fx.Node, kept: dict) -> None:
    new = _new_size(node, kept)
    if new is not None:
        node.args = (node.args[0], (new,), *node.args[2:])
        node.kwargs = {k: v for k, v in node.kwargs.items() if k != "normalized_shape"}


def _split(gm, node: torch.fx.Node, kept: dict) -> None:
    """split/chunk along channels becomes split with the kept width of each piece."""
    sizes = [len(kept[s.id]) if s.id in kept else s.size for s in node_spaces(node)]
    if sizes == [s.size for s in node_spaces(node)]:
        return
    dim = node.meta[META_KEY].rewrite_args["dim"]
    node.op, node.target = "call_function", torch.split
    node.args, node.kwargs = (node.args[0], sizes), {"dim": dim}


def _gather(gm: torch.fx.GraphModule, node: torch.fx.Node, kept: dict) -> None:
    """A channel permutation built from shape ops becomes one index_select of the kept channels."""
    args = node.meta[META_KEY].rewrite_args
    origin = next(n for n in gm.graph.nodes if n.name == args["origin"])
    element_map = torch.as_tensor(args["element_map"])
    origin_kept = _output_kept(origin, kept)
    out_kept = _output_kept(node, kept)
    if out_kept is not None:
        element_map = element_map[out_kept]
    if origin_kept is not None:
        rank = torch.full((int(node_spaces(origin)[0].size),), -1, dtype=torch.long)
        rank[origin_kept] = torch.arange(len(origin_kept))
        element_map = rank[element_map]
    buffer_name = f"fxprune_gather_{node.name}"
    gm.register_buffer(buffer_name, element_map.clone())
    with gm.graph.inserting_before(node):
        index = gm.graph.get_attr(buffer_name)
        gathered = gm.graph.call_function(torch.index_select, (origin, node_spaces(node)[0].dim, index))
    node.replace_all_uses_with(gathered)
    gathered.meta = dict(node.meta)


def _window_attention(gm, node: torch.fx.Node, kept: dict) -> None:
    """Swin attention with a pruned stream: use the kernel that reads its widths from the weights."""
    if _input_kept(node, kept) is not None or _output_kept(node, kept) is not None:
        node.target = shifted_window_attention


NODE_RULES: dict[str, Callable] = {
    "window_attention": _window_attention,
    "shape_sizes": _shape_sizes,
    "layer_norm": _layer_norm,
    "split": _split,
    "gather": _gather,
}
