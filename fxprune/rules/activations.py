"""Activations an engine fuses into the layer before them, as every engine can build them again: found in
a graph (``activation_of``), written as ONNX nodes (``onnx_activation``) and as a torch module
(``torch_activation``) for the unit an engine times."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from fxprune.ir import graph
from fxprune.ir.units import Activation, OnnxBuilder
from fxprune.rules.base import arg

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


_ACTIVATION_FUNCTIONS: dict[Any, Any] = {
    **{f: lambda n: Activation("relu") for f in (F.relu, torch.relu, F.relu_, torch.relu_)},
    F.relu6: lambda n: Activation("clip", (0.0, 6.0)),
    F.hardtanh: lambda n: Activation("clip", (float(arg(n, 1, "min_val", -1.0)), float(arg(n, 2, "max_val", 1.0)))),
    F.silu: lambda n: Activation("silu"),
    F.hardswish: lambda n: Activation("hardswish"),
    F.hardsigmoid: lambda n: Activation("hardsigmoid"),
    **{f: lambda n: Activation("sigmoid") for f in (torch.sigmoid, F.sigmoid)},
    **{f: lambda n: Activation("tanh") for f in (torch.tanh, F.tanh)},
    F.gelu: lambda n: Activation("gelu_tanh" if n.kwargs.get("approximate") == "tanh" else "gelu"),
    F.leaky_relu: lambda n: Activation("leaky_relu", (float(arg(n, 1, "negative_slope", 0.01)),)),
    F.elu: lambda n: Activation("elu", (float(arg(n, 1, "alpha", 1.0)),)),
    F.mish: lambda n: Activation("mish"),
}
_ACTIVATION_METHODS = {"relu": Activation("relu"), "relu_": Activation("relu"), "sigmoid": Activation("sigmoid"),
                       "tanh": Activation("tanh")}


def activation_of(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Activation | None:
    """The activation a node computes on its first argument, or None if it is not one we know."""
    if node.op == "call_module":
        module = gm.get_submodule(graph.target_name(node))
        make = next((f for cls, f in _ACTIVATION_MODULES.items() if type(module) is cls), None)
        return make(module) if make else None
    if node.op == "call_function" and node.target in _ACTIVATION_FUNCTIONS:
        return _ACTIVATION_FUNCTIONS[node.target](node)
    if node.op == "call_method":
        return _ACTIVATION_METHODS.get(graph.target_name(node))
    return None


def onnx_activation(b: OnnxBuilder, act: Activation, x: str, prefix: str) -> str:
    """``act`` applied to ``x`` in the ONNX ops the exporter writes, its nodes named ``prefix...``."""
    name = act.name
    if name == "relu":
        return b.node("Relu", [x], prefix + "relu")
    if name == "clip":
        return b.node("Clip", [x, b.constant(prefix + "lo", act.args[0]), b.constant(prefix + "hi", act.args[1])],
                      prefix + "clip")
    if name == "silu":
        return b.node("Mul", [x, b.node("Sigmoid", [x], prefix + "sigmoid")], prefix + "silu")
    if name == "hardswish":
        return b.node("HardSwish", [x], prefix + "hardswish")
    if name == "hardsigmoid":
        return b.node("HardSigmoid", [x], prefix + "hardsigmoid", alpha=1 / 6, beta=0.5)
    if name in ("sigmoid", "tanh", "mish"):
        return b.node(name.capitalize(), [x], prefix + name)
    if name in ("gelu", "gelu_tanh"):
        return b.node("Gelu", [x], prefix + "gelu", approximate="tanh" if name == "gelu_tanh" else "none")
    if name == "leaky_relu":
        return b.node("LeakyRelu", [x], prefix + "leaky_relu", alpha=act.args[0])
    if name == "elu":
        return b.node("Elu", [x], prefix + "elu", alpha=act.args[0])
    raise ValueError(f"no ONNX form for activation {name!r}")


_TORCH_ACTIVATIONS: dict[str, Any] = {
    "relu": lambda args: nn.ReLU(), "clip": lambda args: nn.Hardtanh(args[0], args[1]), "silu": lambda args: nn.SiLU(),
    "hardswish": lambda args: nn.Hardswish(), "hardsigmoid": lambda args: nn.Hardsigmoid(),
    "sigmoid": lambda args: nn.Sigmoid(), "tanh": lambda args: nn.Tanh(), "gelu": lambda args: nn.GELU(),
    "gelu_tanh": lambda args: nn.GELU(approximate="tanh"), "leaky_relu": lambda args: nn.LeakyReLU(args[0]),
    "elu": lambda args: nn.ELU(args[0]), "mish": lambda args: nn.Mish(),
}


def torch_activation(act: Activation | None) -> nn.Module:
    """``act`` as the torch engines run it after the layer (``nn.Identity`` for none)."""
    return nn.Identity() if act is None else _TORCH_ACTIVATIONS[act.name](act.args)
