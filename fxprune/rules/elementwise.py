"""Ops whose channels pass through unchanged: activations, dropout, pooling, binary arithmetic,
reductions over other dims, softmax over other dims; and the graph's inputs and outputs."""

from __future__ import annotations

import collections
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from fxprune.ir import graph
from fxprune.rules.base import Kept, Rule, arg, input_space, kept_of, same_position, tensor_inputs
from fxprune.rules.coupling import ChannelBuilder
from fxprune.rules.onnx import OnnxOps, ResizeError, Shapes, follow
from fxprune.rules.shape import combine_pending, ensure_space, pass_pending

aten = torch.ops.aten


# Ops that leave every value where it was at inference (a pending channel layout passes through them)
_NOOPS = (nn.Identity, nn.Dropout, F.dropout, aten.dropout, aten.contiguous, aten.clone, aten.to, aten._to_copy,
          aten.alias, aten.detach, torch.clone, "contiguous", "clone", "to", "float", "detach")


def _noop(b: ChannelBuilder, node: torch.fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(b.module(node), _NOOPS[:2])
    target = node.target.overloadpacket if isinstance(node.target, torch._ops.OpOverload) else node.target
    return target in _NOOPS


def _pointwise(node: torch.fx.Node) -> bool:
    """An ATen op that computes each output position from the same position of its inputs (a pending
    layout passes through it: rotary's ``neg``)."""
    return isinstance(node.target, torch._ops.OpOverload) and torch.Tag.pointwise in node.target.tags


class PassthroughOnnx(OnnxOps):
    """Activations, pooling, casts follow their input; Resize's sizes (where given) follow its data; Pad's
    pads must not change (a pruned pad would be a width fxprune does not follow)."""

    def update(self, node: onnx.NodeProto, old: Shapes, new: Shapes) -> None:
        if node.op_type == "Pad" and any(new[i] != old[i] for i in node.input[1:] if i):
            raise ResizeError(f"Pad node {node.name!r} reads pruned pads")

    def constants(self, node: onnx.NodeProto, values: dict[int, np.ndarray], old: Shapes,
                  new: Shapes) -> dict[int, np.ndarray]:
        if node.op_type != "Resize" or len(node.input) <= 3 or not node.input[3]:
            return {}
        if 3 not in values:
            raise ResizeError(f"Resize node {node.name!r} reads computed sizes")
        sizes = tuple(int(s) for s in values[3])
        return {3: np.asarray(follow(sizes, old[node.input[0]], new[node.input[0]]), dtype=np.int64)}


class Passthrough(Rule):
    """Activations, dropout, pooling, interpolation, casts: channels pass unchanged (secondary tensor
    inputs, e.g. a clamp bound, keep theirs)."""

    name = "passthrough"
    parameter_arithmetic = True
    onnx = PassthroughOnnx(
        "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu", "Gelu", "Erf",
        "Softplus", "Mish", "Clip", "Exp", "Log", "Sqrt", "Reciprocal", "Neg", "Abs", "Sin", "Cos", "Cast",
        "Identity", "Dropout", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "Resize",
        "Pad", idempotent=("Relu", "Abs"))
    memory_kernels = frozenset({
        "GlobalAveragePool", "GlobalMaxPool", "AveragePool", "MaxPool", "Resize", "Upsample", "Pad", "Identity",
        "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearSigmoid", "QLinearLeakyRelu",  # INT8 forms
        "aten::max_pool2d_with_indices", "aten::max_pool2d", "aten::avg_pool2d", "aten::adaptive_avg_pool2d",
        "aten::_adaptive_avg_pool2d", "aten::upsample_bilinear2d", "aten::upsample_nearest2d", "aten::clone",
        "aten::contiguous", "aten::copy_"})
    modules = (
        nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid, nn.Tanh, nn.LeakyReLU,
        nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Identity,
        nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
        nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
        nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
        nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool2d,
        nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
        nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d,
    )
    functions = (
        F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh, F.leaky_relu,
        F.elu, F.mish, F.softplus, F.hardtanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
        F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
        F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
        F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.interpolate, F.pad,
        torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.abs, torch.neg, torch.sqrt, torch.clamp,
        operator.neg, torch.clone,
        aten.relu, aten.relu_, aten.gelu, aten.silu, aten.silu_, aten.hardswish, aten.hardswish_, aten.hardsigmoid,
        aten.sigmoid, aten.tanh, aten.hardtanh, aten.hardtanh_, aten.clamp, aten.dropout, aten.clone,
        aten.max_pool2d, aten.avg_pool2d, aten.adaptive_avg_pool2d, aten.upsample_nearest2d,
        aten.upsample_bilinear2d,
        # what torch.export's graphs add (every overload of each)
        aten.relu6, aten.leaky_relu, aten.leaky_relu_, aten.elu, aten.elu_, aten.mish, aten.mish_, aten.softplus,
        aten.gelu_, aten.sigmoid_, aten.tanh_, aten.hardsigmoid_, aten.clamp_, aten.clamp_min, aten.clamp_max,
        aten.dropout_, aten.feature_dropout, aten.alpha_dropout, aten.contiguous, aten.to, aten._to_copy,
        aten.type_as, aten.detach, aten.alias, aten.exp, aten.abs, aten.neg, aten.sqrt, aten.rsqrt, aten.log,
        aten.erf, aten.sin, aten.cos, aten.pow, aten.square, aten.reciprocal,
        aten.max_pool1d, aten.max_pool3d, aten.avg_pool1d, aten.avg_pool3d, aten.adaptive_avg_pool1d,
        aten.adaptive_avg_pool3d, aten.upsample_nearest1d, aten.upsample_nearest3d, aten.upsample_bicubic2d,
        aten.upsample_linear1d, aten.upsample_trilinear3d,
        # a tensor filled like another follows that tensor's widths
        aten.zeros_like, aten.ones_like, aten.full_like, aten.empty_like, torch.zeros_like, torch.ones_like,
        torch.full_like, torch.empty_like,
    )
    methods = ("relu", "relu_", "sigmoid", "sigmoid_", "tanh", "exp", "abs", "neg", "sqrt", "clamp", "clamp_",
               "clone", "detach", "float", "half", "bfloat16", "to", "type_as")
    wrapped = ("stochastic_depth",)  # functions fx keeps as calls (torch.fx.wrap), known by name

    unchanged_modules = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
    # calls that are no op once deployed in eval mode, and one that only relabels its tensor's type
    no_op = ("dropout", "detach", "stochastic_depth")

    def deployed(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
        if node.op == "call_module":
            return "none" if isinstance(gm.get_submodule(graph.target_name(node)), self.unchanged_modules) else "data"
        name = graph.call_name(node)
        if name.split(".")[0] in self.no_op:
            return "none"
        return "view" if name == "type_as" else "data"
    unchanged_calls = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.clone, aten.clone, aten.alias,
                       aten.contiguous, "clone", "contiguous")

    def identity(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
        if node.op == "call_module":
            return isinstance(gm.get_submodule(graph.target_name(node)), self.unchanged_modules)
        target = getattr(node.target, "overloadpacket", node.target)
        if target is aten.dropout:  # torch.export's: unchanged where captured in eval mode (train=False)
            return len(node.args) > 2 and node.args[2] is False or node.kwargs.get("train") is False
        return target in self.unchanged_calls

    def couple(self, b: ChannelBuilder, node: torch.fx.Node) -> None:
        pass_through(b, node)


def pass_through(b: ChannelBuilder, node: torch.fx.Node) -> None:
    """``Passthrough.couple``: channels pass unchanged from the first tensor input; the others keep theirs."""
    inputs = tensor_inputs(node)
    if inputs and (_noop(b, node) or _pointwise(node) and len(inputs) == 1) and pass_pending(b, node, inputs[0]):
        return
    if inputs:
        same_position(b, node, inputs[0])
        for other in inputs[1:]:
            b.freeze(b.space_of(other), f"used as a secondary input of {node.name}")


class BroadcastOnnx(OnnxOps):
    """Elementwise ONNX ops: an operand no parameter names, broadcast against one other, follows its shape."""

    def implied_shape(self, node: onnx.NodeProto, index: int, old: Shapes, new: Shapes) -> tuple[int, ...] | None:
        others = [name for j, name in enumerate(node.input) if j != index and name]
        return follow(old[node.input[index]], old[others[0]], new[others[0]]) if len(others) == 1 else None


class Elementwise(Rule):
    """add/sub/mul/div and friends with broadcasting: channels at the same output position are one."""

    name = "elementwise"
    parameter_arithmetic = True
    memory_kernels = frozenset({"Add", "Sum", "Sub", "Mul", "Div", "Where", "QLinearAdd", "QLinearMul",
                                "aten::add", "aten::add_", "aten::mul", "aten::mul_", "aten::sub", "aten::div"})
    onnx = BroadcastOnnx("Add", "Sub", "Mul", "Div", "PRelu", "Where", "Max", "Min", "Pow", "Equal", "Less", "Greater")
    functions = (operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
                 operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum,
                 torch.minimum, aten.add, aten.add_, aten.sub, aten.mul, aten.mul_, aten.div,
                 aten.sub_, aten.div_, aten.rsub, aten.maximum, aten.minimum, aten.where)
    methods = ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "__add__", "__mul__", "__sub__",
               "__truediv__", "__radd__", "__rmul__")

    adds = (operator.add, operator.iadd, torch.add, aten.add, aten.add_, "add", "add_", "__add__", "__radd__")

    def residual_add(self, node: torch.fx.Node) -> bool:
        target = node.target if node.op == "call_method" else getattr(node.target, "overloadpacket", node.target)
        return (target in self.adds and len(node.args) == 2 and not node.kwargs
                and all(isinstance(a, torch.fx.Node) for a in node.args))

    def couple(self, b: ChannelBuilder, node: torch.fx.Node) -> None:
        out_shape = b.shape(node)
        inputs = tensor_inputs(node)
        if out_shape is None or not inputs:
            return
        if any(src in b.pending for src in inputs):
            combine_pending(b, node, inputs)
            return
        out_dim = None
        for src in inputs:
            space = b.space_of(src)
            if space is not None:
                out_dim = space.dim + len(out_shape) - len(b.tensor_shape(src))
                break
        if out_dim is None:
            return
        out = b.new_space(node, out_dim)
        for src in inputs:
            shape = b.tensor_shape(src)
            dim = out_dim - (len(out_shape) - len(shape))
            space = b.space_of(src)
            if dim < 0 or shape[dim] == 1:
                if space is not None:  # a broadcast operand whose own channels sit elsewhere
                    b.freeze(space, f"broadcast against a wider tensor in {node.name}")
                    b.freeze(out, f"{node.name} broadcasts a tensor with tracked channels")
                continue
            if space is not None and space.dim != dim:
                b.freeze(space, f"{node.name} combines channel axes on different dims")
                b.freeze(out, f"{node.name} combines channel axes on different dims")
                continue
            b.couple(out, ensure_space(b, src, dim))


class Reduction(Rule):
    """mean/sum/amax over some dims: channels survive unless their dim is reduced."""

    name = "reduction"
    onnx = OnnxOps("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2")
    memory_kernels = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "aten::mean", "aten::sum"})
    functions = (torch.mean, torch.sum, torch.amax, torch.amin, aten.mean, aten.sum, aten.amax, aten.amin)
    methods = ("mean", "sum", "amax", "amin")

    def couple(self, b: ChannelBuilder, node: torch.fx.Node) -> None:
        src = node.args[0]
        space = b.space_of(src)
        if space is None or b.shape(node) is None:
            return
        rank = len(b.tensor_shape(src))
        dims = arg(node, 1, "dim", None)
        dims = range(rank) if dims is None else ([dims] if isinstance(dims, int) else dims)
        dims = sorted(d % rank for d in dims)
        keepdim = arg(node, 2, "keepdim", False)
        if space.dim in dims:
            statistic = _root_mean_square(b, node, dims == [space.dim] and keepdim)
            if isinstance(statistic, str):
                b.freeze(space, f"{node.name} reduces over the channel axis" + statistic)
            else:
                b.info(node).notes["root_mean_square"] = statistic
            return
        dim = space.dim if keepdim else space.dim - sum(d < space.dim for d in dims)
        b.couple(space, b.new_space(node, dim))


    def update(self, gm: torch.fx.GraphModule, node: torch.fx.Node, kept: Kept) -> None:
        """An RMS norm's mean of squares over fewer channels: times d'/d, so it is the sum over the kept
        channels divided by the original width, as in the original with the removed channels zero."""
        space = input_space(node)
        width = kept_of(space, kept)
        if "root_mean_square" not in graph.channels(node).notes or width is None or space is None:
            return
        with gm.graph.inserting_after(node):
            scaled = gm.graph.call_function(operator.mul, (node, len(width) / space.size))
        node.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)

    def owner(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> str | None:
        statistic = graph.channels(node).notes.get("root_mean_square")
        return statistic.module if statistic is not None else None

    def owns(self, module: nn.Module) -> bool:
        return isinstance(getattr(module, "weight", None), torch.Tensor) and \
            RootMeanSquare.eps_attribute(module) is not None

    def shrink_module(self, module: nn.Module, node: torch.fx.Node, kept: Kept) -> nn.Module | None:
        """The user's RMS norm computes the mean over the kept channels itself: its scale times
        sqrt(d/d') and its epsilon times d/d' give the same output, since rsqrt(s/d + eps) =
        sqrt(d/d') * rsqrt(s/d' + eps * d/d')."""
        space = input_space(node)
        width = kept_of(space, kept)
        if width is None or space is None:
            return None
        ratio = space.size / len(width)
        statistic = graph.channels(node).notes["root_mean_square"]
        eps = RootMeanSquare.eps_attribute(module, statistic.eps)
        if eps is None:  # no field holds the epsilon its graph adds: left whole, verify_model reports it
            return None
        weight = module.weight
        assert isinstance(weight, torch.Tensor)  # owns
        with torch.no_grad():
            weight.mul_(ratio ** 0.5)
        setattr(module, eps, getattr(module, eps) * ratio)
        return None


@dataclass(frozen=True)
class RootMeanSquare:
    """A mean of squares over the channel axis that an RMS norm divides by (``x * rsqrt(mean(x**2) + eps)``,
    scaled by ``module``'s ``weight``): pruned exactly, the mean rescaled to the original width."""

    module: str
    eps: float

    @staticmethod
    def eps_attribute(module: nn.Module, value: float | None = None) -> str | None:
        """Where an RMS norm module keeps its epsilon (Hugging Face's ``variance_epsilon``, torch's ``eps``);
        with ``value``, only an attribute holding that value (the literal its graph adds)."""
        return next((name for name in ("variance_epsilon", "eps") if isinstance(getattr(module, name, None), float)
                     and (value is None or getattr(module, name) == value)), None)


def _root_mean_square(b: ChannelBuilder, node: torch.fx.Node, over_channels_kept: bool) -> RootMeanSquare | str:
    """The RMS norm ``node`` (a mean over the channel axis) is the statistic of, or why it is none."""
    target = getattr(node.target, "overloadpacket", node.target)
    square = node.args[0]
    if not over_channels_kept or target not in (aten.mean, torch.mean, "mean") or not isinstance(square, torch.fx.Node):
        return ""
    square_target = getattr(square.target, "overloadpacket", square.target)
    if square_target in (aten.pow, torch.pow, "pow") and len(square.args) == 2 and square.args[1] == 2:
        x = square.args[0]
    elif square_target in (aten.mul, torch.mul, operator.mul, "mul") and square.args[0] is square.args[1]:
        x = square.args[0]
    else:
        return " (not a mean of squares)"
    plus_eps = next(iter(node.users)) if len(node.users) == 1 else None
    root = next(iter(plus_eps.users)) if plus_eps is not None and len(plus_eps.users) == 1 else None
    if plus_eps is None or root is None \
            or getattr(root.target, "overloadpacket", root.target) not in (aten.rsqrt, torch.rsqrt, "rsqrt") \
            or not isinstance(plus_eps.args[1], float):
        return " (its mean of squares is not followed by + eps and rsqrt)"
    scaled = list(root.users)
    if not all(set(user.args[:2]) == {x, root} for user in scaled):
        return " (its rsqrt does not scale the tensor it was computed from)"
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    module = stack[-1][0] if stack else None
    if not module:
        return " (an RMS norm outside a module)"
    if not _scaled_by(scaled, f"{module}.weight"):
        return f" (an RMS norm in {module} whose output is not its weight times x / rms(x))"
    return RootMeanSquare(module, plus_eps.args[1])


def _scaled_by(nodes: list[torch.fx.Node], weight: str) -> bool:
    """True when every one of ``nodes``, through casts, is multiplied by the get_attr ``weight`` alone."""
    for node in nodes:
        while len(node.users) == 1 and getattr(next(iter(node.users)).target, "overloadpacket", None) in \
                (aten.to, aten._to_copy, aten.type_as):
            node = next(iter(node.users))
        users = list(node.users)
        if not users or not all(getattr(u.target, "overloadpacket", u.target) in (aten.mul, operator.mul, torch.mul)
                                and any(isinstance(a, torch.fx.Node) and a.op == "get_attr" and a.target == weight
                                        for a in u.args) for u in users):
            return False
    return True


class Softmax(Rule):
    """softmax over another dim passes channels through; over the channel dim it mixes them (frozen)."""

    name = "softmax"
    onnx = OnnxOps("Softmax", "LogSoftmax")
    memory_kernels = frozenset({"Softmax", "QLinearSoftmax", "aten::softmax", "aten::_softmax"})
    modules = (nn.Softmax,)
    functions = (F.softmax, F.log_softmax, torch.softmax, aten._softmax, aten.softmax)
    methods = ("softmax", "log_softmax")

    def couple(self, b: ChannelBuilder, node: torch.fx.Node) -> None:
        src = node.args[0]
        space = b.space_of(src)
        dim: Any = b.module(node).dim if node.op == "call_module" else arg(node, 1, "dim", None)
        if space is not None and (dim is None or dim % len(b.tensor_shape(src)) == space.dim):
            b.freeze(space, f"{node.name} normalizes across channels")
            return
        pass_through(b, node)


class Output(Rule):
    """The model's outputs keep their channels: the caller reads them (also through the mapping type the
    capture rebuilds at the output, an OrderedDict)."""

    name = "output"
    functions = (collections.OrderedDict,)

    def couple(self, b: ChannelBuilder, node: torch.fx.Node) -> None:
        for src in tensor_inputs(node):
            b.freeze(b.space_of(src), "model output")


class NoChannels(Rule):
    """Inputs, parameters, and ops that only read metadata (size, dim) or check conditions."""

    name = "no_channels"
    onnx = OnnxOps("Shape", "Size")

    def deployed(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
        return "none"  # a metadata read or a check: nothing runs on a tensor's data
    functions = (getattr, torch._assert, len, int, float, aten.sym_size, aten._assert_tensor_metadata,
                 aten._assert_scalar, aten.sym_constrain_range_for_size)
    methods = ("size", "dim", "numel", "__len__")

    def couple(self, b: ChannelBuilder, node: torch.fx.Node) -> None:
        pass
