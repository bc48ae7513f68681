"""The keep pass: modules the user names keep every channel they make, by name, pattern or class."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.errors import KeepError
from fxprune.passes.keep import KeepPass
from fxprune.passes.pipeline import analyze_inputs
from tests.doubles import tiny_cnn


def _analysed():
    return fxprune.analyze(tiny_cnn().eval(), (torch.randn(1, 3, 16, 16),))


def _free(gm) -> list[str]:
    return sorted(g.members[0].node for g in fxprune.groups(gm) if g.prunable)


def test_a_kept_module_keeps_its_output_channels_and_the_others_stay_prunable():
    gm = _analysed()
    assert _free(gm) == ["_0", "_3", "_6"]  # each convolution's output
    KeepPass(["3"])(gm)
    assert _free(gm) == ["_0", "_6"]
    (kept,) = [g for g in fxprune.groups(gm) if g.members[0].node == "_3"]
    assert kept.frozen_reason == "kept: 3 matches keep='3'"
    pruned = fxprune.compile(tiny_cnn().eval(), fxprune.FLOPs(0.6), (torch.randn(1, 3, 16, 16),), keep=["3"],
                             progress=False, output="graph")
    assert fxprune.plan_of(pruned).keep.keys() == {g.id for g in fxprune.groups(gm) if g.prunable}
    assert pruned.get_submodule("3").out_channels == 64


def test_patterns_and_classes_name_modules_and_their_submodules():
    gm = _analysed()
    KeepPass([nn.Conv2d], tiny_cnn())(gm)
    assert _free(gm) == []
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1)), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1))
    gm = fxprune.analyze(model, (torch.randn(1, 3, 4, 4),))
    KeepPass(["0"])(gm)  # a parent: both convolutions inside it
    assert _free(gm) == ["_1"]
    gm = fxprune.analyze(model, (torch.randn(1, 3, 4, 4),))
    KeepPass(["0.*"])(gm)
    assert _free(gm) == ["_1"]


def test_keep_naming_nothing_says_how_to_name_modules():
    with pytest.raises(KeepError, match="named_modules"):
        KeepPass(["features.0"])(_analysed())
    with pytest.raises(KeepError, match="analysed graph"):
        KeepPass(["0"])(torch.fx.symbolic_trace(tiny_cnn()))


def test_a_decoder_keeps_its_attention_and_hidden_size_by_pattern():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    gm, _ = analyze_inputs(model, None, example_kwargs={"input_ids": torch.randint(0, 256, (1, 8))})
    KeepPass(["model.layers.*.self_attn.[qkv]_proj", "model.embed_tokens"])(gm)
    assert sorted(g.size for g in fxprune.groups(gm) if g.prunable) == [128, 128]  # each layer's MLP alone
