"""Convolutions of any rank, plain, grouped, depthwise and transposed: as modules, functions or ATen ops."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, cast

import numpy as np
import onnx
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from fxprune.ir import graph
from fxprune.ir.units import OnnxBuilder, UnitSpec
from fxprune.rules.base import Kept, Rule, TensorAxis, arg, input_space, kept_of, parameter_name, set_arg
from fxprune.rules.coupling import ChannelBuilder
from fxprune.rules.onnx import OnnxOps, ResizeError, Shapes, attribute
from fxprune.rules.shape import ensure_space

aten = torch.ops.aten

# Where each call form keeps its arguments: (stride, padding, dilation, groups, transposed, output_padding);
# an int is a position (also accepted by keyword), a bool a constant.
_FUNCTION_ARGS: dict[Any, tuple[int, int, int, int, bool | int, int | None]] = {
    **{f: (3, 4, 5, 6, False, None) for f in (F.conv1d, F.conv2d, F.conv3d, aten.conv1d, aten.conv2d, aten.conv3d)},
    **{f: (3, 4, 7, 6, True, 5) for f in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
                                          aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d)},
    aten.convolution: (3, 4, 5, 8, 6, 7),
}
_NAMES = ("stride", "padding", "dilation", "groups", "transposed", "output_padding")


@dataclass
class ConvView:
    """One convolution, whatever form the graph holds it in."""

    weight: str  # qualified parameter names
    bias: str | None
    shape: tuple[int, ...]  # the weight's
    groups: int
    transposed: bool
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    padding_mode: str = "zeros"
    groups_arg: tuple[int, str] | None = None  # where a call keeps ``groups``; None for a module
    output_padding: tuple[int, ...] = ()  # a transposed convolution's

    @property
    def out_channels(self) -> int:
        return self.shape[1] * self.groups if self.transposed else self.shape[0]

    @property
    def in_channels(self) -> int:
        return self.shape[0] if self.transposed else self.shape[1] * self.groups

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.shape[2:])


@dataclass(frozen=True)
class ConvUnit(UnitSpec):
    """A convolution of any rank as a timed unit: ONNX ``Conv``, ``nn.Conv1d/2d/3d``."""

    op: ClassVar[str] = "conv"
    weightless_kernels: ClassVar[tuple[str, ...]] = ("QLinearConv",)

    @property
    def channel_dim(self) -> int:
        return 1

    @property
    def output_shape(self) -> tuple[int, ...]:
        spatial = len(self.kernel)
        sizes = [(size + self.padding[d] + self.padding[spatial + d] - self.dilation[d] * (self.kernel[d] - 1) - 1)
                 // self.stride[d] + 1 for d, size in enumerate(self.input_shape[2:])]
        return (self.input_shape[0], self.out_channels, *sizes)

    @property
    def weight_shapes(self) -> tuple[tuple[int, ...], ...]:
        return ((self.out_channels, self.in_channels // self.groups, *self.kernel),)

    @property
    def folds_batch_norm(self) -> bool:
        return True

    def layer_name(self) -> str:
        kernel = "x".join(map(str, self.kernel))
        return (f"conv{kernel} {self.in_channels}->{self.out_channels} /{self.stride[0]} "
                f"at {'x'.join(map(str, self.input_shape[2:]))}" + (f" g{self.groups}" if self.groups > 1 else ""))

    def producer(self, b: OnnxBuilder, x: str, width_in: int, prefix: str) -> str:
        """A 1x1 convolution making ``width_in`` channels from ``x`` (the unit's input, just written)."""
        ones = (1,) * len(self.kernel)
        return b.node("Conv", [x, b.weight(f"p_{prefix}w", (width_in, self.in_channels) + ones)], f"p_{prefix}out",
                      kernel_shape=list(ones))

    def onnx_branch(self, b: OnnxBuilder, x: str, width_in: int, width_out: int, prefix: str) -> str:
        groups = self.groups_at(width_out)
        inputs = [self.producer(b, x, width_in, prefix),
                  b.weight(prefix + "w", (width_out, width_in // groups) + tuple(self.kernel))]
        if self.bias:
            inputs.append(b.weight(prefix + "b", (width_out,)))
        return b.node("Conv", inputs, prefix + "conv", kernel_shape=list(self.kernel), strides=list(self.stride),
                      pads=list(self.padding), dilations=list(self.dilation), group=groups)

    def torch_layer(self, width_in: int, width_out: int) -> nn.Module:
        conv: Any = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[len(self.kernel) - 1]  # sizes as tuples of its rank
        padding = tuple(self.padding[:len(self.kernel)])
        return conv(width_in, width_out, self.kernel, self.stride, padding, self.dilation, self.groups_at(width_out),
                    bias=self.layer_bias)


@dataclass(frozen=True)
class ConvTransposeUnit(ConvUnit):
    """A transposed convolution as a timed unit: ONNX ``ConvTranspose``, ``nn.ConvTranspose1d/2d/3d``. The
    producer and the folded BatchNorm are a convolution's; its weight is (in, out / groups, kernel...)."""

    op: ClassVar[str] = "conv_transpose"
    weightless_kernels: ClassVar[tuple[str, ...]] = ("ConvTranspose",)  # onnxruntime's CPU kernel prepacks it
    output_padding: tuple[int, ...] = ()

    @property
    def output_shape(self) -> tuple[int, ...]:
        spatial = len(self.kernel)
        sizes = [(size - 1) * self.stride[d] - self.padding[d] - self.padding[spatial + d]
                 + self.dilation[d] * (self.kernel[d] - 1) + self.output_padding[d] + 1
                 for d, size in enumerate(self.input_shape[2:])]
        return (self.input_shape[0], self.out_channels, *sizes)

    @property
    def weight_shapes(self) -> tuple[tuple[int, ...], ...]:
        return ((self.in_channels, self.out_channels // self.groups, *self.kernel),)

    def layer_name(self) -> str:
        kernel = "x".join(map(str, self.kernel))
        return (f"conv_transpose{kernel} {self.in_channels}->{self.out_channels} x{self.stride[0]} "
                f"at {'x'.join(map(str, self.input_shape[2:]))}" + (f" g{self.groups}" if self.groups > 1 else ""))

    def onnx_branch(self, b: OnnxBuilder, x: str, width_in: int, width_out: int, prefix: str) -> str:
        groups = self.groups_at(width_out)
        inputs = [self.producer(b, x, width_in, prefix),
                  b.weight(prefix + "w", (width_in, width_out // groups) + tuple(self.kernel))]
        if self.bias:
            inputs.append(b.weight(prefix + "b", (width_out,)))
        return b.node("ConvTranspose", inputs, prefix + "conv_transpose", kernel_shape=list(self.kernel),
                      strides=list(self.stride), pads=list(self.padding), dilations=list(self.dilation),
                      output_padding=list(self.output_padding), group=groups)

    def torch_layer(self, width_in: int, width_out: int) -> nn.Module:
        conv: Any = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[len(self.kernel) - 1]
        return conv(width_in, width_out, self.kernel, self.stride, tuple(self.padding[:len(self.kernel)]),
                    self.output_padding, self.groups_at(width_out), bias=self.layer_bias, dilation=self.dilation)


class ConvOnnx(OnnxOps):
    """``Conv`` and ``ConvTranspose`` in an exported graph: a bias follows the output channels, and
    ``group`` the input's width where whole conv groups went."""

    def implied_shape(self, node: onnx.NodeProto, index: int, old: Shapes, new: Shapes) -> tuple[int, ...] | None:
        if index != 2:
            return None
        weight = new[node.input[1]]  # (out, in / group, k...); a transposed one's (in, out / group, k...)
        return (weight[0],) if node.op_type == "Conv" else (weight[1] * attribute(node, "group", 1),)

    def update(self, node: onnx.NodeProto, old: Shapes, new: Shapes) -> None:
        group = attribute(node, "group", 1)
        data, weight = node.input[0], node.input[1]
        if node.op_type == "ConvTranspose":
            if group != 1 and new[data] != old[data]:
                raise ResizeError(f"grouped ConvTranspose node {node.name!r} takes a pruned input")
            return
        in_channels, per_group, out_channels = new[data][1], new[weight][1], new[weight][0]
        if group == 1:
            if in_channels != per_group:
                raise ResizeError(f"Conv node {node.name!r}: input has {in_channels} channels, weight {per_group}")
            return
        if per_group == 0 or in_channels % per_group or out_channels % (in_channels // per_group):
            raise ResizeError(f"Conv node {node.name!r}: {in_channels} input channels do not divide into groups "
                              f"of {per_group} for {out_channels} outputs")
        for a in node.attribute:
            if a.name == "group":
                a.i = in_channels // per_group


def _pads(padding: tuple[int, ...] | str, dilation: tuple[int, ...], kernel: tuple[int, ...]) -> tuple[int, ...]:
    """Padding per spatial dim, begin and end (ONNX's ``pads``), from torch's symmetric one or its name."""
    if not isinstance(padding, str):
        return tuple(padding) * 2
    if padding == "valid":
        return (0,) * (2 * len(kernel))
    total = [d * (k - 1) for d, k in zip(dilation, kernel)]  # "same"
    return tuple(t // 2 for t in total) + tuple(t - t // 2 for t in total)


def _tuple(value, rank: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * rank


class Conv(Rule):
    """In and out channels are independent, except across conv groups: with groups > 1 (grouped,
    depthwise, depthwise with a channel multiplier) conv group k's input and output channels form one
    pruning unit, so the layer stays a valid grouped convolution with fewer groups."""

    name = "conv"
    bilinear_flops = True
    layer = True
    onnx = ConvOnnx("Conv", "ConvTranspose")
    modules = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    functions = tuple(_FUNCTION_ARGS)

    def view(self, gm: torch.nn.Module, node: torch.fx.Node) -> ConvView | None:
        """The convolution's weights and settings; None where its weight is not a parameter."""
        if node.op == "call_module":
            m = gm.get_submodule(graph.target_name(node))
            assert isinstance(m, nn.modules.conv._ConvNd)  # a module of this rule's classes
            transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
            return ConvView(f"{node.target}.weight", f"{node.target}.bias" if m.bias is not None else None,
                            tuple(m.weight.shape), m.groups, transposed, tuple(m.stride),
                            m.padding if isinstance(m.padding, str) else tuple(m.padding), tuple(m.dilation),
                            m.padding_mode, output_padding=tuple(m.output_padding) if transposed else ())
        target = node.target.overloadpacket if isinstance(node.target, torch._ops.OpOverload) else node.target
        weight, bias = parameter_name(arg(node, 1, "weight")), arg(node, 2, "bias")
        if weight is None or (bias is not None and parameter_name(bias) is None):
            return None
        shape = tuple(graph.attribute(gm, weight).shape)
        rank = len(shape) - 2
        positions = _FUNCTION_ARGS[target]
        defaults = (1, 0, 1, 1, False, 0)
        value = {name: (pos if isinstance(pos, bool) else arg(node, pos, name, default) if pos is not None else default)
                 for name, pos, default in zip(_NAMES, positions, defaults)}
        found: list[torch.fx.Node] = []
        torch.fx.node.map_arg(list(value.values()), found.append)
        if found:  # a setting computed in the graph (groups from a width read at run time): not a known conv
            return None
        padding = value["padding"] if isinstance(value["padding"], str) else _tuple(value["padding"], rank)
        return ConvView(weight, parameter_name(bias), shape, int(value["groups"]), bool(value["transposed"]),
                        _tuple(value["stride"], rank), padding, _tuple(value["dilation"], rank),
                        groups_arg=(positions[3], "groups"),
                        output_padding=_tuple(value["output_padding"], rank) if value["transposed"] else ())

    def couple(self, b: ChannelBuilder, node: torch.fx.Node) -> None:
        view = self.view(b.gm, node)
        if view is None:
            Rule.couple(self, b, node)
            return
        src = cast(torch.fx.Node, node.args[0])
        channel_dim = len(b.tensor_shape(src)) - (len(view.kernel) + 1)
        in_space = ensure_space(b, src, channel_dim)
        out = b.new_space(node, channel_dim)
        if view.groups > 1:
            in_per_group = view.in_channels // view.groups
            out_per_group = view.out_channels // view.groups
            b.couple_blocks(in_space, in_per_group)
            b.couple_blocks(out, out_per_group)
            b.couple(in_space, out, np.arange(0, view.in_channels, in_per_group),
                     np.arange(0, view.out_channels, out_per_group))
        self.claim_tensors(b, node)

    def tensor_axes(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> list[TensorAxis]:
        view = self.view(gm, node)
        out, inp = graph.space(node), input_space(node)
        if view is None or out is None:
            return []
        out_dim, in_dim = (1, 0) if view.transposed else (0, 1)
        if view.groups == 1:
            axes = [(view.weight, out_dim, out, True), (view.weight, in_dim, inp, False)]
        else:  # whole conv groups go: the weight's rows are indexed by the side whose width is the groups'
            axes = [(view.weight, 0, inp if view.transposed else out, True)]
        if view.bias is not None:
            axes.append((view.bias, 0, out, True))
        return [TensorAxis(name, dim, space, produces) for name, dim, space, produces in axes if space is not None]

    def update(self, gm: torch.fx.GraphModule, node: torch.fx.Node, kept: Kept) -> None:
        view = self.view(gm, node)  # its weight is indexed already: read the old widths off the spaces
        assert view is not None  # a convolution the dependency pass coupled
        if view.groups_arg is None:
            Rule.update(self, gm, node, kept)
            return
        groups = self._groups(view.groups, node, kept)
        if groups != view.groups:
            set_arg(node, *view.groups_arg, groups)

    def shrink_module(self, module: nn.Module, node: torch.fx.Node, kept: Kept) -> nn.Module | None:
        assert isinstance(module, nn.modules.conv._ConvNd)  # a module of this rule's classes (owns)
        keep_in = kept_of(input_space(node), kept)
        module.groups = self._groups(module.groups, node, kept)
        if keep_in is not None:
            module.in_channels = len(keep_in)
        if (keep_out := kept_of(graph.space(node), kept)) is not None:
            module.out_channels = len(keep_out)
        return None

    @staticmethod
    def _groups(groups: int, node: torch.fx.Node, kept: Kept) -> int:
        """A grouped convolution's group count once whole conv groups went with the output channels."""
        out_space = graph.space(node)
        keep_out = kept_of(out_space, kept)
        if groups > 1 and keep_out is not None and out_space is not None:
            return groups * len(keep_out) // out_space.size
        return groups

    def unit(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> UnitSpec | None:
        """A ``ConvUnit``, or a ``ConvTransposeUnit``; None where the spec would not make the layer's output
        (a transposed module called with ``output_size``)."""
        view = self.view(gm, node)
        input_shape = graph.shape(node.args[0])
        if view is None or view.padding_mode != "zeros" or input_shape is None \
                or len(input_shape) != len(view.kernel) + 2:
            return None
        padding = _pads(view.padding, view.dilation, view.kernel)
        dtype = str(node.meta["tensor_meta"].dtype).removeprefix("torch.")
        fields = (input_shape, view.out_channels, view.kernel, view.stride, padding, view.dilation, view.groups,
                  view.bias is not None)
        spec = (ConvTransposeUnit(*fields, dtype=dtype, output_padding=view.output_padding) if view.transposed
                else ConvUnit(*fields, dtype=dtype))
        return spec if spec.output_shape == graph.shape(node) else None

    def importance_rows(self, gm: torch.fx.GraphModule,
                        node: torch.fx.Node) -> tuple[str, Callable[[torch.Tensor], torch.Tensor]] | None:
        view = self.view(gm, node)
        if view is None:
            return None
        if not view.transposed:
            return view.weight, lambda w: w.reshape(w.shape[0], -1)
        groups, out = view.groups, view.out_channels

        def rows(w: torch.Tensor) -> torch.Tensor:  # [in, out/groups, k...] -> [out, -1]
            w = w.reshape(groups, w.shape[0] // groups, w.shape[1], -1).transpose(1, 2)
            return w.reshape(out, -1)
        return view.weight, rows
