"""Hugging Face models come back as themselves: generate with the KV cache, train with their own loss,
save to a Hugging Face folder and load from it at the pruned sizes."""

from __future__ import annotations

import json

import pytest
import torch

import fxprune
from fxprune import zoo
from fxprune.errors import SaveError
from fxprune.huggingface import SIZES_FILE
from fxprune.modules import ZeroBranch
from fxprune.passes.pipeline import analyze_inputs
from fxprune.passes.shrink import shrink_model
from fxprune.passes.verify import masked_model, verify_model
from fxprune.testing import randomize_parameters

transformers = pytest.importorskip("transformers")


def _llama(**config):
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **config)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # weights O(1) in effect, buffers (the rotary frequencies, not saved) left as they are
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter) / max(parameter.shape[-1], 1) ** 0.5
                            if parameter.dim() > 1 else 1 + 0.1 * torch.randn_like(parameter))
    return model


def test_llama_with_its_default_config_compiles_whole_and_generates_with_its_cache():
    model = _llama()
    assert model.config.use_cache  # the default: analysed with the cache off, returned with it on
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(0))
    pruned = fxprune.compile(model, fxprune.FLOPs(0.6), {"input_ids": ids}, progress=False)
    report = fxprune.report(pruned)
    assert type(pruned) is transformers.LlamaForCausalLM and report.capture == "export"
    assert report.flops_after <= 0.6 * report.flops_before
    assert pruned.config.use_cache and model.config.use_cache
    assert len(report.shapes_checked) == 3  # the example, batch 2, a longer sequence
    # the pruned decoder generates with its KV cache the tokens the masked original generates
    gm, _ = analyze_inputs(model, {"input_ids": ids})
    reference = masked_model(model, gm, fxprune.plan_of(pruned))
    prompt = ids[:, :10].repeat(2, 1)
    with torch.no_grad():
        tokens = pruned.generate(prompt, max_new_tokens=8, do_sample=False)
        expected = reference.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(tokens, expected)
    # one training step with the model's own loss
    pruned.train()
    loss = pruned(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and pruned.model.layers[0].mlp.down_proj.weight.grad is not None


@pytest.mark.parametrize("key", ["llama", "hf_text/gpt2", "hf_text/bert", "hf_vision/vit"])
def test_a_pruned_model_saves_to_a_hugging_face_folder_and_loads_as_its_class(key, tmp_path):
    if key == "llama":
        model, ids = _llama(), torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
        inputs = {"input_ids": ids}
    else:
        model, inputs = zoo.build(*key.split("/"))
        model = randomize_parameters(model)
    args, kwargs = (inputs, {}) if isinstance(inputs, tuple) else ((), inputs)
    pruned = fxprune.compile(model, fxprune.FLOPs(0.6), inputs, progress=False)
    assert type(pruned) is type(model)
    folder = fxprune.save(pruned, tmp_path / "pruned")
    assert (folder / "config.json").exists() and (folder / SIZES_FILE).exists()
    assert list(folder.glob("*.safetensors"))
    loaded = fxprune.load(folder)
    assert type(loaded) is type(model)
    assert fxprune.plan_of(loaded) is not None
    assert fxprune.report(loaded).flops_after == fxprune.report(pruned).flops_after
    with torch.no_grad():
        expected, got = pruned.eval()(*args, **kwargs), loaded(*args, **kwargs)
    tensors = [[x for x in torch.utils._pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]
               for out in (expected, got)]
    assert tensors[0]
    for a, b in zip(*tensors):
        torch.testing.assert_close(a, b)


def test_a_folder_without_our_size_record_or_with_sizes_that_do_not_fit_is_one_error(tmp_path):
    model, inputs = zoo.build("hf_text", "bert")
    pruned = fxprune.compile(model, fxprune.FLOPs(0.6), inputs, progress=False)
    folder = fxprune.save(pruned, tmp_path / "pruned")
    record = json.loads((folder / SIZES_FILE).read_text())
    (folder / SIZES_FILE).unlink()
    with pytest.raises(SaveError, match=SIZES_FILE):
        fxprune.load(folder)
    key = next(iter(record["tensors"]))
    record["tensors"][key] = [3] * len(record["tensors"][key])
    (folder / SIZES_FILE).write_text(json.dumps(record))
    with pytest.raises(SaveError, match="do not fit"):
        fxprune.load(folder)
    del record["fields"]
    (folder / SIZES_FILE).write_text(json.dumps(record))
    with pytest.raises(SaveError, match="fields"):
        fxprune.load(folder)


def test_saving_to_an_unwritable_place_fails_before_any_work(tmp_path):
    model, inputs = zoo.build("hf_text", "bert")
    pruned = fxprune.compile(model, fxprune.FLOPs(0.8), inputs, progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SaveError, match="cannot write"):
        fxprune.save(pruned, blocker / "sub" / "pruned")


def test_bert_pruned_at_one_length_runs_at_other_lengths_and_batches():
    """Pruned with inputs (1, 32): at length 48 and batch 4 it used to raise (a graph frozen at the example's
    sizes); the model returned is BERT itself and matches the masked original there."""
    model, _ = zoo.build("hf_text", "bert")
    model = randomize_parameters(model)
    ids = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    pruned = fxprune.compile(model, fxprune.FLOPs(0.6), inputs, progress=False)
    assert type(pruned) is transformers.BertForSequenceClassification
    gm, _ = analyze_inputs(model, inputs)
    reference = masked_model(model, gm, fxprune.plan_of(pruned))
    other = torch.randint(0, 512, (4, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = pruned(input_ids=other, attention_mask=torch.ones_like(other)).logits
        want = reference(input_ids=other, attention_mask=torch.ones_like(other)).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_llama_loses_a_decoder_layers_mlp_whole_and_saves_and_loads_without_it(tmp_path):
    model = _llama()
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    gm, _ = analyze_inputs(model, {"input_ids": ids})
    found, why = fxprune.blocks(gm)
    assert [(b.module, b.kind, b.returns) for b in found] == [  # attention reads rotary context made once
        (f"model.layers.{i}.{part}", "zero", 2 if part == "self_attn" else 0)
        for i in (0, 1) for part in ("self_attn", "mlp")]
    plan = fxprune.Plan({}, (3,))
    pruned = fxprune.prune(gm, plan)
    shrunk = shrink_model(model, gm, plan)
    assert verify_model(model, shrunk, pruned, gm, plan, (), {"input_ids": ids}).ok
    assert isinstance(shrunk.model.layers[1].mlp, ZeroBranch)
    reference = masked_model(model, gm, plan)
    with torch.no_grad():
        tokens = shrunk.generate(ids[:, :8], max_new_tokens=6, do_sample=False)
        assert torch.equal(tokens, reference.generate(ids[:, :8], max_new_tokens=6, do_sample=False))
    shrunk.meta = {"fxprune_plan": plan}
    fxprune.save(shrunk, tmp_path / "llama")
    loaded = fxprune.load(tmp_path / "llama")
    assert type(loaded) is transformers.LlamaForCausalLM and isinstance(loaded.model.layers[1].mlp, ZeroBranch)
    with torch.no_grad():
        assert torch.equal(loaded.generate(ids[:, :8], max_new_tokens=6, do_sample=False), tokens)


def test_gpt2_loses_its_mlps_whole_exactly_and_generates_the_masked_originals_tokens():
    cfg = transformers.GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=3, n_head=4)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    randomize_parameters(model)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    gm, _ = analyze_inputs(model, {"input_ids": ids})
    found, _ = fxprune.blocks(gm)
    assert [(b.module, b.kind) for b in found] == [(f"transformer.h.{i}.{part}", "zero") for i in range(3)
                                                   for part in ("attn", "mlp")]
    plan = fxprune.Plan({}, (1, 5))
    shrunk = shrink_model(model, gm, plan)
    verification = verify_model(model, shrunk, fxprune.prune(gm, plan), gm, plan, (), {"input_ids": ids})
    assert verification.ok, verification.failure
    assert [isinstance(block.mlp, ZeroBranch) for block in shrunk.transformer.h] == [True, False, True]
    reference = masked_model(model, gm, plan)
    with torch.no_grad():
        tokens = shrunk.generate(ids[:, :8], max_new_tokens=6, do_sample=False)
        assert torch.equal(tokens, reference.generate(ids[:, :8], max_new_tokens=6, do_sample=False))
