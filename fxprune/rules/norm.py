"""Normalizations: per-channel (batch, instance, PReLU), group norm (whole groups), layer norm."""

from __future__ import annotations

from typing import Any, cast

import onnx
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from fxprune.ir import graph
from fxprune.rules.base import Kept, Rule, TensorAxis, arg, kept_of, parameter_name, set_arg
from fxprune.rules.coupling import ChannelBuilder
from fxprune.rules.elementwise import pass_through
from fxprune.rules.onnx import OnnxOps, Shapes
from fxprune.rules.shape import ensure_space

_AFFINE = ("weight", "bias")
_STATISTICS = ("running_mean", "running_var")


def _module_axes(gm: torch.fx.GraphModule, node: torch.fx.Node) -> list[TensorAxis]:
    """A norm module's per-channel tensors, all along dim 0 of its output's channels."""
    out = graph.space(node)
    if out is None:
        return []
    module = gm.get_submodule(graph.target_name(node))
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


# Where a call keeps its per-channel tensors: (weight, bias, running_mean, running_var) positions.
_CALL_TENSORS: dict[Any, tuple[int, int, int, int]] = {
    torch.ops.aten.batch_norm: (1, 2, 3, 4), F.batch_norm: (3, 4, 1, 2),
    torch.ops.aten.instance_norm: (1, 2, 3, 4), F.instance_norm: (3, 4, 1, 2),
}


def _module_affine(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[str | None, str | None] | None:
    """A norm module's (weight, bias) names; None for PReLU and a norm without affine tensors."""
    module = gm.get_submodule(graph.target_name(node))
    if isinstance(module, nn.PReLU) or getattr(module, "weight", None) is None:
        return None
    return f"{node.target}.weight", f"{node.target}.bias" if module.bias is not None else None


def _call_tensors(node: torch.fx.Node) -> list[torch.fx.Node] | None:
    """The get_attr nodes a norm call reads per channel; None where one is computed in the graph."""
    target = node.target.overloadpacket if isinstance(node.target, torch._ops.OpOverload) else node.target
    found = [arg(node, pos, name) for pos, name in zip(_CALL_TENSORS[target], _AFFINE + _STATISTICS)]
    found = [t for t in found if t is not None]
    return found if all(isinstance(t, torch.fx.Node) and t.op == "get_attr" for t in found) else None


class ChannelNormOnnx(OnnxOps):
    """``BatchNormalization`` and ``InstanceNormalization``: scale, shift and statistics follow the channels."""

    def implied_shape(self, node: onnx.NodeProto, index: int, old: Shapes, new: Shapes) -> tuple[int, ...] | None:
        return (new[node.input[0]][1],) if index > 0 else None


class LayerNormOnnx(OnnxOps):
    """``LayerNormalization``: scale and shift follow the normalized trailing dims."""

    def implied_shape(self, node: onnx.NodeProto, index: int, old: Shapes, new: Shapes) -> tuple[int, ...] | None:
        if index == 0:
            return None
        data = new[node.input[0]]
        return data[len(data) - len(old[node.input[index]]):]


class ChannelNorm(Rule):
    """BatchNorm, InstanceNorm, per-channel PReLU: one affine term (and statistic) per channel on dim 1.

    As a module, or as a call (``aten.batch_norm`` in torch.export's graphs) whose tensors are get_attr
    nodes: those get the output's channel space, so the rewrite indexes them."""

    name = "channel_norm"
    onnx: OnnxOps = ChannelNormOnnx("BatchNormalization", "InstanceNormalization")
    modules: tuple[type, ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                                 nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.PReLU)
    functions: tuple[Any, ...] = tuple(_CALL_TENSORS)

    def couple(self, b: ChannelBuilder, node: torch.fx.Node) -> None:
        if node.op != "call_module":
            tensors = _call_tensors(node)
            if tensors is None:
                Rule.couple(self, b, node)
                return
            out = b.new_space(node, 1)
            b.couple(ensure_space(b, cast(torch.fx.Node, node.args[0]), 1), out)
            for tensor in tensors:
                b.couple(out, ensure_space(b, tensor, 0))
            return
        module = b.module(node)
        if _shared_slope(module):
            pass_through(b, node)
            return
        in_space = ensure_space(b, cast(torch.fx.Node, node.args[0]), 1)
        b.couple(in_space, b.new_space(node, 1))
        _claim(self, b, node)

    def tensor_axes(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> list[TensorAxis]:
        if node.op != "call_module":
            return []  # its get_attr tensors carry the space themselves
        return [] if _shared_slope(gm.get_submodule(graph.target_name(node))) else _module_axes(gm, node)

    def shrink_module(self, module: nn.Module, node: torch.fx.Node, kept: Kept) -> nn.Module | None:
        width = kept_of(graph.space(node), kept)
        if width is None or _shared_slope(module):
            return None
        for field in ("num_features", "num_parameters"):
            if hasattr(module, field):
                setattr(module, field, len(width))
        return None

    def affine(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[str | None, str | None] | None:
        if node.op != "call_module":
            target = node.target.overloadpacket if isinstance(node.target, torch._ops.OpOverload) else node.target
            weight, bias = (arg(node, pos, name) for pos, name in zip(_CALL_TENSORS[target][:2], _AFFINE))
            return (parameter_name(weight), parameter_name(bias)) if parameter_name(weight) else None
        return _module_affine(gm, node)


class GroupNorm(ChannelNorm):
    """GroupNorm: whole normalization groups are pruned (statistics of kept groups are unchanged). As a
    module or as a call, ``aten.group_norm(x, num_groups, weight, bias, eps)``."""

    name = "group_norm"
    onnx = OnnxOps("GroupNormalization")
    modules = (nn.GroupNorm,)
    functions = (F.group_norm, torch.ops.aten.group_norm)

    def couple(self, b: ChannelBuilder, node: torch.fx.Node) -> None:
        tensors = [arg(node, 2, "weight"), arg(node, 3, "bias")] if node.op != "call_module" else []
        tensors = [t for t in tensors if t is not None]
        if not all(isinstance(t, torch.fx.Node) and t.op == "get_attr" for t in tensors):
            Rule.couple(self, b, node)
            return
        groups = b.module(node).num_groups if node.op == "call_module" else arg(node, 1, "num_groups")
        in_space = ensure_space(b, cast(torch.fx.Node, node.args[0]), 1)
        out = b.new_space(node, 1)
        b.couple_blocks(in_space, in_space.size // groups)
        b.couple(in_space, out)
        for tensor in tensors:
            b.couple(out, ensure_space(b, tensor, 0))
        if node.op == "call_module":
            _claim(self, b, node)

    def affine(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[str | None, str | None] | None:
        if node.op != "call_module":
            weight = parameter_name(arg(node, 2, "weight"))
            return (weight, parameter_name(arg(node, 3, "bias"))) if weight else None
        return _module_affine(gm, node)

    def update(self, gm: torch.fx.GraphModule, node: torch.fx.Node, kept: Kept) -> None:
        space = graph.space(node)
        width = kept_of(space, kept)
        if node.op == "call_module":
            Rule.update(self, gm, node, kept)
        elif width is not None and space is not None:
            groups = arg(node, 1, "num_groups")
            set_arg(node, 1, "num_groups", groups * len(width) // space.size)

    def shrink_module(self, module: nn.Module, node: torch.fx.Node, kept: Kept) -> nn.Module | None:
        assert isinstance(module, nn.GroupNorm)  # a module of this rule's classes (owns)
        space = graph.space(node)
        if (width := kept_of(space, kept)) is not None and space is not None:
            module.num_groups = module.num_groups * len(width) // space.size
            module.num_channels = len(width)
        return None


class LayerNorm(Rule):
    """LayerNorm over the last dim only: channel-wise affine; its statistics span the channels (the
    group is marked norm-coupled: pruning changes them)."""

    name = "layer_norm"
    onnx = LayerNormOnnx("LayerNormalization")
    memory_kernels = frozenset({"LayerNormalization", "SkipLayerNormalization",  # onnxruntime's, fused with an add
                                "aten::layer_norm", "aten::native_layer_norm"})
    modules = (nn.LayerNorm,)
    functions = (F.layer_norm, torch.ops.aten.layer_norm)

    def couple(self, b: ChannelBuilder, node: torch.fx.Node) -> None:
        src = cast(torch.fx.Node, node.args[0])
        normalized: Any
        if node.op == "call_module":
            normalized = b.module(node).normalized_shape
        else:
            normalized = b.value(arg(node, 1, "normalized_shape"))
        if len(tuple(normalized)) != 1:
            b.freeze(b.space_of(src), f"{node.name} normalizes over several dims")
            return
        in_space = ensure_space(b, src, -1)
        out = b.new_space(node, len(b.tensor_shape(node)) - 1)
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
        if node.op == "call_module":
            Rule.update(self, gm, node, kept)
        elif (width := kept_of(graph.space(node), kept)) is not None:
            set_arg(node, 1, "normalized_shape", (len(width),))

    def shrink_module(self, module: nn.Module, node: torch.fx.Node, kept: Kept) -> nn.Module | None:
        assert isinstance(module, nn.LayerNorm)  # a module of this rule's classes (owns)
        if (width := kept_of(graph.space(node), kept)) is not None:
            module.normalized_shape = (len(width),)
        return None

    def affine(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[str | None, str | None] | None:
        return _module_affine(gm, node) if node.op == "call_module" else None

