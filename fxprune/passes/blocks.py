"""Block pass: the residual blocks a plan may remove whole (``Analysis.blocks``).

A block is found in the graph, not by class names: an add ``x + y`` whose branch ``y`` is computed from
``x`` (and from context computed without ``x``: a decoder's rotary embeddings and attention mask; no branch
result is read outside it), so the add without the branch is ``x``, passed unchanged. Stochastic depth and layer
scale sit inside the branch. The user's model must be able to lose it too: a module whose nodes are the
branch and the add (and activations after it, which must return ``x`` as it is) becomes
``modules.Skip``, else a module that computes the branch's result becomes ``modules.ZeroBranch``. A block
is offered only where zeroing the parameters of the branch's last layer zeroes ``f(x)`` on the example
inputs (the masked reference of a removed block) and the skip module then returns ``x``; blocks inside
another block's branch are left to the outer one's channels. Why other adds are no block is recorded.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Set as AbstractSet
from typing import cast

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxprune.errors import AnalysisRequiredError
from fxprune.ir import graph
from fxprune.ir.capture import is_partitioned
from fxprune.ir.channels import Analysis, Block
from fxprune.ir.graph import inference, run_eager
from fxprune.ir.keys import ANALYSIS_KEY
from fxprune.rules import RULES

_CALL = re.compile(r"@\d+$")  # nn_module_stack marks a module's second and later calls with @n


class BlockPass(PassBase):
    """Find the removable residual blocks of an analysed graph (``Analysis.blocks``, ``kept_blocks``); with
    the ``model`` captured and its ``call`` (args, kwargs), what each block's zero module returns too
    (``record_returns``)."""

    def __init__(self, example_inputs: tuple, model: torch.nn.Module | None = None,
                 call: tuple[tuple, dict] = ((), {})) -> None:
        super().__init__()
        self.example_inputs, self.model, self.call_inputs = example_inputs, model, call

    def requires(self, graph_module: torch.fx.GraphModule) -> None:
        if ANALYSIS_KEY not in graph_module.meta:
            raise AnalysisRequiredError("blocks are found on an analysed graph: run the dependency pass first")

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        analysis: Analysis = graph_module.meta[ANALYSIS_KEY]
        analysis.blocks, analysis.kept_blocks, analysis.sole = [], {}, []
        if is_partitioned(graph_module):  # parts' module paths are relative to each part
            return PassResult(graph_module, modified=False)
        found: list[Block] = []
        position = {n: i for i, n in enumerate(graph_module.graph.nodes)}
        for node in graph_module.graph.nodes:
            if node.op in ("call_function", "call_method") and _rule(node).residual_add(node):
                block = _block(graph_module, analysis, node, len(found), position)
                if isinstance(block, Block):
                    found.append(block)
                else:
                    analysis.kept_blocks[node.name] = block
        found = _innermost(found, analysis)
        analysis.blocks = _checked(graph_module, found, self.example_inputs, analysis)
        analysis.sole = sole_operations(graph_module, analysis.blocks)
        if self.model is not None:
            record_returns(self.model, *self.call_inputs, graph_module)
        return PassResult(graph_module, modified=False)

    def ensures(self, graph_module: torch.fx.GraphModule) -> None:
        blocks = graph_module.meta[ANALYSIS_KEY].blocks
        assert [b.id for b in blocks] == list(range(len(blocks)))


def _rule(node: torch.fx.Node):
    return RULES.recorded(node) or RULES.fallback


def _branch(x: torch.fx.Node, y: torch.fx.Node, add: torch.fx.Node,
            position: dict[torch.fx.Node, int]) -> tuple[set, set] | str:
    """The nodes computing ``y`` from ``x`` (no get_attr), and the context they read, computed without ``x``
    (a decoder's rotary embeddings and mask, made once for every layer); or why ``y`` is no branch of ``x``.
    ``position``: each node's place in the graph."""
    ancestors: set[torch.fx.Node] = set()
    stack = [y]
    while stack:
        node = stack.pop()
        if node is x or node in ancestors or node.op == "get_attr":
            continue
        ancestors.add(node)
        stack.extend(node.all_input_nodes)
    reads_x: dict[torch.fx.Node, bool] = {x: True}
    for node in sorted(ancestors, key=position.__getitem__):  # inputs before their users
        reads_x[node] = any(reads_x.get(a, False) for a in node.all_input_nodes)
    branch = {n for n in ancestors if reads_x[n]}
    if y is x or not reads_x.get(y, False):
        return "its other input does not read the skip input" if y is not x else "the skip input is part of the branch"
    escaping = [n.name for n in branch for user in n.users if user not in branch and user is not add]
    if escaping:
        return f"a result of the branch is read outside it ({escaping[0]})"
    return branch, ancestors - branch


def _block(gm: torch.fx.GraphModule, analysis: Analysis, add: torch.fx.Node, index: int,
           position: dict[torch.fx.Node, int]) -> Block | str:
    """The block ending at ``add``, or why there is none."""
    if graph.shape(add) is None or any(graph.shape(a) != graph.shape(add) for a in add.args):
        return "the add broadcasts"
    reasons = []
    operands = cast(tuple[torch.fx.Node, torch.fx.Node], add.args)  # a residual add: two nodes (residual_add)
    for x, y in (operands, operands[::-1]):
        root, chain = _unchanged(gm, x)  # x itself, or what an identity shortcut passes on
        found = _branch(root, y, add, position)
        if isinstance(found, str):
            reasons.append(found)
            continue
        branch, context = found
        zeroed = _last_parameters(gm, y, branch)
        if not zeroed:
            reasons.append("no layer with parameters ends its branch")
            continue
        place = _skip_module(add, root, branch, chain, context) or _zero_module(gm, add, y, branch, context)
        if place is None:
            reasons.append("no module of the model holds the branch alone (the model's code cannot lose it)")
            continue
        names = {n.name for n in branch} | {a.name for n in branch for a in n.all_input_nodes if a.op == "get_attr"}
        groups = tuple(sorted(g.id for g in analysis.prunable_groups()
                              if all(s.node in names for s in analysis.spaces if s.group_id == g.id)))
        nodes = tuple(n.name for n in gm.graph.nodes if n in branch or n is add)
        return Block(index, add.name, x.name, y.name, nodes, place[0], place[1], tuple(zeroed), groups)
    return "; ".join(dict.fromkeys(reasons))


def _paths(node: torch.fx.Node) -> list[tuple[str, bool]]:
    """The module paths a node runs inside, outermost first, each with whether it is that module's first
    call; a call_module node's own module last."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [(_path(value), not _CALL.search(key)) for key, value in stack.items()]
    if node.op == "call_module" and all(p != node.target for p, _ in paths):
        paths.append((graph.target_name(node), True))
    return [(p, first) for p, first in paths if p]


def _path(value) -> str:
    path = value[0] if isinstance(value, tuple) else str(value)
    return _CALL.sub("", path)


def _inside(nodes, path: str) -> set[torch.fx.Node]:
    return {n for n in nodes if any(p == path for p, _ in _paths(n))}


def _unchanged(gm: torch.fx.GraphModule, x: torch.fx.Node) -> tuple[torch.fx.Node, set[torch.fx.Node]]:
    """The tensor ``x`` is, unchanged (through ``nn.Identity``, dropout: a shortcut that is a module), and
    the calls on the way."""
    chain = set()
    while x.op in ("call_module", "call_function", "call_method") and len(x.all_input_nodes) == 1 \
            and _rule(x).identity(gm, x):
        chain.add(x)
        x = x.all_input_nodes[0]
    return x, chain


def _skip_module(add: torch.fx.Node, x: torch.fx.Node, branch: set, chain: set,
                 context: AbstractSet = frozenset()) -> tuple[str, str] | None:
    """The deepest module that is the whole block: the branch, the add, the identity shortcut ``chain``, and
    single-input activations after the add (the block pass checks they return ``x`` as it is), called once,
    taking ``x`` from outside."""
    x_paths = {p for p, _ in _paths(x)}
    every = list(add.graph.nodes)
    for path, first in reversed(_paths(add)):
        if path in x_paths or not first:
            continue
        inside = _inside(every, path) - {n for n in every if n.op == "get_attr"}
        after = inside - branch - {add} - chain - context
        post, node = [], add  # activations after the add
        while len(node.users) == 1 and next(iter(node.users)) in after:
            node = next(iter(node.users))
            post.append(node)
            if len(node.all_input_nodes) != 1:
                break
        if set(post) == after and all(len(n.all_input_nodes) == 1 for n in post) and branch <= inside:
            return path, "skip"
    return None


def _zero_module(gm: torch.fx.GraphModule, add: torch.fx.Node, y: torch.fx.Node, branch: set,
                 context: AbstractSet = frozenset()) -> tuple[str, str] | None:
    """The module ``ZeroBranch`` replaces: one that computes ``y``, or what ``y`` passes on unchanged
    (Phi-3 adds ``dropout(attention)``; a zero through dropout stays zero), with those calls left in place."""
    tail: set[torch.fx.Node] = set()
    while y.op in ("call_module", "call_function", "call_method") and len(y.all_input_nodes) == 1 \
            and y.all_input_nodes[0] in branch and _rule(y).identity(gm, y):
        place = _branch_module(add, y, branch - tail, context)
        if place is not None:
            return place
        tail.add(y)
        y = y.all_input_nodes[0]
    return _branch_module(add, y, branch - tail, context)


def _branch_module(add: torch.fx.Node, y: torch.fx.Node, branch: set,
                   context: AbstractSet = frozenset()) -> tuple[str, str] | None:
    """The outermost module, called once, that computes ``y`` from nodes of the branch and is read only
    through ``y``, leaving no convolution or linear layer of the branch outside it (those would still run in
    the model's code; a norm before it may)."""
    every = list(add.graph.nodes)
    add_paths = {p for p, _ in _paths(add)}
    for path, first in _paths(y):
        if path in add_paths or not first:
            continue
        whole = _inside(every, path) - {n for n in every if n.op == "get_attr"}
        inside = whole - context  # context the module computes for itself goes with it: read by it alone
        if inside <= branch and all(u in inside for n in inside - {y} for u in n.users) \
                and all(u in whole for n in whole & context for u in n.users) \
                and not any(_rule(n).bilinear_flops for n in branch - inside):
            return path, "zero"
    return None


def _last_parameters(gm: torch.fx.GraphModule, y: torch.fx.Node, branch: set) -> list[str]:
    """The parameters of the first layer met walking back from ``y`` through single-input ops: zeroed,
    they make the branch's result zero where what follows them maps zero to zero (checked on data)."""
    parameters = dict(gm.named_parameters(remove_duplicate=False))
    node = y
    while node in branch:
        names = [name for name in _tensors_read(gm, node) if name in parameters]
        if names:
            return names
        inputs = [a for a in node.all_input_nodes if a.op != "get_attr"]
        if len(inputs) != 1:
            return []
        node = inputs[0]
    return []


def _tensors_read(gm: torch.fx.GraphModule, node: torch.fx.Node) -> list[str]:
    """Qualified names of the parameters and buffers a call reads: a called module's own, or the tensors
    its get_attr inputs fetch (torch.export's graphs)."""
    if node.op == "call_module":
        module = gm.get_submodule(graph.target_name(node))
        return [f"{node.target}.{n}" for n, _ in (*module.named_parameters(), *module.named_buffers())]
    if node.op in ("call_function", "call_method"):
        return [graph.target_name(a) for a in node.all_input_nodes if a.op == "get_attr"]
    return []


def _innermost(blocks: list[Block], analysis: Analysis) -> list[Block]:
    """Blocks whose branch holds no other block's add (an outer block's inner ones are its channels)."""
    adds = {b.add for b in blocks}
    kept = []
    for block in blocks:
        if adds.intersection(block.nodes[:-1]):
            analysis.kept_blocks[block.add] = "it holds another residual block"
        else:
            kept.append(block)
    return kept


def _values(gm: torch.fx.GraphModule, wanted: set[str], example_inputs: tuple) -> dict[str, object]:
    """The values of the ``wanted`` nodes in one run of ``gm`` as fxprune runs models (``inference``)."""
    with torch.no_grad(), inference(gm):
        run = _Values(gm, wanted)
        run.run(*example_inputs)
    return run.values


class _Values(torch.fx.Interpreter):
    """Runs the graph and keeps the values of the nodes asked for."""

    def __init__(self, gm: torch.fx.GraphModule, wanted: set[str]) -> None:
        super().__init__(gm)
        self.wanted = wanted
        self.values: dict[str, object] = {}

    def run_node(self, n: torch.fx.Node):
        result = super().run_node(n)
        if n.name in self.wanted:  # as it is now: an in-place add later writes into its first input
            self.values[n.name] = result.clone() if isinstance(result, torch.Tensor) else result
        return result


def _checked(gm: torch.fx.GraphModule, blocks: list[Block], example_inputs: tuple,
             analysis: Analysis) -> list[Block]:
    """The blocks whose zeroed parameters zero the branch on the example inputs (all zeroed in one run),
    and whose skip module then returns ``x``; renumbered in graph order."""
    if not blocks:
        return []
    parameters = dict(gm.named_parameters())
    saved = {name: parameters[name].detach().clone() for b in blocks for name in b.zeroed}
    skip_ends = {b.id: _module_output(gm, b) for b in blocks if b.kind == "skip"}
    wanted = {b.output for b in blocks} | {b.skip for b in blocks} | set(skip_ends.values())
    try:
        as_is = _values(gm, wanted, example_inputs)  # the branches' shares of their residuals, as the model is
        try:
            with torch.no_grad():
                for name in saved:
                    parameters[name].zero_()
            values = _values(gm, wanted, example_inputs)
        finally:
            with torch.no_grad():
                for name, tensor in saved.items():
                    parameters[name].copy_(tensor)
    except Exception as error:  # noqa: BLE001 - the model's own code may raise anything; no block is offered
        analysis.kept_blocks.update({b.add: f"the graph did not run to check its branch: {error}" for b in blocks})
        return []
    kept, nodes = [], {n.name: n for n in gm.graph.nodes}
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    for block in blocks:
        block = dataclasses.replace(block, share=_share(as_is.get(block.skip), as_is.get(block.output)))
        branch, skip = values.get(block.output), values.get(block.skip)
        end = values.get(skip_ends.get(block.id, block.output))
        if not isinstance(branch, torch.Tensor) or bool(branch.ne(0).any()):
            analysis.kept_blocks[block.add] = "zeroing its last layer's parameters does not zero its branch"
        elif block.kind == "skip" and not (isinstance(end, torch.Tensor)
                                           and torch.equal(end, cast(torch.Tensor, skip))):
            found = _branch(nodes[block.skip], nodes[block.output], nodes[block.add], position)
            place = None if isinstance(found, str) else _zero_module(gm, nodes[block.add], nodes[block.output], *found)
            if place is None:  # nor is the branch one module the model's code adds
                analysis.kept_blocks[block.add] = f"{block.module} does not return its input once the branch is zero"
            else:
                kept.append(dataclasses.replace(block, module=place[0], kind=place[1]))
        else:
            kept.append(block)
    return [dataclasses.replace(block, id=index) for index, block in enumerate(kept)]


def sole_operations(gm: torch.fx.GraphModule, blocks: list[Block]) -> list[tuple[str, tuple[int, ...]]]:
    """The operations that only removable blocks compute, each with those blocks: a plan that removed them
    all would compute something else than a smaller model (a decoder without its attention mixes no tokens).
    An operation is a node's function, method or module class; calls that move no data are not counted."""
    inside: dict[str, set[int]] = {}  # a branch's nodes (its add is the skip, no computation of its own)
    for block in blocks:
        for name in block.nodes:
            if name != block.add:
                inside.setdefault(name, set()).add(block.id)
    computed: dict[str, set[int]] = {}
    outside: set[str] = set()
    adds = {block.add for block in blocks}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module") or _rule(node).deployed(gm, node) != "data":
            continue
        operation = (type(gm.get_submodule(node.target)).__name__ if node.op == "call_module"
                     else graph.call_name(node))
        if node.name in inside:
            computed.setdefault(operation, set()).update(inside[node.name])
        elif node.name not in adds:
            outside.add(operation)
    families: dict[tuple[int, ...], list[str]] = {}
    for operation, ids in sorted(computed.items()):
        if operation not in outside:
            families.setdefault(tuple(sorted(ids)), []).append(operation)
    return [(", ".join(names[:3]) + (", ..." if len(names) > 3 else ""), ids) for ids, names in families.items()]


def without_blocks(gm: torch.fx.GraphModule, reasons: dict[int, str]) -> None:
    """Take the blocks ``reasons`` names out of ``Analysis.blocks`` (into ``kept_blocks``, with the reason),
    renumbering the rest and what alone they compute (``Analysis.sole``)."""
    analysis: Analysis = gm.meta[ANALYSIS_KEY]
    analysis.kept_blocks.update({b.add: reasons[b.id] for b in analysis.blocks if b.id in reasons})
    analysis.blocks = [dataclasses.replace(block, id=index) for index, block in
                       enumerate(b for b in analysis.blocks if b.id not in reasons)]
    analysis.sole = sole_operations(gm, analysis.blocks)


def _share(x, y) -> float:
    """``||y|| / (||x|| + ||y||)``: the branch's share of the residual's norm (1 where it cannot be read)."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        return 1.0
    x_norm, y_norm = float(x.float().norm()), float(y.float().norm())
    return y_norm / (x_norm + y_norm) if x_norm + y_norm > 0 else 1.0


def _module_output(gm: torch.fx.GraphModule, block: Block) -> str:
    """The last node of a skip block's module (the add, or the activation after it)."""
    node = next(n for n in gm.graph.nodes if n.name == block.add)
    inside = _inside(list(gm.graph.nodes), block.module)
    while len(node.users) == 1 and next(iter(node.users)) in inside:
        node = next(iter(node.users))
    return node.name


def record_returns(model: torch.nn.Module, args: tuple, kwargs: dict, gm: torch.fx.GraphModule) -> None:
    """What each block's "zero" module returns, seen in one eager run of ``model``: where a tuple (Hugging
    Face's attention returns its output and its weights), its length, so ``ZeroBranch`` returns one alike;
    a module whose tuple does not start with the branch's result is no block."""
    analysis: Analysis = gm.meta[ANALYSIS_KEY]
    zero = {b.module for b in analysis.blocks if b.kind == "zero"}
    if not zero:
        return
    outputs: dict[str, object] = {}
    hooks = [model.get_submodule(path).register_forward_hook(
        lambda module, inputs, output, path=path: outputs.setdefault(path, output)) for path in zero]
    try:
        run_eager(model, args, kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    kept = []
    for block in analysis.blocks:
        output = outputs.get(block.module)
        if block.kind == "zero" and isinstance(output, (tuple, list)):
            if not output or not isinstance(output[0], torch.Tensor):
                analysis.kept_blocks[block.add] = f"{block.module} returns a tuple that does not start with its branch"
                continue
            block = dataclasses.replace(block, returns=len(output))
        kept.append(block)
    analysis.blocks = [dataclasses.replace(block, id=index) for index, block in enumerate(kept)]


def emptied_modules(gm: torch.fx.GraphModule, blocks: list[Block]) -> list[str]:
    """The outermost modules (called once) every node of which goes with the removed ``blocks``: their
    branches and adds, and what only those read (a decoder layer whose attention and MLP both go). Each
    then returns its input, so the user's model swaps it for ``Skip``."""
    if not blocks:
        return []
    nodes = list(gm.graph.nodes)
    by_name = {n.name: n for n in nodes}
    skip_of = {by_name[b.add]: by_name[b.skip] for b in blocks}
    live: set[torch.fx.Node] = set()
    stack = [n for n in nodes if n.op == "output"]
    while stack:  # what the output still reads once each removed add reads as its skip input
        node = stack.pop()
        if node in skip_of:  # a removed add passes its skip input on and is itself gone
            stack.append(skip_of[node])
        elif node not in live:
            live.add(node)
            stack.extend(node.all_input_nodes)
    gone = set(nodes) - live
    candidates = {p for b in blocks for p, first in _paths(by_name[b.add]) if first}
    emptied: list[str] = []
    for path in sorted(candidates, key=lambda p: p.count(".")):
        inside = _inside(nodes, path) - {n for n in nodes if n.op == "get_attr"}
        kept = {n for n in inside - gone if not _passes_on(gm, n)}  # a cast of the input passes it on as it is
        if inside and not kept and not any(path.startswith(f"{e}.") for e in emptied) \
                and all(first for n in inside for p, first in _paths(n) if p == path):
            emptied.append(path)
    return emptied


def _passes_on(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """A call that returns its one tensor input as it is, or cast to the dtype it has (an RMS norm's float32)."""
    if node.op not in ("call_function", "call_method", "call_module") or len(node.all_input_nodes) != 1:
        return False
    cast = getattr(node.target, "overloadpacket", node.target) in \
        (torch.ops.aten.to, torch.ops.aten._to_copy, "to", "float", "type_as")
    same = graph.dtype(node) is not None and graph.dtype(node) == graph.dtype(node.all_input_nodes[0])
    return _rule(node).identity(gm, node) or (cast and same)


def block_spaces(gm: torch.fx.GraphModule) -> tuple[dict[str, int], dict[str, int]]:
    """Where the blocks' costs sit: the block space of each node in a block's nodes, and of each tensor
    (qualified name) only nodes of one block read; what cost models multiply by the block's kept share."""
    analysis: Analysis | None = gm.meta.get(ANALYSIS_KEY)
    nodes = {name: block.space for block in (analysis.blocks if analysis else []) for name in block.nodes}
    readers: dict[str, set[int | None]] = {}
    for node in gm.graph.nodes:
        for name in _tensors_read(gm, node):
            readers.setdefault(name, set()).add(nodes.get(node.name))
    tensors = {name: space for name, spaces in readers.items()
               if len(spaces) == 1 and (space := next(iter(spaces))) is not None}
    return nodes, tensors
