"""HALP's schedule in the user's own training loop: prune a little every N iterations, keep training.

    pruner = fxprune.Pruner(model, fxprune.Latency(0.5), example_inputs, optimizer=optimizer, steps=30)
    for iteration, (x, y) in enumerate(loader):
        loss_fn(model(x), y).backward()
        optimizer.step()               # the pruner reads the gradients before, and re-zeroes pruned channels after
        optimizer.zero_grad()
        if (iteration + 1) % 40 == 0 and not pruner.done:
            pruner.step()              # latency target t of T: exp((t/T) log L_target + (1 - t/T) log L0)
    small = pruner.compile()           # a new, physically smaller copy of the model (its own class)

Importance is HALP's Taylor score accumulated between steps (or any data-free criterion, from the
current weights). Every step solves HALP's augmented knapsack (or SP-LAMP's) against the cost model
of ``fxprune.compile``, with the latency tables measured once at the start. A latency schedule is in
shares of the model as the engine runs it: each target is read through the tables' correction by the
two whole models the latency pass timed (``passes/refine.py``), and the last step runs compile's closed
loop (``refine`` plans timed on the engine), so the model compiled meets the budget as measured, not
only as the tables predict. With ``depth=True`` a step may remove whole residual blocks (the same knapsack
as ``compile(..., depth=True)``): their last layer is zeroed and stays zero. Under DDP the gradients
the scores come from are already averaged across ranks; rank 0 solves and broadcasts the masks, so
every rank holds the same ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx
import torch.nn as nn

from fxprune.budgets import UserBudget, as_budget
from fxprune.errors import PrunerError
from fxprune.ir.channels import Plan
from fxprune.ir.keys import IMPORTANCE_KEY
from fxprune.passes.refine import Correction, calibration_points, check_refine
from fxprune.passes.score import CRITERIA, ScorePass, TaylorAccumulator
from fxprune.solvers.planner import nearest_plan
from fxprune.training.live import BLOCKS, LiveModel, rank


@dataclass
class PruneStep:
    """What one step did: its target on the budget's metric, the plan's predicted cost (for latency: in
    the engine's ms as the tables' correction reads it, or as timed), channels kept."""

    step: int
    target: float
    predicted: float
    kept: int
    timed: bool = False  # the plan was timed on the engine (a latency budget's last step, refine > 0)


def geometric_targets(start: float, end: float, steps: int) -> list[float]:
    """HALP's schedule: L_t = exp((t/T) log end + (1 - t/T) log start) for t = 1..T."""
    return [math.exp((t / steps) * math.log(end) + (1 - t / steps) * math.log(start)) for t in range(1, steps + 1)]


class Pruner:
    """Prune ``model`` to ``budget`` over ``steps`` steps while the user trains it (HALP)."""

    def __init__(self, model: nn.Module, budget: UserBudget | float, example_inputs: Any = None, *, steps: int = 30,
                 optimizer: torch.optim.Optimizer | None = None, importance: str = "taylor", solver: str = "halp",
                 engine: Any = "onnxruntime", threads: int | None = None, round_to: int | None = None,
                 cache: Any = None, progress: bool = False, leaf_modules=(), refine: int = 4,
                 depth: bool = False) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise PrunerError(f"steps must be a positive integer, got {steps!r}")
        check_refine(refine, PrunerError)
        if importance not in CRITERIA:
            raise PrunerError(f"unknown importance {importance!r}; choose one of {', '.join(CRITERIA)}")
        self.budget, self.steps, self.importance, self.solver = as_budget(budget), steps, importance, solver
        self.refine = refine
        self.correction: Correction | None = None  # a latency budget's: tables' share -> measured share
        self.live = LiveModel(model, example_inputs, leaf_modules, depth)
        self.taylor = TaylorAccumulator(self.live.gm, self.live.live) if importance == "taylor" else None
        self.plan = Plan({})
        self.masks = self.live.masks_of(self.plan)
        self.history: list[PruneStep] = []
        self._scores_seen: dict[int, np.ndarray] | None = None
        self.passes_read = 0  # backward passes whose gradients the Taylor score has read
        self.targets: list[float] = []
        if rank() == 0:  # the cost model is needed where the plan is solved
            self.cost = self.live.cost_model(self.budget, engine, threads, round_to, cache, progress)
            self.targets = geometric_targets(self.cost.baseline, self.budget.capacity(self.cost.baseline), steps)
            if self.budget.metric == "latency":
                self.correction = Correction(calibration_points(self.live.gm, self.cost))
        self.hooks = [optimizer.register_step_pre_hook(lambda *_: self.accumulate()),
                      optimizer.register_step_post_hook(lambda *_: self.apply_masks())] if optimizer else []

    @property
    def done(self) -> bool:
        return len(self.history) >= self.steps

    def accumulate(self) -> None:
        """Read the gradients of the backward pass just done (before the optimizer step)."""
        if self.taylor is not None and not self.done:
            self.taylor.add()
            self.passes_read += 1

    def apply_masks(self) -> None:
        """Zero the pruned channels again (after every optimizer step)."""
        self.live.apply(self.masks)

    def step(self) -> Plan:
        """Prune to the next target of the schedule; returns the plan (the same on every rank)."""
        if self.done:
            raise PrunerError(f"the pruner has done all its {self.steps} steps; call pruner.compile()")
        if self.taylor is not None and self.passes_read == 0:
            raise PrunerError("no gradients were read yet: pass optimizer= to Pruner, or call "
                              "pruner.accumulate() after loss.backward()")
        index = len(self.history)
        solved: list[tuple[float, bool]] = []

        def solve() -> Plan:
            plan, predicted, timed = self._solve(self.targets[index], last=index == self.steps - 1)
            solved.append((predicted, timed))
            return plan

        self.plan = self.live.agreed(solve)
        self.masks = self.live.masks_of(self.plan)
        kept = int(sum(m.sum() for gid, m in self.masks.items() if gid != BLOCKS))
        target = self.targets[index] if self.targets else float("nan")  # known where the plan is solved: rank 0
        predicted, timed = solved[0] if solved else (float("nan"), False)
        self.history.append(PruneStep(index + 1, target, predicted, kept, timed))
        if index + 1 == self.steps:  # the last step: no solve follows, the deployed analysed model goes
            self.live.close()
        if self.taylor is not None:
            self.taylor.reset()
        self.apply_masks()
        return self.plan

    def _solve(self, target: float, last: bool) -> tuple[Plan, float, bool]:
        """The plan for ``target``, its predicted cost, and whether it was timed on the engine."""
        scores = self._scores()
        importance = {gid: np.where(self.masks[gid], scores[gid], 0.0) for gid in scores}  # pruned channels stay last
        solve = lambda capacity: self.live.solve(capacity, importance, self.solver).result  # noqa: E731
        if self.correction is None:
            result = solve(target)
            return result.plan, result.predicted_cost, False
        baseline = self.cost.baseline
        if last and self.refine:
            measured = self.live.solve(target, importance, self.solver, self.refine).measured_solve
            assert measured is not None  # a latency budget with refine > 0 runs the closed loop
            return measured.result.plan, measured.predicted_share * baseline, measured.measured
        # the target as the engine runs it, in the tables' terms; under the tables' reach, the smallest plan
        result = nearest_plan(solve, self.correction.predicted_share(target / baseline) * baseline)
        return result.plan, self.correction.measured_share(result.predicted_cost / baseline) * baseline, False

    def _scores(self) -> dict[int, np.ndarray]:
        if self.taylor is not None:  # no new gradients since the last step: the scores of that step again
            if self.taylor.count:
                self._scores_seen = self.taylor.mean()
            assert self._scores_seen is not None  # step() runs once gradients were read
            return self._scores_seen
        state = {name: value.detach().cpu() for name, value in self.live.module.state_dict().items()}
        self.live.gm.load_state_dict(state, strict=False)
        ScorePass(self.importance)(self.live.gm)
        return self.live.gm.meta[IMPORTANCE_KEY].scores

    def compile(self) -> nn.Module:
        """The model as trained so far, with the pruned channels removed: a new, smaller model
        (``LiveModel.compile``)."""
        return self.live.compile(self.plan)

    def remove_hooks(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
