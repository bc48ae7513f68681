"""The five decoder families of issue 29 at FLOPs(0.5) and Latency(0.5, phase="decode") on onnxruntime.

    python benchmarks/decoder_families.py            # writes docs/decoder_families.md and .json

Each family (Llama, Qwen2, Mistral, Phi-3, GPT-2) is built from a small config with random weights, as
tests/test_decoders.py builds it but with 4 layers (at 2 layers a plan that keeps one attention sits at
0.5 of the decode step, and this machine's timing decides which side). Per budget: ``fxprune.compile``
on the engine fxprune uses by default; the returned model's class; ``generate`` against the masked
reference (the original with the plan's channels and blocks zeroed; GPT-2's LayerNorm stream pruned has
none); ``fxprune.save``/``load`` generating the same tokens; the user's model unchanged. Latency plans are
then timed by this script, not by fxprune: both decode steps exported (benchmarks/llm.py's ``export_step``,
a cache of 24 tokens) and run in round-robin rounds by plain onnxruntime sessions, the median of per-round
ratios of each round's 20% quantile.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers
from llm import export_step, shares  # this folder's scripts run as scripts

import fxprune
from fxprune.passes.pipeline import analyze_inputs
from fxprune.passes.verify import masked_model
from fxprune.testing import randomize_parameters

DOCS = Path(__file__).resolve().parent.parent / "docs"
LAYERS, TOKENS = 4, 24
_LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)
FAMILIES = {  # tests/test_decoders.py's configs, at LAYERS layers
    "llama": ("LlamaConfig", "LlamaForCausalLM", _LLAMA),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _LLAMA),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_LLAMA, sliding_window=None)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_LLAMA, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=256, n_embd=64, n_layer=LAYERS, n_head=4,
                                                   n_positions=128, bos_token_id=1, eos_token_id=2)),
}


def decoder(family: str) -> torch.nn.Module:
    config, cls, fields = FAMILIES[family]
    torch.manual_seed(0)
    return randomize_parameters(getattr(transformers, cls)(getattr(transformers, config)(**fields)).eval())


def _ids(length: int) -> torch.Tensor:
    return torch.randint(3, 256, (1, length), generator=torch.Generator().manual_seed(0))


def _tokens(model: torch.nn.Module, prompt: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=6, do_sample=False)


def run_case(family: str, budget: fxprune.Budget, folder: Path, rounds: int) -> dict:
    model, ids = decoder(family), _ids(TOKENS)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    label = f"Latency({budget.fraction}, phase='decode')" if budget.metric == "latency" else f"FLOPs({budget.fraction})"
    record: dict = {"family": family, "budget": label}
    start = time.perf_counter()
    try:
        pruned = fxprune.compile(model, budget, {"input_ids": ids}, progress=False)
    except fxprune.FxpruneError as error:
        return dict(record, refused=str(error)[:200], seconds=round(time.perf_counter() - start, 1))
    record["seconds"] = round(time.perf_counter() - start, 1)
    report = fxprune.report(pruned)
    gm, _ = analyze_inputs(model, {"input_ids": ids})
    plan = fxprune.plan_of(pruned)
    mixed = any(g.norm_coupled and g.id in plan.keep and len(plan.keep[g.id]) < g.size for g in fxprune.groups(gm))
    prompt = ids[:, :8]
    path = fxprune.save(pruned, folder / f"{family}-{budget.metric}")
    record.update(
        returned=type(pruned).__name__, blocks_removed=report.blocks_removed,
        flops_share=round(report.flops_after / report.flops_before, 3),
        generates_as_masked=None if mixed else bool(torch.equal(_tokens(pruned, prompt),
                                                                _tokens(masked_model(model, gm, plan), prompt))),
        round_trip=bool(torch.equal(_tokens(fxprune.load(path), prompt), _tokens(pruned, prompt))),
        user_unchanged=all(torch.equal(before[k], v) for k, v in model.state_dict().items()))
    if budget.metric == "latency":
        record["fxprune_share"] = round(report.predicted_latency_ms_after / report.predicted_latency_ms_before, 3)
        base, small = folder / f"{family}-base.onnx", folder / f"{family}-pruned.onnx"
        export_step(model, base, TOKENS)
        export_step(pruned, small, TOKENS)
        record["measured_share"] = round(statistics.median(shares([base, small], rounds, 30)[1]), 3)
    return record


def write_docs(records: list[dict]) -> None:
    lines = ["# Decoder families at FLOPs(0.5) and decode Latency(0.5) (issue 29)", "",
             f"Written by `python benchmarks/decoder_families.py` ({time.strftime('%Y-%m-%d')}, torch "
             f"{torch.__version__}, transformers {transformers.__version__}); see its docstring for the protocol. "
             f"Random weights, {LAYERS} layers, hidden 64, 4 query / 2 kv heads; onnxruntime CPU, 2 threads. "
             "measured: this script's own timing of both decode steps; generate: the same tokens as the masked "
             "reference (blank where the plan pruned a LayerNorm stream, which has none).", "",
             "| family | budget | returned | FLOPs share | fxprune's share | measured share | blocks removed "
             "| generate | save/load | user's model unchanged | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if "refused" in r:
            lines.append(f"| {r['family']} | {r['budget']} | refused: {r['refused']} | | | | | | | | {r['seconds']} |")
            continue
        lines.append(f"| {r['family']} | {r['budget']} | {r['returned']} | {r['flops_share']} | "
                     f"{r.get('fxprune_share', '')} | {r.get('measured_share', '')} | "
                     f"{', '.join(r['blocks_removed']) or 'none'} | "
                     f"{'' if r['generates_as_masked'] is None else r['generates_as_masked']} | {r['round_trip']} | "
                     f"{r['user_unchanged']} | {r['seconds']} |")
    (DOCS / "decoder_families.md").write_text("\n".join(lines) + "\n")
    (DOCS / "decoder_families.json").write_text(json.dumps(records, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="*", default=list(FAMILIES))
    parser.add_argument("--rounds", type=int, default=15, help="round-robin rounds of this script's timing")
    args = parser.parse_args()
    records = []
    with tempfile.TemporaryDirectory() as folder:
        for family in args.families:
            for budget in (fxprune.FLOPs(0.5), fxprune.Latency(0.5, phase="decode")):
                records.append(run_case(family, budget, Path(folder), args.rounds))
                print(json.dumps(records[-1]), flush=True)
    write_docs(records)


if __name__ == "__main__":
    main()
