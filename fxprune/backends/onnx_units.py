"""ONNX models that time units as onnxruntime runs them inside a network.

One model holds one branch per table point. Each branch has a *producer* (a 1x1 convolution or a
matrix product making the unit's input from the shared graph input, so the unit reads a tensor that a
kernel has just written, as it does in a network) and the unit itself: the layer with its bias (the
BatchNorm folded into it, as the exporter does) and its activation, in the ops the exporter writes.
Both come from the rules: the unit's kind (``UnitSpec.onnx_branch``) and ``rules/activations.py``.
Every node and value of branch ``i``'s unit is named ``u{i}_...``; onnxruntime keeps that prefix on the
kernels it fuses or converts, which is how the profile is read back per branch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fxprune.ir.units import UnitSpec
from fxprune.rules.activations import onnx_activation

OPSET = 20  # what torch.onnx's dynamo exporter writes
IR_VERSION = 10


def unit_prefix(branch: int) -> str:
    return f"u{branch}_"


class _Builder:
    """Collects nodes and initializers of one graph."""

    def __init__(self, seed: int = 0) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.rng = np.random.default_rng(seed)

    def weight(self, name: str, shape: tuple[int, ...]) -> str:
        fan_in = max(1, int(np.prod(shape[1:])))
        array = self.rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(fan_in))
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def constant(self, name: str, value: float) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output


def unit_model(spec: UnitSpec, points: list[tuple[int, int]], first_branch: int = 0,
               reference: UnitSpec | None = None, references: int = 2) -> onnx.ModelProto:
    """A model with one branch per (kept input width, kept output width) point, all fed by input ``x``;
    and ``references`` branches of the ``reference`` unit at full width (named ``r{j}_``, fed by
    ``reference_x``), whose time in the same runs tells how fast the machine was running."""
    for unit in (spec, reference):
        if unit is not None and unit.dtype != "float32":
            raise ValueError(f"onnxruntime latency tables are measured in float32, not {unit.dtype}")
    b = _Builder(seed=first_branch)
    outputs = []
    branches = [(spec, "x", point, unit_prefix(first_branch + offset)) for offset, point in enumerate(points)]
    if reference is not None:
        whole = (reference.in_channels, reference.out_channels)
        branches += [(reference, "reference_x", whole, reference_prefix(j)) for j in range(references)]
    for unit, source, (width_in, width_out), prefix in branches:
        out = unit.onnx_branch(b, source, int(width_in), int(width_out), prefix)
        if unit.activation is not None:
            out = onnx_activation(b, unit.activation, out, prefix)
        outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, None))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(spec.input_shape))]
    if reference is not None:
        inputs.append(helper.make_tensor_value_info("reference_x", TensorProto.FLOAT, list(reference.input_shape)))
    graph = helper.make_graph(b.nodes, "fxprune_units", inputs, outputs, b.initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def reference_prefix(index: int) -> str:
    return f"r{index}_"


def branch_weight_bytes(spec: UnitSpec, width_in: int, width_out: int) -> int:
    """Bytes of one branch's weights (producer and unit), to cap the size of one measuring session."""
    kernel = int(np.prod(spec.kernel)) if spec.kernel else 1
    return 4 * (width_in * spec.in_channels + width_out * (width_in // spec.groups_at(width_out)) * kernel + width_out)
