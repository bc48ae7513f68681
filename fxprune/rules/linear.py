"""Linear layers and embeddings, as modules, functions or ATen ops."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, cast

import onnx
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from fxprune.ir import graph
from fxprune.ir.units import OnnxBuilder, UnitSpec
from fxprune.rules.base import Kept, Rule, TensorAxis, arg, input_space, parameter_name
from fxprune.rules.coupling import ChannelBuilder
from fxprune.rules.onnx import OnnxOps, Shapes, attribute, follow
from fxprune.rules.shape import ensure_space

aten = torch.ops.aten


@dataclass(frozen=True)
class LinearUnit(UnitSpec):
    """A linear layer as a timed unit: ONNX ``Gemm`` on 2-D inputs, ``MatMul`` + ``Add`` otherwise; ``nn.Linear``."""

    op: ClassVar[str] = "linear"
    weightless_kernels: ClassVar[tuple[str, ...]] = ("QGemm", "QLinearMatMul", "MatMulIntegerToFloat",
                                                     "DynamicQuantizeMatMul")

    @property
    def channel_dim(self) -> int:
        return len(self.input_shape) - 1

    @property
    def output_shape(self) -> tuple[int, ...]:
        return (*self.input_shape[:-1], self.out_channels)

    @property
    def weight_shapes(self) -> tuple[tuple[int, ...], ...]:
        return ((self.out_channels, self.in_channels), (self.in_channels, self.out_channels))

    @property
    def folds_batch_norm(self) -> bool:
        return len(self.input_shape) == 2  # BatchNorm1d after a Linear normalizes its features on 2-D inputs only

    def layer_name(self) -> str:
        return f"linear {self.in_channels}->{self.out_channels} on {list(self.input_shape)}"

    def onnx_branch(self, b: OnnxBuilder, x: str, width_in: int, width_out: int, prefix: str) -> str:
        if len(self.input_shape) == 2:  # the exporter writes Gemm for 2-D inputs, MatMul + Add otherwise
            producer = b.node("Gemm", [x, b.weight(f"p_{prefix}w", (width_in, self.in_channels))], f"p_{prefix}out",
                              transB=1)
            inputs = [producer, b.weight(prefix + "w", (width_out, width_in))]
            if self.bias:
                inputs.append(b.weight(prefix + "b", (width_out,)))
            return b.node("Gemm", inputs, prefix + "gemm", transB=1)
        producer = b.node("MatMul", [x, b.weight(f"p_{prefix}w", (self.in_channels, width_in))], f"p_{prefix}out")
        out = b.node("MatMul", [producer, b.weight(prefix + "w", (width_in, width_out))], prefix + "matmul")
        return b.node("Add", [out, b.weight(prefix + "b", (width_out,))], prefix + "add") if self.bias else out

    def torch_layer(self, width_in: int, width_out: int) -> nn.Module:
        return nn.Linear(width_in, width_out, bias=self.layer_bias)


class GemmOnnx(OnnxOps):
    """``Gemm`` and ``MatMul`` in an exported graph: a ``Gemm``'s C follows its output columns."""

    def implied_shape(self, node: onnx.NodeProto, index: int, old: Shapes, new: Shapes) -> tuple[int, ...] | None:
        if node.op_type != "Gemm" or index != 2:
            return None
        data, bias = node.input[0], node.input[2]
        return follow(old[bias], (old[data][0], _columns(node, old)), (new[data][0], _columns(node, new)))


def _columns(node: onnx.NodeProto, shapes: Shapes) -> int:
    """A ``Gemm``'s output columns: its weight's rows where it is transposed (``transB``), else its columns."""
    weight = shapes[node.input[1]]
    return weight[0] if attribute(node, "transB", 0) else weight[1]


class Linear(Rule):
    """Input features (last dim) and output features are independent channel axes."""

    name = "linear"
    bilinear_flops = True
    layer = True
    onnx = GemmOnnx("Gemm", "MatMul")
    modules: tuple[type, ...] = (nn.Linear,)
    functions: tuple[Any, ...] = (F.linear, aten.linear)

    def tensors(self, node: torch.fx.Node) -> tuple[str, str | None] | None:
        """Qualified names of (weight, bias); None where the weight is not a parameter."""
        if node.op == "call_module":
            return f"{node.target}.weight", f"{node.target}.bias"
        weight, bias = parameter_name(arg(node, 1, "weight")), arg(node, 2, "bias")
        if weight is None or (bias is not None and parameter_name(bias) is None):
            return None
        return weight, parameter_name(bias)

    def couple(self, b: ChannelBuilder, node: torch.fx.Node) -> None:
        if self.tensors(node) is None:
            Rule.couple(self, b, node)
            return
        ensure_space(b, cast(torch.fx.Node, node.args[0]), -1)
        b.new_space(node, len(b.tensor_shape(node)) - 1)
        self.claim_tensors(b, node)

    def tensor_axes(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> list[TensorAxis]:
        names, out, inp = self.tensors(node), graph.space(node), input_space(node)
        if names is None or out is None:
            return []
        weight, bias = names
        axes = [TensorAxis(weight, 0, out, True)] + ([TensorAxis(weight, 1, inp, False)] if inp is not None else [])
        if bias is not None and _exists(gm, bias):
            axes.append(TensorAxis(bias, 0, out, True))
        return axes

    def shrink_module(self, module: nn.Module, node: torch.fx.Node, kept: Kept) -> nn.Module | None:
        assert isinstance(module, nn.Linear)  # a module of this rule's classes (owns)
        module.out_features, module.in_features = module.weight.shape
        return None

    def unit(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> UnitSpec | None:
        names, input_shape = self.tensors(node), graph.shape(node.args[0])
        if names is None or input_shape is None:
            return None
        weight, bias = names
        dtype = str(node.meta["tensor_meta"].dtype).removeprefix("torch.")
        return LinearUnit(input_shape, graph.attribute(gm, weight).shape[0],
                          bias=bias is not None and _exists(gm, bias), dtype=dtype)

    def importance_rows(self, gm: torch.fx.GraphModule,
                        node: torch.fx.Node) -> tuple[str, Callable[[torch.Tensor], torch.Tensor]] | None:
        names = self.tensors(node)
        return None if names is None else (names[0], lambda w: w.reshape(w.shape[0], -1))


class AddMM(Linear):
    """``addmm(bias, x, weight)`` with the weight stored (in, out): Hugging Face's ``Conv1D`` (GPT-2) in
    torch.export's graphs. The same layer as ``Linear``, its weight transposed."""

    name = "addmm"
    modules = ()
    functions = (torch.addmm, aten.addmm)

    def tensors(self, node: torch.fx.Node) -> tuple[str, str | None] | None:
        weight, bias = parameter_name(arg(node, 2, "mat2")), parameter_name(arg(node, 0, "input"))
        return (weight, bias) if weight is not None and bias is not None else None

    def couple(self, b: ChannelBuilder, node: torch.fx.Node) -> None:
        if self.tensors(node) is None or arg(node, 3, "beta", 1) != 1 or arg(node, 4, "alpha", 1) != 1:
            Rule.couple(self, b, node)
            return
        ensure_space(b, cast(torch.fx.Node, node.args[1]), -1)
        b.new_space(node, 1)
        self.claim_tensors(b, node)

    def tensor_axes(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> list[TensorAxis]:
        names, out, inp = self.tensors(node), graph.space(node), graph.space(node.args[1])
        if names is None or out is None:
            return []
        weight, bias = names
        axes = [TensorAxis(weight, 1, out, True)] + ([TensorAxis(bias, 0, out, True)] if bias is not None else [])
        return axes + ([TensorAxis(weight, 0, inp, False)] if inp is not None else [])

    def owns(self, module: nn.Module) -> bool:
        """Hugging Face's ``Conv1D`` (GPT-2): it keeps its widths as ``nx`` and ``nf`` and reshapes by ``nf``."""
        return isinstance(getattr(module, "nf", None), int) and isinstance(getattr(module, "nx", None), int)

    def shrink_module(self, module: nn.Module, node: torch.fx.Node, kept: Kept) -> nn.Module | None:
        conv1d: Any = module  # Hugging Face's Conv1D (owns), not imported
        conv1d.nx, conv1d.nf = conv1d.weight.shape
        return None

    def unit(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> UnitSpec | None:
        """Timed as the exporter writes it, a Gemm over the flattened tokens."""
        names, input_shape = self.tensors(node), graph.shape(node.args[1])
        if names is None or input_shape is None:
            return None
        dtype = str(node.meta["tensor_meta"].dtype).removeprefix("torch.")
        return LinearUnit(input_shape, graph.attribute(gm, names[0]).shape[1], bias=True, dtype=dtype)

    def unit_input(self, node: torch.fx.Node) -> Any:
        return node.args[1]

    def importance_rows(self, gm: torch.fx.GraphModule,
                        node: torch.fx.Node) -> tuple[str, Callable[[torch.Tensor], torch.Tensor]] | None:
        names = self.tensors(node)
        return None if names is None else (names[0], lambda w: w.t())


class Embedding(Rule):
    """A lookup table: its output's last dim is the table's columns; the indices carry no channels."""

    name = "embedding"
    memory_kernels = frozenset({"Gather", "aten::index_select"})
    modules = (nn.Embedding,)
    functions = (F.embedding, aten.embedding)

    def weight(self, node: torch.fx.Node) -> str | None:
        if node.op == "call_module":
            return f"{node.target}.weight"
        index = 0 if isinstance(node.target, torch._ops.OpOverload) else 1  # aten.embedding(weight, indices)
        return parameter_name(arg(node, index, "weight"))

    def couple(self, b: ChannelBuilder, node: torch.fx.Node) -> None:
        if self.weight(node) is None or b.shape(node) is None:
            Rule.couple(self, b, node)
            return
        b.new_space(node, len(b.tensor_shape(node)) - 1)
        self.claim_tensors(b, node)

    def tensor_axes(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> list[TensorAxis]:
        weight, out = self.weight(node), graph.space(node)
        return [] if weight is None or out is None else [TensorAxis(weight, 1, out, True)]

    def shrink_module(self, module: nn.Module, node: torch.fx.Node, kept: Kept) -> nn.Module | None:
        assert isinstance(module, nn.Embedding)  # a module of this rule's classes (owns)
        module.embedding_dim = module.weight.shape[1]
        return None

    def importance_rows(self, gm: torch.fx.GraphModule,
                        node: torch.fx.Node) -> tuple[str, Callable[[torch.Tensor], torch.Tensor]] | None:
        weight = self.weight(node)
        return None if weight is None else (weight, lambda w: w.t())


def _exists(gm: torch.nn.Module, name: str) -> bool:
    owner, _, attr = name.rpartition(".")
    return getattr(gm.get_submodule(owner), attr, None) is not None
