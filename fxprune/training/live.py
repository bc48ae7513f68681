"""A model being trained, seen through fxprune's analysis: what training-time pruning shares.

The analysis runs on fxprune's own traced copy (``fxprune.analyze``); the training happens on the
user's model. Both name their parameters alike (fx keeps qualified names), which is how a channel group
maps to the live tensors the optimizer updates. Training-time methods write only those tensors' values
(zeroing pruned channels), never the model's structure; ``compile`` returns a new, smaller copy of the
user's model (its own class).
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.fx
import torch.nn as nn

from fxprune.budgets import Budget
from fxprune.errors import FxpruneError
from fxprune.ir.channels import Plan
from fxprune.ir.cost import CostModel
from fxprune.ir.solution import Solution
from fxprune.passes.budget import cost_of, solve_budget
from fxprune.passes.context import Context
from fxprune.passes.pipeline import analyze_inputs, called_like, cost_passes, infer_example_inputs, prune, run_passes
from fxprune.passes.verify import own_model
from fxprune.rules import TensorAxis
from fxprune.rules.params import parameter_axes
from fxprune.solvers.planner import analysis

BLOCKS = -1  # the key of the removable blocks' keep mask among the groups' (whose ids count from 0)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel wrappers."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class LiveModel:
    """The user's model (possibly DDP-wrapped) with fxprune's analysis of it."""

    def __init__(self, model: nn.Module, example_inputs: Any, leaf_modules=(), depth: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise FxpruneError(f"expected a torch.nn.Module, got {type(model).__name__}")
        self.module = unwrap(model)
        if example_inputs is None:
            example_inputs = infer_example_inputs(self.module)
        device = next(self.module.parameters()).device
        # fxprune analyses a copy on the CPU: example inputs there, the live model wherever it trains. A model
        # captured by torch.export names its parameters as the live model does too (masks go by those names).
        on_cpu = torch.utils._pytree.tree_map(lambda x: x.detach().cpu() if isinstance(x, torch.Tensor) else x,
                                              example_inputs)
        self.call_inputs = on_cpu  # as the model is called (own_model verifies the pruned copy on them)
        self.gm, self.example_inputs = analyze_inputs(self.module, on_cpu, leaf_modules=leaf_modules)
        self.gm.to("cpu")
        self.device = device
        self.groups = analysis(self.gm).groups
        self.blocks = analysis(self.gm).blocks if depth else []  # removable blocks the plans may remove
        self.params = dict(self.module.named_parameters())
        self._every_name = dict(self.module.named_parameters(remove_duplicate=False))  # tied weights too
        self.axes: list[TensorAxis] = [a for a in parameter_axes(self.gm) if a.name in self.params]
        self.context: Context | None = None  # cost_model's, kept for the solves after it
        self.round_to: int | None = None
        self.cost: CostModel | None = None

    def live(self, name: str) -> torch.Tensor:
        return self._every_name[name]

    def masks_of(self, plan: Plan) -> dict[int, np.ndarray]:
        """Per group, which channels ``plan`` keeps; under ``BLOCKS``, which removable blocks it keeps."""
        masks = {gid: np.ones(g.size, dtype=bool) for gid, g in self.groups.items()}
        for gid, kept in plan.keep.items():
            masks[gid] = np.isin(np.arange(self.groups[gid].size), kept)
        if self.blocks:
            masks[BLOCKS] = ~np.isin(np.arange(len(self.blocks)), plan.drop)
        return masks

    @torch.no_grad()
    def apply(self, masks: dict[int, np.ndarray]) -> None:
        """Zero, in the live parameters, every position of a channel the masks remove, and the last layer of
        every block they remove (its branch then computes zero, as the masked reference does)."""
        for block in (b for b, keep in zip(self.blocks, masks.get(BLOCKS, ())) if not keep):
            for name in block.zeroed:
                self.params[name].zero_()
        for axis in self.axes:
            keep = masks[axis.space.group_id]
            if keep.all():
                continue
            removed = np.flatnonzero(~keep[axis.space.channel_index])
            if removed.size:
                tensor = self.params[axis.name]
                tensor.index_fill_(axis.dim, torch.as_tensor(removed, device=tensor.device), 0.0)

    def cost_model(self, budget: Budget, engine: Any = "onnxruntime", threads: int | None = None,
                   round_to: int | None = None, cache: Any = None, progress: bool = False) -> CostModel:
        """The cost model of ``budget``'s metric, by compile's cost passes (``cost_passes``: the cost pass, and
        the latency pass's tables, measured or loaded), over the one Context this model keeps for its solves
        (made here; ``close`` releases it).
        ``round_to`` as for ``fxprune.compile`` (default: the engine's step, else 8 channels)."""
        self.close()
        self.context = Context(self.example_inputs, engine, threads=threads, cache=cache, progress=progress,
                               check=budget.metric == "latency")
        self.round_to = round_to
        run_passes(self.gm, cost_passes(self.context, budget, round_to))
        self.cost = cost_of(self.gm, budget.metric)
        return self.cost

    def solve(self, capacity: float, importance: dict[int, np.ndarray], solver: str, refine: int = 0) -> Solution:
        """The best plan under ``capacity`` of the cost model for the given per-group importance, solved as
        compile's plan pass solves (``passes/budget.solve_budget``): compile's grid, groups under one step
        where no plan of whole steps is that small (unless ``round_to`` was set), and for a latency budget with
        ``refine`` > 0 compile's closed loop (``refine`` plans timed on the engine ``cost_model`` was given)."""
        if self.context is None or self.cost is None:
            raise FxpruneError("solving needs the cost model: call LiveModel.cost_model(budget, ...) first")
        return solve_budget(self.gm, self.cost, capacity, self.context, solver=solver, round_to=self.round_to,
                            refine=refine, depth=bool(self.blocks), importance=importance)

    def close(self) -> None:
        """Release the Context ``cost_model`` made (the analysed model deployed on the engine)."""
        if self.context is not None:
            self.context.close()
        self.context = None

    def agreed(self, solve: Callable[[], Plan]) -> Plan:
        """The plan ``solve()`` gives on rank 0, on every rank (latency tables measured on each rank could
        differ; the plan must not)."""
        masks = self.masks_of(solve() if rank() == 0 else Plan({}))
        masks = broadcast_masks(masks)
        drop = tuple(int(b) for b in np.flatnonzero(~masks.pop(BLOCKS, np.ones(0, dtype=bool))))
        return Plan({gid: np.flatnonzero(m) for gid, m in masks.items() if not m.all()}, drop)

    def compile(self, plan: Plan, output: str = "module") -> nn.Module:
        """A new, physically smaller model with the live model's current weights and ``plan``: the live
        model's own class (``passes/verify.own_model``: its modules pruned on a copy and verified), or with
        ``output="graph"``, or where that copy fails verification, the pruned graph."""
        state = {name: value.detach().cpu() for name, value in self.module.state_dict().items()}
        self.gm.load_state_dict(state, strict=False)
        pruned = called_like(self.module, prune(self.gm, plan))  # a model in parts: a copy of the live model
        if output != "graph":
            on_cpu = copy.deepcopy(self.module).cpu()
            pruned = own_model(on_cpu, self.gm, pruned.cpu(), plan, self.call_inputs)
        pruned.train(self.module.training)
        return pruned.to(self.device)


def broadcast_masks(masks: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Rank 0's masks on every rank (unchanged when not distributed)."""
    if not distributed():
        return masks
    order = sorted(masks)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    flat = torch.as_tensor(np.concatenate([masks[g] for g in order]).astype(np.uint8), device=device)
    dist.broadcast(flat, src=0)
    values, out, start = flat.cpu().numpy().astype(bool), {}, 0
    for gid in order:
        out[gid] = values[start:start + masks[gid].size]
        start += masks[gid].size
    return out


def rank() -> int:
    return dist.get_rank() if distributed() else 0
