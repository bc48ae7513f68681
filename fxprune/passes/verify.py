"""Verify pass: the user's model, shrunk, against the pruned graph and the masked original.

Two checks, eager, so they hold at any size the model's code accepts: on the example inputs the shrunk
model must equal the pruned graph; at other shapes (another batch size, and another image size or
sequence length where the original model runs at it) it must equal the original model with the removed
channels' parameters zeroed (the masked reference), or, where the plan prunes a group a LayerNorm
normalizes over (the masked reference does not define those), return the original's output shapes.
A failure names the innermost module that raised, so compile can say which code keeps a size.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from fxprune.backends.export import larger
from fxprune.ir.capture import capture_of, is_partitioned, split_inputs
from fxprune.ir.channels import Plan
from fxprune.ir.graph import inference
from fxprune.ir.keys import CAPTURE_KEY, PLAN_KEY, REPORT_KEY
from fxprune.passes.cost import count_params
from fxprune.passes.rewrite import keep_masks
from fxprune.passes.shrink import shrink_model
from fxprune.rules.params import tensor_axes
from fxprune.solvers.planner import analysis


@dataclass
class Verification:
    """What was checked: ``shapes`` the input shapes each check ran at; ``failure`` why the shrunk model
    cannot be returned (None: it can), naming the module where one raised."""

    shapes: list[str] = field(default_factory=list)
    failure: str | None = None
    max_difference: float = 0.0

    @property
    def ok(self) -> bool:
        return self.failure is None


def verify_model(original: nn.Module, shrunk: nn.Module, pruned: nn.Module, gm: torch.fx.GraphModule, plan: Plan,
                 args: tuple, kwargs: dict, *, rtol: float = 1e-4) -> Verification:
    """Check ``shrunk`` (the user's class) against ``pruned`` (the graph, called like the model) on the
    example call and against ``original`` masked by ``plan`` at other shapes."""
    result = Verification()
    masked = masked_model(original, gm, plan)
    with inference(shrunk), inference(pruned):
        result.shapes.append(describe(args, kwargs))
        called: set[str] = set()
        failure = _compare(_run(pruned, args, kwargs)[0], _run(shrunk, args, kwargs, called), "the pruned graph",
                           describe(args, kwargs), rtol, result)
        if failure:
            result.failure = failure
            return result
    idle = [name for name, m in shrunk.named_modules()
            if name not in called and next(m.parameters(recurse=False), None) is not None]
    if idle:  # modules this call never runs (a classifier's auxiliary heads run in training only)
        result.failure = _in_training(shrunk, masked, args, kwargs, idle)
        if result.failure:
            return result
    with inference(shrunk):
        exact = not any(analysis(gm).groups[gid].norm_coupled for gid in plan.keep
                        if len(plan.keep[gid]) < analysis(gm).groups[gid].size)
        raw = [part.path for part in capture.parts if part.raw] if (capture := capture_of(gm)) is not None else []
        with inference(masked):
            for other_args, other_kwargs in other_shapes(args, kwargs):
                if len(result.shapes) >= 3:
                    break
                expected, error = _run(masked, other_args, other_kwargs, raw=raw)
                if error is not None:
                    continue  # the model itself does not take this shape
                where = describe(other_args, other_kwargs)
                failure = _compare(expected, _run(shrunk, other_args, other_kwargs, raw=raw),
                                   "the masked original model", where, rtol, result, values=exact, raw=bool(raw))
                if failure:
                    result.failure = failure
                    return result
                result.shapes.append(where)
    return result


def own_model(model: torch.nn.Module, gm: torch.fx.GraphModule, pruned: torch.nn.Module, plan: Plan,
              example_inputs: Any, example_kwargs: dict | None = None) -> torch.nn.Module:
    """``model``'s own class with ``plan`` applied to a copy of its modules (``passes/shrink.py``), verified
    (``passes/verify.py``) against ``pruned``, the graph's result, whose plan, report and capture it
    carries on ``.meta``; ``pruned`` itself, its report saying why, where the copy fails verification."""
    args, kwargs = split_inputs(example_inputs, example_kwargs)
    meta = getattr(pruned, "meta", {})
    report = meta.get(REPORT_KEY)
    shrunk = shrink_model(model, gm, plan)
    verification = verify_model(model, shrunk, pruned, gm, plan, args, kwargs)
    if report is not None:
        report.shapes_checked = verification.shapes
    if not verification.ok:
        if report is not None:
            report.returned = type(pruned).__name__
            graph = "its captured parts as pruned graphs" if is_partitioned(pruned) else "the pruned graph"
            report.notes.append(f"returned {graph}, not the model's own modules pruned: they fail verification: "
                                f"{verification.failure}")
        return pruned
    returned_meta = {key: meta[key] for key in (PLAN_KEY, REPORT_KEY, CAPTURE_KEY) if key in meta}
    shrunk.meta = returned_meta  # type: ignore[assignment]  # torch types Module attributes as tensors or modules
    if report is not None:  # parameters of what is returned (with modules the example call never ran)
        report.returned = type(model).__name__
        report.params_before, report.params_after = count_params(model), count_params(shrunk)
    return shrunk


def masked_model(model: nn.Module, gm: torch.fx.GraphModule, plan: Plan) -> nn.Module:
    """A copy of ``model`` whose parameters are zero at every position of a channel ``plan`` removes, and
    where the plan removes a block, its branch's last layer's (``Block.zeroed``: the branch computes zero):
    it computes what the pruned model does, eagerly, at any input size (the reference of ``verify_model``)."""
    masks = keep_masks(gm, plan)
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for block in plan.drop:
            for name in analysis(gm).blocks[block].zeroed:
                owner, _, attr = name.rpartition(".")
                getattr(masked.get_submodule(owner), attr).zero_()
        for axis in tensor_axes(gm):
            removed = np.flatnonzero(~masks[axis.space.group_id][axis.space.channel_index])
            if removed.size and axis.parameter:
                owner, _, name = axis.name.rpartition(".")
                tensor = getattr(masked.get_submodule(owner), name)
                tensor.index_fill_(axis.dim, torch.as_tensor(removed, device=tensor.device), 0.0)
    return masked


def other_shapes(args: tuple, kwargs: dict) -> list[tuple[tuple, dict]]:
    """The example call at another batch size, at another image size or sequence length, and (for a model
    that takes one size only) at a third batch size."""
    twice = _mapped(args, kwargs, _batch)
    return [twice, _mapped(args, kwargs, larger), _mapped(*twice, _batch)]


def describe(args: tuple, kwargs: dict) -> str:
    """The call's tensor shapes, e.g. ``1x3x64x64`` or ``input_ids 2x24``."""
    def shape(x: Any) -> str:
        if isinstance(x, torch.Tensor):
            return "x".join(map(str, x.shape)) or "scalar"
        if isinstance(x, (list, tuple)):
            return "[" + ", ".join(shape(item) for item in x) + "]"
        return type(x).__name__
    return ", ".join([shape(a) for a in args] + [f"{k} {shape(v)}" for k, v in kwargs.items()])


# --- running and comparing ------------------------------------------------------------------------
def _in_training(shrunk: nn.Module, masked: nn.Module, args: tuple, kwargs: dict, idle: list[str]) -> str | None:
    """Why the shrunk model fails in training mode, where the example call in eval mode leaves ``idle``
    modules out (the graph never saw them, so nothing pruned their inputs); None where it runs as the
    masked original does (output shapes: dropout draws differ)."""
    for call in [(args, kwargs), *other_shapes(args, kwargs)]:  # a call the model itself trains on
        expected, error = _run_training(masked, *call)
        if error is None:
            args, kwargs = call
            break
    else:
        return (f"modules the example call does not run ({', '.join(idle[:4])}) could not be checked: the model "
                "raised in training mode at every shape tried")
    output, error = _run_training(shrunk, args, kwargs)
    if error is None:
        want, have = _leaves(expected), _leaves(output)
        if [t.shape for t in want] == [t.shape for t in have]:
            return None
    module = getattr(error, "fxprune_module", None) if error is not None else None
    inside = f" in {module[0] or 'the model'} ({module[1]})" if module else ""
    what = f"raised{inside}: {type(error).__name__}: {str(error).splitlines()[0][:200]}" if error is not None \
        else "returned other shapes than the masked original"
    return (f"in training mode, which runs modules the example call does not ({', '.join(idle[:4])}), it {what}")


def _run_training(model: nn.Module, args: tuple, kwargs: dict) -> tuple[Any, BaseException | None]:
    """One training-mode call of a copy of ``model`` (its statistics stay as they are), no autograd."""
    copied = copy.deepcopy(model).train()
    with torch.no_grad():
        return _run(copied, args, kwargs)


def _run(model: nn.Module, args: tuple, kwargs: dict, called: set[str] | None = None,
         raw: Sequence[str] = ()) -> tuple[Any, BaseException | None]:
    """The model's output, or the error it raised with the innermost module it raised in; ``called``
    collects the names of the modules that ran. With ``raw`` (the parts of a model captured in parts that
    no post-processing precedes), the output is ``(output, what those parts returned)``: NMS and top-k
    turn last-digit differences into other boxes, so those are compared instead of the boxes."""
    returned: list = []
    hooks = [model.get_submodule(path).register_forward_hook(lambda m, a, out: returned.append(out)) for path in raw]
    try:
        with _module_stack(model, called) as stack:
            output = model(*args, **kwargs)
            return ((output, returned) if raw else output), None
    except Exception as error:  # noqa: BLE001 - whatever forward raises is what verification reports
        error.fxprune_module = stack[-1] if stack else None  # type: ignore[attr-defined]
        return None, error
    finally:
        for hook in hooks:
            hook.remove()


def _compare(expected: Any, got: tuple[Any, BaseException | None], reference: str, where: str, rtol: float,
             result: Verification, values: bool = True, raw: bool = False) -> str | None:
    output, error = got
    if error is not None:
        module = getattr(error, "fxprune_module", None)
        inside = f" in {module[0] or 'the model'} ({module[1]})" if module else ""
        return f"at {where} it raised{inside}: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
    if raw:  # the boxes' structure, and the raw parts' outputs where the pruning left their shapes alone
        if torch.utils._pytree.tree_structure(expected[0]) != torch.utils._pytree.tree_structure(output[0]):
            return f"at {where} it returned another structure than {reference}"
        pairs = [(a, b) for a, b in zip(_leaves(expected[1]), _leaves(output[1])) if a.shape == b.shape]
        if not pairs:
            return f"at {where} no raw output of its parts kept the shape of {reference}'s"
        expected, output = [a for a, _ in pairs], [b for _, b in pairs]
    want, have = _leaves(expected), _leaves(output)
    if len(want) != len(have):
        return f"at {where} it returned {len(have)} tensors where {reference} returns {len(want)}"
    for index, (a, b) in enumerate(zip(want, have)):
        if a.shape != b.shape:
            return f"at {where} its output {index} has shape {tuple(b.shape)}, {reference}'s {tuple(a.shape)}"
        if not values or not a.is_floating_point():
            continue
        a, b = a.double(), b.double()
        scale = float(a[torch.isfinite(a)].abs().max()) if torch.isfinite(a).any() else 0.0
        both = torch.isfinite(a) & torch.isfinite(b)
        difference = float((a - b)[both].abs().max()) if both.any() else 0.0
        if difference > rtol * max(scale, 1.0) or not torch.equal(torch.isfinite(a), torch.isfinite(b)):
            return (f"at {where} its output {index} differs from {reference}'s by {difference:.3g} "
                    f"(largest value {scale:.3g})")
        result.max_difference = max(result.max_difference, difference / max(scale, 1.0))
    return None


def _leaves(value: Any) -> list[torch.Tensor]:
    return [x for x in torch.utils._pytree.tree_leaves(value) if isinstance(x, torch.Tensor)]


@contextmanager
def _module_stack(model: nn.Module, called: set[str] | None = None) -> Iterator[list[tuple[str, str]]]:
    """The (name, class) of the modules whose forward is running, innermost last, while the block runs;
    ``called`` collects every module that ran."""
    stack: list[tuple[str, str]] = []

    def enter(module: nn.Module, args: Any, name: str) -> None:
        stack.append((name, type(module).__name__))
        if called is not None:
            called.add(name)

    def leave(module: nn.Module, args: Any, output: Any) -> None:  # returns None: the output stays as it is
        if stack:
            stack.pop()

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda m, a, name=name: enter(m, a, name)))
        handles.append(module.register_forward_hook(leave))
    try:
        yield stack
    finally:
        for handle in handles:
            handle.remove()


# --- other shapes -----------------------------------------------------------------------------------
def _mapped(args: tuple, kwargs: dict, change) -> tuple[tuple, dict]:
    return tuple(change(a) for a in args), {k: change(v) for k, v in kwargs.items()}


def _batch(x: Any) -> Any:
    """Batch 2: the example and a perturbed copy (token ids rolled); a list of images gains one of another
    aspect ratio."""
    if isinstance(x, list) and x and all(isinstance(t, torch.Tensor) and t.dim() == 3 for t in x):
        first = x[0]
        return [*x, F.interpolate(first[None], size=(first.shape[1], first.shape[2] * 3 // 4), mode="bilinear")[0]]
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return x
    if x.is_floating_point():
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x)
        return torch.cat([x, x + 0.1 * noise])
    return torch.cat([x, x.roll(1, dims=-1)])
