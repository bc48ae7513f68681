"""Every torchvision family: analyse, prune at a random plan, compare with the masked reference."""

from __future__ import annotations

import pytest
import torch

import fxprune
from fxprune.ir import Plan
from fxprune.testing import (
    FAMILY_REPRESENTATIVES,
    build_torchvision_model,
    classification_models,
    family,
    masked_forward,
)


def _main_output(out):
    return out["out"] if isinstance(out, dict) else out


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def test_every_family_has_a_representative():
    families = {family(name) for name in classification_models()}
    covered = {family(name) for name in FAMILY_REPRESENTATIVES}
    assert families <= covered, f"families without a default test model: {sorted(families - covered)}"


def test_zoo_model_prunes_equivalently(zoo_model):
    model, inputs = build_torchvision_model(zoo_model)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = fxprune.analyze(model, inputs)
    groups = fxprune.groups(gm)
    assert any(g.prunable for g in groups), "no prunable group found"

    # Exact check on every group whose channels no normalization mixes (LayerNorm statistics span the
    # channel axis, so zeroing a channel is not the same as removing it there).
    plan = fxprune.random_plan(gm, keep_ratio=0.5, seed=1, include_norm_coupled=False)
    pruned = fxprune.prune(gm, plan)
    with torch.no_grad():
        full = _main_output(model(*inputs))
        expected = _main_output(masked_forward(gm, plan, *inputs))
        actual = _main_output(pruned(*inputs))
    assert actual.shape == expected.shape
    assert _relative_error(actual, expected) < 1e-4
    assert _relative_error(full, expected) > 1e-3, "masking changed nothing: the check would be vacuous"
    params_before = sum(p.numel() for p in model.parameters())
    params_after = sum(p.numel() for p in pruned.parameters())
    assert params_after < params_before

    # Norm-coupled groups pruned too: shapes, finiteness and a smaller model are what can be checked.
    norm_groups = [g for g in groups if g.prunable and g.norm_coupled]
    if norm_groups:
        plan_all = fxprune.random_plan(gm, keep_ratio=0.5, seed=2)
        pruned_all = fxprune.prune(gm, plan_all)
        with torch.no_grad():
            out_all = _main_output(pruned_all(*inputs))
        assert out_all.shape == full.shape and torch.isfinite(out_all).all()
        assert sum(p.numel() for p in pruned_all.parameters()) < params_after

    # Keeping every channel reproduces the model bit for bit, and the user's model is untouched.
    keep_all = fxprune.prune(gm, Plan({}))
    with torch.no_grad():
        assert torch.equal(_main_output(keep_all(*inputs)), full)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state_before[key]), f"the user's model changed: {key}"


@pytest.mark.export
@pytest.mark.parametrize("name", ["resnet18", "shufflenet_v2_x0_5", "vit_b_32", "convnext_tiny",
                                  "lraspp_mobilenet_v3_large"])
def test_pruned_zoo_model_exports_and_matches_onnxruntime(name, tmp_path):
    model, inputs = build_torchvision_model(name)
    gm = fxprune.analyze(model, inputs)
    pruned = fxprune.prune(gm, fxprune.random_plan(gm, keep_ratio=0.5, seed=3))
    result = fxprune.export_onnx(pruned, tmp_path / f"{name}.onnx", inputs)
    assert result.max_abs_diff is not None
    assert (tmp_path / f"{name}.onnx").stat().st_size > 0
