"""Decoder LLM pruning at equal measured decode latency, judged by validation perplexity (issue 29).

    python benchmarks/llm.py                      # every case not yet in docs/llm.json; writes docs/llm.md
    python benchmarks/llm.py --again              # time and heal every case again (the base model is kept)
    python benchmarks/llm.py --from-docs          # only rewrite docs/llm.md and its plot from docs/llm.json

The corpus is the source of Python's standard library (every ``.py`` file of this interpreter's stdlib,
bytes as tokens; a file is held out for validation when the CRC32 of its relative path is 0 mod 10). A
small Llama-style decoder (grouped-query attention) is trained here from scratch once and cached; its
validation perplexity is reported beside a unigram model's. Each method then prunes it to a decode-latency
budget: one new token with a key-value cache of ``--tokens`` tokens at batch 1, timed by this script (not by
fxprune) in onnxruntime: each model's decode step (``fxprune.huggingface.DecodeStep``) exported, then
round-robin rounds against the unpruned model's, a low quantile of each model's calls per round, the median
of per-round ratios. Methods:

- ``fxprune``: ``fxprune.compile(model, Latency(b, phase="decode"))``, its default (SP-LAMP, kv heads and the
  query heads under each, MLP, hidden size and blocks in one plan, closed loop on onnxruntime);
  ``fxprune-width``: the same, ``depth=False``; ``fxprune-depth``: ``depth="only"`` (whole blocks, widths kept);
- ``torch-pruning``: Torch-Pruning's MetaPruner as its LLM
  example uses it (magnitude, GQA-aware head pruning, one ratio for every layer), the ratio bisected until
  this script's timing meets the budget;
- ``uniform``: every prunable group of fxprune's analysis kept at one share, bisected alike;
- ``shortgpt``: whole decoder layers dropped in order of block influence (1 - cosine of each layer's input
  and output on training text), as few as this script's timing needs;
- ``unpruned`` (with ``--budgets 1``): the base model itself, healed alike: what the healing alone buys.

Validation perplexity one-shot, after a short healing fine-tune and after a longer one (``fxprune.heal``,
``--seeds`` seeds of the healing batches); paired differences per seed.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sysconfig
import time
import zlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import transformers
from returned_latency import round_robin_ratios  # this folder's scripts run as scripts

import fxprune
from fxprune.huggingface import DecodeStep, Prefill
from fxprune.modules import Skip
from fxprune.passes.pipeline import analyze_inputs
from fxprune.passes.shrink import shrink_model
from fxprune.solvers.planner import uniform_plan

DOCS = Path(__file__).resolve().parent.parent / "docs"
RESULTS = DOCS / "llm.json"
CACHE = Path.home() / ".cache" / "fxprune-benchmarks" / "llm"
CONFIG = dict(vocab_size=256, hidden_size=192, intermediate_size=512, num_hidden_layers=6, num_attention_heads=6,
              num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
METHODS = ("fxprune", "fxprune-width", "fxprune-depth", "fxprune-mlp", "fxprune-heads", "fxprune-hidden",
           "torch-pruning", "uniform", "shortgpt", "unpruned")
DEPTH = {"fxprune": True, "fxprune-depth": "only"}  # the rest: widths only
# each width axis alone: fxprune.compile(..., depth=False, keep=...) keeps the other axes' channels
AXIS_KEEP = {"fxprune-mlp": ["model.layers.*.self_attn.[qkv]_proj", "model.embed_tokens"],
             "fxprune-heads": ["model.layers.*.mlp.gate_proj", "model.layers.*.mlp.up_proj", "model.embed_tokens"],
             "fxprune-hidden": ["model.layers.*.self_attn.[qkv]_proj", "model.layers.*.mlp.gate_proj",
                                "model.layers.*.mlp.up_proj"]}
# Torch-Pruning 1.6 groups a transformers 5 LlamaForCausalLM only when traced without the key-value cache and
# with eager attention (see ``torch_pruning``): without them its grouping never returned (570 s, 2 layers).
DEFAULT_METHODS = ("fxprune", "fxprune-width", "torch-pruning", "uniform", "shortgpt")
LENGTH, BATCH = 128, 16  # training and healing windows


# --- data ---------------------------------------------------------------------------------------------
def corpus() -> tuple[torch.Tensor, torch.Tensor]:
    """The standard library's source as bytes: (train, validation), split by file."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, validation = [], []
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        held_out = zlib.crc32(str(path.relative_to(root)).encode()) % 10 == 0
        (validation if held_out else train).append(data)
    return tuple(torch.frombuffer(bytearray(b"\n\n".join(parts)), dtype=torch.uint8) for parts in (train, validation))


def batches(data: torch.Tensor, seed: int, batch: int = BATCH, length: int = LENGTH):
    """Random windows of ``data``, forever."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, data.numel() - length - 1, (batch,), generator=generator)
        yield torch.stack([data[s: s + length] for s in starts.tolist()]).long()


def perplexity(model: torch.nn.Module, validation: torch.Tensor, windows: int = 96, length: int = 256) -> float:
    """exp of the mean next-byte loss over fixed validation windows."""
    starts = torch.linspace(0, validation.numel() - length - 1, windows).long().tolist()
    losses = []
    model.eval()
    with torch.no_grad():
        for chunk in range(0, windows, 16):
            ids = torch.stack([validation[s: s + length] for s in starts[chunk: chunk + 16]]).long()
            losses.append(float(model(input_ids=ids, labels=ids).loss) * len(ids))
    return math.exp(sum(losses) / windows)


def unigram_perplexity(train: torch.Tensor, validation: torch.Tensor) -> float:
    counts = torch.bincount(train.long(), minlength=256).double() + 1
    log_p = (counts / counts.sum()).log()
    return math.exp(-float(log_p[validation.long()].mean()))


# --- the base model -----------------------------------------------------------------------------------
def base_model(train: torch.Tensor, validation: torch.Tensor, steps: int) -> tuple[torch.nn.Module, dict]:
    """The decoder trained here from scratch (cached in ``CACHE/base``)."""
    folder = CACHE / f"base-{steps}"
    record_file = folder / "record.json"
    if record_file.exists():
        return transformers.LlamaForCausalLM.from_pretrained(folder).eval(), json.loads(record_file.read_text())
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    start, data = time.time(), batches(train, seed=12345)
    model.train()
    for step in range(steps):
        ids = next(data)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 200 == 0:
            print(f"  base step {step}: loss {float(loss):.3f}", flush=True)
    model.eval()
    record = {"steps": steps, "train_seconds": round(time.time() - start), "params": fxprune.count_params(model),
              "validation_perplexity": perplexity(model, validation),
              "unigram_perplexity": unigram_perplexity(train, validation),
              "train_bytes": train.numel(), "validation_bytes": validation.numel()}
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    record_file.write_text(json.dumps(record, indent=1))
    return model, record


# --- timing (this script's own) ------------------------------------------------------------------------
def export_step(model: torch.nn.Module, path: Path, tokens: int, phase: str = "decode") -> None:
    """The decode step (one token, a cache of ``tokens``) or the prefill (``tokens`` tokens) as ONNX."""
    if phase == "decode":
        module, length = DecodeStep(model, tokens, 1).eval(), 1
    else:
        module, length = Prefill(model, ["input_ids"]).eval(), tokens
    ids = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(1))
    fxprune.export_onnx(module, path, (ids,), dynamic_batch=False, dynamic_sizes=False, verify=False)


def _session(path: Path):
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    shape = [d if isinstance(d, int) else 1 for d in session.get_inputs()[0].shape]
    feed = {session.get_inputs()[0].name: np.full(shape, 7, dtype=np.int64)}
    return lambda: session.run(None, feed)


def shares(paths: list[Path], rounds: int, calls: int) -> list[list[float]]:
    """Per model, its per-round ratios to ``paths[0]`` (each round: every model's 20% quantile of ``calls``)."""
    runners = [_session(p) for p in paths]
    for run in runners:
        for _ in range(5):
            run()
    return round_robin_ratios(runners, rounds, calls)


class Timer:
    """Shares of the base model's decode step, timed here."""

    def __init__(self, base: torch.nn.Module, tokens: int, folder: Path, phase: str = "decode") -> None:
        self.tokens, self.folder, self.count, self.phase = tokens, folder, 0, phase
        self.base = folder / f"base-{phase}.onnx"
        export_step(base, self.base, tokens, phase)

    def export(self, model: torch.nn.Module) -> Path:
        self.count += 1
        path = self.folder / f"m{self.count}-{time.time_ns()}.onnx"
        export_step(model, path, self.tokens, self.phase)
        return path

    def share(self, model: torch.nn.Module, rounds: int = 5, calls: int = 30) -> float:
        return statistics.median(shares([self.base, self.export(model)], rounds, calls)[1])


# --- methods -------------------------------------------------------------------------------------------
def torch_pruning(model: torch.nn.Module, ratio: float, example: torch.Tensor) -> torch.nn.Module:
    """Torch-Pruning's LLM example: MetaPruner, group magnitude, GQA-aware head pruning, one ratio.

    Two settings of the traced forward only, so that Torch-Pruning 1.6 sees the graph its example saw on the
    transformers of its time (what it prunes is its own choice, unchanged):

    - ``use_cache=False``: since transformers 4.56 a forward without a cache still fills a new DynamicCache
      with ``torch.cat([empty, keys], dim=-2)``. Torch-Pruning reads that cat as a channel concat (the grad
      node keeps dim -2 as 2**64 - 2, past its other-dim guard), rotate_half's cat then gets channel offsets
      and the group walk shifts the indices by one concat input's width at each turn of the loop, never
      meeting an index list it has seen: ``get_all_groups`` never returns.
    - eager attention: Torch-Pruning finds grouped-query attention by ``repeat_kv``'s expand, which the SDPA
      path no longer runs (``enable_gqa=True``): the heads' importance cannot be reshaped (``shape '[6, -1]'
      is invalid for input of size 64``). The model's own implementation is set back afterwards.

    With GQA, Torch-Pruning keeps every kv head and removes query heads evenly from the kv groups; where that
    would leave one query head per kv head, or none (ratio above 1/3 here), it prunes no head in that layer,
    but still counts them as pruned in ``pruner.num_heads``: the sizes below are read from the weights."""
    import torch_pruning as tp

    model = copy.deepcopy(model)
    implementation = model.config._attn_implementation
    model.set_attn_implementation("eager")
    num_heads = {}
    for name, module in model.named_modules():
        if name.endswith("self_attn"):
            num_heads[module.q_proj] = model.config.num_attention_heads
            num_heads[module.k_proj] = model.config.num_key_value_heads
            num_heads[module.v_proj] = model.config.num_key_value_heads
    pruner = tp.pruner.MetaPruner(
        model, example_inputs={"input_ids": example, "use_cache": False},
        importance=tp.importance.GroupMagnitudeImportance(p=2), global_pruning=False,
        output_transform=lambda out: out.logits, pruning_ratio=ratio, ignored_layers=[model.lm_head],
        num_heads=num_heads, prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio, round_to=4)
    pruner.step()
    model.set_attn_implementation(implementation)
    # the example's updates after pruning, for transformers 5's attention (it keeps head_dim, not num_heads)
    config = model.config
    attentions = [m for name, m in model.named_modules() if name.endswith("self_attn")]
    for attention in attentions:
        attention.num_key_value_groups = attention.q_proj.out_features // attention.k_proj.out_features
    (config.num_attention_heads, config.num_key_value_heads), = {  # one ratio: the same in every layer
        (a.q_proj.out_features // a.head_dim, a.k_proj.out_features // a.head_dim) for a in attentions}
    config.head_dim = attentions[0].head_dim  # else the config derives it from the pruned hidden size
    config.hidden_size = model.lm_head.in_features
    config.intermediate_size = model.model.layers[0].mlp.gate_proj.out_features
    return model


def uniform(model: torch.nn.Module, keep: float, example: torch.Tensor) -> torch.nn.Module:
    gm, _ = analyze_inputs(model, {"input_ids": example})
    return shrink_model(model, gm, uniform_plan(gm, keep))


def block_influence(model: torch.nn.Module, train: torch.Tensor) -> list[float]:
    """ShortGPT's block influence of each decoder layer: 1 - the mean cosine of its input and output."""
    seen: dict[int, list[float]] = {}
    hooks = [layer.register_forward_hook(
        lambda module, args, kwargs, out, index=index: seen.setdefault(index, []).append(float(
            torch.nn.functional.cosine_similarity(args[0] if args else kwargs["hidden_states"],
                                                  out[0] if isinstance(out, tuple) else out, dim=-1).mean())),
        with_kwargs=True) for index, layer in enumerate(model.model.layers)]
    data = batches(train, seed=999)
    with torch.no_grad():
        for _ in range(4):
            model(input_ids=next(data))
    for hook in hooks:
        hook.remove()
    return [1 - statistics.mean(seen[i]) for i in range(len(model.model.layers))]


def shortgpt(model: torch.nn.Module, count: int, influence: list[float]) -> torch.nn.Module:
    model = copy.deepcopy(model)
    for index in sorted(range(len(influence)), key=influence.__getitem__)[:count]:
        model.model.layers[index] = Skip()
    return model


def bisect(build, timer: Timer, budget: float, low: float = 0.0, high: float = 0.95, steps: int = 6):
    """The smallest pruning amount in [low, high] whose model this script times within ``budget``
    (``build(amount)``: amount 0 is the base model); returns (model, amount, share)."""
    best = None
    for _ in range(steps):
        middle = (low + high) / 2
        candidate = build(middle)
        share = timer.share(candidate)
        if share <= budget:
            best, high = (candidate, middle, share), middle
        else:
            low = middle
    if best is None:
        candidate = build(high)
        share = timer.share(candidate)
        if share > budget:  # recorded as refused, as a method refusing a budget is
            raise OutOfReach(f"out of reach: its most pruned model (amount {high}) measured {share:.3f}")
        best = (candidate, high, share)
    return best


class OutOfReach(Exception):
    """A bisected method whose most pruned model this script times over the budget."""


def _attentions(model) -> list:
    """The attention modules a pruned model kept (a removed block's is gone)."""
    return [m for m in model.modules() if hasattr(m, "num_key_value_groups")]


def prune(method: str, base, budget: float, timer: Timer, example: torch.Tensor, train, influence) -> tuple:
    """The method's model at ``budget`` and how it got there."""
    start = time.time()
    if method.startswith("fxprune"):
        latency = (fxprune.Latency(budget, phase="decode", tokens=timer.tokens, batch=1) if timer.phase == "decode"
                   else fxprune.Latency(budget, phase="prefill"))
        pruned = fxprune.compile(base, latency, {"input_ids": example}, depth=DEPTH.get(method, False),
                                 keep=AXIS_KEEP.get(method, ()), progress=False, cache=CACHE / "latency-cache")
        report = fxprune.report(pruned)
        setting = {"fxprune_share": report.predicted_latency_ms_after / report.predicted_latency_ms_before,
                   "returned": report.returned, "blocks_removed": len(fxprune.plan_of(pruned).drop),
                   "heads": [a.q_proj.out_features // a.head_dim for a in _attentions(pruned)],
                   "kv_heads": [a.k_proj.out_features // a.head_dim for a in _attentions(pruned)]}
    elif method == "torch-pruning":
        pruned, ratio, _ = bisect(lambda r: torch_pruning(base, r, example), timer, budget)
        setting = {"ratio": ratio}
    elif method == "unpruned":  # the base model healed alike: what the healing alone buys (give --budgets 1)
        pruned, setting = copy.deepcopy(base), {}
    elif method == "uniform":
        pruned, amount, _ = bisect(lambda a: uniform(base, 1 - a, example), timer, budget)
        setting = {"keep": 1 - amount}
    else:
        layers = len(base.model.layers)
        count = next((k for k in range(layers) if timer.share(shortgpt(base, k, influence)) <= budget), layers - 1)
        pruned, setting = shortgpt(base, count, influence), {"layers_dropped": count}
    setting["seconds"] = round(time.time() - start)
    return pruned, setting


# --- a case: prune, time, heal, evaluate -----------------------------------------------------------------
def run_case(method: str, budget: float, base, train, validation, timer: Timer, args, influence) -> dict:
    example = next(batches(train, seed=7, batch=1, length=args.tokens))
    try:
        pruned, setting = prune(method, base, budget, timer, example, train, influence)
    except (fxprune.BudgetError, OutOfReach) as error:  # the budget is out of the method's reach
        print(f"  {method} at {budget}: refused: {error}", flush=True)
        return {"method": method, "budget": budget, "phase": timer.phase, "refused": str(error)}
    record = {"method": method, "budget": budget, "phase": timer.phase, **setting,
              "params": fxprune.count_params(pruned), "one_shot": perplexity(pruned, validation), "short": [],
              "long": []}
    record["path"] = str(timer.export(pruned))  # timed with every method's model of this budget at the end
    for seed in range(args.seeds):
        healed = copy.deepcopy(pruned)
        data = batches(train, seed=1000 + seed)
        fxprune.heal(healed, data, steps=args.short, lr=1e-3)
        record["short"].append(perplexity(healed, validation))
        fxprune.heal(healed, data, steps=args.long - args.short, lr=1e-3)
        record["long"].append(perplexity(healed, validation))
    print(f"  {method} at {budget}: {json.dumps({k: v for k, v in record.items() if k != 'path'})}", flush=True)
    return record


def final_shares(records: list[dict], timer: Timer, rounds: int, calls: int) -> None:
    """Every model of one budget and phase timed together against the base, round-robin."""
    for budget in sorted({r["budget"] for r in records}):
        group = [r for r in records if r["budget"] == budget and _phase(r) == timer.phase and r.get("path")
                 and Path(r["path"]).exists()]
        if not group:
            continue
        ratios = shares([timer.base] + [Path(r["path"]) for r in group], rounds, calls)
        for record, per_round in zip(group, ratios[1:]):
            record["share"] = statistics.median(per_round)
            record["share_quartiles"] = [float(np.quantile(per_round, q)) for q in (0.25, 0.75)]


# --- the report ----------------------------------------------------------------------------------------
def _phase(record: dict) -> str:
    return record.get("phase", "decode")  # the first run timed the decode step only


PHASE_WORDS = {"decode": "one token, a key-value cache of {tokens} tokens, batch 1",
               "prefill": "a forward over {tokens} tokens, batch 1 (no cache kept)"}


def write_docs(state: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = state["base"]
    lines = ["# Decoder LLM pruning at equal measured latency, decode and prefill (issue 29)", "",
             "Written by `python benchmarks/llm.py` (see its docstring for the protocol). Base model: a "
             f"Llama-style decoder ({CONFIG['num_hidden_layers']} layers, hidden {CONFIG['hidden_size']}, "
             f"{CONFIG['num_attention_heads']} query / {CONFIG['num_key_value_heads']} kv heads, MLP "
             f"{CONFIG['intermediate_size']}; {base['params']:,} parameters) trained here for {base['steps']} steps "
             f"({base['train_seconds']} s) on the standard library's source ({base['train_bytes']:,} bytes; "
             f"{base['validation_bytes']:,} held out). Validation perplexity {base['validation_perplexity']:.2f} "
             f"per byte; a unigram model's {base['unigram_perplexity']:.2f}.", "",
             "Latency: onnxruntime CPU (2 threads), timed by this script: share = median over rounds of the model's "
             "20% quantile over the base model's (quartiles of the rounds beside it). Healing: "
             f"{state['short']} and {state['long']} steps of AdamW at 1e-3 on {BATCH}x{LENGTH}-byte windows, "
             "one seed of the batches per listed perplexity (mean, min-max over seeds where there are several). "
             "fxprune-mlp / -heads / -hidden: one width axis alone (depth off, the others kept with `keep=`); "
             "fxprune-depth: whole blocks alone (`depth=\"only\"`). Heads in the setting column: query/kv heads of "
             "each attention kept."]
    figure, plots = plt.subplots(1, 2, figsize=(11, 4))
    for phase, axes in zip(("decode", "prefill"), plots):
        records = [r for r in state["cases"] if _phase(r) == phase]
        if records:
            lines += _phase_section(phase, records, base, state["tokens"])
            _plot(axes, phase, records, base)
    lines += ["", "![perplexity at measured latency](llm.png)", "", *state.get("notes", [])]
    (DOCS / "llm.md").write_text("\n".join(lines) + "\n")
    figure.tight_layout()
    figure.savefig(DOCS / "llm.png", dpi=120)


def _phase_section(phase: str, records: list[dict], base: dict, tokens: int) -> list[str]:
    """One phase's table of cases and fxprune's paired differences against each other method."""
    lines = ["", f"## {phase.capitalize()}: {PHASE_WORDS[phase].format(tokens=tokens)}", "",
             "| budget | method | measured share (quartiles) | params | one-shot ppl | ppl after short heal | "
             "ppl after long heal | setting |", "|---|---|---|---|---|---|---|---|"]
    for record in sorted(records, key=lambda r: (r["budget"], METHODS.index(r["method"]))):
        if "refused" in record:
            lines.append(f"| {record['budget']} | {record['method']} | refused: {record['refused'][:160]} |"
                         " | | | | |")
            continue
        quartiles = record.get("share_quartiles", [float("nan")] * 2)
        setting = {k: v for k, v in record.items() if k in ("ratio", "keep", "layers_dropped", "blocks_removed",
                                                              "fxprune_share")}
        if "heads" in record:  # query heads / kv heads of each attention kept, as 3/1
            setting["heads"] = " ".join(f"{q}/{kv}" for q, kv in zip(record["heads"], record["kv_heads"])) or "none"
        said = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in setting.items())
        lines.append(f"| {record['budget']} | {record['method']} | {record.get('share', float('nan')):.3f} "
                     f"({quartiles[0]:.3f}-{quartiles[1]:.3f}) | {record['params'] / base['params']:.3f} | "
                     f"{record['one_shot']:.2f} | {_spread(record['short'])} | {_spread(record['long'])} | {said} |")
    lines += ["", f"fxprune's default against each other method, {phase}, paired per seed (long heal; negative: "
              "fxprune's perplexity is lower)", "", "| budget | against | mean difference | per seed |",
              "|---|---|---|---|"]
    for budget in sorted({r["budget"] for r in records}):
        ours = next((r for r in records if r["budget"] == budget and r["method"] == "fxprune"
                     and "refused" not in r), None)
        for other in (r for r in records if r["budget"] == budget and r["method"] != "fxprune"
                      and "refused" not in r):
            if ours is None:
                continue
            diffs = [a - b for a, b in zip(ours["long"], other["long"])]
            lines.append(f"| {budget} | {other['method']} | {statistics.mean(diffs):+.3f} | "
                         f"{', '.join(f'{d:+.3f}' for d in diffs)} |")
    return lines


def _plot(axes, phase: str, records: list[dict], base: dict) -> None:
    for method in METHODS:
        points = sorted((r.get("share", float("nan")), statistics.mean(r["long"])) for r in records
                        if r["method"] == method and "refused" not in r)
        if points:
            axes.plot(*zip(*points), marker="o", label=method)
    axes.axhline(base["validation_perplexity"], color="grey", linestyle=":", label="unpruned, not healed")
    axes.set_xlabel(f"{phase} latency, share of the unpruned model (this script's timing)")
    axes.set_ylabel("validation perplexity after the long heal")
    axes.legend(fontsize=7)


def _spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ({min(values):.2f}-{max(values):.2f})" if values else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    parser.add_argument("--train-steps", type=int, default=1500)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--short", type=int, default=50)
    parser.add_argument("--long", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--phase", choices=("decode", "prefill"), default="decode")
    parser.add_argument("--redo", action="store_true", help="run the listed methods and budgets again")
    parser.add_argument("--again", action="store_true")
    parser.add_argument("--from-docs", action="store_true")
    args = parser.parse_args()
    state = json.loads(RESULTS.read_text()) if RESULTS.exists() and not args.again else {"cases": []}
    if args.from_docs:
        write_docs(state)
        return
    torch.set_num_threads(2)
    train, validation = corpus()
    base, record = base_model(train, validation, args.train_steps)
    print(f"base: {record}", flush=True)
    state.update(base=record, tokens=args.tokens, short=args.short, long=args.long)
    influence = block_influence(base, train)
    state["block_influence"] = influence
    folder = CACHE / "decode-steps"  # kept until the final timing has read every case's file
    folder.mkdir(parents=True, exist_ok=True)
    timer = Timer(base, args.tokens, folder, args.phase)
    if args.redo:
        state["cases"] = [r for r in state["cases"] if not (r["method"] in args.methods and r["budget"] in args.budgets
                                                            and _phase(r) == args.phase)]
    done = {(r["method"], r["budget"], _phase(r)) for r in state["cases"]}
    for budget in args.budgets:
        for method in args.methods:
            if (method, budget, args.phase) in done:
                continue
            state["cases"].append(run_case(method, budget, base, train, validation, timer, args, influence))
            RESULTS.write_text(json.dumps(state, indent=1))
    fresh = [r for r in state["cases"] if r.get("path") and Path(r["path"]).exists()]
    final_shares(fresh, timer, args.rounds, args.calls)
    for record in state["cases"]:
        record.pop("path", None)
    RESULTS.write_text(json.dumps(state, indent=1))
    write_docs(state)


if __name__ == "__main__":
    main()
