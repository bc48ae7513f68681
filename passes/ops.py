"""The op table: for each op kind, how channels flow from its inputs to its outputs.

One entry per op (module type, function, or method name) mapping to a handler. Handlers read shapes
from the graph and call ``ChannelBuilder`` to create and couple channel spaces. Anything not in the
table is frozen: its tensor inputs' channels are never pruned, and the reason is recorded.
Adding an op is one entry here (plus a rewrite rule in ``passes/rewrite.py`` if it holds
shape-dependent constants) and a test.
"""

from __future__ import annotations

import operator
from typing import Callable

import numpy as np
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from fxprune.ir import ChannelSpace
from fxprune.passes.dependency import ChannelBuilder, _Pending

Handler = Callable[[ChannelBuilder, torch.fx.Node], None]


def _tensor_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(a) if ChannelBuilder.shape(a) else a)
    return list(dict.fromkeys(found))


def _arg(node: torch.fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _same_position(b: ChannelBuilder, node: torch.fx.Node, src: torch.fx.Node) -> None:
    """Output keeps the input's channel axis at the same dim, element for element (size checked)."""
    space = b.space_of(src)
    out_shape = b.shape(node)
    if space is None or out_shape is None:
        return
    dim = space.dim + len(out_shape) - len(b.shape(src))
    if not 0 <= dim < len(out_shape) or out_shape[dim] != space.size:
        b.freeze(space, f"{node.name} changes the size of its channel axis")
        return
    b.couple(space, b.new_space(node, dim))


def ensure_space(b: ChannelBuilder, node: torch.fx.Node, dim: int):
    """``ChannelBuilder.ensure_space``, but a parameter seen through shape ops gets its axis inferred.

    ``class_token.expand(n, -1, -1)`` has no channel axis of its own until it meets the residual
    stream; replaying the shape ops on each candidate axis of the parameter finds which one it is.
    """
    if node.op != "get_attr" and b.space_of(node) is None and node not in b.pending \
            and _reshaped_parameter(b, node):
        src = node.args[0]
        rank = len(b.shape(node))
        for candidate in range(len(b.shape(src))):
            try:
                out = _replay(b, node, src, _labels(b.shape(src), candidate))
            except Exception:
                continue
            varying = [d for d in range(out.dim()) if not _constant_along(out, d)]
            if varying == [dim % rank]:
                ensure_space(b, src, candidate)
                shape_op(b, node)
                break
    return b.ensure_space(node, dim)


def _reshaped_parameter(b: ChannelBuilder, node: torch.fx.Node) -> bool:
    """True for a chain of shape ops that starts at a parameter or buffer (get_attr)."""
    if node.op == "get_attr":
        return True
    src = node.args[0] if node.args else None
    return (node.op in ("call_function", "call_method") and isinstance(src, torch.fx.Node)
            and handler_for(b, node) in (shape_op, getitem) and _reshaped_parameter(b, src))


# --- generic handlers ---------------------------------------------------------------------------
def passthrough(b: ChannelBuilder, node: torch.fx.Node) -> None:
    """Activations, dropout, pooling, interpolation, casts: channels pass unchanged."""
    inputs = _tensor_inputs(node)
    if inputs:
        _same_position(b, node, inputs[0])
        for other in inputs[1:]:
            b.freeze(b.space_of(other), f"used as a secondary input of {node.name}")


def elementwise(b: ChannelBuilder, node: torch.fx.Node) -> None:
    """add/sub/mul/div and friends with broadcasting: channels at the same output position are one."""
    out_shape = b.shape(node)
    inputs = _tensor_inputs(node)
    if out_shape is None or not inputs:
        return
    out_dim = None
    for src in inputs:
        space = b.space_of(src)
        if space is not None:
            out_dim = space.dim + len(out_shape) - len(b.shape(src))
            break
    if out_dim is None:
        return
    out = b.new_space(node, out_dim)
    for src in inputs:
        shape = b.shape(src)
        dim = out_dim - (len(out_shape) - len(shape))
        space = b.space_of(src)
        if dim < 0 or shape[dim] == 1:
            if space is not None:  # a broadcast operand whose own channels sit elsewhere
                b.freeze(space, f"broadcast against a wider tensor in {node.name}")
                b.freeze(out, f"{node.name} broadcasts a tensor with tracked channels")
            continue
        if space is not None and space.dim != dim:
            b.freeze(space, f"{node.name} combines channel axes on different dims")
            b.freeze(out, f"{node.name} combines channel axes on different dims")
            continue
        b.couple(out, ensure_space(b, src, dim))


def shape_op(b: ChannelBuilder, node: torch.fx.Node) -> None:
    """view/reshape/permute/flatten/getitem...: replay the op on a tensor of channel labels.

    Each position of the label tensor holds the index of its channel element, so the op's output says
    exactly where every channel went. An output whose labels vary along one dim only is a channel
    axis again; labels spread over several dims (a channel shuffle's intermediate) stay pending until a
    later shape op merges them back.
    """
    src = node.args[0]
    if not isinstance(src, torch.fx.Node) or b.shape(src) is None:
        return
    pending = b.pending.pop(src, None)
    if pending is not None:
        origin, labels_in = pending.origin, pending.labels
    else:
        origin = b.space_of(src)
        if origin is None:
            return
        labels_in = _labels(b.shape(src), origin.dim)
    try:
        out = _replay(b, node, src, labels_in)
    except Exception as exc:  # an argument we cannot evaluate (a tensor index, say)
        b.freeze(origin, f"{node.name} could not be replayed on channel labels ({type(exc).__name__})")
        return
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != b.shape(node):
        b.freeze(origin, f"{node.name} does not map channels to one output tensor")
        return
    present = np.unique(out.numpy())
    if present[0] == 0:  # label 0 marks positions that hold no channel (padding)
        b.freeze(origin, f"{node.name} pads or fills positions with no channel")
        return
    if present.size != origin.size:
        b.freeze(origin, f"{node.name} selects individual channels")
        return
    dims = [d for d in range(out.dim()) if not _constant_along(out, d)]  # dims the labels vary along
    if len(dims) == 1:
        dim = dims[0]
        element_map = _along(out, dim)
        space = b.new_space(node, dim)
        b.couple(space, origin, None, element_map)
        info = b.info(node)
        if pending is not None:
            _mark_gather(b, node, pending, space, element_map)
        elif node.op != "call_module":
            info.rewrite, info.rewrite_args = "shape_sizes", {}
    elif len(dims) > 1:
        origin_node = src if pending is None else pending.origin_node
        chain = (pending.chain if pending is not None else ()) + (node,)
        b.pending[node] = _Pending(origin=origin, origin_node=origin_node, labels=out, chain=chain)
    else:
        b.freeze(origin, f"{node.name} reduces its channel axis to one element")


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
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return b.modules[node.target](*args, **kwargs)


def _constant_along(t: torch.Tensor, dim: int) -> bool:
    """True when every slice of ``t`` along ``dim`` equals the first one."""
    return bool((t == t.narrow(dim, 0, 1)).all())


def _along(t: torch.Tensor, dim: int) -> np.ndarray:
    index = [0] * t.dim()
    index[dim] = slice(None)
    return t[tuple(index)].numpy().astype(np.int64) - 1


def _mark_gather(b, node, pending, space, element_map) -> None:
    """The end of a pending chain: a pure permutation of the origin's channels becomes one gather."""
    shape_ok = b.shape(node) == b.shape(pending.origin_node) and space.dim == pending.origin.dim
    if not shape_ok or np.unique(element_map).size != element_map.size:
        b.freeze(pending.origin, f"{node.name} rearranges channels in a way that is not a permutation")
        return
    b.replaced_chains.update(pending.chain)
    info = b.info(node)
    info.rewrite = "gather"
    info.rewrite_args = {"origin": pending.origin_node.name, "element_map": element_map}


# --- concat, split, getitem ---------------------------------------------------------------------
def cat(b: ChannelBuilder, node: torch.fx.Node) -> None:
    tensors = list(_arg(node, 0, "tensors"))
    out_shape = b.shape(node)
    cat_dim = _arg(node, 1, "dim", 0) % len(out_shape)
    spaces = [b.space_of(t) for t in tensors]
    known = [s for s in spaces if s is not None]
    if not known:
        return
    channel_dim = known[0].dim
    out = b.new_space(node, channel_dim)
    offset = 0
    for t in tensors:
        width = b.shape(t)[channel_dim]
        positions = np.arange(offset, offset + width) if cat_dim == channel_dim else None
        b.couple(out, ensure_space(b, t, channel_dim), positions)
        offset += width if cat_dim == channel_dim else 0


def stack(b: ChannelBuilder, node: torch.fx.Node) -> None:
    tensors = list(_arg(node, 0, "tensors"))
    stack_dim = _arg(node, 1, "dim", 0) % len(b.shape(node))
    known = [b.space_of(t) for t in tensors if b.space_of(t) is not None]
    if not known:
        return
    in_dim = known[0].dim
    out = b.new_space(node, in_dim + (1 if stack_dim <= in_dim else 0))
    for t in tensors:
        b.couple(out, ensure_space(b, t, in_dim))


def split(b: ChannelBuilder, node: torch.fx.Node) -> None:
    """split/chunk: each piece is an output of the node; along the channel axis it is a slice."""
    src = node.args[0]
    space = b.space_of(src)
    pieces = node.meta.get("tensor_meta")
    if space is None or not isinstance(pieces, (tuple, list)):
        return
    dim = _arg(node, 2, "dim", 0) % len(b.shape(src))
    offset = 0
    for index, piece in enumerate(pieces):
        out = b.new_space(node, space.dim, size=piece.shape[space.dim], index=index)
        if dim == space.dim:
            b.couple(out, space, None, np.arange(offset, offset + out.size))
            offset += out.size
        else:
            b.couple(out, space)
    if dim == space.dim:
        info = b.info(node)
        info.rewrite, info.rewrite_args = "split", {"dim": dim}


def getitem(b: ChannelBuilder, node: torch.fx.Node) -> None:
    """Indexing a tuple picks one output's space; indexing a tensor is a shape op."""
    src, index = node.args
    if b.shape(src) is not None:
        shape_op(b, node)
        return
    if not isinstance(index, int) or b.shape(node) is None:
        return
    space = b.space_of(src, index)
    if space is not None:
        b.couple(space, b.new_space(node, space.dim))


def reduction(b: ChannelBuilder, node: torch.fx.Node) -> None:
    """mean/sum/amax over some dims: channels survive unless their dim is reduced."""
    src = node.args[0]
    space = b.space_of(src)
    if space is None or b.shape(node) is None:
        return
    rank = len(b.shape(src))
    dims = _arg(node, 1, "dim", None)
    dims = range(rank) if dims is None else ([dims] if isinstance(dims, int) else dims)
    dims = sorted(d % rank for d in dims)
    if space.dim in dims:
        b.freeze(space, f"{node.name} reduces over the channel axis")
        return
    keepdim = _arg(node, 2, "keepdim", False)
    dim = space.dim if keepdim else space.dim - sum(d < space.dim for d in dims)
    b.couple(space, b.new_space(node, dim))


def softmax(b: ChannelBuilder, node: torch.fx.Node) -> None:
    src = node.args[0]
    space = b.space_of(src)
    dim = _arg(node, 1, "dim", None)
    if space is not None and (dim is None or dim % len(b.shape(src)) == space.dim):
        b.freeze(space, f"{node.name} normalizes across channels")
        return
    passthrough(b, node)


# --- layers ---------------------------------------------------------------------------------------
def _module(b: ChannelBuilder, node: torch.fx.Node) -> nn.Module:
    return b.modules[node.target]


def _shared_call_site(b: ChannelBuilder, node: torch.fx.Node, in_space, out_space) -> None:
    """A module called from several places must be pruned the same way at each."""
    first = b.module_sites.setdefault(node.target, node)
    if first is node:
        return
    for a, bb in ((in_space, b.space_of(first.args[0])), (out_space, b.space_of(first))):
        if a is not None and bb is not None and a.size == bb.size:
            b.couple(a, bb)


def conv(b: ChannelBuilder, node: torch.fx.Node) -> None:
    """Conv and ConvTranspose: in and out channels are independent, except across conv groups.

    With groups > 1 (grouped, depthwise, depthwise with a channel multiplier) conv group k's input and
    output channels form one pruning unit, so the layer stays a valid grouped conv with fewer groups.
    """
    module = _module(b, node)
    src = node.args[0]
    rank = len(b.shape(src))
    channel_dim = rank - (len(module.kernel_size) + 1)
    in_space = ensure_space(b, src, channel_dim)
    out = b.new_space(node, channel_dim)
    if module.groups > 1:
        in_per_group = module.in_channels // module.groups
        out_per_group = module.out_channels // module.groups
        b.couple_blocks(in_space, in_per_group)
        b.couple_blocks(out, out_per_group)
        b.couple(in_space, out, np.arange(0, module.in_channels, in_per_group),
                 np.arange(0, module.out_channels, out_per_group))
    b.info(node).rewrite = "module"
    _shared_call_site(b, node, in_space, out)


def linear(b: ChannelBuilder, node: torch.fx.Node) -> None:
    src = node.args[0]
    in_space = ensure_space(b, src, -1)
    out = b.new_space(node, len(b.shape(node)) - 1)
    b.info(node).rewrite = "module"
    _shared_call_site(b, node, in_space, out)


def channel_norm(b: ChannelBuilder, node: torch.fx.Node) -> None:
    """BatchNorm, InstanceNorm, per-channel PReLU: one affine term per channel on dim 1."""
    module = _module(b, node)
    src = node.args[0]
    if isinstance(module, nn.PReLU) and module.num_parameters == 1:
        passthrough(b, node)
        return
    in_space = ensure_space(b, src, 1)
    out = b.new_space(node, 1)
    b.couple(in_space, out)
    b.info(node).rewrite = "module"
    _shared_call_site(b, node, in_space, out)


def group_norm(b: ChannelBuilder, node: torch.fx.Node) -> None:
    """GroupNorm: whole normalization groups are pruned (statistics of kept groups are unchanged)."""
    module = _module(b, node)
    in_space = ensure_space(b, node.args[0], 1)
    out = b.new_space(node, 1)
    b.couple_blocks(in_space, module.num_channels // module.num_groups)
    b.couple(in_space, out)
    b.info(node).rewrite = "module"
    _shared_call_site(b, node, in_space, out)


def layer_norm(b: ChannelBuilder, node: torch.fx.Node) -> None:
    """LayerNorm over the last dim only: channel-wise affine; statistics span the channels."""
    src = node.args[0]
    if node.op == "call_module":
        normalized = _module(b, node).normalized_shape
    else:
        normalized = b.value(_arg(node, 1, "normalized_shape"))
    if len(tuple(normalized)) != 1:
        b.freeze(b.space_of(src), f"{node.name} normalizes over several dims")
        return
    in_space = ensure_space(b, src, -1)
    out = b.new_space(node, len(b.shape(node)) - 1)
    b.couple(in_space, out)
    b.mark_norm(in_space, out)
    info = b.info(node)
    if node.op == "call_module":
        info.rewrite = "module"
        _shared_call_site(b, node, in_space, out)
        return
    for index, name in ((2, "weight"), (3, "bias")):
        param = _arg(node, index, name)
        if isinstance(param, torch.fx.Node):
            b.couple(out, ensure_space(b, param, 0))
    info.rewrite = "layer_norm"


def multihead_attention(b: ChannelBuilder, node: torch.fx.Node) -> None:
    """nn.MultiheadAttention used as self-attention: embedding in and out prunable, heads frozen."""
    query, key, value = (_arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
    masks = [_arg(node, i, n) for i, n in ((3, "key_padding_mask"), (5, "attn_mask"))]
    need_weights = _arg(node, 4, "need_weights", True)
    if not (query is key is value) or any(m is not None for m in masks) or need_weights:
        for src in _tensor_inputs(node):
            b.freeze(b.space_of(src), f"{node.name}: only self-attention without masks or returned "
                     "weights is supported")
        return
    in_space = ensure_space(b, query, -1)
    b.new_space(node, len(b.shape(query)) - 1, size=in_space.size, index=0)
    b.info(node).rewrite = "module"


def window_attention(b: ChannelBuilder, node: torch.fx.Node) -> None:
    """Swin's shifted_window_attention: stream width in (qkv columns) and out (proj rows) prunable.

    torchvision's kernel derives the head width from the input width, so the rewrite swaps in
    ``fxprune.modules.shifted_window_attention``, which reads every width from the weights.
    """
    x, qkv_weight, proj_weight = node.args[:3]
    proj_bias = _arg(node, 10, "proj_bias")
    params = [qkv_weight, proj_weight] + ([proj_bias] if proj_bias is not None else [])
    if not all(isinstance(p, torch.fx.Node) and p.op == "get_attr" for p in params):
        frozen(b, node)
        return
    b.couple(ensure_space(b, x, -1), ensure_space(b, qkv_weight, 1))
    out = b.new_space(node, len(b.shape(node)) - 1)
    for param in params[1:]:
        b.couple(out, ensure_space(b, param, 0))
    b.info(node).rewrite = "window_attention"


def frozen(b: ChannelBuilder, node: torch.fx.Node) -> None:
    """An op fxprune does not know: its tensor inputs keep all their channels."""
    what = node.target if node.op == "call_method" else getattr(node.target, "__name__", node.target)
    if node.op == "call_module":
        what = type(_module(b, node)).__name__
    for src in _tensor_inputs(node):
        b.freeze(b.space_of(src), f"consumed by {what} ({node.name}), which fxprune does not support")


def output(b: ChannelBuilder, node: torch.fx.Node) -> None:
    for src in _tensor_inputs(node):
        b.freeze(b.space_of(src), "model output")


def no_channels(b: ChannelBuilder, node: torch.fx.Node) -> None:
    """Ops that only read metadata (size, dim, shape) or check conditions: nothing to track."""


# --- the table ----------------------------------------------------------------------------------
_PASSTHROUGH_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid, nn.Tanh, nn.LeakyReLU,
    nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool2d,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
    nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d,
)
MODULE_HANDLERS: dict[type, Handler] = {
    **{m: passthrough for m in _PASSTHROUGH_MODULES},
    **{m: conv for m in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                         nn.ConvTranspose3d)},
    nn.Linear: linear,
    **{m: channel_norm for m in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                                 nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.PReLU)},
    nn.GroupNorm: group_norm,
    nn.LayerNorm: layer_norm,
    nn.MultiheadAttention: multihead_attention,
    nn.Flatten: shape_op,
    nn.Unflatten: shape_op,
    nn.ChannelShuffle: shape_op,
    nn.Softmax: lambda b, n: (softmax(b, n) if _module(b, n).dim is not None else frozen(b, n)),
}

_PASSTHROUGH_FUNCTIONS = (
    F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh, F.leaky_relu,
    F.elu, F.mish, F.softplus, F.hardtanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.interpolate, F.pad,
    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.abs, torch.neg, torch.sqrt, torch.clamp,
    torch.nn.functional.hardtanh, operator.neg, torch.clone,
)
_ELEMENTWISE_FUNCTIONS = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
    operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum,
    torch.minimum,
)
_SHAPE_FUNCTIONS = (
    torch.reshape, torch.flatten, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
    torch.movedim, torch.swapaxes, torch.swapdims, torch.t, torch.narrow, torch.unflatten,
)
_REDUCTIONS = (torch.mean, torch.sum, torch.amax, torch.amin)
_NO_CHANNEL_FUNCTIONS = (getattr, torch._assert, len, int, float)

FUNCTION_HANDLERS: dict[Callable, Handler] = {
    **{f: passthrough for f in _PASSTHROUGH_FUNCTIONS},
    **{f: elementwise for f in _ELEMENTWISE_FUNCTIONS},
    **{f: shape_op for f in _SHAPE_FUNCTIONS},
    **{f: reduction for f in _REDUCTIONS},
    **{f: no_channels for f in _NO_CHANNEL_FUNCTIONS},
    torch.cat: cat, torch.concat: cat, torch.concatenate: cat, torch.stack: stack,
    torch.split: split, torch.chunk: split, torch.tensor_split: split,
    operator.getitem: getitem,
    F.softmax: softmax, F.log_softmax: softmax, torch.softmax: softmax,
    F.layer_norm: layer_norm,
}

METHOD_HANDLERS: dict[str, Handler] = {
    **{m: passthrough for m in ("relu", "relu_", "sigmoid", "sigmoid_", "tanh", "exp", "abs", "neg",
                                "sqrt", "clamp", "clamp_", "clone", "detach", "float",
                                "half", "bfloat16", "to", "type_as")},
    **{m: elementwise for m in ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "__add__",
                                "__mul__", "__sub__", "__truediv__", "__radd__", "__rmul__")},
    **{m: shape_op for m in ("view", "reshape", "permute", "transpose", "flatten", "unflatten", "squeeze",
                             "unsqueeze", "expand", "movedim", "swapaxes", "swapdims", "t", "narrow",
                             "repeat", "contiguous")},
    **{m: reduction for m in ("mean", "sum", "amax", "amin")},
    **{m: no_channels for m in ("size", "dim", "numel", "__len__")},
    "split": split, "chunk": split, "tensor_split": split,
    "softmax": softmax, "log_softmax": softmax,
}


def _function_handler(target) -> Handler | None:
    handler = FUNCTION_HANDLERS.get(target)
    if handler is None and getattr(target, "__name__", None) == "shifted_window_attention":
        handler = window_attention  # torchvision's, or fxprune's own after a rewrite
    name = getattr(target, "__name__", None)
    if handler is None and name in _WRAPPED_PASSTHROUGH:
        handler = passthrough
    if handler is None and name in _WRAPPED_SHAPE_OPS:
        handler = shape_op
    return handler


# torchvision functions that fx keeps as calls (torch.fx.wrap) or that are channel-independent by name.
_WRAPPED_PASSTHROUGH = {"stochastic_depth"}
_WRAPPED_SHAPE_OPS = {"_patch_merging_pad"}  # pads H/W, then concatenates the 2x2 neighbours on channels


def handler_for(b: ChannelBuilder, node: torch.fx.Node) -> Handler:
    """Look up a node's handler in the op table; unknown ops get ``frozen``."""
    if node.op in ("placeholder", "get_attr"):
        return no_channels
    if node.op == "output":
        return output
    if node.op == "call_module":
        module = _module(b, node)
        for cls in type(module).__mro__:
            if cls in MODULE_HANDLERS:
                return MODULE_HANDLERS[cls]
        return frozen
    if node.op == "call_method":
        return METHOD_HANDLERS.get(node.target, frozen)
    return _function_handler(node.target) or (no_channels if not _tensor_inputs(node) else frozen)


def handle_node(b: ChannelBuilder, node: torch.fx.Node) -> None:
    handler = handler_for(b, node)
    width_args = _width_args(b, node)
    handler(b, node)
    _track_widths(b, node, handler, width_args)


# --- channel widths read at run time ---------------------------------------------------------------
_WIDTH_ARITHMETIC = (operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv,
                     operator.mod, operator.neg, int, float)
_SIZE_ARG_METHODS = ("view", "reshape", "expand")


def _width_args(b: ChannelBuilder, node: torch.fx.Node) -> list[tuple[int | None, ChannelSpace]]:
    """(position in the size list or None, measured space) for each width-valued argument of node."""
    found = []
    for arg in node.all_input_nodes:
        measured = b.widths.get(arg, {}).get(None)
        if measured is not None:
            found.append((_size_position(node, arg), measured))
    return found


def _size_position(node: torch.fx.Node, arg: torch.fx.Node) -> int | None:
    """Which output dim a size argument of view/reshape/expand sets, or None for other uses."""
    if node.target not in _SIZE_ARG_METHODS and node.target is not torch.reshape:
        return None
    packed = len(node.args) == 2 and isinstance(node.args[1], (tuple, list))
    sizes = list(node.args[1] if packed else node.args[1:])
    return sizes.index(arg) if arg in sizes else None


def _track_widths(b: ChannelBuilder, node: torch.fx.Node, handler: Handler, width_args) -> None:
    """Record which widths a node's value measures, and check the uses of measured widths."""
    src = node.args[0] if node.args else None
    space = b.space_of(src) if isinstance(src, torch.fx.Node) and src not in b.pending else None
    if node.target == "size" and space is not None:
        dim = _arg(node, 1, "dim", None)
        if dim is None:
            b.widths[node] = {space.dim: space}
        elif dim % len(b.shape(src)) == space.dim:
            b.widths[node] = {None: space}
    elif node.target is getattr and node.args[1] == "shape" and space is not None:
        b.widths[node] = {space.dim: space}
    elif node.target is operator.getitem and src in b.widths:
        index = node.args[1]
        if isinstance(index, int) and index % len(b.shape(src.args[0])) in b.widths[src]:
            b.widths[node] = {None: b.widths[src][index % len(b.shape(src.args[0]))]}
        elif isinstance(index, slice):
            positions = range(len(b.shape(src.args[0])))[index]
            kept = {i: b.widths[src][p] for i, p in enumerate(positions) if p in b.widths[src]}
            if kept:
                b.widths[node] = kept
    for position, measured in width_args:
        if node.target in _WIDTH_ARITHMETIC and b.shape(node) is None:
            b.widths[node] = {None: measured}  # still a width, to be checked where it is used
        elif position is not None and handler is shape_op:
            target = b.space_of(node) if node not in b.pending else None
            on_axis = target is not None and target.dim == position
            b.width_uses.append((measured, target if on_axis else None, node, position))
        else:
            b.width_uses.append((measured, None, node, None))
