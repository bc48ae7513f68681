"""Which axis of which model tensor runs over which channel space, read from every node's rule.

What the rewrite indexes, what masking (training-time pruning) zeroes, what structured-sparsity
regularization groups into rows, and what the parameter cost counts: removing group channel c removes,
along every axis listed, the positions that belong to c. A parameter the graph reads as a tensor
(``get_attr`` with a channel space, ViT's class token) is listed along that space's dim.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn as nn

from fxprune.ir import graph
from fxprune.rules import RULES, TensorAxis


def tensor_axes(gm: torch.fx.GraphModule, *, include_replaced: bool = True) -> list[TensorAxis]:
    """Every (tensor, axis, space) of an analysed graph, once each (a module called twice counts once).

    ``include_replaced=False`` leaves out the tensors of rules that replace their module (the rewrite does
    not index those: the rule builds the replacement from the originals).
    """
    found: dict[tuple[str, int], TensorAxis] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            space = graph.space(node)
            if space is not None:
                is_parameter = isinstance(graph.attribute(gm, node.target), nn.Parameter)
                found.setdefault((node.target, space.dim),
                                 TensorAxis(node.target, space.dim, space, True, parameter=is_parameter))
            continue
        rule = RULES.recorded(node)
        if rule is None:
            continue
        if rule.owns_tensors and not include_replaced:
            continue
        for axis in rule.tensor_axes(gm, node):
            found.setdefault((axis.name, axis.dim), axis)
    return list(found.values())


def parameter_axes(gm: torch.fx.GraphModule) -> list[TensorAxis]:
    """The parameters among ``tensor_axes`` (buffers such as running statistics left out)."""
    return [axis for axis in tensor_axes(gm) if axis.parameter]
