"""Which axis of which parameter runs over which channel space.

What masking (training-time pruning), structured-sparsity regularization and the parameter cost read:
removing group channel c removes, along every axis listed here, the positions that belong to c.
An axis *produces* its channels when it indexes the tensor's outputs (a filter, a bias, a norm's scale
and shift, a parameter used as a tensor); otherwise the layer *reads* them (its input columns).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
import torch.nn as nn

from fxprune.ir import META_KEY, ChannelSpace, NodeChannels


@dataclass(frozen=True)
class ParameterAxis:
    """Axis ``dim`` of parameter ``name`` (its qualified name, as in ``state_dict``) runs over ``space``."""

    name: str
    dim: int
    space: ChannelSpace
    produces: bool


def input_space(node: torch.fx.Node) -> ChannelSpace | None:
    """The channel space of a node's first argument."""
    src = node.args[0] if node.args else None
    return src.meta.get(META_KEY, NodeChannels()).space if isinstance(src, torch.fx.Node) else None


def module_axes(module: nn.Module, node: torch.fx.Node) -> dict[str, list[tuple[int, ChannelSpace, bool]]]:
    """For a module the rewrite can prune: (dim, space, produces) per parameter attribute name."""
    out_space, in_space = node.meta.get(META_KEY, NodeChannels()).space, input_space(node)
    axes: dict[str, list] = {}

    def add(name: str, dim: int, space: ChannelSpace | None, produces: bool) -> None:
        if space is not None:
            axes.setdefault(name, []).append((dim, space, produces))

    if isinstance(module, nn.modules.conv._ConvNd):
        transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
        out_dim, in_dim = (1, 0) if transposed else (0, 1)
        if module.groups == 1:
            add("weight", out_dim, out_space, True)
            add("weight", in_dim, in_space, False)
        else:  # whole conv groups go: the weight's rows are indexed by the side whose width is the groups'
            add("weight", 0, in_space if transposed else out_space, True)
        add("bias", 0, out_space, True)
    elif isinstance(module, nn.Linear):
        add("weight", 0, out_space, True)
        add("weight", 1, in_space, False)
        add("bias", 0, out_space, True)
    elif isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.PReLU)):
        add("weight", 0, out_space, True)
        add("bias", 0, out_space, True)
    elif isinstance(module, nn.MultiheadAttention):
        add("in_proj_weight", 1, in_space, False)
        add("out_proj.weight", 0, out_space, True)
        add("out_proj.bias", 0, out_space, True)
    return axes


def parameter_axes(gm: torch.fx.GraphModule) -> list[ParameterAxis]:
    """Every (parameter, axis, space) of an analysed graph, once each (a module called twice counts once)."""
    found: dict[tuple[str, int], ParameterAxis] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            for attr, axes in module_axes(module, node).items():
                if _parameter(module, attr) is None:
                    continue
                for dim, space, produces in axes:
                    name = f"{node.target}.{attr}"
                    found.setdefault((name, dim), ParameterAxis(name, dim, space, produces))
        elif node.op == "get_attr":
            space = node.meta.get(META_KEY, NodeChannels()).space
            if space is not None and isinstance(_attribute(gm, node.target), nn.Parameter):
                found.setdefault((node.target, space.dim), ParameterAxis(node.target, space.dim, space, True))
    return list(found.values())


def _parameter(module: nn.Module, name: str) -> nn.Parameter | None:
    try:
        return module.get_parameter(name)
    except AttributeError:
        return None


def _attribute(gm: nn.Module, target: str):
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner), name, None)
