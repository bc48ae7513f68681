"""An activation the rules find after a layer is built again, as the engines time it, in ONNX and in torch:
both compute what the model's own module computes."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.fx
import torch.nn as nn
from onnx import TensorProto, helper

from fxprune.backends.onnx_units import IR_VERSION, OPSET, _Builder
from fxprune.rules.activations import activation_of, onnx_activation, torch_activation

MODULES = [nn.ReLU(), nn.ReLU6(), nn.Hardtanh(-2.0, 3.0), nn.SiLU(), nn.Hardswish(), nn.Hardsigmoid(), nn.Sigmoid(),
           nn.Tanh(), nn.GELU(), nn.GELU(approximate="tanh"), nn.LeakyReLU(0.2), nn.ELU(0.5), nn.Mish()]


def _onnx(act, x: np.ndarray) -> np.ndarray:
    b = _Builder()
    out = onnx_activation(b, act, "x", "a_")
    graph = helper.make_graph(b.nodes, "activation", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: repr(m))
def test_an_activation_found_in_a_graph_is_rebuilt_alike_in_onnx_and_torch(module):
    gm = torch.fx.symbolic_trace(nn.Sequential(module))
    act = activation_of(gm, next(n for n in gm.graph.nodes if n.op == "call_module"))
    assert act is not None
    x = torch.linspace(-6, 6, 97).reshape(1, 97)
    with torch.no_grad():
        expected = module(x)
        torch.testing.assert_close(torch_activation(act)(x), expected)
    np.testing.assert_allclose(_onnx(act, x.numpy()), expected.numpy(), rtol=1e-4, atol=1e-5)


def test_no_activation_is_the_identity():
    assert isinstance(torch_activation(None), nn.Identity)
