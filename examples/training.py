"""The training loop the examples share: SGD with momentum, cosine learning rate, optional DDP.

``callback(iteration)`` runs after every optimizer step: that is where ``fxprune.Pruner.step`` goes.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler


def loader(dataset, batch_size: int, train: bool, seed: int = 0, workers: int = 0) -> DataLoader:
    """A DataLoader, sharded across ranks when torch.distributed is running."""
    sharded = dist.is_available() and dist.is_initialized()
    sampler = DistributedSampler(dataset, shuffle=train, seed=seed) if sharded else None
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
                      generator=generator, num_workers=workers,
                      drop_last=train and len(dataset) > batch_size)  # a set smaller than a batch is one batch


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 5e-4) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)


def train(model: nn.Module, data: DataLoader, optimizer: torch.optim.Optimizer, epochs: int, *, lr: float,
          callback: Callable[[int], None] | None = None, device: str = "cpu") -> float:
    """Train for ``epochs`` with a cosine schedule from ``lr``; returns the last epoch's mean loss."""
    total = max(1, epochs * len(data))
    iteration, loss_sum, count = 0, 0.0, 0
    model.train()
    for epoch in range(epochs):
        if isinstance(getattr(data, "sampler", None), DistributedSampler):
            data.sampler.set_epoch(epoch)
        loss_sum, count = 0.0, 0
        for x, y in data:
            for group in optimizer.param_groups:
                group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * iteration / total))
            loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            iteration += 1
            loss_sum, count = loss_sum + loss.item(), count + 1
            if callback is not None:
                callback(iteration)
    return loss_sum / max(count, 1)


@torch.no_grad()
def accuracy(model: nn.Module, data: DataLoader, device: str = "cpu") -> float:
    """Top-1 accuracy (summed over ranks under torch.distributed)."""
    model.eval()
    correct = seen = 0
    for x, y in data:
        correct += int((model(x.to(device)).argmax(1) == y.to(device)).sum())
        seen += len(y)
    if dist.is_available() and dist.is_initialized():
        counts = torch.tensor([correct, seen], dtype=torch.float64)
        dist.all_reduce(counts)
        correct, seen = counts.tolist()
    return correct / max(seen, 1)
