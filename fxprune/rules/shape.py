"""Shape ops, understood by replaying them on a tensor of channel labels; concat, stack, split, indexing.

Label replay: the op is run on an integer tensor whose entries are 1 + the channel index of each
position (0 marks "no channel"), and the output says where each channel went. If labels vary along one
output dim, that dim is the channel axis; spread over several dims (the middle of a channel shuffle),
the result stays *pending* until a later shape op merges them; a chain that ends as a pure permutation of
its origin is rewritten as one gather.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, Callable, cast

import numpy as np
import onnx
import torch
import torch.fx
import torch.nn as nn

from fxprune.ir import graph
from fxprune.ir.channels import ChannelSpace
from fxprune.rules.base import Kept, Rule, arg, kept_of, tensor_inputs
from fxprune.rules.coupling import ChannelBuilder, Pending
from fxprune.rules.onnx import OnnxOps, ResizeError, Shapes, attribute, follow

aten = torch.ops.aten


def ensure_space(b: ChannelBuilder, node: torch.fx.Node, dim: int):
    """``ChannelBuilder.ensure_space``, but a tensor computed from parameters alone gets its axis inferred.

    ``class_token.expand(n, -1, -1)`` has no channel axis of its own until it meets the residual
    stream; replaying the shape ops on each candidate axis of the parameter finds which one it is. A
    frozen BatchNorm's ``(weight * (var + eps).rsqrt()).reshape(1, -1, 1, 1)`` is arithmetic and shape
    ops over buffers: the axis is traced back through both to the buffers, which then get the space.
    """
    if node.op != "get_attr" and b.space_of(node) is None and node not in b.pending \
            and _parameter_expression(b, node):
        rank = len(b.tensor_shape(node))
        if isinstance(b.rule_for(node), (Shape, GetItem)):
            src = cast(torch.fx.Node, node.args[0])  # the tensor reshaped or indexed
            for candidate in range(len(b.tensor_shape(src))):
                try:
                    out = _replay(b, node, src, _labels(b.tensor_shape(src), candidate))
                except Exception:  # noqa: BLE001 - this candidate dim does not replay; try the next
                    continue
                varying = [d for d in range(out.dim()) if not _constant_along(out, d)]
                if varying == [dim % rank]:
                    ensure_space(b, src, candidate)
                    SHAPE.couple(b, node)
                    break
        else:  # arithmetic: every operand that is not broadcast along the axis carries it
            for src in tensor_inputs(node):
                aligned = dim % rank - (rank - len(b.tensor_shape(src)))
                if aligned >= 0 and b.tensor_shape(src)[aligned] == b.tensor_shape(node)[dim % rank]:
                    ensure_space(b, src, aligned)
            b.rule_for(node).couple(b, node)
    return b.ensure_space(node, dim)


def _parameter_expression(b: ChannelBuilder, node: torch.fx.Node) -> bool:
    """True for a tensor computed from parameters and buffers (get_attr) alone, through shape ops and
    arithmetic."""
    if node.op == "get_attr":
        return True
    known = b.parameter_expressions.get(node)
    if known is None:
        inputs = tensor_inputs(node)
        known = (node.op in ("call_function", "call_method") and bool(inputs)
                 and b.rule_for(node).parameter_arithmetic and all(_parameter_expression(b, i) for i in inputs))
        b.parameter_expressions[node] = known
    return known


class ShapeOnnx(OnnxOps):
    """Reshape's target records widths: it follows the data's new shape (``reshape_target``)."""

    def constants(self, node: onnx.NodeProto, values: dict[int, np.ndarray], old: Shapes,
                  new: Shapes) -> dict[int, np.ndarray]:
        if node.op_type != "Reshape":
            return {}
        if 1 not in values:
            raise ResizeError(f"Reshape node {node.name!r} reads a computed shape, not a constant")
        data = node.input[0]
        target = reshape_target(old[data], old[node.output[0]], new[data])
        if target is None:
            raise ResizeError(f"Reshape node {node.name!r} regroups a pruned axis ({old[data]} -> "
                              f"{old[node.output[0]]}) in a way fxprune cannot follow")
        return {1: np.asarray(target, dtype=np.int64)}


def reshape_target(old_in: tuple, old_out: tuple, new_in: tuple) -> list[int] | None:
    """The new target of a reshape that took ``old_in`` to ``old_out``, now given ``new_in``: axes are
    matched in runs of equal element count; a run that changed size must end in one output axis."""
    if len(old_in) != len(new_in):
        return None
    target: list[int] = []
    i = o = 0
    while i < len(old_in) or o < len(old_out):
        run_in, run_out = [i], [o]
        size_in, size_out = _at(old_in, i), _at(old_out, o)
        while size_in != size_out:
            if size_in < size_out:
                i += 1
                if i >= len(old_in):
                    return None
                run_in.append(i)
                size_in *= old_in[i]
            else:
                o += 1
                if o >= len(old_out):
                    return None
                run_out.append(o)
                size_out *= old_out[o]
        new_size = int(np.prod([new_in[k] for k in run_in if k < len(new_in)]))
        if new_size == size_in:
            target += [old_out[k] for k in run_out if k < len(old_out)]
        elif len(run_out) == 1 and run_out[0] < len(old_out):
            target.append(new_size)
        else:
            return None
        i, o = i + 1, o + 1
    return target


def _at(shape: tuple, index: int) -> int:
    return shape[index] if index < len(shape) else 1


class Shape(Rule):
    """view/reshape/permute/flatten/transpose/expand...: channels go where the label replay says."""

    name = "shape"
    parameter_arithmetic = True
    onnx = ShapeOnnx("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze")
    memory_kernels = frozenset({"Transpose", "Slice", "Expand", "Tile"})  # a permute, slice or repeat copies
    modules = (nn.Flatten, nn.Unflatten, nn.ChannelShuffle)
    functions = (torch.reshape, torch.flatten, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
                 torch.movedim, torch.swapaxes, torch.swapdims, torch.t, torch.narrow, torch.unflatten,
                 aten.view, aten.reshape, aten._unsafe_view, aten.permute, aten.transpose, aten.flatten,
                 aten.squeeze, aten.unsqueeze, aten.expand, aten.t, aten.select, aten.slice, aten.unflatten,
                 aten.movedim, aten.swapaxes, aten.narrow, aten.view_as, aten.expand_as, aten.repeat)
    methods = ("view", "reshape", "permute", "transpose", "flatten", "unflatten", "squeeze", "unsqueeze",
               "expand", "movedim", "swapaxes", "swapdims", "t", "narrow", "repeat", "contiguous")
    wrapped = ("_patch_merging_pad",)  # torchvision: pads H/W, then concatenates the 2x2 neighbours on channels
    sized = ("view", "reshape", "expand", torch.reshape, aten.view.default, aten.reshape.default,
             aten._unsafe_view.default, aten.expand.default)
    # calls that only relabel their tensor's shape (torch.export's aten views are counted as kernels that move
    # data, as the latency model has counted them since decoders were first timed: docs/llm.md rests on it)
    views = ("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "expand")

    def deployed(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
        if node.op == "call_module":
            return "data" if isinstance(gm.get_submodule(graph.target_name(node)), nn.ChannelShuffle) else "none"
        if isinstance(node.target, torch._ops.OpOverload):
            return "data"
        return "view" if graph.call_name(node) in self.views else "data"

    def couple(self, b: ChannelBuilder, node: torch.fx.Node) -> None:
        """view/reshape/permute/flatten/getitem...: replay the op on a tensor of channel labels.

        Each position of the label tensor holds the index of its channel element, so the op's output says
        exactly where every channel went. An output whose labels vary along one dim only is a channel
        axis again; labels spread over several dims (a channel shuffle's intermediate) stay pending until a
        later shape op merges them back.
        """
        src = node.args[0]
        if not isinstance(src, torch.fx.Node) or b.shape(src) is None:
            return
        pending = b.take_pending(src, node)
        if pending is not None:
            origin, labels_in = pending.origin, pending.labels
        else:
            space = b.space_of(src)
            if space is None:
                return
            origin, labels_in = space, _labels(b.tensor_shape(src), space.dim)
        try:
            out = _replay(b, node, src, labels_in)
        except Exception as exc:  # noqa: BLE001 - an argument we cannot evaluate (a tensor index, say)
            b.freeze(origin, f"{node.name} could not be replayed on channel labels ({type(exc).__name__})")
            return
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != b.shape(node):
            b.freeze(origin, f"{node.name} does not map channels to one output tensor")
            return
        present = np.unique(out.numpy())
        if present[0] == 0:  # label 0 marks positions that hold no channel (padding)
            b.freeze(origin, f"{node.name} pads or fills positions with no channel")
            return
        dims = [d for d in range(out.dim()) if not _constant_along(out, d)]  # dims the labels vary along
        subset = present.size != (origin.size if pending is None else np.unique(labels_in.numpy()).size)
        if subset and pending is None:
            b.freeze(origin, f"{node.name} selects individual channels")
            return
        if len(dims) == 1:
            dim = dims[0]
            element_map = _along(out, dim)
            space = b.new_space(node, dim)
            b.couple(space, origin, None, element_map)
            if pending is not None and subset:  # one part of a spread layout (q of a fused qkv): the chain follows
                if not b.resolve_chain(pending, space, element_map):
                    b.freeze(origin, f"{node.name} takes a part of a layout its chain spreads over several dims")
            elif pending is not None:
                _mark_gather(b, node, pending, space, element_map)
        elif len(dims) > 1:
            b.pending[node] = (Pending(origin, src, out, (node,), (out,)) if pending is None
                               else pending.extended(node, out))
        else:
            b.freeze(origin, f"{node.name} reduces its channel axis to one element")

    def update(self, gm: torch.fx.GraphModule, node: torch.fx.Node, kept: Kept) -> None:
        if "origin" in graph.channels(node).notes:
            _gather(gm, node, kept)
        elif node.op != "call_module" and node.target in self.sized:
            _resize(node, kept)
        elif node.target in (aten.unflatten.int, torch.unflatten, "unflatten"):
            _resize_unflatten(node, kept)


SHAPE = Shape()


def pass_pending(b: ChannelBuilder, node: torch.fx.Node, src: torch.fx.Node) -> bool:
    """Carry a pending channel layout through an op that leaves every position where it was (a no-op at
    inference: Identity, dropout, contiguous, a cast). True if ``src`` was pending."""
    if src not in b.pending or b.shape(node) != tuple(b.pending[src].labels.shape):
        return False
    pending = b.take_pending(src, node)
    assert pending is not None  # src is pending
    b.pending[node] = pending.extended(node, pending.labels)
    return True


def combine_pending(b: ChannelBuilder, node: torch.fx.Node, inputs: list[torch.fx.Node], out=None,
                    stored: Sequence[tuple[torch.fx.Node, torch.Tensor]] = ()) -> bool:
    """Carry pending layouts of one origin through ``node``, which combines them (an add, a mul, a cat along a
    dim), with other operands that hold no channels: rotary embeddings' ``q * cos + rotate_half(q) * sin``.
    ``out``: the labels at ``node`` (default: its first pending input's, for position-by-position ops).
    Dims along which the other operands vary are marked: no head may run along them. False, and the
    layouts frozen, where the inputs are not so."""
    pendings = [src for src in inputs if src in b.pending]
    others = [src for src in inputs if src not in b.pending]
    out_shape = b.shape(node)
    ok = (len({id(b.pending[src].origin) for src in pendings}) == 1
          and all(graph.space(src) is None for src in others)
          and (out is not None or all(tuple(b.pending[src].labels.shape) == out_shape for src in pendings)))
    if not ok:
        for src in pendings:
            b.space_of(src)  # frozen as any op that is not a rearrangement
        return False
    shared = frozenset(len(b.tensor_shape(node)) - len(b.tensor_shape(src)) + d for src in others
                       for d, size in enumerate(b.tensor_shape(src)) if size > 1)
    parts = [cast(Pending, b.take_pending(src, node)) for src in pendings]  # each src is pending
    labels = [part.labels for part in parts] if out is None else [out]
    merged = Pending.merged(parts, node, labels, labels[0], shared)
    for tensor, tensor_labels in stored:  # stored tensors laid out as the layout: on its chain, so indexed with it
        merged = Pending(merged.origin, merged.origin_node, merged.labels, (tensor, *merged.chain),
                         (tensor_labels, *merged.chain_labels), merged.shared)
    b.pending[node] = merged
    return True


def _labels(shape: tuple[int, ...], dim: int) -> torch.Tensor:
    """Label tensor of ``shape``: 1 + the element index along ``dim`` (0 is left for 'no channel')."""
    view = [1] * len(shape)
    view[dim] = shape[dim]
    return torch.arange(1, shape[dim] + 1).view(view).expand(shape).contiguous()


def _replay(b: ChannelBuilder, node: torch.fx.Node, src: torch.fx.Node, labels: torch.Tensor):
    """Evaluate ``node`` with ``labels`` in place of ``src`` and recorded values for the other args."""
    args = torch.fx.node.map_arg(node.args, lambda a: labels if a is src else b.value(a))
    kwargs = torch.fx.node.map_arg(node.kwargs, lambda a: labels if a is src else b.value(a))
    if node.op == "call_function":
        return cast(Callable[..., Any], node.target)(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], graph.target_name(node))(*args[1:], **kwargs)
    return b.modules[graph.target_name(node)](*args, **kwargs)


def _constant_along(t: torch.Tensor, dim: int) -> bool:
    """True when every slice of ``t`` along ``dim`` equals the first one."""
    return bool((t == t.narrow(dim, 0, 1)).all())


def _along(t: torch.Tensor, dim: int) -> np.ndarray:
    index: list[int | slice] = [0] * t.dim()
    index[dim] = slice(None)
    return t[tuple(index)].numpy().astype(np.int64) - 1


def _mark_gather(b, node, pending, space, element_map) -> None:
    """The end of a pending chain: a pure permutation of the origin's channels becomes one gather."""
    shape_ok = b.shape(node) == b.shape(pending.origin_node) and space.dim == pending.origin.dim
    if not shape_ok or np.unique(element_map).size != element_map.size:
        b.freeze(pending.origin, f"{node.name} rearranges channels in a way that is not a permutation")
        return
    b.replaced_chains.update(pending.chain)
    b.info(node).notes.update(origin=pending.origin_node.name, element_map=element_map)
    _align_groups(b, pending)


def _align_groups(b, pending) -> None:
    """The first op of a permutation chain spreads the channels over (groups, per group) dims, e.g. a
    channel shuffle's ``view(B, G, C // G, H, W)``: every group keeps the same positions, so the user's
    code, which computes ``C // G`` from the width it is given, shuffles the pruned channels as the gather
    does (the graph's own rewrite needs no such constraint; the user's module does)."""
    first = pending.chain_labels[0] if pending.chain_labels else None
    if first is None:
        return
    dims = [d for d in range(first.dim()) if not _constant_along(first, d)]
    if len(dims) != 2:
        return
    index: list[int | slice] = [0] * first.dim()
    index[dims[0]], index[dims[1]] = slice(None), slice(None)
    grid = first[tuple(index)].numpy().astype(np.int64) - 1  # (groups, per group) origin elements
    for row in grid[1:]:
        b.couple(pending.origin, pending.origin, grid[0], row)


def _resize(node: torch.fx.Node, kept: Kept) -> None:
    """view/reshape/expand sizes: the kept count on the channel axis; traced literals where asked.

    A literal channel count becomes the kept count. A width read at run time that sets an axis whose
    width never changes (the dependency pass's ``literal_sizes``) becomes the traced number again.
    """
    given = node.args[1] if len(node.args) == 2 else None
    packed = isinstance(given, (tuple, list))
    sizes = list(given if isinstance(given, (tuple, list)) else node.args[1:])
    for position, value in graph.channels(node).notes.get("literal_sizes", {}).items():
        sizes[position] = value
    space = graph.space(node)
    new = kept_of(space, kept)
    if new is not None and space is not None and isinstance(sizes[space.dim], int) and sizes[space.dim] != -1:
        sizes[space.dim] = len(new)
    node.args = (node.args[0], tuple(sizes)) if packed else (node.args[0], *sizes)


def _resize_unflatten(node: torch.fx.Node, kept: Kept) -> None:
    """unflatten(x, dim, sizes): the size of the channel axis among ``sizes`` becomes its kept count."""
    space, new = graph.space(node), kept_of(graph.space(node), kept)
    dim, sizes = arg(node, 1, "dim"), list(arg(node, 2, "sizes"))
    position = space.dim - dim % len(graph.tensor_shape(node.args[0])) if space is not None else -1
    if new is not None and 0 <= position < len(sizes) and sizes[position] != -1:
        sizes[position] = len(new)
        node.args = (node.args[0], dim, tuple(sizes))


def _gather(gm: torch.fx.GraphModule, node: torch.fx.Node, kept: Kept) -> None:
    """A channel permutation built from shape ops becomes one index_select of the kept channels."""
    notes = graph.channels(node).notes
    origin = next(n for n in gm.graph.nodes if n.name == notes["origin"])
    element_map = torch.as_tensor(notes["element_map"])
    origin_space, out_space = graph.space(origin), graph.space(node)
    assert out_space is not None  # the end of a chain the dependency pass found a permutation
    origin_kept, out_kept = kept_of(origin_space, kept), kept_of(out_space, kept)
    if out_kept is not None:
        element_map = element_map[out_kept]
    if origin_kept is not None and origin_space is not None:
        rank = torch.full((int(origin_space.size),), -1, dtype=torch.long)
        rank[origin_kept] = torch.arange(len(origin_kept))
        element_map = rank[element_map]
    buffer_name = f"fxprune_gather_{node.name}"
    gm.register_buffer(buffer_name, element_map.clone())
    with gm.graph.inserting_before(node):
        index = gm.graph.get_attr(buffer_name)
        gathered = gm.graph.call_function(torch.index_select, (origin, out_space.dim, index))
    node.replace_all_uses_with(gathered)
    gathered.meta = dict(node.meta)


class ConcatOnnx(OnnxOps):
    """``Concat``: an operand no parameter names keeps the concatenated axis and follows the other inputs on
    every other axis."""

    def implied_shape(self, node: onnx.NodeProto, index: int, old: Shapes, new: Shapes) -> tuple[int, ...] | None:
        inputs, own = list(node.input), old[node.input[index]]
        axis = attribute(node, "axis", 0) % len(own)
        other = next((name for j, name in enumerate(inputs) if j != index and old[name] != new[name]), None)
        if other is None:
            return own
        followed = follow(own, old[other], new[other])
        return tuple(own[d] if d == axis else followed[d] for d in range(len(followed)))


class Cat(Rule):
    """cat along channels: output slice [offset, offset + n) is the input's axis; along another dim,
    every input's channels are the output's."""

    name = "cat"
    onnx = ConcatOnnx("Concat")
    memory_kernels = frozenset({"Concat", "QLinearConcat", "aten::cat"})
    functions = (torch.cat, torch.concat, torch.concatenate, aten.cat)

    def couple(self, b: ChannelBuilder, node: torch.fx.Node) -> None:
        tensors = list(arg(node, 0, "tensors"))
        cat_dim = arg(node, 1, "dim", 0) % len(b.tensor_shape(node))
        if any(t in b.pending for t in tensors):
            _cat_pending(b, node, tensors, cat_dim)
            return
        spaces = [b.space_of(t) for t in tensors]
        known = [s for s in spaces if s is not None]
        if not known:
            return
        channel_dim = known[0].dim
        out = b.new_space(node, channel_dim)
        offset = 0
        for t in tensors:
            width = b.tensor_shape(t)[channel_dim]
            positions = np.arange(offset, offset + width) if cat_dim == channel_dim else None
            b.couple(out, ensure_space(b, t, channel_dim), positions)
            offset += width if cat_dim == channel_dim else 0


def _cat_pending(b: ChannelBuilder, node: torch.fx.Node, tensors: list, cat_dim: int) -> None:
    """Parts of one split layout put back together (rotary's ``rotate_half``), or a layout appended to a
    stored tensor laid out alike along another dim (a key-value cache of past tokens, a buffer, gains the new
    token's keys): the buffer takes the layout, so the heads that go leave it too."""
    reference = next(b.pending[t].labels for t in tensors if t in b.pending)
    parts, stored = [], []
    for t in tensors:
        if t in b.pending:
            parts.append(b.pending[t].labels)
            continue
        shape = b.shape(t)
        alike = (isinstance(t, torch.fx.Node) and t.op == "get_attr" and graph.space(t) is None
                 and len(b.tensor_shape(t)) == reference.dim() and _constant_along(reference, cat_dim)
                 and all(n == m for d, (n, m) in enumerate(zip(b.tensor_shape(t), reference.shape)) if d != cat_dim))
        if not alike or shape is None:  # (alike: its shape is known)
            for each in tensors:
                b.space_of(each)  # frozen as any op that is not a rearrangement
            return
        parts.append(reference.narrow(cat_dim, 0, 1).expand(shape).contiguous())
        stored.append((t, parts[-1]))
    combine_pending(b, node, [t for t in tensors if t in b.pending], torch.cat(parts, cat_dim), stored)


class Stack(Rule):
    name = "stack"
    functions = (torch.stack, aten.stack)

    def couple(self, b: ChannelBuilder, node: torch.fx.Node) -> None:
        tensors = list(arg(node, 0, "tensors"))
        stack_dim = arg(node, 1, "dim", 0) % len(b.tensor_shape(node))
        known = [space for t in tensors if (space := b.space_of(t)) is not None]
        if not known:
            return
        in_dim = known[0].dim
        out = b.new_space(node, in_dim + (1 if stack_dim <= in_dim else 0))
        for t in tensors:
            b.couple(out, ensure_space(b, t, in_dim))


class Split(Rule):
    """split/chunk: each piece is an output of the node; along the channel axis it is a slice, and the
    rewrite splits with the kept width of each piece.

    Equal pieces stay equal (piece k's channel j is one group channel with piece 0's): the user's module,
    unlike the graph, is never given the pruned sizes, and its code splits by count (``chunk(2)``) or by
    one size it keeps (``split((self.c, self.c))``, set again by ``rules.attributes``)."""

    name = "split"
    memory_kernels = frozenset({"Split"})
    functions = (torch.split, torch.chunk, torch.tensor_split, aten.split, aten.split_with_sizes, aten.chunk)
    methods = ("split", "chunk", "tensor_split")

    def couple(self, b: ChannelBuilder, node: torch.fx.Node) -> None:
        """split/chunk: each piece is an output of the node; along the channel axis it is a slice."""
        src = node.args[0]
        space = b.space_of(src)
        pieces = node.meta.get("tensor_meta")
        if space is None or not isinstance(pieces, (tuple, list)):
            return
        dim = arg(node, 2, "dim", 0) % len(b.tensor_shape(src))
        offset, outs = 0, []
        for index, piece in enumerate(pieces):
            out = b.new_space(node, space.dim, size=piece.shape[space.dim], index=index)
            outs.append(out)
            if dim == space.dim:
                b.couple(out, space, None, np.arange(offset, offset + out.size))
                offset += out.size
            else:
                b.couple(out, space)
        if dim == space.dim and len(outs) > 1 and len({out.size for out in outs}) == 1:
            for out in outs[1:]:  # equal pieces stay equal, position by position: see ``equal_pieces``
                b.couple(outs[0], out)
        if dim == space.dim:
            b.info(node).notes["dim"] = dim

    def update(self, gm: torch.fx.GraphModule, node: torch.fx.Node, kept: Kept) -> None:
        notes = graph.channels(node).notes
        spaces = cast(list[ChannelSpace], graph.channels(node).spaces)  # couple made one per piece
        if "dim" not in notes:
            return
        sizes = [len(kept[s.id]) if s.id in kept else s.size for s in spaces]
        if sizes != [s.size for s in spaces]:
            node.op, node.target = "call_function", torch.split
            node.args, node.kwargs = (node.args[0], sizes), {"dim": notes["dim"]}


class GetItem(Rule):
    """Indexing a tuple picks one output's space; indexing a tensor is a shape op."""

    name = "getitem"

    def deployed(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
        return "none"  # one output of a node of several outputs, or an index into a non-tensor
    parameter_arithmetic = True
    functions = (operator.getitem,)

    def couple(self, b: ChannelBuilder, node: torch.fx.Node) -> None:
        """Indexing a tuple picks one output's space; indexing a tensor is a shape op."""
        src, index = node.args
        if b.shape(src) is not None:
            SHAPE.couple(b, node)
            return
        if not isinstance(index, int) or b.shape(node) is None:
            return
        space = b.space_of(src, index)
        if space is not None:
            b.couple(space, b.new_space(node, space.dim))

    def update(self, gm: torch.fx.GraphModule, node: torch.fx.Node, kept: Kept) -> None:
        if graph.shape(node.args[0]) is not None:
            SHAPE.update(gm, node, kept)


class Unbind(Rule):
    """unbind(dim): each piece is one slice. A tracked axis elsewhere passes to every piece; a layout
    still pending (timm's fused qkv: reshape, permute, unbind) passes on, one slice per piece, to the
    getitem that reads it."""

    name = "unbind"
    functions = (torch.unbind, aten.unbind)
    methods = ("unbind",)

    def couple(self, b: ChannelBuilder, node: torch.fx.Node) -> None:
        src, shape = node.args[0], b.shape(node.args[0])
        if not isinstance(src, torch.fx.Node) or shape is None:
            return
        rank = len(shape)
        dim = arg(node, 1, "dim", 0) % rank
        pending = b.take_pending(src, node)
        if pending is not None:
            for user in node.users:
                if user.target is operator.getitem and isinstance(user.args[1], int):
                    labels = pending.labels.select(dim, user.args[1])
                    b.pending[user] = pending.extended(user, labels)
            return
        space = b.space_of(src)
        if space is None:
            return
        if space.dim == dim:
            b.freeze(space, f"{node.name} takes its channels apart one by one")
            return
        for index in range(shape[dim]):
            b.couple(space, b.new_space(node, space.dim - (space.dim > dim), size=space.size, index=index))
