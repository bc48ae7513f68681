"""Reading and running a traced graph: shapes, recorded values, the channels on a node, one way to run it."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx

from fxprune.ir.channels import ChannelSpace, NodeChannels
from fxprune.ir.keys import CHANNELS_KEY, VALUE_KEY


def shape(node: Any) -> tuple[int, ...] | None:
    """Shape of a node's tensor output, or None for non-tensors and tuples."""
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    return tuple(int(d) for d in meta.shape) if meta is not None and hasattr(meta, "shape") else None


def tensor_shape(node: Any) -> tuple[int, ...]:
    """``shape`` of a node known to output one tensor (an op's tensor operand); TypeError otherwise."""
    found = shape(node)
    if found is None:
        raise TypeError(f"{node} does not output one tensor of known shape")
    return found


def dtype(node: Any) -> torch.dtype | None:
    """dtype of a node's tensor output, or None for non-tensors and tuples."""
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    return getattr(meta, "dtype", None)


def value(arg: Any) -> Any:
    """Concrete value of an argument: constants as is, nodes through the value the trace recorded."""
    if isinstance(arg, torch.fx.Node):
        if VALUE_KEY not in arg.meta:
            raise KeyError(arg.name)
        return arg.meta[VALUE_KEY]
    if isinstance(arg, (list, tuple)):
        return type(arg)(value(a) for a in arg)
    return arg


def channels(node: Any) -> NodeChannels:
    """The dependency pass's record of a node (empty for nodes it left alone, and for non-nodes)."""
    if not isinstance(node, torch.fx.Node):
        return NodeChannels()
    return node.meta.get(CHANNELS_KEY) or NodeChannels()


def space(node: Any, index: int = 0) -> ChannelSpace | None:
    """The channel space of output ``index`` of a node, or None."""
    spaces = channels(node).spaces
    return spaces[index] if index < len(spaces) else None


def target_name(node: torch.fx.Node) -> str:
    """The name a ``get_attr``, ``call_module`` or ``call_method`` node's target is (a callable for the
    other calls)."""
    assert isinstance(node.target, str), f"{node.name} ({node.op}) calls a function, not a name"
    return node.target


def call_name(node: torch.fx.Node) -> str:
    """The name of what a call calls: a method's name, a function's ``__name__`` (``view.default`` for an
    ATen overload)."""
    return str(node.target if node.op == "call_method" else getattr(node.target, "__name__", node.target))


def attribute(module: torch.nn.Module, target: str) -> Any:
    """The tensor (or module) at a qualified name, as ``get_attr`` reads it."""
    owner, _, name = target.rpartition(".")
    return getattr(module.get_submodule(owner), name)


@contextmanager
def inference(model: torch.nn.Module, grad: bool | None = False) -> Iterator[None]:
    """The one way fxprune runs a model: eval mode, so no BatchNorm statistic moves (and dropout is off),
    and no autograd unless ``grad`` (None: as the caller has it); every module's own training flag is
    restored after."""
    flags = [(module, module.training) for module in model.modules()]
    for module, _ in flags:  # not model.eval(): torch.export's modules refuse it
        module.training = False
    try:
        with torch.set_grad_enabled(torch.is_grad_enabled() if grad is None else grad), cache_off(model):
            yield
    finally:
        for module, training in flags:
            module.training = training


@contextlib.contextmanager
def cache_off(model: torch.nn.Module) -> Iterator[None]:
    """A model whose config turns a key-value cache on (Hugging Face's ``use_cache``) runs without it while
    fxprune captures and checks it: the cache is state carried across calls, not channels; the model
    returned keeps its config, so ``generate`` uses the cache as before."""
    configs: dict[int, Any] = {id(c): c for m in model.modules()
                               if getattr(c := getattr(m, "config", None), "use_cache", False) is True}
    for config in configs.values():
        config.use_cache = False
    try:
        yield
    finally:
        for config in configs.values():
            config.use_cache = True


_FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"  # read by transformers' sdpa_attention_forward at each call


@contextlib.contextmanager
def grouped_query_attention() -> Iterator[None]:
    """Hugging Face's SDPA attention calls ``scaled_dot_product_attention(..., enable_gqa=True)`` on the kv heads
    as they are, instead of repeating them per query head first (``repeat_kv``, whose repeat count is a
    constant of the graph), while fxprune captures a model: the query heads under each kv head can then be
    pruned apart. The same attention; the model returned runs as its code says."""
    previous = os.environ.get(_FORCE_GQA)
    os.environ[_FORCE_GQA] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[_FORCE_GQA]
        else:
            os.environ[_FORCE_GQA] = previous


def run_eager(model: torch.nn.Module, args: tuple, kwargs: dict | None = None) -> Any:
    """The model's own forward, as fxprune runs models (``inference``: eval mode, no autograd)."""
    with inference(model, grad=False):
        return model(*args, **(kwargs or {}))


def model_digest(gm: torch.fx.GraphModule, example_inputs: tuple) -> str:
    """What a whole-model timing depends on: the graph, every node's shape, the parameters' shapes, the
    inputs' shapes and dtypes (not the weights' values)."""
    parts = [gm.code]
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        parts.append(f"{node.name}:{node.op}:{tuple(meta.shape) if hasattr(meta, 'shape') else ''}")
    parts += [f"{name}:{tuple(t.shape)}:{t.dtype}"
              for name, t in list(gm.named_parameters()) + list(gm.named_buffers())]
    parts += [f"input:{tuple(x.shape)}:{x.dtype}" for x in example_inputs if isinstance(x, torch.Tensor)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()
