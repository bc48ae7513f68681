"""Deployed units: each prunable layer with the ops an engine runs fused to it.

A latency table is measured per *unit*: a convolution or linear layer, the BatchNorm folded into it
and the activation after it, at the input shape the model gives it. Two units with the same
``UnitSpec`` are the same measurement, wherever they sit in whichever model. Everything else the
model runs (pooling, residual adds, squeeze-and-excitation products, layout changes) is the
remainder, which the latency pass measures on the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.fx
import torch.nn as nn

from fxprune.ir import graph
from fxprune.ir.channels import ChannelSpace
from fxprune.ir.keys import ANALYSIS_KEY
from fxprune.ir.units import Activation, UnitSpec
from fxprune.rules import RULES
from fxprune.rules.activations import activation_of
from fxprune.rules.conv import ConvUnit

# A unit every measuring session also runs: table entries are taken relative to it (see the engines).
REFERENCE = ConvUnit((1, 64, 28, 28), 64, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, True, True, Activation("relu"))


@dataclass
class Unit:
    """One unit found in an analysed graph: its layer node, the nodes fused after it, its spaces."""

    layer: torch.fx.Node
    fused: list[torch.fx.Node]
    spec: UnitSpec
    in_space: ChannelSpace | None
    out_space: ChannelSpace
    nodes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.nodes = [self.layer.name] + [n.name for n in self.fused]


# --- finding units ------------------------------------------------------------------------------
def _only_user(node: torch.fx.Node) -> torch.fx.Node | None:
    users = list(node.users)
    if len(users) == 1 and users[0].args and users[0].args[0] is node:
        return users[0]
    return None


def find_units(gm: torch.fx.GraphModule) -> list[Unit]:
    """Every convolution and linear layer whose input or output width can change, as deployed."""
    analysis = gm.meta[ANALYSIS_KEY]
    units = []
    for node in gm.graph.nodes:
        out_space, rule = graph.space(node), RULES.recorded(node)
        if out_space is None or rule is None:
            continue
        src = rule.unit_input(node)
        if graph.shape(src) is None:
            continue
        spec = rule.unit(gm, node)
        in_space = graph.space(src)
        if spec is None or in_space is None or in_space.dim != spec.channel_dim:
            in_space = None  # not a channel axis of this layer: its input width never changes
        varies = [s for s in (in_space, out_space) if s is not None and analysis.groups[s.group_id].prunable]
        if spec is None or not varies:
            continue
        fused, tail = [], node
        nxt = _only_user(tail)
        if nxt is not None and nxt.op == "call_module" and spec.folds_batch_norm \
                and isinstance(gm.get_submodule(graph.target_name(nxt)), nn.modules.batchnorm._BatchNorm):
            spec = replace(spec, batch_norm=True, bias=True)
            fused.append(nxt)
            tail = nxt
        nxt = _only_user(tail)
        activation = activation_of(gm, nxt) if nxt is not None else None
        if activation is not None and nxt is not None:
            spec = replace(spec, activation=activation)
            fused.append(nxt)
        units.append(Unit(node, fused, spec, in_space, out_space))
    return units
