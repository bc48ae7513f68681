"""Partitioned capture: when no front end takes the whole model, its largest submodules that are captured
alone, stitched into one graph for the passes; the rest of the model runs as written.

The module tree is walked top-down; a submodule that holds parameters and is called in one eager run of
the model is captured on the inputs it received there (torch.fx, then torch.export), and kept when its
graph reproduces the submodule on every recorded call; otherwise its children are tried. Parts stay
disjoint subtrees, and a submodule never called keeps its weights as they are.

Channels wholly inside a part are pruned. What crosses the uncaptured code is kept: each part's inputs
are inputs of the stitched graph and its outputs are outputs of it (fxprune never prunes those). The
exception is a tensor that one eager run shows flowing unchanged from a part's output into another
part's input, read outside the parts only for its shape (the FPN features a torchvision detector hands
from its backbone to its heads): the stitched graph wires the two together, so their channels are
coupled and pruned together instead of kept.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn as nn
from torch.fx.graph import _PyTreeInfo
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from fxprune.errors import CaptureError
from fxprune.frontends.fx_trace import propagate_shapes
from fxprune.ir.capture import FX, PART_KEY, PARTITIONED, Capture, Part, capture_of, flat_inputs, structured
from fxprune.ir.graph import attribute, inference, run_eager, target_name
from fxprune.ir.keys import CAPTURE_KEY

PART_OUTPUT_KEY = "part_output"  # node.meta: the (part, leaf) outputs a node of the stitched graph is
# reads of a tensor that do not depend on its values or channel contents beyond its shape
_SHAPE_READS = frozenset({"shape", "size", "dim", "ndim", "ndimension", "dtype", "device", "layout", "is_cuda",
                          "is_floating_point", "requires_grad", "__len__", "get_device", "is_sparse"})
_TOLERANCE = 1e-4


@dataclass
class _Calls:
    """How one forward called a module: the count, the first and the last call's inputs."""

    count: int = 0
    samples: list[tuple[tuple, dict]] = field(default_factory=list)


@dataclass
class _Found:
    path: str
    module: nn.Module
    gm: torch.fx.GraphModule  # takes the leaves of its inputs, returns a flat tuple of its outputs' leaves
    calls: int


def partition(model: nn.Module, args: tuple, kwargs: dict, failed: list[tuple[str, str]],
              capture_part: Any) -> tuple[torch.fx.GraphModule, tuple]:
    """The stitched graph of ``model``'s capturable parts and its example inputs; ``capture_part(module,
    args, kwargs)`` captures one submodule (the capture pass's ``capture``), ``failed`` says why the whole
    model was not captured."""
    copied = copy.deepcopy(model)  # hooks stay off the user's model
    calls = _record_calls(copied, args, kwargs)
    found: list[_Found] = []
    _walk("", copied, calls, found, capture_part)
    if not found:
        raise CaptureError("no capture path took the model whole, and none of its submodules with parameters "
                           "could be captured alone either")
    inputs, outputs, order, escaped = _observe(copied, args, kwargs, found)
    found.sort(key=lambda f: order[f.path])
    return _stitch(found, inputs, outputs, escaped, failed)


def _record_calls(model: nn.Module, args: tuple, kwargs: dict) -> dict[nn.Module, _Calls]:
    calls: dict[nn.Module, _Calls] = {}

    def record(module, a, k):
        seen = calls.setdefault(module, _Calls())
        seen.count += 1
        seen.samples[1:] = []
        seen.samples.append((a, k))  # the first call, and the last one

    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in model.modules()]
    try:
        run_eager(model, args, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _walk(prefix: str, module: nn.Module, calls: dict[nn.Module, _Calls], found: list[_Found], capture_part) -> None:
    """Capture each child holding parameters that the forward calls, or else its children."""
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if child not in calls or not any(True for _ in child.parameters()) or any(f.module is child for f in found):
            continue  # never called, nothing to prune, or one module under two names (captured once)
        try:
            gm = _capture(child, calls[child], capture_part)
        except Exception:  # noqa: BLE001 - not capturable alone: its children may be
            _walk(path, child, calls, found, capture_part)
            continue
        found.append(_Found(path, child, gm, calls[child].count))


def _capture(module: nn.Module, calls: _Calls, capture_part) -> torch.fx.GraphModule:
    """A flat graph of ``module`` that reproduces it on each recorded call, or an exception."""
    args, kwargs = calls.samples[0]
    gm, _ = capture_part(module, args, kwargs)
    returned = [run_eager(module, a, k) for a, k in calls.samples]
    capture = capture_of(gm)
    assert capture is not None  # capture_part records how it captured
    if capture.path == FX:
        _flatten_fx(gm, args, returned[0])
    for (sample_args, sample_kwargs), value in zip(calls.samples, returned):
        want = pytree.tree_leaves(value)
        with inference(gm, grad=False):
            got = list(gm(*flat_inputs(gm, sample_args, sample_kwargs)))
        if len(got) != len(want) or not all(_close(g, w) for g, w in zip(got, want)):
            raise CaptureError("the captured graph does not reproduce the submodule on its recorded calls")
    return gm


def _close(got: Any, want: Any) -> bool:
    if not isinstance(want, torch.Tensor):
        return got == want
    if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != want.dtype:
        return False
    if not want.is_floating_point():
        return torch.equal(got, want)
    scale = float(want.abs().max()) if want.numel() else 0.0
    return bool(((got - want).abs() <= _TOLERANCE * (1 + scale)).all())


def _flatten_fx(gm: torch.fx.GraphModule, args: tuple, returned: Any) -> None:
    """Make a torch.fx graph take its fed inputs and return its outputs' leaves, as torch.export's do,
    with the structure kept on its Capture (so every part is stitched and restored one way)."""
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for unfed in placeholders[len(args):]:  # defaults the trace held constant
        for user in list(unfed.users):
            if user.op == "call_function" and getattr(user.target, "__name__", "") == "_assert_is_none":
                graph.erase_node(user)
        if unfed.users:
            raise CaptureError(f"the traced graph reads the unfed input {unfed.name}")
        graph.erase_node(unfed)
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    value, mapping = output.args[0], None
    if isinstance(value, torch.fx.Node) and value.op == "call_function" and isinstance(value.target, type) \
            and issubclass(value.target, dict):  # the OrderedDict the capture pass rebuilds
        mapping, value = value, value.args[0]
    leaves = pytree.tree_leaves(value)
    if len(leaves) != len(pytree.tree_leaves(returned)):
        raise CaptureError("the traced graph's outputs do not match what the submodule returns")
    output.args = (tuple(leaves),)
    if mapping is not None and not mapping.users:
        graph.erase_node(mapping)
    gm.recompile()
    structure = _PyTreeInfo([p.name for p in placeholders[:len(args)]], pytree.tree_structure((tuple(args), {})),
                            pytree.tree_structure(returned))
    capture = capture_of(gm)
    assert capture is not None  # captured by torch.fx
    gm.meta[CAPTURE_KEY] = Capture(FX, capture.failed, structure)


def _function_name(func: Any) -> str:
    name = getattr(func, "__name__", "")
    if name == "__get__":  # a property read: Tensor.shape.__get__
        return getattr(getattr(func, "__self__", None), "__name__", name)
    return name


class _OutsideUses(TorchFunctionMode):
    """Records which parts' output tensors the code outside the parts reads for more than their shape."""

    def __init__(self, watched: dict[int, torch.Tensor], depth: list[int]) -> None:
        super().__init__()
        self.watched, self.depth = watched, depth
        self.read: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.depth[0] and _function_name(func) not in _SHAPE_READS:
            self.read.update(id(x) for x in pytree.tree_leaves((args, kwargs))
                             if isinstance(x, torch.Tensor) and id(x) in self.watched)
        return func(*args, **kwargs)


def _observe(model: nn.Module, args: tuple, kwargs: dict, found: list[_Found]):
    """One eager run: each part's input and output leaves at its first call, the order parts are first
    called in, and the ids of part outputs read outside the parts (or returned by the model)."""
    by_module = {f.module: f for f in found}
    inputs: dict[str, list] = {}
    outputs: dict[str, list] = {}
    order: dict[str, int] = {}
    watched: dict[int, torch.Tensor] = {}
    depth = [0]

    def enter(module, a, k):
        part = by_module[module]
        if part.path not in inputs:
            inputs[part.path], order[part.path] = list(flat_inputs(part.gm, a, k)), len(order)
        depth[0] += 1

    def leave(module, a, k, returned):
        depth[0] -= 1
        part = by_module[module]
        if part.path not in outputs:
            outputs[part.path] = pytree.tree_leaves(returned)
            watched.update((id(x), x) for x in outputs[part.path] if isinstance(x, torch.Tensor))

    handles = [h for m in by_module for h in (m.register_forward_pre_hook(enter, with_kwargs=True),
                                              m.register_forward_hook(leave, with_kwargs=True))]
    uses = _OutsideUses(watched, depth)
    try:
        with uses:
            returned = run_eager(model, args, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    escaped = uses.read | {id(x) for x in pytree.tree_leaves(returned) if isinstance(x, torch.Tensor)}
    return inputs, outputs, order, escaped


def _stitch(found: list[_Found], inputs: dict[str, list], outputs: dict[str, list], escaped: set[int],
            failed: list[tuple[str, str]]) -> tuple[torch.fx.GraphModule, tuple]:
    """One graph holding every part's nodes, in call order, with couplings wired (module docstring)."""
    produced = {id(x): (f.path, k) for f in reversed(found) for k, x in enumerate(outputs[f.path])
                if isinstance(x, torch.Tensor)}  # the first part to return a tensor made it
    consumers: dict[int, list[str]] = {}
    for f in found:
        for x in inputs[f.path]:
            consumers.setdefault(id(x), []).append(f.path)
    calls = {f.path: f.calls for f in found}

    def coupled(x: Any, path: str) -> tuple[str, int] | None:
        source = produced.get(id(x)) if isinstance(x, torch.Tensor) else None
        if source is None or id(x) in escaped or source[0] == path or calls[source[0]] != 1:
            return None
        users = consumers[id(x)]
        if any(calls[u] != 1 for u in users) or len(users) != len(set(users)):
            return None
        return source

    graph, root = torch.fx.Graph(), nn.Module()
    sources: dict[str, list] = {}
    example: list[torch.Tensor] = []
    for f in found:  # every placeholder first
        _install(root, f.path, f.gm)
        sources[f.path] = []
        for k, x in enumerate(inputs[f.path]):
            source: tuple[str, int | str] | None = coupled(x, f.path)
            if source is None:
                node = graph.placeholder(f"{f.path.replace('.', '_')}_input_{k}")
                example.append(x.detach() if isinstance(x, torch.Tensor) else x)
                source = ("input", node.name)
            sources[f.path].append(source)
    by_output: dict[tuple[str, int | str], torch.fx.Node] = {}
    placeholders = {n.name: n for n in graph.nodes}
    parts: list[Part] = []
    returned: list[torch.fx.Node] = []
    raw_outputs: set[int] = set()
    for f in found:
        raw = not parts or all(isinstance(x, torch.Tensor) and id(x) in raw_outputs for x in inputs[f.path])
        if raw:
            raw_outputs.update(id(x) for x in outputs[f.path])
        env: dict[torch.fx.Node, Any] = {}
        own = [n for n in f.gm.graph.nodes if n.op == "placeholder"]
        for node, source in zip(own, sources[f.path]):
            env[node] = placeholders[source[1]] if source[0] == "input" else by_output[source]
        for node in f.gm.graph.nodes:
            if node.op in ("placeholder", "output"):
                continue
            env[node] = copied = graph.node_copy(node, lambda n: env[n])  # noqa: B023 - called at once, here
            if node.op in ("get_attr", "call_module"):
                copied.target = f"{f.path}.{node.target}"
            copied.meta[PART_KEY] = f.path
        leaves = next(n for n in reversed(f.gm.graph.nodes) if n.op == "output").args[0]
        names: list[str | None] = []
        constants: dict[int, Any] = {}
        for k, leaf in enumerate(leaves):
            if not isinstance(leaf, torch.fx.Node):
                names.append(None)
                constants[k] = leaf
                continue
            node = by_output[(f.path, k)] = env[leaf]
            node.meta.setdefault(PART_OUTPUT_KEY, []).append((f.path, k))
            names.append(node.name)
            tensor = outputs[f.path][k]
            if not any(coupled(tensor, user) for user in consumers.get(id(tensor), [])):
                returned.append(node)  # read outside the parts (or by no part): an output, kept whole
        part_capture = capture_of(f.gm)
        assert part_capture is not None  # each part was captured
        parts.append(Part(f.path, f.calls, part_capture, [n.name for n in own],
                          [s[1] if s[0] == "input" else f"{s[0]}:{s[1]}" for s in sources[f.path]], names, constants,
                          raw=raw))
    graph.output(tuple(returned))
    gm = torch.fx.GraphModule(root, graph, "Partitioned")
    gm.meta[CAPTURE_KEY] = Capture(PARTITIONED, list(failed), None, parts)
    example_inputs = tuple(example)
    propagate_shapes(gm, example_inputs)
    return gm, example_inputs


def _install(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``path`` under ``root``, with empty modules above it."""
    *parents, name = path.split(".")
    owner = root
    for parent in parents:
        if not hasattr(owner, parent):
            owner.add_module(parent, nn.Module())
        owner = getattr(owner, parent)
    owner.add_module(name, module)


def split(gm: torch.fx.GraphModule) -> dict[str, torch.fx.GraphModule]:
    """Each part of a (pruned) stitched graph as a module called like the submodule it replaces."""
    capture = capture_of(gm)
    assert capture is not None  # a stitched graph lists its parts
    _label_new_nodes(gm)
    by_output = {tuple(key): node for node in gm.graph.nodes for key in node.meta.get(PART_OUTPUT_KEY, [])}
    placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    modules = {}
    for part in capture.parts:
        graph, env = torch.fx.Graph(), {}
        attrs: dict[str, Any] = {}
        for name, source in zip(part.placeholders, part.inputs):
            path, _, leaf = source.rpartition(":")
            env[by_output[(path, int(leaf))] if path else placeholders[source]] = graph.placeholder(name)
        for node in gm.graph.nodes:
            if node.meta.get(PART_KEY) != part.path or node.op in ("placeholder", "output"):
                continue
            env[node] = copied = graph.node_copy(node, lambda n: env[n])  # noqa: B023 - called at once, here
            if node.op in ("get_attr", "call_module"):
                prefix, target = part.path + ".", target_name(node)
                copied.target = local = target[len(prefix):] if target.startswith(prefix) else target
                attrs[local] = attribute(gm, target)
        graph.output(tuple(env[by_output[(part.path, k)]] if name is not None else part.constants[k]
                           for k, name in enumerate(part.outputs)))
        module = torch.fx.GraphModule(attrs, graph, "Part")
        module.meta[CAPTURE_KEY] = part.capture
        modules[part.path] = structured(module)
    return modules


def _label_new_nodes(gm: torch.fx.GraphModule) -> None:
    """Nodes a rewrite inserted belong to the part of the node they feed (or, failing that, read)."""
    for node in reversed(list(gm.graph.nodes)):
        if PART_KEY not in node.meta and node.op not in ("placeholder", "output"):
            near = [n for n in list(node.users) + node.all_input_nodes if PART_KEY in n.meta]
            if near:
                node.meta[PART_KEY] = near[0].meta[PART_KEY]


def assemble(model: nn.Module, parts: Mapping[str, nn.Module]) -> nn.Module:
    """A copy of ``model`` with each part put in place of the submodule it was captured from."""
    result = copy.deepcopy(model)
    for path, module in parts.items():
        result.set_submodule(path, module)
    return result
