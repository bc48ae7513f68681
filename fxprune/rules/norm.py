"""Normalizations: per-channel (batch, instance, PReLU), group norm (whole groups), layer norm."""

from __future__ import annotations

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from fxprune.ir import graph
from fxprune.rules.base import Kept, Rule, TensorAxis, arg, kept_of, set_arg
from fxprune.rules.coupling import ChannelBuilder
from fxprune.rules.elementwise import Passthrough
from fxprune.rules.shape import ensure_space

_AFFINE = ("weight", "bias")
_STATISTICS = ("running_mean", "running_var")


def _module_axes(gm: torch.fx.GraphModule, node: torch.fx.Node) -> list[TensorAxis]:
    """A norm module's per-channel tensors, all along dim 0 of its output's channels."""
    out = graph.space(node)
    if out is None:
        return []
    module = gm.get_submodule(node.target)
    return [TensorAxis(f"{node.target}.{name}", 0, out, True, parameter=name in _AFFINE)
            for name in _AFFINE + _STATISTICS if getattr(module, name, None) is not None]


def _claim(rule: Rule, b: ChannelBuilder, node: torch.fx.Node) -> None:
    """Couple this call's channels with the module's other calls: through its tensors, and through the
    module itself (one without affine tensors still has one width, in ``num_features`` or ``normalized_shape``)."""
    b.claim(f"{node.target}:<channels>", 0, graph.space(node))
    rule.claim_tensors(b, node)


def _shared_slope(module: nn.Module) -> bool:
    """A PReLU with one slope for every channel: an activation, with nothing per channel."""
    return isinstance(module, nn.PReLU) and module.num_parameters == 1


class ChannelNorm(Rule):
    """BatchNorm, InstanceNorm, per-channel PReLU: one affine term (and statistic) per channel on dim 1."""

    name = "channel_norm"
    modules = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d,
               nn.InstanceNorm2d, nn.InstanceNorm3d, nn.PReLU)

    def couple(self, b: ChannelBuilder, node: torch.fx.Node) -> None:
        module = b.module(node)
        if _shared_slope(module):
            Passthrough.couple(self, b, node)
            return
        in_space = ensure_space(b, node.args[0], 1)
        b.couple(in_space, b.new_space(node, 1))
        _claim(self, b, node)

    def tensor_axes(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> list[TensorAxis]:
        return [] if _shared_slope(gm.get_submodule(node.target)) else _module_axes(gm, node)

    def update(self, gm: torch.fx.GraphModule, node: torch.fx.Node, kept: Kept) -> None:
        module = gm.get_submodule(node.target)
        width = kept_of(graph.space(node), kept)
        if width is None or _shared_slope(module):
            return
        for field in ("num_features", "num_parameters"):
            if hasattr(module, field):
                setattr(module, field, len(width))

    def affine(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[str | None, str | None] | None:
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.PReLU) or getattr(module, "weight", None) is None:
            return None
        return f"{node.target}.weight", f"{node.target}.bias" if module.bias is not None else None


class GroupNorm(ChannelNorm):
    """GroupNorm: whole normalization groups are pruned (statistics of kept groups are unchanged)."""

    name = "group_norm"
    modules = (nn.GroupNorm,)

    def couple(self, b: ChannelBuilder, node: torch.fx.Node) -> None:
        module = b.module(node)
        in_space = ensure_space(b, node.args[0], 1)
        out = b.new_space(node, 1)
        b.couple_blocks(in_space, module.num_channels // module.num_groups)
        b.couple(in_space, out)
        _claim(self, b, node)

    def update(self, gm: torch.fx.GraphModule, node: torch.fx.Node, kept: Kept) -> None:
        module = gm.get_submodule(node.target)
        width = kept_of(graph.space(node), kept)
        if width is not None:
            module.num_groups = module.num_groups * len(width) // module.num_channels
            module.num_channels = len(width)


class LayerNorm(Rule):
    """LayerNorm over the last dim only: channel-wise affine; its statistics span the channels (the
    group is marked norm-coupled: pruning changes them)."""

    name = "layer_norm"
    modules = (nn.LayerNorm,)
    functions = (F.layer_norm, torch.ops.aten.layer_norm)

    def couple(self, b: ChannelBuilder, node: torch.fx.Node) -> None:
        src = node.args[0]
        if node.op == "call_module":
            normalized = b.module(node).normalized_shape
        else:
            normalized = b.value(arg(node, 1, "normalized_shape"))
        if len(tuple(normalized)) != 1:
            b.freeze(b.space_of(src), f"{node.name} normalizes over several dims")
            return
        in_space = ensure_space(b, src, -1)
        out = b.new_space(node, len(b.shape(node)) - 1)
        b.couple(in_space, out)
        b.mark_norm(in_space, out)
        if node.op == "call_module":
            _claim(self, b, node)
            return
        for index, name in ((2, "weight"), (3, "bias")):  # parameters read through get_attr: their own space
            param = arg(node, index, name)
            if isinstance(param, torch.fx.Node):
                b.couple(out, ensure_space(b, param, 0))

    def tensor_axes(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> list[TensorAxis]:
        return _module_axes(gm, node) if node.op == "call_module" else []

    def update(self, gm: torch.fx.GraphModule, node: torch.fx.Node, kept: Kept) -> None:
        width = kept_of(graph.space(node), kept)
        if width is None:
            return
        if node.op == "call_module":
            gm.get_submodule(node.target).normalized_shape = (len(width),)
        else:
            set_arg(node, 1, "normalized_shape", (len(width),))

    def affine(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[str | None, str | None] | None:
        return ChannelNorm.affine(self, gm, node) if node.op == "call_module" else None

