"""A rule holds everything fxprune knows about one kind of operation; the registry finds a node's rule.

A rule is keyed by operation, not only by module class: the convolution rule serves ``nn.Conv2d``
(``call_module``), ``F.conv2d`` and ``aten.convolution`` (``call_function`` with weights from
``get_attr``). A module subclass resolves to its nearest base's rule. A node no rule claims is frozen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.fx
import torch.nn as nn

from fxprune.ir import graph
from fxprune.ir.channels import ChannelSpace
from fxprune.ir.units import UnitSpec
from fxprune.rules.coupling import ChannelBuilder
from fxprune.rules.onnx import OnnxOps

Kept = dict[int, torch.Tensor]  # channel space id -> kept positions, for spaces that lose channels
Probe = Callable[[int, int], Callable[[], Any]]  # kept widths (in, out) -> a call whose FLOPs are counted


@dataclass(frozen=True)
class TensorAxis:
    """Axis ``dim`` of the model tensor ``name`` (qualified, as in ``state_dict``) runs over ``space``.

    ``produces``: the axis indexes the op's outputs (a filter, a bias, a norm's scale); otherwise the op
    reads those channels (its input columns). ``parameter``: False for buffers (running statistics).
    """

    name: str
    dim: int
    space: ChannelSpace
    produces: bool
    parameter: bool = True


class Rule:
    """An operation fxprune does not know: its tensor inputs keep all their channels.

    Subclasses override what applies to their operation:

    - ``couple``: how channels flow from inputs to outputs (dependency pass);
    - ``tensor_axes``: which axes of which parameters and buffers run over which channel space (the
      rewrite shrinks them; masks, regularizers and parameter counts read them);
    - ``update``: the op's own fields after its tensors shrank (a call's ``groups`` argument, a view's
      sizes; for a module call, ``shrink_module``);
    - ``owner``/``shrink_module``: the module of the user's model this op is the call of, and how that
      module becomes smaller once its tensors were indexed (its size fields; a replacement where torch's
      own class cannot express the pruned layer), so the user's own model is pruned, not only the graph;
    - ``unit``: the layer as an engine times it (latency tables): a ``UnitSpec`` of a kind the rule's file
      defines, which also builds the ONNX branch and the torch module it is timed as;
    - ``importance_rows``: the tensor whose rows are this op's output channels, laid out one row each;
    - ``affine``: the per-channel scale and shift of a normalization (BN-scale and Taylor importance);
    - ``flop_probe``: the call at given kept widths (whose FLOPs are counted), for ops whose count is not a
      product of shares;
    - ``residual_add``, ``identity``: whether a call is ``a + b`` (where the block pass looks for removable
      blocks), whether it returns its input unchanged (what a skip path may pass through).
    """

    name = "frozen"
    owns_tensors = False  # True: ``update`` replaces the module, so the rewrite does not index its tensors
    # True: a tensor this op computes from parameters and buffers alone is itself one (shape ops, indexing,
    # arithmetic), so its channel axis is traced back to them (``rules.shape.ensure_space``)
    parameter_arithmetic = False
    # True: a layer with weights (convolution, linear): outside units (its widths frozen) the latency pass counts
    # its time in the model's fixed part, not as memory traffic
    layer = False
    onnx = OnnxOps()  # the ONNX op types the operation exports to, as an exported graph is resized
    # The kernels engines run the operation as, by the names their profiles give (an ONNX op type in
    # onnxruntime's, an aten op in torch's), that move memory between layers: the latency pass scales their
    # time with the widths of the tensors they touch (``Registry.memory_kernels``)
    memory_kernels: frozenset[str] = frozenset()
    bilinear_flops = False  # True: FLOPs scale with the kept shares of its weight's input and output axes
    modules: tuple[type, ...] = ()
    functions: tuple[Any, ...] = ()
    methods: tuple[str, ...] = ()

    def couple(self, b: ChannelBuilder, node: torch.fx.Node) -> None:
        b.fell_back.add(node)  # a rule that falls back to this one is not asked about the node again
        what = graph.call_name(node)
        if node.op == "call_module":
            what = type(b.module(node)).__name__
        for src in tensor_inputs(node):
            b.freeze(b.space_of(src), f"consumed by {what} ({node.name}), which fxprune does not support")

    def tensor_axes(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> list[TensorAxis]:
        return []

    def claim_tensors(self, b: ChannelBuilder, node: torch.fx.Node) -> None:
        """Couple this call's axes with every other use of the same tensors (``ChannelBuilder.claim``)."""
        for axis in self.tensor_axes(b.gm, node):
            b.claim(axis.name, axis.dim, axis.space)

    def update(self, gm: torch.fx.GraphModule, node: torch.fx.Node, kept: Kept) -> None:
        """Called once per node (once per module for ``call_module``) after the tensors were indexed."""
        if node.op == "call_module":
            replacement = self.shrink_module(gm.get_submodule(graph.target_name(node)), node, kept)
            if replacement is not None:
                gm.set_submodule(graph.target_name(node), replacement)

    def owner(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> str | None:
        """The qualified name of the module ``node`` is the call of: the module called, or the one holding
        the op's first tensor (torch.export's graphs call functions on the modules' parameters)."""
        if node.op == "call_module":
            return graph.target_name(node)
        names = [axis.name for axis in self.tensor_axes(gm, node)] \
            or [graph.target_name(n) for n in node.all_input_nodes if n.op == "get_attr"]
        return names[0].rpartition(".")[0] if names else None

    def owns(self, module: nn.Module) -> bool:
        """Whether ``shrink_module`` knows ``module``'s size fields (a class of this rule's)."""
        return isinstance(module, self.modules)

    def shrink_module(self, module: nn.Module, node: torch.fx.Node, kept: Kept) -> nn.Module | None:
        """Set the size fields of ``module`` (of a class this rule knows; its tensors already indexed along
        ``node``'s spaces, whose ``kept`` positions say what stayed); return a replacement module where
        the class cannot hold the pruned layer, else None."""
        return None

    def unit(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> UnitSpec | None:
        return None

    def deployed(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
        """What the call is once deployed, for the latency model: ``"none"`` (no op: a metadata read, dropout
        in eval), ``"view"`` (an op that moves no data) or ``"data"`` (a kernel that reads and writes its
        tensors, what an op no rule knows is taken to be)."""
        return "data"

    def unit_input(self, node: torch.fx.Node) -> Any:
        """The argument a timed layer reads its channels from (its first, for most layers)."""
        return node.args[0] if node.args else None

    def residual_add(self, node: torch.fx.Node) -> bool:
        """Whether ``node`` is a plain sum of two tensors, ``a + b`` (the end of a residual block)."""
        return False

    def identity(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
        """Whether the call returns its tensor input unchanged as fxprune runs models (eval mode): a
        residual's skip path may pass through it."""
        return False

    def importance_rows(self, gm: torch.fx.GraphModule,
                        node: torch.fx.Node) -> tuple[str, Callable[[torch.Tensor], torch.Tensor]] | None:
        return None

    def affine(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[str | None, str | None] | None:
        return None

    def flop_probe(self, gm: torch.nn.Module, node: torch.fx.Node, args: tuple, kwargs: dict) -> Probe | None:
        return None


# --- helpers rules share ----------------------------------------------------------------------------
def tensor_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(a) if graph.shape(a) else a)
    return list(dict.fromkeys(found))


def arg(node: torch.fx.Node, index: int, name: str, default=None):
    """A call's argument by position or keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def set_arg(node: torch.fx.Node, index: int, name: str, value) -> None:
    """Set a call's argument where it was given (by position or keyword), else by keyword."""
    if len(node.args) > index:
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


def parameter_name(node: Any) -> str | None:
    """The qualified name a ``get_attr`` node reads, or None for anything else."""
    return graph.target_name(node) if isinstance(node, torch.fx.Node) and node.op == "get_attr" else None


def input_space(node: torch.fx.Node) -> ChannelSpace | None:
    """The channel space of a node's first argument."""
    return graph.space(node.args[0]) if node.args else None


def kept_of(space: ChannelSpace | None, kept: Kept) -> torch.Tensor | None:
    return None if space is None else kept.get(space.id)


def tensor_names(prefix: str, module: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """Attribute name -> qualified name of each of ``names`` the module holds (a tensor, not None)."""
    return {n: f"{prefix}.{n}" if prefix else n for n in names if getattr(module, n, None) is not None}


def same_position(b: ChannelBuilder, node: torch.fx.Node, src: torch.fx.Node) -> None:
    """Output keeps the input's channel axis at the same dim, element for element (size checked)."""
    space = b.space_of(src)
    out_shape = b.shape(node)
    if space is None or out_shape is None:
        return
    dim = space.dim + len(out_shape) - len(b.tensor_shape(src))
    if not 0 <= dim < len(out_shape) or out_shape[dim] != space.size:
        b.freeze(space, f"{node.name} changes the size of its channel axis")
        return
    b.couple(space, b.new_space(node, dim))


# --- the registry -----------------------------------------------------------------------------------
class Registry:
    """Rules by module class, function (an ATen overload also by its packet) and method name."""

    def __init__(self, rules: Iterable[Rule], *, fallback: Rule, no_channels: Rule, output: Rule,
                 by_name_of_function: dict[str, Rule] | None = None) -> None:
        self.rules = list(rules)
        self.fallback, self.no_channels, self.output = fallback, no_channels, output
        self._by_name = {rule.name: rule for rule in [*self.rules, fallback]}  # the names nodes record
        if len(self._by_name) != len(self.rules) + 1:
            raise ValueError("two rules share a name")
        self.by_module: dict[type, Rule] = {}
        self.by_function: dict[Any, Rule] = {}
        self.by_method: dict[str, Rule] = {}
        self.by_function_name = dict(by_name_of_function or {})
        self.by_onnx_type: dict[str, OnnxOps] = {}
        self.memory_kernels = frozenset().union(*(rule.memory_kernels for rule in self.rules))
        for rule in self.rules:
            for op_type in rule.onnx.types:
                if self.by_onnx_type.setdefault(op_type, rule.onnx) is not rule.onnx:
                    raise ValueError(f"ONNX op {op_type} is claimed by two rules, {rule.name} among them")
        for rule in self.rules:
            tables: tuple[tuple[dict[Any, Rule], tuple[Any, ...]], ...] = (
                (self.by_module, rule.modules), (self.by_function, rule.functions), (self.by_method, rule.methods))
            for table, keys in tables:
                for key in keys:
                    if key in table:
                        raise ValueError(f"{key} has two rules: {table[key].name} and {rule.name}")
                    table[key] = rule

    def module_rule(self, module: nn.Module) -> Rule | None:
        """The rule of a module's class, or of its nearest base class that has one."""
        for cls in type(module).__mro__:
            if cls in self.by_module:
                return self.by_module[cls]
        return None

    def function_rule(self, target: Any) -> Rule | None:
        rule = self.by_function.get(target)
        if rule is None and isinstance(target, torch._ops.OpOverload):
            rule = self.by_function.get(target.overloadpacket)
        name = getattr(target, "__name__", None)
        if rule is None and name is not None:
            rule = self.by_function_name.get(name)
        return rule

    def recorded(self, node: torch.fx.Node) -> Rule | None:
        """The rule the dependency pass handled ``node`` with (its name on the node's ``NodeChannels``: the
        fallback's where the op's own rule fell back), or None for a node it left alone."""
        name = graph.channels(node).rule
        return None if name is None else self._by_name[name]

    def __call__(self, gm: torch.nn.Module, node: torch.fx.Node) -> Rule:
        """The rule that handles ``node``."""
        if node.op in ("placeholder", "get_attr"):
            return self.no_channels
        if node.op == "output":
            return self.output
        if node.op == "call_module":
            return self.module_rule(gm.get_submodule(graph.target_name(node))) or self.fallback
        if node.op == "call_method":
            return self.by_method.get(graph.target_name(node), self.fallback)
        rule = self.function_rule(node.target)
        if rule is None and not tensor_inputs(node):
            return self.no_channels
        return rule or self.fallback
