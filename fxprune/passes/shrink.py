"""Shrink pass: apply a plan to a copy of the user's own model, the graph's plan driving the modules.

The analysed graph names every tensor as the model does (torch.fx keeps qualified names, torch.export's
``get_attr`` nodes read the ``state_dict``'s), so a plan made on the graph applies to the model's own
modules: every tensor axis a rule lists is indexed in a deep copy of the model (tied tensors stay tied),
then each op's rule sets the size fields of the module it is the call of (``Rule.shrink_module``), and
sizes third-party blocks keep in plain attributes are set by ``rules.attributes``. The result is the
user's class, shape-generic as its code is; ``passes/verify.py`` checks it against the pruned graph.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx
import torch.nn as nn

from fxprune.ir import graph
from fxprune.ir.channels import Block, Plan
from fxprune.modules import Skip, ZeroBranch
from fxprune.passes.blocks import emptied_modules
from fxprune.passes.rewrite import keep_masks, kept_positions
from fxprune.rules import RULES, Kept, TensorAxis, resize_attributes
from fxprune.rules.params import tensor_axes
from fxprune.solvers.planner import analysis


def shrink_model(model: nn.Module, gm: torch.fx.GraphModule, plan: Plan) -> nn.Module:
    """A deep copy of ``model`` (left as it was) with ``plan``'s removed channels sliced out of its
    parameters and buffers and its modules' size fields updated; ``gm`` is ``model``'s analysed graph."""
    kept = kept_positions(gm, keep_masks(gm, plan))
    shrunk = copy.deepcopy(model)
    _index_tensors(shrunk, gm, kept)
    changed = _shrink_modules(shrunk, gm, kept)
    resize_attributes(shrunk, changed)
    dropped = [analysis(gm).blocks[b] for b in plan.drop]
    remove_blocks(shrunk, dropped)
    for path in emptied_modules(gm, dropped):  # a decoder layer that lost its attention and its MLP
        shrunk.set_submodule(path, Skip())
    return shrunk


def remove_blocks(model: nn.Module, blocks: list[Block]) -> None:
    """Each removed block's module gives way: the whole block to ``Skip`` (returns its input), a branch
    the model's code adds to ``ZeroBranch`` (a zero)."""
    for block in blocks:
        model.set_submodule(block.module, Skip() if block.kind == "skip" else ZeroBranch(block.returns))


def replace_tensors(model: nn.Module, new_by_old: dict[int, torch.Tensor]) -> None:
    """Put each new tensor at every place of ``model`` that holds the one it replaces (keyed by the old
    tensor's id), so tied weights stay one tensor."""
    for module in model.modules():
        tables: tuple[dict[str, Any], ...] = (module._parameters, module._buffers)
        for table in tables:
            for name, tensor in table.items():
                if tensor is not None and id(tensor) in new_by_old:
                    table[name] = new_by_old[id(tensor)]


def _index_tensors(model: nn.Module, gm: torch.fx.GraphModule, kept: Kept) -> None:
    """Replace every tensor a rule lists by its kept positions along each listed axis, at every alias."""
    by_tensor: dict[int, tuple[torch.Tensor, dict[int, TensorAxis]]] = {}  # a tied tensor once, each axis once
    for axis in tensor_axes(gm, include_replaced=False):
        if axis.space.id in kept:
            owner_path, _, attr = axis.name.rpartition(".")
            tensor = getattr(model.get_submodule(owner_path), attr)
            by_tensor.setdefault(id(tensor), (tensor, {}))[1].setdefault(axis.dim, axis)
    new_by_old = {}
    for key, (old, axes) in by_tensor.items():
        tensor = old.detach()
        for axis in axes.values():
            tensor = tensor.index_select(axis.dim, kept[axis.space.id].to(tensor.device))
        new_by_old[key] = nn.Parameter(tensor.clone(), requires_grad=old.requires_grad) \
            if isinstance(old, nn.Parameter) else tensor.clone()
    replace_tensors(model, new_by_old)


def _shrink_modules(model: nn.Module, gm: torch.fx.GraphModule, kept: Kept) -> set[str]:
    """Each op's rule sets the size fields of the module it is the call of (once a module); returns the
    names of the modules whose channels changed."""
    changed_spaces = set(kept)
    done: set[str] = set()
    for node in gm.graph.nodes:
        rule = RULES.recorded(node)
        if rule is None:
            continue
        spaces = [s for s in (*graph.channels(node).spaces, *(graph.space(a) for a in node.all_input_nodes))
                  if s is not None]
        if not any(s.id in changed_spaces for s in spaces):
            continue
        path = rule.owner(gm, node)
        if path is None or path in done:
            continue
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue  # a tensor of the graph's own (a constant torch.export lifted), not of a module
        if not rule.owns(module):
            continue
        done.add(path)
        replacement = rule.shrink_module(module, node, kept)
        if replacement is not None:
            model.set_submodule(path, replacement)
    return done
