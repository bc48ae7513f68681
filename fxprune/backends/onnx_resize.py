"""Resize an exported model's ONNX graph to a pruned copy's widths, instead of exporting the copy.

Exporting through torch.export takes seconds (docs/latency_model.md), and the closed latency loop
times pruned copies of one model again and again. A pruned copy's graph is the full model's with
smaller tensors: the same nodes, smaller initializers, and a few constants that
record a width (reshape targets, convolution groups). ``resize`` walks the full graph in order with
ONNX's per-node shape inference, gives each initializer the pruned module's shape, rewrites the
constants it understands (a layer's, as its rule says: ``Rule.onnx``, ``rules/onnx.py``), and raises
``ResizeError`` for anything else a changed width reaches, so the caller exports the copy instead. Only
shapes are carried (a cached graph stays small, ``strip``); a timing graph gets its values from the
module it stands for (``fill``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper, shape_inference

from fxprune.rules import RULES
from fxprune.rules.onnx import ResizeError

STRIP_ELEMENTS = 64  # float initializers larger than this are kept as shapes only
TRANSPOSE_TAG = "fxprune:transposes:"  # doc_string of an initializer that is a parameter's transpose
# Ops no rule claims (RULES.by_onnx_type holds the rest), no constant of which records a width: they follow
# their inputs' shapes (ONNX infers the rest).
WIDTH_FREE = frozenset({"Einsum", "Not"})
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)

__all__ = ["ResizeError", "fill", "name_transposes", "remove_blocks", "resize", "strip"]


def strip(model: onnx.ModelProto, elements: int = STRIP_ELEMENTS) -> onnx.ModelProto:
    """A copy whose float initializers of more than ``elements`` values keep their shapes, not their values."""
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    for tensor in stripped.graph.initializer:
        if tensor.data_type in FLOAT_TYPES and int(np.prod(tensor.dims)) > elements:
            _clear_data(tensor)
    return stripped


def fill(model: onnx.ModelProto, tensors: Mapping[str, torch.Tensor] | None = None,
         seed: int = 0) -> onnx.ModelProto:
    """Values for every initializer left without data, in place: the module's own tensor where the
    initializer names it (or its transpose, see ``name_transposes``) with that shape, else random:
    matrices and kernels normal with variance 1 / fan-in, vectors uniform in [0.5, 1.5] (positive, as
    scales and variances must be). The module's values keep a timing graph's numbers like the deployed
    one's (a CPU slows down on denormal numbers, and only values decide where those appear)."""
    tensors = tensors or {}
    rng = np.random.default_rng(seed)
    for tensor in model.graph.initializer:
        if _has_data(tensor):
            continue
        shape = tuple(tensor.dims)
        source = _transposed_from(tensor)
        if tensor.name in tensors and tuple(tensors[tensor.name].shape) == shape:
            values = tensors[tensor.name].detach().cpu().numpy()
        elif source is not None and source in tensors and tuple(tensors[source].shape)[::-1] == shape:
            values = tensors[source].detach().cpu().t().numpy()
        elif len(shape) >= 2:
            values = rng.standard_normal(shape, dtype=np.float32) / np.sqrt(max(int(np.prod(shape[1:])), 1))
        else:
            values = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        doc = tensor.doc_string
        tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(values).astype(dtype), tensor.name))
        tensor.doc_string = doc
    return model


def name_transposes(model: onnx.ModelProto, tensors: Mapping[str, torch.Tensor]) -> None:
    """Mark each unnamed 2-D float initializer that holds a parameter's transpose (the exporter folds a
    linear layer's ``weight.T`` into a new constant) with that parameter's name, so ``resize`` can tell
    its pruned shape. In place; needs the initializers' values."""
    sources: dict[tuple, str | None] = {}
    for name, tensor in tensors.items():
        if tensor.dim() == 2 and tensor.is_floating_point():
            array = tensor.detach().cpu().t().contiguous().numpy()
            key = (array.shape, str(array.dtype), hashlib.sha256(array.tobytes()).hexdigest())
            sources[key] = None if key in sources else name  # two parameters alike: neither is named
    for tensor in model.graph.initializer:
        if tensor.name in tensors or len(tensor.dims) != 2 or tensor.data_type not in FLOAT_TYPES:
            continue
        array = numpy_helper.to_array(tensor)
        source = sources.get((array.shape, str(array.dtype), hashlib.sha256(array.tobytes()).hexdigest()))
        if source is not None:
            tensor.doc_string = TRANSPOSE_TAG + source


def resize(model: onnx.ModelProto, full_shapes: Mapping[str, tuple[int, ...]],
           pruned_shapes: Mapping[str, tuple[int, ...]]) -> onnx.ModelProto:
    """``model`` (exported from a module whose state_dict has ``full_shapes``) with the widths of its
    pruned copy (state_dict ``pruned_shapes``), weights left for ``fill``. Raises ResizeError."""
    resized = strip(model)
    try:
        old = _value_shapes(shape_inference.infer_shapes(resized, strict_mode=True, data_prop=True))
    except (shape_inference.InferenceError, onnx.checker.ValidationError) as error:
        raise ResizeError(f"ONNX shape inference fails on the full model: {error}") from error
    graph = resized.graph
    opset = next((o.version for o in resized.opset_import if o.domain in ("", "ai.onnx")), None)
    initializers = {t.name: t for t in graph.initializer}
    constants = {name: numpy_helper.to_array(t) for name, t in initializers.items()
                 if t.data_type not in FLOAT_TYPES and _has_data(t)}
    types: dict[str, onnx.TypeProto] = {v.name: v.type for v in graph.input}
    new: dict[str, tuple[int, ...]] = {v.name: old[v.name] for v in graph.input}
    pending: set[str] = set()  # float initializers whose width only their consumer can tell
    for name, tensor in initializers.items():
        shape = tuple(tensor.dims)
        source = _transposed_from(tensor)
        if name in full_shapes and tuple(full_shapes[name]) == shape and name in pruned_shapes:
            shape = tuple(pruned_shapes[name])
        elif source is not None and source in pruned_shapes and tuple(full_shapes.get(source, ()))[::-1] == shape:
            shape = tuple(pruned_shapes[source])[::-1]
        elif tensor.data_type in FLOAT_TYPES and any(d > 1 for d in shape):  # a scalar records no width
            pending.add(name)
        _set_shape(tensor, shape)
        new[name] = shape
    for node in graph.node:
        if node.op_type == "Constant":
            _constant(node, constants, types, new)
            continue
        changed = any(new.get(i) != old.get(i) for i in node.input if i)
        if not changed:
            for name in node.input:
                pending.discard(name)
        else:
            if node.domain not in ("", "ai.onnx") or not _known(node.op_type):
                raise ResizeError(f"{node.op_type} node {node.name!r} takes a pruned tensor, and fxprune does not "
                                  "know which of its constants record a width")
            _settle_pending(node, pending, initializers, old, new)
            _update_constants(node, graph, initializers, constants, old, new)
        for name in node.input:
            if name in initializers:
                types[name] = helper.make_tensor_type_proto(initializers[name].data_type, new[name])
        inferred = _infer(node, types, constants, opset)
        for name in filter(None, node.output):
            if name not in inferred or not inferred[name].tensor_type.HasField("shape"):
                raise ResizeError(f"ONNX cannot infer the shape of {name!r} ({node.op_type} {node.name!r})")
            types[name] = inferred[name]
            new[name] = tuple(d.dim_value if d.HasField("dim_value") else -1
                              for d in inferred[name].tensor_type.shape.dim)
            if -1 in new[name]:
                raise ResizeError(f"{name!r} ({node.op_type} {node.name!r}) has a symbolic dimension")
    read = {name for node in graph.node for name in node.input}
    unread = [t for t in graph.initializer if t.name not in read]  # constants the walk replaced
    for tensor in unread:
        graph.initializer.remove(tensor)
    del graph.value_info[:]
    for output in graph.output:
        output.type.CopyFrom(types[output.name])
    return resized


def remove_blocks(model: onnx.ModelProto, full_names: Collection[str], kept_names: Collection[str],
                  blocks: int) -> onnx.ModelProto:
    """``model`` without the branches of ``blocks`` removed residual blocks, so a plan that drops blocks is
    resized, not exported: every node reading a parameter of the full model (``full_names``) that the pruned
    copy lost (not in ``kept_names``) goes, with all computed from it; each Add joining such a branch to a
    kept tensor reads as that tensor (the graph rewrite's ``x + f(x) -> x``); nodes left unread go. Raises
    ResizeError unless exactly ``blocks`` Adds join a removed branch (anything else: export instead)."""
    removed = onnx.ModelProto()
    removed.CopyFrom(model)
    graph = removed.graph
    kept_names = set(kept_names)
    dead = {t.name for t in graph.initializer
            if _parameter_of(t) in full_names and _parameter_of(t) not in kept_names}
    instead: dict[str, str] = {}  # a join's output -> the kept tensor it now is
    joins, nodes = 0, []
    made_by: dict[str, onnx.NodeProto] = {}
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ResizeError(f"{node.op_type} node {node.name!r} holds a subgraph")
        for index, name in enumerate(node.input):
            node.input[index] = instead.get(name, name)
        reads_dead = [name in dead for name in node.input]
        source = made_by.get(node.input[0]) if node.input else None
        if not any(reads_dead) and _idempotent(node.op_type) and source is not None and _same_op(node, source):
            instead[node.output[0]] = node.input[0]  # relu(relu(x)), left where a block's add was: as exported
        elif not any(reads_dead):
            nodes.append(node)
            made_by.update((name, node) for name in node.output)
        elif node.op_type == "Add" and len(node.input) == 2 and sum(reads_dead) == 1:
            instead[node.output[0]] = node.input[reads_dead.index(False)]
            joins += 1
        else:
            dead.update(filter(None, node.output))
    if joins != blocks:
        raise ResizeError(f"{joins} adds join a removed parameter's branch to the rest, the plan removes {blocks} "
                          "blocks")
    for output in graph.output:
        if output.name in dead:
            raise ResizeError(f"the model's output {output.name!r} is computed from a removed block's branch")
        if output.name in instead:
            nodes.append(helper.make_node("Identity", [instead[output.name]], [output.name]))
    read = {output.name for output in graph.output}
    live = []
    for node in reversed(nodes):  # a node none of whose outputs is read any more went with the branch
        if any(name in read for name in node.output):
            live.append(node)
            read.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(live))
    unread = [t for t in graph.initializer if t.name not in read]
    for tensor in unread:
        graph.initializer.remove(tensor)
    del graph.value_info[:]
    return removed


def _same_op(node: onnx.NodeProto, other: onnx.NodeProto) -> bool:
    return (node.op_type, node.domain, list(node.attribute)) == (other.op_type, other.domain, list(other.attribute))


def _parameter_of(tensor: TensorProto) -> str:
    """The parameter an initializer holds: its name, or the one whose transpose it is (``name_transposes``)."""
    return _transposed_from(tensor) or tensor.name


def _transposed_from(tensor: TensorProto) -> str | None:
    """The parameter whose transpose the initializer holds, as ``name_transposes`` marked it; else None."""
    return tensor.doc_string[len(TRANSPOSE_TAG):] if tensor.doc_string.startswith(TRANSPOSE_TAG) else None


# --- the walk -----------------------------------------------------------------------------------------
def _settle_pending(node: onnx.NodeProto, pending: set[str], initializers: dict, old: dict, new: dict) -> None:
    """Give the float initializers ``node`` reads, whose names say nothing, the shape their role implies."""
    for index, name in enumerate(node.input):
        if name not in pending:
            continue
        shape = _implied_shape(node, index, old, new)
        if shape is None:
            raise ResizeError(f"{node.op_type} node {node.name!r} reads {name!r}, an initializer no parameter of "
                              "the model names, and fxprune cannot tell its pruned shape")
        pending.discard(name)
        new[name] = shape
        _set_shape(initializers[name], shape)


def _known(op_type: str) -> bool:
    """Whether resize knows which constants of ``op_type`` record a width: its rule's, or none (WIDTH_FREE)."""
    return op_type in RULES.by_onnx_type or op_type in WIDTH_FREE


def _implied_shape(node: onnx.NodeProto, index: int, old: dict, new: dict) -> tuple[int, ...] | None:
    """What the rule claiming ``node``'s op type (``Rule.onnx``) says input ``index`` becomes; None if none does."""
    ops = RULES.by_onnx_type.get(node.op_type)
    return None if ops is None else ops.implied_shape(node, index, old, new)


def _update_constants(node: onnx.NodeProto, graph: onnx.GraphProto, initializers: dict, constants: dict,
                      old: dict, new: dict) -> None:
    """Rewrite the width-recording attributes and constants of ``node`` (its rule's ``Rule.onnx`` says which),
    whose inputs changed shape."""
    ops = RULES.by_onnx_type.get(node.op_type)
    if ops is None:  # WIDTH_FREE
        return
    ops.update(node, old, new)
    values = {index: constants[name] for index, name in enumerate(node.input) if name in constants}
    for index, value in ops.constants(node, values, old, new).items():
        _replace_constant(node, index, np.asarray(value), graph, initializers, constants, new)


def _idempotent(op_type: str) -> bool:
    ops = RULES.by_onnx_type.get(op_type)
    return ops is not None and op_type in ops.idempotent


def _replace_constant(node: onnx.NodeProto, index: int, value: np.ndarray, graph: onnx.GraphProto,
                      initializers: dict, constants: dict, new: dict) -> None:
    """Point input ``index`` of ``node`` at a new initializer holding ``value`` (constants may be shared)."""
    if np.array_equal(constants[node.input[index]], value):
        return
    name = f"{node.input[index]}__resized_{node.name or len(initializers)}"
    tensor = numpy_helper.from_array(value, name)
    graph.initializer.append(tensor)
    initializers[name], constants[name], new[name] = graph.initializer[-1], value, tuple(value.shape)
    node.input[index] = name


def _constant(node: onnx.NodeProto, constants: dict, types: dict, new: dict) -> None:
    value = next((a for a in node.attribute if a.name == "value"), None)
    if value is None:
        raise ResizeError(f"Constant node {node.name!r} holds something other than a tensor")
    array = numpy_helper.to_array(value.t)
    if value.t.data_type not in FLOAT_TYPES:
        constants[node.output[0]] = array
    new[node.output[0]] = tuple(array.shape)
    types[node.output[0]] = helper.make_tensor_type_proto(value.t.data_type, array.shape)


def _infer(node: onnx.NodeProto, types: dict, constants: dict, opset: int | None) -> dict[str, onnx.TypeProto]:
    try:
        schema = onnx.defs.get_schema(node.op_type, opset or onnx.defs.onnx_opset_version(), node.domain)
        inputs = {name: types[name] for name in node.input if name}
        data = {name: numpy_helper.from_array(constants[name], name) for name in node.input if name in constants}
        return shape_inference.infer_node_outputs(schema, node, inputs, data)
    except (KeyError, onnx.defs.SchemaError, shape_inference.InferenceError) as error:
        raise ResizeError(f"ONNX shape inference failed at {node.op_type} node {node.name!r}: {error}") from error


# --- small helpers ------------------------------------------------------------------------------------
def _value_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for value in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        if value.type.tensor_type.HasField("shape"):
            shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else -1
                                       for d in value.type.tensor_type.shape.dim)
    for node in model.graph.node:
        if node.op_type == "Constant":
            value = next((a for a in node.attribute if a.name == "value"), None)
            if value is not None:
                shapes[node.output[0]] = tuple(value.t.dims)
    return shapes


def _has_data(tensor: TensorProto) -> bool:
    if int(np.prod(tensor.dims)) == 0:
        return True
    return bool(tensor.raw_data or tensor.float_data or tensor.int32_data or tensor.int64_data
                or tensor.double_data or tensor.uint64_data or tensor.string_data or tensor.external_data)


def _clear_data(tensor: TensorProto) -> None:
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        tensor.ClearField(field)
    del tensor.external_data[:]
    tensor.data_location = TensorProto.DEFAULT


def _set_shape(tensor: TensorProto, shape: tuple[int, ...]) -> None:
    """New dims; the values go (``fill`` gives new ones)."""
    if tuple(tensor.dims) == tuple(shape):
        return
    if tensor.data_type not in FLOAT_TYPES:
        raise ResizeError(f"initializer {tensor.name!r} ({TensorProto.DataType.Name(tensor.data_type)}) would "
                          "change shape")
    _clear_data(tensor)
    del tensor.dims[:]
    tensor.dims.extend(shape)
