"""Deployed units: each prunable layer with the ops an engine runs fused to it.

A latency table is measured per *unit*: a convolution or linear layer, the BatchNorm folded into it
and the activation after it, at the input shape the model gives it. Two units with the same
``UnitSpec`` are the same measurement, wherever they sit in whichever model. Everything else the
model runs (pooling, residual adds, squeeze-and-excitation products, layout changes) is the
remainder, which the latency pass measures on the whole model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from fxprune.ir import META_KEY, ChannelSpace, NodeChannels


@dataclass(frozen=True)
class Activation:
    """An activation as every engine can build it: a name and its numeric parameters."""

    name: str  # relu, clip, silu, hardswish, hardsigmoid, sigmoid, tanh, gelu, gelu_tanh, leaky_relu, elu, mish
    args: tuple[float, ...] = ()


@dataclass(frozen=True)
class UnitSpec:
    """What a unit's latency depends on, apart from its kept widths: the key of its latency table."""

    op: str  # "conv" or "linear"
    input_shape: tuple[int, ...]  # full width, batch included
    out_channels: int
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()  # per spatial dim, begin and end: (b0, b1, ..., e0, e1, ...)
    dilation: tuple[int, ...] = ()
    groups: int = 1
    bias: bool = True  # after BatchNorm folding
    batch_norm: bool = False  # folded by engines that fold it (onnxruntime), run by those that don't (torch)
    activation: Activation | None = None
    dtype: str = "float32"

    @property
    def in_channels(self) -> int:
        return self.input_shape[1] if self.op == "conv" else self.input_shape[-1]

    @property
    def tied(self) -> bool:
        """Grouped and depthwise convolutions lose whole groups: the input width follows the output."""
        return self.groups > 1

    def to_key(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))  # plain JSON types: tuples become lists

    @classmethod
    def from_key(cls, key: dict[str, Any]) -> "UnitSpec":
        fields = {name: tuple(value) if isinstance(value, list) else value for name, value in key.items()}
        if fields.get("activation") is not None:
            fields["activation"] = Activation(fields["activation"]["name"], tuple(fields["activation"]["args"]))
        return cls(**fields)

    def describe(self) -> str:
        if self.op == "linear":
            core = f"linear {self.in_channels}->{self.out_channels} on {list(self.input_shape)}"
        else:
            kernel = "x".join(map(str, self.kernel))
            core = (f"conv{kernel} {self.in_channels}->{self.out_channels} /{self.stride[0]} "
                    f"at {'x'.join(map(str, self.input_shape[2:]))}" + (f" g{self.groups}" if self.groups > 1 else ""))
        tail = "".join(f"+{name}" for name, on in (("bn", self.batch_norm),
                                                     (self.activation.name if self.activation else "", True)) if on and name)
        return core + tail


@dataclass
class Unit:
    """One unit found in an analysed graph: its layer node, the nodes fused after it, its spaces."""

    layer: torch.fx.Node
    fused: list[torch.fx.Node]
    spec: UnitSpec
    in_space: ChannelSpace | None
    out_space: ChannelSpace
    nodes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.nodes = [self.layer.name] + [n.name for n in self.fused]


# --- activations --------------------------------------------------------------------------------
_ACTIVATION_MODULES: dict[type, Any] = {
    nn.ReLU: lambda m: Activation("relu"),
    nn.ReLU6: lambda m: Activation("clip", (0.0, 6.0)),
    nn.Hardtanh: lambda m: Activation("clip", (float(m.min_val), float(m.max_val))),
    nn.SiLU: lambda m: Activation("silu"),
    nn.Hardswish: lambda m: Activation("hardswish"),
    nn.Hardsigmoid: lambda m: Activation("hardsigmoid"),
    nn.Sigmoid: lambda m: Activation("sigmoid"),
    nn.Tanh: lambda m: Activation("tanh"),
    nn.GELU: lambda m: Activation("gelu_tanh" if m.approximate == "tanh" else "gelu"),
    nn.LeakyReLU: lambda m: Activation("leaky_relu", (float(m.negative_slope),)),
    nn.ELU: lambda m: Activation("elu", (float(m.alpha),)),
    nn.Mish: lambda m: Activation("mish"),
}


def _kwarg(node: torch.fx.Node, index: int, name: str, default):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


_ACTIVATION_FUNCTIONS: dict[Any, Any] = {
    **{f: lambda n: Activation("relu") for f in (F.relu, torch.relu, F.relu_, torch.relu_)},
    F.relu6: lambda n: Activation("clip", (0.0, 6.0)),
    F.hardtanh: lambda n: Activation("clip", (float(_kwarg(n, 1, "min_val", -1.0)), float(_kwarg(n, 2, "max_val", 1.0)))),
    F.silu: lambda n: Activation("silu"),
    F.hardswish: lambda n: Activation("hardswish"),
    F.hardsigmoid: lambda n: Activation("hardsigmoid"),
    **{f: lambda n: Activation("sigmoid") for f in (torch.sigmoid, F.sigmoid)},
    **{f: lambda n: Activation("tanh") for f in (torch.tanh, F.tanh)},
    F.gelu: lambda n: Activation("gelu_tanh" if n.kwargs.get("approximate") == "tanh" else "gelu"),
    F.leaky_relu: lambda n: Activation("leaky_relu", (float(_kwarg(n, 1, "negative_slope", 0.01)),)),
    F.elu: lambda n: Activation("elu", (float(_kwarg(n, 1, "alpha", 1.0)),)),
    F.mish: lambda n: Activation("mish"),
}
_ACTIVATION_METHODS = {"relu": Activation("relu"), "relu_": Activation("relu"), "sigmoid": Activation("sigmoid"),
                       "tanh": Activation("tanh")}


def activation_of(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Activation | None:
    """The activation a node computes on its first argument, or None if it is not one we know."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        make = next((f for cls, f in _ACTIVATION_MODULES.items() if type(module) is cls), None)
        return make(module) if make else None
    if node.op == "call_function" and node.target in _ACTIVATION_FUNCTIONS:
        return _ACTIVATION_FUNCTIONS[node.target](node)
    if node.op == "call_method":
        return _ACTIVATION_METHODS.get(node.target)
    return None


# --- finding units ------------------------------------------------------------------------------
def _shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    return tuple(int(d) for d in meta.shape) if hasattr(meta, "shape") else None


def _dtype(node: torch.fx.Node) -> str:
    return str(node.meta["tensor_meta"].dtype).removeprefix("torch.")


def _only_user(node: torch.fx.Node) -> torch.fx.Node | None:
    users = list(node.users)
    if len(users) == 1 and users[0].args and users[0].args[0] is node:
        return users[0]
    return None


def _conv_padding(module: nn.modules.conv._ConvNd) -> tuple[int, ...] | None:
    """Begin and end padding per spatial dim, as ONNX writes it; None for non-zero padding modes."""
    if module.padding_mode != "zeros":
        return None
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return (0,) * (2 * len(module.kernel_size))
        total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]  # "same"
        return tuple(t // 2 for t in total) + tuple(t - t // 2 for t in total)
    return tuple(module.padding) * 2


def _layer_spec(module: nn.Module, input_shape: tuple[int, ...], dtype: str) -> UnitSpec | None:
    if isinstance(module, nn.modules.conv._ConvNd) and not isinstance(module, nn.modules.conv._ConvTransposeNd):
        padding = _conv_padding(module)
        if padding is None or len(input_shape) != len(module.kernel_size) + 2:
            return None
        return UnitSpec("conv", input_shape, module.out_channels, tuple(module.kernel_size), tuple(module.stride),
                        padding, tuple(module.dilation), module.groups, module.bias is not None, dtype=dtype)
    if isinstance(module, nn.Linear):
        return UnitSpec("linear", input_shape, module.out_features, bias=module.bias is not None, dtype=dtype)
    return None


def find_units(gm: torch.fx.GraphModule) -> list[Unit]:
    """Every convolution and linear layer whose input or output width can change, as deployed."""
    analysis = gm.meta[META_KEY]
    units = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        out_space = node.meta.get(META_KEY, NodeChannels()).space
        src = node.args[0] if node.args else None
        input_shape = _shape(src)
        if out_space is None or input_shape is None:
            continue
        spec = _layer_spec(gm.get_submodule(node.target), input_shape, _dtype(node))
        in_space = src.meta.get(META_KEY, NodeChannels()).space
        if spec is None or in_space is None or in_space.dim != (1 if spec.op == "conv" else len(input_shape) - 1):
            in_space = None  # not a channel axis of this layer: its input width never changes
        varies = [s for s in (in_space, out_space) if s is not None and analysis.groups[s.group_id].prunable]
        if spec is None or not varies:
            continue
        fused, tail = [], node
        nxt = _only_user(tail)
        foldable = spec.op == "conv" or len(spec.input_shape) == 2  # BatchNorm1d after Linear: over features
        if nxt is not None and nxt.op == "call_module" and foldable \
                and isinstance(gm.get_submodule(nxt.target), nn.modules.batchnorm._BatchNorm):
            spec = _replace(spec, batch_norm=True, bias=True)
            fused.append(nxt)
            tail = nxt
        nxt = _only_user(tail)
        activation = activation_of(gm, nxt) if nxt is not None else None
        if activation is not None:
            spec = _replace(spec, activation=activation)
            fused.append(nxt)
        units.append(Unit(node, fused, spec, in_space, out_space))
    return units


def _replace(spec: UnitSpec, **changes) -> UnitSpec:
    return UnitSpec(**{**spec.__dict__, **changes})


# A unit every measuring session also runs: table entries are taken relative to it (see the engines).
REFERENCE = UnitSpec("conv", (1, 64, 28, 28), 64, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, True, True,
                     Activation("relu"))
