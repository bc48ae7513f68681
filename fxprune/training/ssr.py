"""SSR: structured-sparsity regularization over fxprune's channel groups, solved with AULM.

    ssr = fxprune.SSR(model, example_inputs, optimizer=optimizer, strength=1e-3, penalty=1e-2, every=10)
    ... train as usual: the regularizer adds its gradient before every optimizer step ...
    small = ssr.compile()                       # removes the groups driven to zero, exactly
    small = ssr.compile(fxprune.Latency(0.5))   # or prunes to a budget, weakest rows first

Each channel of a prunable group is one *row*: everything that produces it, in every layer of the group
(filter rows, biases, norm scales and shifts), so coupled layers are regularized together. AULM
(SSR, IEEE TNNLS 2020; docs/architecture.md): an auxiliary F = W and a multiplier Y; the optimizer minimizes
L(W) + (rho/2)||W - F + Y/rho||^2; every K steps T = W + Y/rho, F = prox(T) row by row (group soft
threshold for L2,1, hard threshold for L2,0), Y += rho (W - F). Rows whose F is zero are the pruned
channels; ``compile`` sets their W to zero exactly and removes them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx
import torch.nn as nn

from fxprune.budgets import UserBudget, as_budget
from fxprune.errors import SSRError
from fxprune.ir.channels import Plan
from fxprune.passes.refine import check_refine
from fxprune.rules import TensorAxis
from fxprune.solvers.planner import with_every_member
from fxprune.training.live import LiveModel

NORMS = ("l21", "l20")


class SSR:
    """Structured-sparsity regularization (L2,1 or L2,0) over channel groups, by AULM."""

    def __init__(self, model: nn.Module, example_inputs: Any = None, *, optimizer: torch.optim.Optimizer | None = None,
                 strength: float = 1e-3, penalty: float = 1e-2, every: int = 10, norm: str = "l21",
                 leaf_modules=(), depth: bool = False) -> None:
        if norm not in NORMS:
            raise SSRError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
        for name, value in (("strength", strength), ("penalty", penalty)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise SSRError(f"{name} must be a positive number, got {value!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise SSRError(f"every must be a positive integer, got {every!r}")
        self.strength, self.penalty, self.every, self.norm = float(strength), float(penalty), every, norm
        self.live = LiveModel(model, example_inputs, leaf_modules, depth)  # depth: budgets may remove blocks
        self.rows: list[TensorAxis] = [a for a in self.live.axes if a.produces
                                          and self.live.groups[a.space.group_id].prunable]
        with torch.no_grad():
            self.auxiliary = {a.name: self.live.live(a.name).detach().clone() for a in self.rows}  # F
            self.multiplier = {a.name: torch.zeros_like(f) for a, f in zip(self.rows, self.auxiliary.values())}  # Y
        self.iterations = 0
        self.hooks = [optimizer.register_step_pre_hook(lambda *_: self.add_gradient()),
                      optimizer.register_step_post_hook(lambda *_: self.after_step())] if optimizer else []

    @torch.no_grad()
    def add_gradient(self) -> None:
        """The W-step's penalty: grad += rho (W - F + Y / rho)."""
        for axis in self.rows:
            weight = self.live.live(axis.name)
            term = self.penalty * (weight - self.auxiliary[axis.name]) + self.multiplier[axis.name]
            weight.grad = term if weight.grad is None else weight.grad.add_(term)

    def after_step(self) -> None:
        self.iterations += 1
        if self.iterations % self.every == 0:
            self.update()

    @torch.no_grad()
    def update(self) -> None:
        """AULM's F- and Y-steps: F = prox(W + Y/rho) row by row, then Y += rho (W - F)."""
        targets = {a.name: self.live.live(a.name) + self.multiplier[a.name] / self.penalty for a in self.rows}
        norms = self._row_norms(targets)
        if self.norm == "l21":  # group soft threshold
            scale = {gid: np.where(n > 0, np.maximum(n - self.strength / self.penalty, 0.0) / np.maximum(n, 1e-30), 0.0)
                     for gid, n in norms.items()}
        else:  # group hard threshold
            scale = {gid: (n > np.sqrt(2 * self.strength / self.penalty)).astype(np.float64)
                     for gid, n in norms.items()}
        for axis in self.rows:
            factor = _along(scale[axis.space.group_id][axis.space.channel_index], targets[axis.name], axis.dim)
            self.auxiliary[axis.name] = targets[axis.name] * factor
            self.multiplier[axis.name] += self.penalty * (self.live.live(axis.name) - self.auxiliary[axis.name])

    def _row_norms(self, tensors: dict[str, torch.Tensor]) -> dict[int, np.ndarray]:
        """The L2 norm of every channel's row (all it produces, in every layer of its group)."""
        squares = {gid: np.zeros(g.size) for gid, g in self.live.groups.items()}
        for axis in self.rows:
            tensor = tensors[axis.name].detach()
            per_position = (tensor.double() ** 2).movedim(axis.dim, 0).reshape(tensor.shape[axis.dim], -1).sum(1)
            assert axis.space.channel_index is not None  # the dependency pass grouped every space
            squares[axis.space.group_id] += np.bincount(axis.space.channel_index, weights=per_position.cpu().numpy(),
                                                        minlength=self.live.groups[axis.space.group_id].size)
        return {gid: np.sqrt(s) for gid, s in squares.items()}

    def zero_channels(self) -> dict[int, np.ndarray]:
        """Per prunable group: the channels whose auxiliary row F is exactly zero."""
        norms = self._row_norms(self.auxiliary)
        found = {}
        for gid, n in norms.items():
            group = self.live.groups[gid]
            zero = (n == 0) if group.fixed is None else (n == 0) & ~np.isin(np.arange(n.size), group.fixed)
            if group.prunable and zero.any():
                found[gid] = np.flatnonzero(zero)
        return found

    def plan(self, budget: UserBudget | float | None = None, *, solver: str = "sp_lamp", refine: int = 4,
             **cost_options) -> Plan:
        """Remove the zero rows (keeping one channel per member, as every plan must); with a budget, prune on
        to it, weakest rows first (``cost_options``: engine, threads, round_to, cache, as for compile; a
        latency budget through compile's closed loop, ``refine`` plans timed on the engine)."""
        check_refine(refine, SSRError)
        masks = {gid: np.ones(g.size, dtype=bool) for gid, g in self.live.groups.items()}
        for gid, channels in self.zero_channels().items():
            masks[gid][channels] = False
        plan = with_every_member(self.live.gm, {gid: np.flatnonzero(m) for gid, m in masks.items() if not m.all()})
        if budget is None:
            return plan
        budget = as_budget(budget)

        def solve() -> Plan:
            cost = self.live.cost_model(budget, **cost_options)
            norms = self._row_norms({a.name: self.live.live(a.name) for a in self.rows})
            kept = self.live.masks_of(plan)
            importance = {gid: np.where(kept[gid], norms[gid], 0.0) for gid in norms}
            try:
                return self.live.solve(budget.capacity(cost.baseline), importance, solver, refine).result.plan
            finally:
                self.live.close()

        return self.live.agreed(solve)

    @torch.no_grad()
    def compile(self, budget: UserBudget | float | None = None, **options) -> nn.Module:
        """Set the live weights of zero rows to exactly zero, then return the model without those channels
        (and, with a budget, pruned on to it): a new, smaller model (``LiveModel.compile``)."""
        masks = {gid: np.ones(g.size, dtype=bool) for gid, g in self.live.groups.items()}
        for gid, channels in self.zero_channels().items():
            masks[gid][channels] = False
        self.live.apply(masks)
        plan = self.plan(budget, **options)
        self.live.apply(self.live.masks_of(plan))
        return self.live.compile(plan)

    def remove_hooks(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []


def _along(values: np.ndarray, like: torch.Tensor, dim: int) -> torch.Tensor:
    """``values`` (one per position of axis ``dim``) shaped to broadcast against ``like``."""
    shape = [1] * like.dim()
    shape[dim] = -1
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).reshape(shape)


