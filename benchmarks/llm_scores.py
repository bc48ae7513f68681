"""How SP-LAMP values width against depth on benchmarks/llm.py's base model (docs/llm.md's note on where the
default loses).

    python benchmarks/llm_scores.py            # writes docs/llm_scores.md

The base model (llm.py's, from its cache or trained as it trains it) is analysed on 128 held-out bytes and
scored by the score pass (SP-LAMP). Per prunable group: its size, members, total score, and the share of the
total its best half of channels holds (what halving it keeps). Per removable block: its residual share and
its channels' total score, the value the planner weighs by that share over the median block's (at most 1).
"""

from __future__ import annotations

import time
from pathlib import Path

import llm  # this folder's scripts run as scripts
import numpy as np
import torch

import fxprune
from fxprune.ir.keys import IMPORTANCE_KEY
from fxprune.passes.pipeline import analyze_inputs
from fxprune.passes.score import ScorePass

DOCS = Path(__file__).resolve().parent.parent / "docs"


def main() -> None:
    train, validation = llm.corpus()
    model, _ = llm.base_model(train, validation, 1500)  # llm.py's --train-steps default
    gm, _ = analyze_inputs(model, {"input_ids": validation[:128].long().unsqueeze(0)})
    ScorePass()(gm)
    scores = gm.meta[IMPORTANCE_KEY].scores
    lines = ["# SP-LAMP's values of width and depth on the LLM benchmark's base model", "",
             f"Written by `python benchmarks/llm_scores.py` ({time.strftime('%Y-%m-%d')}, torch {torch.__version__}); "
             "see its docstring.", "", "| group | size | members | total score | best half's share |",
             "|---|---|---|---|---|"]
    for group in fxprune.analysis(gm).prunable_groups():
        ranked = np.sort(scores[group.id])[::-1]
        lines.append(f"| {group.id} | {group.size} | {len(group.members)} | {ranked.sum():.2f} | "
                     f"{ranked[: group.size // 2].sum() / ranked.sum():.3f} |")
    blocks, _ = fxprune.blocks(gm)
    median = float(np.median([b.share for b in blocks]))
    lines += ["", "| block | groups | residual share | channels' total score | weighed (share / median, at most 1) |",
              "|---|---|---|---|---|"]
    for block in blocks:
        total = sum(float(scores[g].sum()) for g in block.groups)
        lines.append(f"| {block.module} | {', '.join(map(str, block.groups))} | {block.share:.3f} | {total:.2f} | "
                     f"{total * min(1.0, block.share / median):.2f} |")
    (DOCS / "llm_scores.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
