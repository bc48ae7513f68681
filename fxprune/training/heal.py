"""Healing fine-tune: a pruned causal language model trained with its own loss, on one process or as one
replica of torch.distributed's DistributedDataParallel (each process its own batches)."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn

from fxprune.errors import HealError


def heal(model: nn.Module, batches: Iterable[torch.Tensor], steps: int, *, lr: float = 1e-3,
         weight_decay: float = 0.0, clip: float = 1.0) -> list[float]:
    """Train ``model`` (a Hugging Face causal LM: ``model(input_ids=..., labels=...).loss``) on ``steps``
    batches of token ids (AdamW, gradients clipped to ``clip``); returns each step's loss. Where
    torch.distributed is initialized, the model trains as a DistributedDataParallel replica (gradients
    averaged across processes, which must start from the same weights); ``model`` itself is trained."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise HealError(f"heal(steps={steps!r}): give the number of batches to train on (>= 1)")
    replica = nn.parallel.DistributedDataParallel(model) if dist.is_available() and dist.is_initialized() else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    losses: list[float] = []
    for ids in batches:
        if len(losses) == steps:
            break
        loss = replica(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        losses.append(float(loss.detach()))
    if len(losses) < steps:
        raise HealError(f"heal(steps={steps}) ran out of batches after {len(losses)}: give at least {steps}")
    model.eval()
    return losses
