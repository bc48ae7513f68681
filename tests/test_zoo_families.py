"""Models users ship beyond torchvision classification (fxprune.zoo): compiled as they are, called as they
were, exported and matched in onnxruntime. The whole sweep is benchmarks/coverage_families.py."""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree

import fxprune
from fxprune import zoo
from fxprune.passes.pipeline import prune as prune_graph
from fxprune.testing import masked_forward, randomize_parameters


@pytest.mark.parametrize("key", ["hf_text/gpt2", "yolo/yolov8n", "smp/FPN", "hf_vision/detr",
                                 "detectors/fasterrcnn_mobilenet_v3_large_320_fpn"])
def test_a_model_compiles_as_it_is_and_exports(key, tmp_path):
    model, inputs = zoo.build(*key.split("/"))
    model = randomize_parameters(model)
    args, kwargs = (inputs, {}) if isinstance(inputs, tuple) else ((), inputs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = fxprune.compile(model, fxprune.FLOPs(0.7), inputs, progress=False)
    report = fxprune.report(pruned)
    assert report.flops_after <= 0.7 * report.flops_before
    assert sum(g.kept < g.total for g in report.groups) >= 1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert type(pruned) is type(model) and report.returned == type(model).__name__  # the user's own class
    assert len(report.shapes_checked) >= 3  # verified at the example and two other shapes
    with torch.no_grad():
        assert pytree.tree_structure(pruned(*args, **kwargs)) == pytree.tree_structure(model(*args, **kwargs))
    assert fxprune.export_onnx(pruned, tmp_path / "model.onnx", inputs).max_abs_diff < 1e-3


@pytest.mark.parametrize("key", ["hf_text/bert", "hf_vision/vit", "torchvision_video/r3d_18",
                                 "detection_backbones/ssdlite320_mobilenet_v3_large", "smp/Unet"])
def test_every_family_returns_its_own_class_verified_at_three_shapes(key, tmp_path):
    model, inputs = zoo.build(*key.split("/"))
    pruned = fxprune.compile(model, fxprune.FLOPs(0.7), inputs, progress=False)
    report = fxprune.report(pruned)
    assert type(pruned) is type(model), report.notes
    assert len(report.shapes_checked) >= 3 and len(set(report.shapes_checked)) == len(report.shapes_checked)
    torch.save(pruned, tmp_path / "model.pt")  # the whole object round-trips with torch's own tools
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    args, kwargs = (inputs, {}) if isinstance(inputs, tuple) else ((), inputs)
    with torch.no_grad():
        for a, b in zip(pytree.tree_leaves(pruned(*args, **kwargs)), pytree.tree_leaves(loaded(*args, **kwargs))):
            torch.testing.assert_close(a, b)


def test_raft_whose_code_checks_its_widths_comes_back_as_the_graph_with_the_reason():
    """RAFT's forward refuses a context encoder narrower than its hidden state: its own class cannot be
    returned at those widths, so compile returns the pruned graph and says which module raised."""
    model, inputs = zoo.build("optical_flow", "raft_small")
    pruned = fxprune.compile(model, fxprune.FLOPs(0.6), inputs, progress=False)
    report = fxprune.report(pruned)
    if type(pruned) is type(model):  # a plan that kept the context encoder wide enough: verified as any other
        assert len(report.shapes_checked) >= 3
    else:
        assert isinstance(pruned, torch.fx.GraphModule)
        assert any("returned the pruned graph" in note and "(RAFT)" in note for note in report.notes)


def test_a_pruned_detector_takes_images_of_three_sizes_in_one_batch(tmp_path):
    """Its parts are shrunk in place (no graph frozen at the example's size): the detector resizes and batches
    images of any size and aspect ratio as before, and the whole object saves and loads with torch."""
    model, images = zoo.build("detectors", "fasterrcnn_mobilenet_v3_large_320_fpn")
    pruned = fxprune.compile(model, fxprune.FLOPs(0.7), images, progress=False)
    assert type(pruned) is type(model) and not any(isinstance(m, torch.fx.GraphModule) for m in pruned.modules())
    batch = [torch.rand(3, 320, 320), torch.rand(3, 240, 400), torch.rand(3, 500, 280)]
    with torch.no_grad():
        out = pruned(batch)
    assert len(out) == 3 and all(set(o) == {"boxes", "labels", "scores"} for o in out)
    torch.save(pruned, tmp_path / "detector.pt")
    loaded = torch.load(tmp_path / "detector.pt", weights_only=False)
    with torch.no_grad():
        again = loaded(batch)
    for a, b in zip(out, again):
        torch.testing.assert_close(a["scores"], b["scores"])


def test_gpt2_heads_through_a_fused_projection_and_split_are_exact():
    model, inputs = zoo.build("hf_text", "gpt2")
    model = randomize_parameters(model)
    gm = fxprune.analyze(model, inputs)
    heads = [g for g in fxprune.groups(gm) if g.prunable and g.size == 4]
    assert len(heads) == 2
    plan = fxprune.Plan({g.id: torch.tensor([1, 3]).numpy() for g in heads})
    flat = fxprune.graph_inputs(gm, inputs)
    with torch.no_grad():
        expected, actual = masked_forward(gm, plan, *flat), prune_graph(gm, plan)(*flat)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_detr_matches_the_masked_reference_through_its_frozen_batchnorms():
    """DETR's frozen BatchNorms compute (var + eps).rsqrt() from buffers: the masked reference zeroes removed
    entries with ``where``, so the infinite values at removed positions never reach kept ones."""
    model, inputs = zoo.build("hf_vision", "detr")
    gm = fxprune.analyze(randomize_parameters(model), inputs)
    plan = fxprune.random_plan(gm, 0.5, seed=0, include_norm_coupled=False)
    flat = fxprune.graph_inputs(gm, inputs)
    with torch.no_grad():
        expected, actual = masked_forward(gm, plan, *flat), prune_graph(gm, plan)(*flat)
    for a, b in zip(actual, expected):
        assert bool(torch.isfinite(b).all())
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["yolov8n", "yolo11n"])
def test_yolo_with_its_detect_head_exports_as_ultralytics_exports(name, tmp_path):
    """ultralytics' ONNX export: the Detect head in export mode (one tensor, boxes and class scores per
    anchor), input ``images``, output ``output0``; pruned, it keeps that form."""
    from ultralytics.nn.modules import Detect

    model, inputs = zoo.build("yolo", name)
    for module in model.modules():
        if isinstance(module, Detect):
            module.export, module.format = True, "onnx"
    pruned = fxprune.compile(model, fxprune.FLOPs(0.7), inputs, progress=False)
    report = fxprune.report(pruned)
    assert report.flops_after <= 0.7 * report.flops_before
    with torch.no_grad():
        expected = model(*inputs)
    assert isinstance(expected, torch.Tensor) and pruned(*inputs).shape == expected.shape == (1, 84, 336)
    result = fxprune.export_onnx(pruned, tmp_path / f"{name}.onnx", inputs, input_names=["images"],
                                 output_names=["output0"])
    assert (result.input_names, result.output_names) == (["images"], ["output0"])
    assert result.max_abs_diff < 1e-3
