"""Resizing an exported graph to a plan's widths gives the graph an export of the pruned model gives,
and anything it cannot follow is refused (then the engine exports)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper, shape_inference

import fxprune
from fxprune.backends import ort as ort_engine
from fxprune.backends.onnx_resize import (
    TRANSPOSE_TAG,
    WIDTH_FREE,
    ResizeError,
    fill,
    name_transposes,
    remove_blocks,
    resize,
    strip,
)
from fxprune.backends.ort import OnnxRuntimeEngine
from fxprune.cache import LatencyCache
from fxprune.ir.graph import model_digest
from fxprune.rules import RULES
from fxprune.testing import randomize_parameters

INPUTS = (torch.randn(1, 3, 16, 16),)


class Blocks(nn.Module):
    """Residual add, depthwise convolution, squeeze-excitation, concatenation and a flattened head:
    the widths an exported graph records in initializers, groups and reshape targets."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.Hardswish())
        self.depthwise = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.BatchNorm2d(32), nn.ReLU6())
        self.squeeze, self.excite = nn.Conv2d(32, 8, 1), nn.Conv2d(8, 32, 1)
        self.project = nn.Sequential(nn.Conv2d(32, 16, 1), nn.BatchNorm2d(16))
        self.side = nn.Conv2d(16, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(24 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.depthwise(self.expand(x))
        y = y * torch.sigmoid(self.excite(torch.relu(self.squeeze(y.mean((2, 3), keepdim=True)))))
        x = x + self.project(y)
        x = torch.cat([x, self.side(x)], dim=1)
        return self.head(torch.flatten(self.pool(x), 1))


class Shuffle(nn.Module):
    """A channel shuffle: a reshape that splits the pruned axis in two."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y = y.view(y.shape[0], 2, 4, 16, 16).transpose(1, 2).reshape(y.shape[0], 8, 16, 16)
        return self.head(y)


class Tokens(nn.Module):
    """A ConvNeXt-like block: linear layers on channels-last tokens, which the exporter turns into
    MatMuls with the weights' transposes folded into new, unnamed constants."""

    def __init__(self) -> None:
        super().__init__()
        self.patchify = nn.Conv2d(3, 16, 4, stride=4)
        self.norm, self.up, self.down = nn.LayerNorm(16), nn.Linear(16, 32), nn.Linear(32, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patchify(x)
        y = self.down(torch.nn.functional.gelu(self.up(self.norm(x.permute(0, 2, 3, 1)))))
        x = x + y.permute(0, 3, 1, 2)
        return self.head(x.mean((2, 3)))


@pytest.fixture(scope="module")
def analysed():
    gm = fxprune.analyze(randomize_parameters(Blocks().eval()), INPUTS)
    return gm, _exported(gm)


def _exported(module: nn.Module) -> onnx.ModelProto:
    with ort_engine._exported(module, INPUTS) as path:
        return onnx.load(path)


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


def _layout(model: onnx.ModelProto) -> tuple[list[tuple], list[tuple]]:
    """Op types and attributes in order, and every node output's inferred shape in order."""
    inferred = shape_inference.infer_shapes(strip(model, 0), strict_mode=True, data_prop=True)
    shapes = {v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim)
              for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    return ([(n.op_type, str(n.attribute)) for n in model.graph.node],
            [shapes[name] for n in model.graph.node for name in n.output if name])


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000))
def test_a_resized_graph_is_the_pruned_models_export(analysed, seed):
    gm, full = analysed
    plan = fxprune.random_plan(gm, seed=seed)
    pruned = fxprune.prune(gm, plan)
    resized = resize(full, _shapes(gm), _shapes(pruned))
    assert _layout(resized) == _layout(_exported(pruned))
    assert _layout(resized) != _layout(full)  # the plan did change widths
    initializers = sorted(tuple(t.dims) for t in resized.graph.initializer)
    assert initializers == sorted(tuple(t.dims) for t in _exported(pruned).graph.initializer)


def test_the_resized_graph_runs_in_onnxruntime(analysed):
    import onnxruntime

    gm, full = analysed
    pruned = fxprune.prune(gm, fxprune.random_plan(gm, seed=1))
    model = fill(resize(full, _shapes(gm), _shapes(pruned)))
    assert all(numpy_helper.to_array(t).size == int(np.prod(t.dims)) for t in model.graph.initializer)
    session = onnxruntime.InferenceSession(model.SerializeToString())
    (out,) = session.run(None, {session.get_inputs()[0].name: INPUTS[0].numpy()})
    assert out.shape == (1, 10) and np.isfinite(out).all() and np.abs(out).max() > 1e-3


def test_a_timing_graph_carries_the_modules_own_weights(analysed):
    gm, full = analysed
    pruned = fxprune.prune(gm, fxprune.random_plan(gm, seed=3))
    tensors = pruned.state_dict()
    model = fill(resize(full, _shapes(gm), _shapes(pruned)), tensors)
    named = [t for t in model.graph.initializer if t.name in tensors]
    assert named  # the exporter keeps parameter names on the convolution and linear weights
    for tensor in named:
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), tensors[tensor.name].numpy())


def test_a_reshape_that_splits_a_pruned_axis_is_refused():
    gm = fxprune.analyze(Shuffle().eval(), INPUTS)
    plan = fxprune.random_plan(gm, seed=0)
    pruned = fxprune.prune(gm, plan)
    assert _shapes(pruned) != _shapes(gm)
    with pytest.raises(ResizeError, match="Reshape"):
        resize(_exported(gm), _shapes(gm), _shapes(pruned))


def test_transposed_weights_are_found_by_their_values():
    gm = fxprune.analyze(randomize_parameters(Tokens().eval()), INPUTS)
    pruned = fxprune.prune(gm, fxprune.random_plan(gm, seed=0))
    full = _exported(gm)
    with pytest.raises(ResizeError, match="MatMul"):  # unnamed constants: their pruned shape is unknown
        resize(full, _shapes(gm), _shapes(pruned))
    name_transposes(full, gm.state_dict())
    assert sum(t.doc_string.startswith(TRANSPOSE_TAG) for t in full.graph.initializer) == 2  # up, down
    assert _layout(resize(full, _shapes(gm), _shapes(pruned))) == _layout(_exported(pruned))


def test_strip_keeps_shapes_and_small_constants(analysed):
    _, full = analysed
    stripped = strip(full)
    assert [tuple(t.dims) for t in stripped.graph.initializer] == [tuple(t.dims) for t in full.graph.initializer]
    assert stripped.ByteSize() < full.ByteSize() / 5
    restored = fill(strip(full))
    assert all(numpy_helper.to_array(t).shape == tuple(t.dims) for t in restored.graph.initializer)


def test_the_engine_exports_an_analysed_model_once_and_resizes_its_plans(tmp_path, monkeypatch):
    gm = fxprune.analyze(randomize_parameters(Blocks().eval()), INPUTS)
    engine, cache = OnnxRuntimeEngine(threads=1), LatencyCache(tmp_path)
    exports = []
    real_export = ort_engine._exported
    monkeypatch.setattr(ort_engine, "_exported", lambda *a: exports.append(1) or real_export(*a))
    with engine.deploy_traced(gm, INPUTS, cache, model_digest(gm, INPUTS)) as full:
        full.run()
    assert len(exports) == 1
    pruned = fxprune.prune(gm, fxprune.random_plan(gm, seed=2))
    # a new process: from disk
    with engine.deploy_traced(gm, INPUTS, LatencyCache(tmp_path), model_digest(gm, INPUTS)) as full:
        with engine.deploy_pruned(full, pruned, INPUTS) as small:
            (out,) = small.run()
    assert len(exports) == 1 and out.shape == (1, 10)

    shuffle = fxprune.analyze(Shuffle().eval(), INPUTS)  # not resizable: the engine exports the copy
    with engine.deploy_traced(shuffle, INPUTS, cache, model_digest(shuffle, INPUTS)) as full:
        with engine.deploy_pruned(full, fxprune.prune(shuffle, fxprune.random_plan(shuffle, seed=0)), INPUTS) as small:
            small.run()
    assert len(exports) == 3


def test_a_corrupt_cached_graph_is_exported_again(tmp_path):
    gm = fxprune.analyze(Blocks().eval(), INPUTS)
    engine, cache = OnnxRuntimeEngine(threads=1), LatencyCache(tmp_path)
    with engine.deploy_traced(gm, INPUTS, cache, model_digest(gm, INPUTS)):
        pass
    (entry,) = (tmp_path / "latency" / "onnx").glob("*.json")
    entry.write_text(entry.read_text().replace('"onnx": "', '"onnx": "AAAA', 1))
    again = LatencyCache(tmp_path)
    with engine.deploy_traced(gm, INPUTS, again, model_digest(gm, INPUTS)) as full:
        assert full.run()[0].shape == (1, 10)
    assert again.rejected and again.measured == 1


@pytest.mark.parametrize("drop", [(0,), (1, 2), (0, 1, 2)])
def test_a_plan_that_removes_blocks_is_resized_to_the_pruned_models_export(residual_net, drop):
    gm = fxprune.analyze(randomize_parameters(residual_net().eval()), INPUTS)
    full = _exported(gm)
    plan = fxprune.random_plan(gm, seed=len(drop))
    plan.drop = drop
    pruned = fxprune.prune(gm, plan)
    removed = remove_blocks(full, _shapes(gm), _shapes(pruned), len(drop))
    resized = resize(removed, _shapes(gm), _shapes(pruned))
    assert _layout(resized) == _layout(_exported(pruned))
    assert sorted(tuple(t.dims) for t in resized.graph.initializer) == sorted(
        tuple(t.dims) for t in _exported(pruned).graph.initializer)
    with pytest.raises(ResizeError, match="adds join"):  # a count that does not match is never guessed at
        remove_blocks(full, _shapes(gm), _shapes(pruned), len(drop) + 1)


def test_the_engine_resizes_a_plan_that_removes_blocks_without_exporting_it(residual_net, tmp_path, monkeypatch):
    gm = fxprune.analyze(randomize_parameters(residual_net().eval()), INPUTS)
    engine, cache = OnnxRuntimeEngine(threads=1), LatencyCache(tmp_path)
    exports = []
    real_export = ort_engine._exported
    monkeypatch.setattr(ort_engine, "_exported", lambda *a: exports.append(1) or real_export(*a))
    plan = fxprune.Plan({}, (1,))
    pruned = fxprune.prune(gm, plan)
    with engine.deploy_traced(gm, INPUTS, cache, model_digest(gm, INPUTS)) as full:
        with engine.deploy_pruned(full, pruned, INPUTS) as small:
            (out,) = small.run()
    assert len(exports) == 1 and small.origin == "resized graph"  # the full model's export, nothing more
    assert out.shape == (1, 10) and np.isfinite(out).all()
    assert sum(n.op_type == "Add" for n in small.graph().graph.node) == 2  # of three blocks


def test_every_onnx_op_resize_follows_is_a_rules_or_width_free_never_both():
    """A layer's ONNX op is its rule's (``Rule.onnx``): the conv rule resizes ConvTranspose's group and bias."""
    claimed = set(RULES.by_onnx_type)
    assert not claimed & WIDTH_FREE
    assert {"Conv", "ConvTranspose", "Gemm", "Concat", "Add", "BatchNormalization"} <= claimed
    assert RULES.by_onnx_type["ConvTranspose"] is RULES.module_rule(nn.ConvTranspose2d(2, 2, 1)).onnx
    # a reshape's target is the shape rule's to follow; that relu(relu(x)) is relu(x), the activations' rule's
    assert RULES.by_onnx_type["Reshape"] is RULES.by_method["view"].onnx
    assert "Relu" in RULES.by_onnx_type["Relu"].idempotent and "Sigmoid" not in RULES.by_onnx_type["Sigmoid"].idempotent
