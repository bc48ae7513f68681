"""The capture pass: torch.fx, then torch.export; inputs and outputs of any structure; heads pruned whole."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import transformers

import fxprune
from fxprune.passes.latency import channel_granularity
from fxprune.passes.pipeline import prune as prune_graph
from fxprune.testing import masked_forward, randomize_parameters
from tests.doubles import SplitBlock


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 3, 3, 3))

    def forward(self, x):
        y = F.conv2d(x, self.weight)
        return y if bool(y.sum() > 0) else -y  # a branch on a value: no path captures it, and it has no parts


def _bert() -> tuple[nn.Module, dict]:
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=100)
    ids = torch.randint(0, 100, (1, 8))
    return transformers.BertModel(config).eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _vit() -> nn.Module:
    config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=128, image_size=32, patch_size=8)
    return transformers.ViTModel(config).eval()


def test_auto_capture_falls_back_to_export_and_returns_the_models_structure():
    model, x = SplitBlock().eval(), torch.randn(1, 3, 16, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = fxprune.compile(model, fxprune.FLOPs(0.7), (x,), progress=False)
    report = fxprune.report(pruned)
    assert report.capture == "export" and any("fx failed" in n for n in report.notes)
    assert report.flops_after <= 0.7 * report.flops_before
    out, expected = pruned(x), model(x)
    assert set(out) == {"features", "aux"} and isinstance(out["aux"], tuple) and isinstance(out["aux"][1], list)
    assert out["features"].shape == expected["features"].shape
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the user's model untouched


def test_a_forced_path_is_the_only_one_tried():
    model, x = SplitBlock().eval(), torch.randn(1, 3, 16, 16)
    with pytest.raises(fxprune.CaptureError, match="fx"):
        fxprune.analyze(model, (x,), capture="fx")
    assert fxprune.capture_of(fxprune.analyze(nn.Conv2d(3, 4, 1), (x,), capture="export")).path == "export"
    with pytest.raises(fxprune.CaptureError, match="unknown capture mode"):
        fxprune.analyze(model, (x,), capture="dynamo")


def test_no_path_names_each_failure():
    with pytest.raises(fxprune.CaptureError) as error:
        fxprune.analyze(DataDependent(), (torch.randn(1, 3, 8, 8),))
    message = str(error.value)
    assert all(f"  {path}:" in message for path in ("fx", "export", "export-strict"))
    assert "no submodule holding parameters was captured alone" in message
    assert "concrete_args" not in message  # not a parameter of compile


def test_keyword_inputs_model_output_onnx_and_save_round_trip(tmp_path):
    model, inputs = _bert()
    pruned = fxprune.compile(model, fxprune.FLOPs(0.6), inputs, progress=False)
    out, expected = pruned(**inputs), model(**inputs)
    assert type(out) is type(expected) and out.last_hidden_state.shape == expected.last_hidden_state.shape
    assert fxprune.report(pruned).flops_after <= 0.6 * fxprune.report(pruned).flops_before
    result = fxprune.export_onnx(pruned, tmp_path / "bert.onnx", inputs)
    assert result.input_names == ["input_ids", "attention_mask"] and result.max_abs_diff < 1e-4
    fxprune.save(pruned, tmp_path / "bert.pt")
    loaded = fxprune.load(tmp_path / "bert.pt")
    torch.testing.assert_close(loaded(**inputs).pooler_output, out.pooler_output)
    assert fxprune.report(loaded).capture == "export"


@pytest.mark.parametrize("build", ["hf_vit", "hf_bert", "timm_vit", "torchvision_vit"])
def test_attention_heads_are_pruned_whole_and_exactly(build):
    capture = "auto"
    if build == "torchvision_vit":  # nn.MultiheadAttention, exported as its projections and SDPA
        model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                     hidden_dim=64, mlp_dim=128).eval()
        inputs, heads, capture = (torch.randn(1, 3, 32, 32),), 4, "export"
    elif build == "hf_vit":
        model, inputs, heads = _vit(), (torch.randn(1, 3, 32, 32),), 4
    elif build == "hf_bert":
        (model, inputs), heads = _bert(), 4
    else:
        timm = pytest.importorskip("timm")
        model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2).eval()
        inputs, heads = (torch.randn(1, 3, 32, 32),), 3
    model = randomize_parameters(model)
    gm = fxprune.analyze(model, inputs, capture=capture)
    flat = fxprune.graph_inputs(gm, inputs)
    head_groups = [g for g in fxprune.groups(gm) if g.prunable and g.size == heads]
    assert len(head_groups) == 2  # one per layer
    plan = fxprune.Plan({g.id: np.array([0, 2]) for g in head_groups})
    pruned = prune_graph(gm, plan)
    with torch.no_grad():
        expected, actual = masked_forward(gm, plan, *flat), pruned(*flat)
    for a, b in zip(torch.utils._pytree.tree_leaves(actual), torch.utils._pytree.tree_leaves(expected)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in gm.parameters())


def test_the_report_lists_heads_kept_per_layer():
    model, inputs = _bert()
    pruned = fxprune.compile(model, fxprune.Params(0.8), inputs, progress=False)
    notes = [n for n in fxprune.report(pruned).notes if n.startswith("attention heads kept")]
    assert len(notes) == 1 and notes[0].count("/4") == 2


class _Wrapper(nn.Module):
    """A model whose own forward no path captures, around parts that are captured alone."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
        self.gate = DataDependent()

    def forward(self, x):
        return self.gate(x) if bool(self.backbone(x).mean() > -1e9) else x


def test_when_no_path_captures_the_model_its_capturable_parts_are_captured_alone():
    gm = fxprune.analyze(_Wrapper(), (torch.randn(1, 3, 8, 8),))
    assert [p.path for p in fxprune.capture_of(gm).parts] == ["backbone"]  # gate has no capturable part
    with pytest.raises(fxprune.CaptureError, match="fx"):
        fxprune.analyze(_Wrapper(), (torch.randn(1, 3, 8, 8),), capture="fx")


def test_a_head_is_one_step_of_the_latency_grid():
    """Keep counts are counted on the axes layers produce: a head spans its projection rows (16 here), so a
    step of 16 channels is one head, not sixteen (which froze every head group)."""
    model, inputs = _bert()
    gm = fxprune.analyze(model, inputs)
    granularity = channel_granularity(gm, 16)
    heads = [g.id for g in fxprune.groups(gm) if g.prunable and g.size == 4]
    mlp = [g.id for g in fxprune.groups(gm) if g.prunable and g.size == 128]
    assert heads and all(granularity[g] == 1 for g in heads) and all(granularity[g] == 16 for g in mlp)
