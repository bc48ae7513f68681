"""Capture pass: the model as one torch.fx GraphModule, by the first front end that takes it whole.

``auto`` tries torch.fx symbolic tracing (its graph keeps modules as calls and runs the model's own
Python for what it does not trace), then ``torch.export`` non-strict (runs the Python, records ATen ops;
what Hugging Face transformers and most models written for export need), then strict (TorchDynamo).

Exported graphs are used at torch.export's own ATen level, not decomposed to core ATen: a layer stays
one op (``aten.conv2d``, ``aten.linear``, ``aten.layer_norm``, ``aten.batch_norm``,
``aten.scaled_dot_product_attention``) whose weights are ``get_attr`` nodes named as in the model's
``state_dict``, so one rule per layer kind serves both front ends, and the exporter and the engines see
the same layers. Exported graphs are captured in eval mode: they are inference graphs.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from typing import Any, Iterable, Iterator, cast

import torch
import torch.fx
from torch.fx.graph import _PyTreeCodeGen

from fxprune.errors import CaptureError, ExampleInputsError, FxpruneTraceError
from fxprune.frontends.fx_trace import check_weights, propagate_shapes, trace, unfed_defaults
from fxprune.frontends.partition import partition
from fxprune.ir.capture import EXPORT, EXPORT_STRICT, FX, PARTITIONED, Capture, flat, flat_inputs
from fxprune.ir.graph import cache_off, grouped_query_attention, run_eager
from fxprune.ir.keys import CAPTURE_KEY

CAPTURE_MODES = ("auto", FX, EXPORT, EXPORT_STRICT, PARTITIONED)
_EXPORT_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch._dynamo", "torch.export", "torch._export",
                   "torch._functorch", "torch._subclasses.fake_tensor")
_DROPPED = (torch.ops.aten._assert_tensor_metadata.default,)  # checks of dtype/device, no result


def capture(model: torch.nn.Module, args: tuple, kwargs: dict, **options: Any) -> tuple[torch.fx.GraphModule, tuple]:
    """``capture_model`` with the model's key-value cache off (``ir.graph.cache_off``) and grouped-query attention
    on its kv heads (``ir.graph.grouped_query_attention``)."""
    with cache_off(model), grouped_query_attention():
        return capture_model(model, args, kwargs, **options)


def capture_model(model: torch.nn.Module, args: tuple, kwargs: dict, *, mode: str = "auto",
            leaf_modules: Iterable[type | str] = (), autowrap_functions: Iterable = (),
            concrete_args: dict[str, Any] | None = None, whole: bool = False) -> tuple[torch.fx.GraphModule, tuple]:
    """A GraphModule of a copy of ``model`` and the example call's inputs as that graph takes them.

    ``mode``: ``auto`` (fx, then export, then export-strict, then the model in parts: ``frontends/partition.py``),
    or one path alone. ``whole``: never in parts. The Capture on ``gm.meta`` says which path took it and
    why the ones before failed.
    """
    if mode not in CAPTURE_MODES:
        raise CaptureError(f"unknown capture mode {mode!r}; choose one of {', '.join(CAPTURE_MODES)}")
    if not isinstance(model, torch.nn.Module):
        raise FxpruneTraceError(f"expected a torch.nn.Module, got {type(model).__name__}")
    check_weights(model)
    odd = sorted({type(x).__name__ for x in torch.utils._pytree.tree_leaves((args, kwargs))
                  if not isinstance(x, torch.Tensor)})
    if odd:
        raise ExampleInputsError(
            f"example_inputs must be a tensor or a tuple of tensors (or a dict of keyword tensors), and hold only "
            f"tensors; got {', '.join(odd)} values. Flags such as use_cache belong in the model's config.")
    plain = not kwargs and all(isinstance(a, torch.Tensor) for a in args)
    options = dict(leaf_modules=leaf_modules, autowrap_functions=autowrap_functions)
    if mode == PARTITIONED:
        return _in_parts(model, args, kwargs, [], options)
    paths = [FX, EXPORT, EXPORT_STRICT] if mode == "auto" else [mode]
    failed: list[tuple[str, str]] = []
    if mode == "auto" and not plain:  # fx takes one tensor per positional argument: the rest go to export
        paths.remove(FX)
        failed.append((FX, "the inputs are not a tuple of tensors (keyword, list or nested inputs)"))
    for path in paths:
        try:
            if path == FX:
                defaults = {**unfed_defaults(model, args), **(concrete_args or {})} or None
                gm = trace(model, leaf_modules=leaf_modules, concrete_args=defaults,
                           autowrap_functions=autowrap_functions)
                gm.meta[CAPTURE_KEY] = Capture(FX, failed)
                _propagate(gm, tuple(args), model if mode == "auto" else None)
                _keep_mapping_type(gm, model, tuple(args))
                return gm, tuple(args)
            with _quiet():
                gm, structure = _export(model, args, kwargs, strict=path == EXPORT_STRICT)
            gm.meta[CAPTURE_KEY] = Capture(path, failed, structure)
            inputs = flat_inputs(gm, args, kwargs)
            propagate_shapes(gm, inputs)
        except ExampleInputsError:
            raise
        except FxpruneTraceError as error:
            if mode != "auto":
                raise CaptureError(_advice(model, [(path, str(error))])) from error
            failed.append((path, str(error)))
            continue
        except Exception as error:  # torch.export raises many kinds
            message = f"{type(error).__name__}: {error}"
            if mode != "auto":
                raise CaptureError(_advice(model, [(path, message)])) from error
            failed.append((path, message))
            continue
        return gm, inputs
    if not whole:
        try:
            return _in_parts(model, args, kwargs, failed, options)
        except CaptureError:
            pass
    raise CaptureError(_advice(model, failed, parts_tried=not whole))


def _in_parts(model: torch.nn.Module, args: tuple, kwargs: dict, failed: list, options: dict):
    """The model as its capturable submodules (``frontends/partition.py``), each captured whole."""
    return partition(model, args, kwargs, failed,
                     lambda module, a, k: capture(module, a, k, whole=True, **options))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.export's own report of a failed attempt (its warnings, and the partial graph it prints to
    stderr): the Capture says why an attempt failed, in one line."""
    loggers = [logging.getLogger(name) for name in _EXPORT_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _keep_mapping_type(gm: torch.fx.GraphModule, model: torch.nn.Module, inputs: tuple) -> None:
    """torch.fx writes a returned mapping as a dict literal; where the model returns another mapping type
    (torchvision's backbones: an OrderedDict), the graph builds that type again."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    if not isinstance(output.args[0], dict):  # torch.fx holds it as its immutable_dict
        return
    returned = type(run_eager(copy.deepcopy(model), inputs))
    if returned is dict or not issubclass(returned, dict):
        return
    with gm.graph.inserting_before(output):
        rebuilt = gm.graph.call_function(returned, (output.args[0],))
    output.args = (rebuilt,)
    gm.recompile()
    propagate_shapes(gm, inputs)


def _propagate(gm: torch.fx.GraphModule, inputs: tuple, model: torch.nn.Module | None) -> None:
    """Shapes on the traced graph. Where the graph fails on inputs the model itself runs on (fx traced
    Python that only works as written, torchvision's swin3d window sizes), the trace is at fault: with
    ``model`` given, that is a FxpruneTraceError (the next path is tried), else the inputs' error stands."""
    try:
        propagate_shapes(gm, inputs)
    except ExampleInputsError as error:
        if model is None:
            raise
        try:
            run_eager(copy.deepcopy(model), inputs)
        except Exception:  # noqa: BLE001 - the model fails too: the inputs are wrong
            raise error from None
        raise FxpruneTraceError(f"the traced graph fails where the model runs: {error}".splitlines()[0]) from error


def _export(model: torch.nn.Module, args: tuple, kwargs: dict, strict: bool) -> tuple[torch.fx.GraphModule, Any]:
    """torch.export's graph of an eval-mode copy, as a plain GraphModule taking and returning flat leaves, and
    the structure of the inputs and outputs it flattened."""
    copied = copy.deepcopy(model).eval()
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # nn.MultiheadAttention as its projections and SDPA: heads show
    try:
        program = torch.export.export(copied, tuple(args), dict(kwargs), strict=strict)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
    exported = program.module()
    structure = cast(_PyTreeCodeGen, exported.graph._codegen).pytree_info  # torch.export's: pytrees in and out
    graph = exported.graph
    for node in list(graph.nodes):
        guard = (node.op == "call_module" and node.target == "_guards_fn") or node.target in _DROPPED
        if guard and not node.users:
            graph.erase_node(node)
    gm = torch.fx.GraphModule(exported, graph, type(model).__name__)  # a plain GraphModule: eval()/train() work
    gm._tracer_cls = gm.graph._tracer_cls = None  # pickled and reloaded by torch.fx's own tracer
    gm._tracer_extras = gm.graph._tracer_extras = {}
    flat(gm)
    gm.graph.lint()
    return gm, structure


def _advice(model: torch.nn.Module, failed: list[tuple[str, str]], parts_tried: bool = False) -> str:
    """What each path said, and what to do."""
    lines = [f"no capture path took {type(model).__name__} whole:"]
    lines += [f"  {path}: {message.strip().splitlines()[0][:300]}" for path, message in failed]
    if parts_tried:
        lines.append("  and no submodule holding parameters was captured alone on the inputs it receives")
    if EXPORT not in {path for path, _ in failed}:
        lines.append("Fix: capture it with torch.export (capture='export'), which runs such Python as it is, or keep "
                     "the failing submodule opaque with leaf_modules=[...] (its channels are then kept)")
    else:
        lines.append("Fix: make the failing code traceable (torch.export's docs list what it takes), or prune a "
                     "submodule alone (its own example inputs), or keep a submodule opaque with leaf_modules=[...] "
                     "(its channels are then kept)")
    return "\n".join(lines)
