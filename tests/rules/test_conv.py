"""The convolution rule serves every form a convolution takes: a module, a subclass of one, a function
call with parameters read through get_attr, and ATen's conv2d / convolution in torch.export's graphs; and a
transposed convolution is a timed unit through its rule alone (its kind, ONNX branch and torch layer)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from onnx import numpy_helper

import fxprune
from fxprune.backends import ort as ort_engine
from fxprune.backends.engines import unit_module
from fxprune.backends.onnx_resize import resize
from fxprune.backends.onnx_units import unit_model
from fxprune.backends.ort import OnnxRuntimeEngine
from fxprune.frontends.fx_trace import propagate_shapes
from fxprune.ir.units import Activation, UnitSpec
from fxprune.passes.dependency import DependencyPass
from fxprune.passes.latency import _layer_kernels
from fxprune.rules import RULES
from fxprune.rules.conv import ConvTransposeUnit
from fxprune.rules.units import find_units
from fxprune.testing import masked_forward, randomize_parameters
from tests.backends.test_onnx_resize import _layout, _shapes
from tests.doubles import SyntheticEngine


def _prunes_exactly(gm: torch.fx.GraphModule, inputs: tuple, seed: int = 0) -> torch.fx.GraphModule:
    plan = fxprune.random_plan(gm, 0.5, seed=seed)
    assert plan.keep, "nothing was prunable"
    pruned = fxprune.prune(gm, plan)
    with torch.no_grad():
        expected, actual = masked_forward(gm, plan, *inputs), pruned(*inputs)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in gm.parameters())
    return pruned


class Subclassed(nn.Conv3d):
    """A subclass that adds nothing to its forward (torchvision's Conv3DSimple is one)."""


class OwnForward(nn.Conv2d):
    """A subclass with a forward of its own: traced through, down to F.conv2d."""

    def forward(self, x):
        return super().forward(x) * 2.0


def test_a_subclass_of_a_known_module_resolves_to_its_base_rule():
    assert RULES.module_rule(Subclassed(2, 2, 1)) is RULES.module_rule(nn.Conv3d(2, 2, 1))
    model = nn.Sequential(Subclassed(3, 8, 3, padding=1), nn.ReLU(), Subclassed(8, 4, 1)).eval()
    inputs = (torch.randn(1, 3, 4, 6, 6),)
    gm = fxprune.analyze(model, inputs)
    assert [n.op for n in gm.graph.nodes if n.op.startswith("call")] == ["call_module"] * 3
    _prunes_exactly(gm, inputs)


def test_a_convolution_reached_through_a_forward_of_its_own_is_pruned_as_a_call():
    model = nn.Sequential(OwnForward(3, 8, 3, padding=1, groups=1), nn.ReLU(), OwnForward(8, 8, 3, groups=4),
                          nn.ReLU(), OwnForward(8, 4, 1)).eval()
    inputs = (torch.randn(1, 3, 9, 9),)
    gm = fxprune.analyze(model, inputs)
    assert sum(n.target is F.conv2d for n in gm.graph.nodes) == 3
    pruned = _prunes_exactly(gm, inputs)
    groups = [n.args[6] for n in pruned.graph.nodes if n.target is F.conv2d]
    assert groups[0] == 1 and groups[1] < 4  # the grouped call lost whole groups and says so


def test_r3d_18_is_prunable_through_the_conv3d_rule():
    model = randomize_parameters(torchvision.models.video.r3d_18(weights=None).eval())
    inputs = (torch.randn(1, 3, 4, 32, 32),)
    gm = fxprune.analyze(model, inputs)
    convs = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Conv3d)]
    assert len(convs) == 20
    prunable = [g for g in fxprune.groups(gm) if g.prunable]
    assert len(prunable) >= 9, [g.describe() for g in fxprune.groups(gm)]  # was 0 of 14: every conv frozen
    _prunes_exactly(gm, inputs, seed=1)


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))) + 1)


@pytest.mark.parametrize("decomposed", [False, True])
def test_aten_convolutions_from_torch_export_are_pruned_by_the_same_rule(decomposed):
    """torch.export's graph: aten.conv2d (or aten.convolution once decomposed), weights from get_attr."""
    inputs = (torch.randn(1, 3, 8, 8),)
    program = torch.export.export(randomize_parameters(Small().eval()), inputs)
    exported = (program.run_decompositions() if decomposed else program).module()
    gm = torch.fx.GraphModule(exported, exported.graph)
    target = torch.ops.aten.convolution.default if decomposed else torch.ops.aten.conv2d.default
    assert sum(n.target is target for n in gm.graph.nodes) == 3
    propagate_shapes(gm, inputs)
    DependencyPass()(gm)
    assert [g.size for g in fxprune.groups(gm) if g.prunable] == [2]  # conv a's output: two groups of conv b
    _prunes_exactly(gm, inputs)


class StandardizedWeight(nn.Module):
    """timm's StdConv2d in small: the convolution's weight is computed in the graph, not a parameter."""

    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.w = nn.Parameter(torch.randn(8, 8, 3, 3))

    def forward(self, x):
        w = (self.w - self.w.mean()) / (self.w.std() + 1e-5)
        return self.c(F.conv2d(torch.relu(self.a(x)), w, None, 1, 1))


class WidthAsGroups(nn.Module):
    """A depthwise call whose groups argument is a width read at run time."""

    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.w = nn.Parameter(torch.randn(8, 1, 3, 3))

    def forward(self, x):
        h = self.a(x)
        return self.c(F.conv2d(h, self.w, None, 1, 1, 1, h.shape[1]))


@pytest.mark.parametrize("model", [StandardizedWeight(), WidthAsGroups()], ids=["computed-weight", "traced-groups"])
def test_a_convolution_call_the_rule_cannot_read_is_frozen_and_the_rest_still_prunes(model):
    inputs = (torch.randn(1, 3, 6, 6),)
    gm = fxprune.analyze(model.eval(), inputs)
    conv = next(n for n in gm.graph.nodes if n.target is F.conv2d)
    assert any(m.node == conv.args[0].name for g in fxprune.groups(gm) if not g.prunable for m in g.members)
    fxprune.prune(gm, fxprune.Plan({}))  # the frozen call is left as it is
    with torch.no_grad():
        assert torch.equal(fxprune.prune(gm, fxprune.Plan({}))(*inputs), model(*inputs))


# --- a transposed convolution as a timed unit (its kind: rules/conv.py's ConvTransposeUnit) ------------------
class Upsampler(nn.Module):
    """A decoder stage: a strided convolution, a transposed one with an output padding, a 1x1 head."""

    def __init__(self, groups: int = 1):
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.up = nn.Sequential(nn.ConvTranspose2d(16, 12, 3, stride=2, padding=1, output_padding=1, groups=groups),
                                nn.BatchNorm2d(12), nn.ReLU())
        self.head = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        return self.head(self.up(self.down(x)))


UPSAMPLER_INPUTS = (torch.randn(1, 3, 32, 32),)


def _transposed_unit(model: nn.Module, capture: str = "auto"):
    gm = fxprune.analyze(randomize_parameters(model.eval()), UPSAMPLER_INPUTS, capture=capture)
    units = find_units(gm)
    found = [u for u in units if isinstance(u.spec, ConvTransposeUnit)]
    assert len(units) == 3 and len(found) == 1, [u.spec.describe() for u in units]
    return gm, found[0]


@pytest.mark.parametrize("groups", [1, 4])
def test_a_transposed_convolution_is_a_unit_with_its_norm_and_activation(groups):
    model = Upsampler(groups)
    gm, unit = _transposed_unit(model)
    spec, layer = unit.spec, model.up[0]
    assert unit.nodes == ["up_0", "up_1", "up_2"] and spec.batch_norm and spec.activation == Activation("relu")
    assert unit.in_space is not None and unit.out_space is not None and spec.tied == (groups > 1)
    assert spec.output_shape == (1, 12, 32, 32) == tuple(layer(torch.randn(1, 16, 16, 16)).shape)
    assert spec.weight_shapes == (tuple(layer.weight.shape),)
    assert spec.describe() == f"conv_transpose3x3 16->12 x2 at 16x16{f' g{groups}' if groups > 1 else ''}+bn+relu"
    assert UnitSpec.from_key(spec.to_key()) == spec and spec.to_key()["output_padding"] == [1, 1]


def test_a_transposed_convolution_from_torch_export_is_the_same_unit():
    _, fx_unit = _transposed_unit(Upsampler())
    gm, unit = _transposed_unit(Upsampler(), capture="export")
    assert unit.layer.target is torch.ops.aten.conv_transpose2d.input
    # torch.export's BatchNorm is an aten call, which find_units folds for no layer yet: the rest is the same
    assert not unit.spec.batch_norm and unit.nodes == [unit.layer.name]
    assert replace(unit.spec, batch_norm=True, activation=Activation("relu")) == fx_unit.spec


@pytest.mark.parametrize("groups", [1, 4])
def test_the_transposed_units_onnx_branch_computes_the_torch_layer_at_kept_widths(groups):
    spec = replace(_transposed_unit(Upsampler(groups))[1].spec, batch_norm=False)  # the layer keeps its bias
    points = [(16, 12), (8, 6)]
    model = unit_model(spec, points)
    assert [n.op_type for n in model.graph.node if n.name.startswith("u1_")] == ["ConvTranspose", "Relu"]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal(spec.input_shape).astype(np.float32)
    weights = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer}
    for branch, (got, (width_in, width_out)) in enumerate(zip(session.run(None, {"x": x}), points)):
        produced = F.conv2d(torch.from_numpy(x), weights[f"p_u{branch}_w"])
        layer = spec.torch_layer(width_in, width_out)
        layer.load_state_dict({"weight": weights[f"u{branch}_w"], "bias": weights[f"u{branch}_b"]})
        with torch.no_grad():
            expected = torch.relu(layer(produced))
        assert got.shape == (1, width_out, 32, 32) == tuple(expected.shape)
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-4)
        module, x_kept = unit_module(_transposed_unit(Upsampler(groups))[1].spec, width_in, width_out)
        assert tuple(module(x_kept).shape) == got.shape  # the torch engines' unit: layer, BatchNorm, ReLU


def test_onnxruntime_times_a_transposed_unit_from_its_own_kernels():
    spec = _transposed_unit(Upsampler())[1].spec
    timing = OnnxRuntimeEngine(threads=1, warmup=2, repeats=5).measure_units(spec, [(16, 12), (4, 3)])
    assert np.all(timing.ms > 0) and np.all(timing.reference_ms > 0)


def test_the_transposed_unit_is_found_in_a_profile_of_the_whole_model_on_onnxruntime():
    """onnxruntime's ConvTranspose kernel prepacks its weight (its profile shows the bias only): the unit's
    kind says so, and the latency pass's check finds it by its data and output shapes."""
    model = randomize_parameters(Upsampler().eval())
    gm, unit = _transposed_unit(model)
    with OnnxRuntimeEngine(threads=1, warmup=1, repeats=3).deploy(model, UPSAMPLER_INPUTS) as deployed:
        kernels = deployed.kernels()
    assert kernels is not None
    found = [u for u, _ in _layer_kernels(find_units(gm), kernels)]
    assert [u.layer.name for u in found if isinstance(u.spec, ConvTransposeUnit)] == [unit.layer.name]


def test_a_graph_with_a_transposed_convolution_is_resized_to_the_pruned_models_export():
    """The closed loop times plans by resizing the full model's ONNX graph; the conv rule's ONNX ops
    (``Rule.onnx``) give ConvTranspose's folded bias its width."""
    inputs = (torch.randn(1, 3, 16, 16),)
    gm = fxprune.analyze(randomize_parameters(Upsampler().eval()), inputs)
    pruned = fxprune.prune(gm, fxprune.random_plan(gm, seed=0))
    width_in, width_out = pruned.get_submodule("up.0").weight.shape[:2]
    assert width_in < 16 and width_out < 12  # both of the transposed convolution's sides pruned
    with ort_engine._exported(gm, inputs) as full, ort_engine._exported(pruned, inputs) as expected:
        full_model, expected_model = onnx.load(full), onnx.load(expected)
    assert "ConvTranspose" in [n.op_type for n in full_model.graph.node]
    resized = resize(full_model, _shapes(gm), _shapes(pruned))
    assert _layout(resized) == _layout(expected_model) != _layout(full_model)


class _Recording(SyntheticEngine):
    """The synthetic engine, noting the kind of every unit it times."""

    def __init__(self) -> None:
        super().__init__()
        self.kinds: list[str] = []

    def measure_units(self, spec, points):
        self.kinds.append(spec.op)
        return super().measure_units(spec, points)


def test_a_model_with_a_transposed_convolution_compiles_to_a_latency_budget(tmp_path):
    engine, model = _Recording(), randomize_parameters(Upsampler().eval())
    pruned = fxprune.compile(model, fxprune.Latency(0.6), UPSAMPLER_INPUTS, engine=engine, cache=tmp_path,
                             progress=False)
    assert "conv_transpose" in engine.kinds
    layer = pruned.up[0]
    assert isinstance(layer, nn.ConvTranspose2d) and (layer.in_channels, layer.out_channels) < (16, 12)
    assert engine.model_ms(pruned, UPSAMPLER_INPUTS) <= 0.6 * engine.model_ms(model, UPSAMPLER_INPUTS) * 1.03
    assert tuple(pruned(*UPSAMPLER_INPUTS).shape) == (1, 4, 32, 32)
