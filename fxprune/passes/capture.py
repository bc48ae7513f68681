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

import copy
from typing import Any, Iterable

import torch
import torch.fx

from fxprune.errors import CaptureError, ExampleInputsError, FxpruneTraceError
from fxprune.ir.capture import EXPORT, EXPORT_STRICT, FX, Capture, flat, flat_inputs
from fxprune.ir.keys import CAPTURE_KEY
from fxprune.passes.trace import check_weights, trace, unfed_defaults

CAPTURE_MODES = ("auto", FX, EXPORT, EXPORT_STRICT)
_DROPPED = (torch.ops.aten._assert_tensor_metadata.default,)  # checks of dtype/device, no result


def capture(model: torch.nn.Module, args: tuple, kwargs: dict, *, mode: str = "auto",
            leaf_modules: Iterable[type | str] = (), autowrap_functions: Iterable = (),
            concrete_args: dict[str, Any] | None = None) -> tuple[torch.fx.GraphModule, tuple]:
    """A GraphModule of a copy of ``model`` and the example call's inputs as that graph takes them.

    ``mode``: ``auto`` (fx, then export, then export-strict), or one path alone. The Capture on
    ``gm.meta`` says which path took it and why the ones before failed.
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
                return gm, tuple(args)
            gm = _export(model, args, kwargs, strict=path == EXPORT_STRICT)
        except ExampleInputsError:
            raise
        except FxpruneTraceError as error:
            if mode != "auto":
                raise CaptureError(_advice(model, [(path, str(error))])) from error
            failed.append((path, str(error)))
            continue
        except Exception as error:  # noqa: BLE001 - torch.export raises many kinds
            message = f"{type(error).__name__}: {error}"
            if mode != "auto":
                raise CaptureError(_advice(model, [(path, message)])) from error
            failed.append((path, message))
            continue
        gm.meta[CAPTURE_KEY].failed = failed
        return gm, flat_inputs(gm, args, kwargs)
    raise CaptureError(_advice(model, failed))


def _export(model: torch.nn.Module, args: tuple, kwargs: dict, strict: bool) -> torch.fx.GraphModule:
    """torch.export's graph of an eval-mode copy, as a plain GraphModule taking and returning flat leaves."""
    copied = copy.deepcopy(model).eval()
    program = torch.export.export(copied, tuple(args), dict(kwargs), strict=strict)
    exported = program.module()
    structure = exported.graph._codegen.pytree_info
    graph = exported.graph
    for node in list(graph.nodes):
        guard = (node.op == "call_module" and node.target == "_guards_fn") or node.target in _DROPPED
        if guard and not node.users:
            graph.erase_node(node)
    gm = torch.fx.GraphModule(exported, graph, type(model).__name__)  # a plain GraphModule: eval()/train() work
    gm._tracer_cls = gm.graph._tracer_cls = None  # pickled and reloaded by torch.fx's own tracer
    gm._tracer_extras = gm.graph._tracer_extras = {}
    gm.meta[CAPTURE_KEY] = Capture(EXPORT_STRICT if strict else EXPORT, [], structure)
    flat(gm)
    gm.graph.lint()
    return gm


def _advice(model: torch.nn.Module, failed: list[tuple[str, str]]) -> str:
    """What each path said, and which direct submodules can be captured (and so pruned) alone."""
    lines = [f"no capture path took {type(model).__name__} whole:"]
    lines += [f"  {path}: {message.strip().splitlines()[0][:300]}" for path, message in failed]
    if EXPORT not in {path for path, _ in failed}:
        lines.append("Fix: capture it with torch.export (capture='export'), which runs such Python as it is, or keep "
                     "the failing submodule opaque with leaf_modules=[...] (its channels are then kept)")
    else:
        lines.append("Fix: make the failing code traceable (torch.export's docs list what it takes), or prune a "
                     "submodule alone (its own example inputs), or keep a submodule opaque with leaf_modules=[...] "
                     "(its channels are then kept)")
    return "\n".join(lines)
