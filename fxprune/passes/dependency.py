"""Dependency pass: which channels must be pruned together.

Every node's rule (``fxprune.rules``) couples channel spaces element by element through a
``ChannelBuilder``; coupled elements become one group channel and coupled spaces one ``ChannelGroup``.
Writes ``node.meta["fxprune"]`` (``NodeChannels``) and ``gm.meta["fxprune"]`` (``Analysis``). Also
follows channel widths read at run time (``x.size(1)``) to their uses, which stay right after pruning
only in some cases (``ChannelBuilder._check_width_uses``).
"""

from __future__ import annotations

import operator

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxprune.errors import AnalysisRequiredError
from fxprune.ir import graph
from fxprune.ir.channels import Analysis, ChannelSpace
from fxprune.ir.keys import ANALYSIS_KEY, CHANNELS_KEY
from fxprune.rules import RULES, ChannelBuilder, Rule
from fxprune.rules.base import arg
from fxprune.rules.shape import Shape


class DependencyPass(PassBase):
    """Find the channel groups of a shape-propagated GraphModule (``fxprune.analyze`` runs it)."""

    def requires(self, graph_module: torch.fx.GraphModule) -> None:
        missing = [n.name for n in graph_module.graph.nodes if n.op != "output" and "type" not in n.meta]
        if missing:
            raise AnalysisRequiredError(
                f"the dependency pass needs shapes on every node (missing on {missing[:3]}); "
                "run the trace pass with example inputs first (fxprune.analyze does both)")

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        builder = ChannelBuilder(graph_module, RULES)
        for node in graph_module.graph.nodes:
            node.meta.pop(CHANNELS_KEY, None)
        for node in graph_module.graph.nodes:
            rule = RULES(graph_module, node)
            width_args = _width_args(builder, node)
            rule.couple(builder, node)
            if node.op.startswith("call_"):
                builder.info(node).rule = RULES.fallback.name if node in builder.fell_back else rule.name
            _track_widths(builder, node, rule, width_args)
        graph_module.meta[ANALYSIS_KEY] = builder.finish()
        return PassResult(graph_module, modified=False)

    def ensures(self, graph_module: torch.fx.GraphModule) -> None:
        analysis: Analysis = graph_module.meta[ANALYSIS_KEY]
        for node in graph_module.graph.nodes:
            for space in graph.channels(node).spaces:
                if space is not None:
                    assert space.group_id in analysis.groups, f"space of {node.name} has no group"
                    assert space.group_channels.max(initial=-1) < analysis.groups[space.group_id].size


_WIDTH_ARITHMETIC = (operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv,
                     operator.mod, operator.neg, int, float)
_SIZE_ARG_METHODS = ("view", "reshape", "expand")


def _width_args(b: ChannelBuilder, node: torch.fx.Node) -> list[tuple[int | None, ChannelSpace]]:
    """(position in the size list or None, measured space) for each width-valued argument of node."""
    found = []
    for source in node.all_input_nodes:
        measured = b.widths.get(source, {}).get(None)
        if measured is not None:
            found.append((_size_position(node, source), measured))
    return found


def _size_position(node: torch.fx.Node, arg: torch.fx.Node) -> int | None:
    """Which output dim a size argument of view/reshape/expand sets, or None for other uses."""
    if node.target not in _SIZE_ARG_METHODS and node.target is not torch.reshape:
        return None
    given = node.args[1] if len(node.args) == 2 else None
    sizes = list(given if isinstance(given, (tuple, list)) else node.args[1:])
    return sizes.index(arg) if arg in sizes else None


def _track_widths(b: ChannelBuilder, node: torch.fx.Node, rule: Rule, width_args) -> None:
    """Record which widths a node's value measures, and check the uses of measured widths."""
    src = node.args[0] if node.args else None
    space = b.space_of(src) if isinstance(src, torch.fx.Node) and src not in b.pending else None
    if node.target == "size" and space is not None:
        dim = arg(node, 1, "dim", None)
        if dim is None:
            b.widths[node] = {space.dim: space}
        elif dim % len(b.tensor_shape(src)) == space.dim:
            b.widths[node] = {None: space}
    elif node.target is getattr and node.args[1] == "shape" and space is not None:
        b.widths[node] = {space.dim: space}
    elif node.target is operator.getitem and isinstance(src, torch.fx.Node) and src in b.widths:
        index = node.args[1]
        if isinstance(index, int) and index % len(b.tensor_shape(src.args[0])) in b.widths[src]:
            b.widths[node] = {None: b.widths[src][index % len(b.tensor_shape(src.args[0]))]}
        elif isinstance(index, slice):
            positions = range(len(b.tensor_shape(src.args[0])))[index]
            kept: dict[int | None, ChannelSpace] = {i: b.widths[src][p] for i, p in enumerate(positions)
                                                    if p in b.widths[src]}
            if kept:
                b.widths[node] = kept
    for position, measured in width_args:
        if node.target in _WIDTH_ARITHMETIC and b.shape(node) is None:
            b.widths[node] = {None: measured}  # still a width, to be checked where it is used
        elif position is not None and isinstance(rule, Shape):
            target = b.space_of(node) if node not in b.pending else None
            on_axis = target is not None and target.dim == position
            b.width_uses.append((measured, target if on_axis else None, node, position))
        else:
            b.width_uses.append((measured, None, node, None))
