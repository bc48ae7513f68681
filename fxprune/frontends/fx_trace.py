"""The torch.fx front end: symbolic tracing, then shape propagation on example inputs.

Results on the graph: ``node.meta["tensor_meta"]`` (from ShapeProp) and, for nodes that produce small
non-tensor values such as sizes, ``node.meta["fxprune_value"]`` so later passes can replay shape ops.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import sys
from typing import Any, Iterable, Sequence

import torch
import torch.fx
from torch.fx.passes.shape_prop import ShapeProp

from fxprune.errors import ExampleInputsError, FxpruneTraceError, InvalidWeightsError, UnsupportedModelError
from fxprune.ir.graph import inference
from fxprune.ir.keys import VALUE_KEY
from fxprune.modules import shifted_window_attention
from fxprune.rules import RULES


class FxpruneTracer(torch.fx.Tracer):
    """A tracer that keeps opaque: the user's leaf modules (by type or qualified name) and functions,
    fxprune's own kernels, and subclasses of modules a rule knows that inherit their forward (torchvision's
    ``Conv3DSimple(nn.Conv3d)``), which then resolve to their base's rule."""

    def __init__(self, leaf_modules: Iterable[type | str] = (), autowrap_functions: Iterable = ()) -> None:
        super().__init__(autowrap_functions=(shifted_window_attention, *autowrap_functions))
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.leaf_names = {m for m in leaf_modules if isinstance(m, str)}

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self.leaf_types) or module_qualified_name in self.leaf_names:
            return True
        return super().is_leaf_module(m, module_qualified_name) or _known_with_inherited_forward(m)


def _known_with_inherited_forward(module: torch.nn.Module) -> bool:
    """A subclass of a module some rule knows, whose forward is torch's own (so the rule applies)."""
    if RULES.module_rule(module) is None:
        return False
    owner = next(cls for cls in type(module).__mro__ if "forward" in cls.__dict__)
    return owner.__module__.startswith("torch.nn.")


def trace(
    model: torch.nn.Module,
    *,
    leaf_modules: Iterable[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
    autowrap_functions: Iterable = (),
) -> torch.fx.GraphModule:
    """Trace a deep copy of ``model`` into a GraphModule that owns the copy's modules.

    The copy is what makes "the user's model is never modified" hold for every later pass, and for the
    trace itself: a forward that caches what it computes on ``self`` (timm's attention-bias caches) would
    otherwise keep proxies of this trace in the user's model, and break the next one.
    """
    if not isinstance(model, torch.nn.Module):
        raise FxpruneTraceError(f"expected a torch.nn.Module, got {type(model).__name__}")
    check_weights(model)
    model = copy.deepcopy(model)
    tracer = FxpruneTracer(leaf_modules, autowrap_functions)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # torch.fx raises many error types; all mean "not traceable as written"
        where = _failing_module(exc)
        raise FxpruneTraceError(
            f"torch.fx could not trace {type(model).__name__}{where}: {type(exc).__name__}: {exc}\n"
            "Fix: capture it with torch.export (capture='export'; 'auto' tries it next), which runs such Python "
            "as it is, or keep that submodule opaque with leaf_modules=[...] (type or qualified name; its "
            "channels are then kept)."
        ) from exc
    return torch.fx.GraphModule(tracer.root, graph, model.__class__.__name__)


def unfed_defaults(model: torch.nn.Module, example_inputs: Any) -> dict[str, Any]:
    """Forward arguments the example inputs leave out, with their non-tensor defaults (``mask=None``,
    ``return_features=False``): traced as constants, as a call with those inputs would run them, so
    ``if mask is not None`` branches need no ``concrete_args`` from the user."""
    count = 1 if isinstance(example_inputs, torch.Tensor) else len(example_inputs) if isinstance(
        example_inputs, (tuple, list)) else 0
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # a forward without a readable signature: trace it as it is
        return {}
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return {p.name: p.default for p in parameters[count:]
            if p.kind in positional and p.default is not inspect.Parameter.empty
            and not isinstance(p.default, torch.Tensor)}


def check_weights(model: torch.nn.Module) -> None:
    """Refuse models fxprune cannot score or price: non-float parameters, NaN or infinite weights."""
    integer = [name for name, p in model.named_parameters() if not p.is_floating_point()]
    if integer:
        raise UnsupportedModelError(
            f"parameters {', '.join(integer[:5])} are {model.get_parameter(integer[0]).dtype}: fxprune prunes "
            "floating-point models; prune the float model, then quantize the pruned one")
    tensors = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
    bad = [name for name, t in tensors if not bool(torch.isfinite(t).all())]
    if bad:
        raise InvalidWeightsError(
            f"{len(bad)} weight tensor(s) hold NaN or infinite values ({', '.join(bad[:5])}); fxprune scores "
            "channels by their weights. Fix or reload the checkpoint (a diverged training run often causes this).")


def _failing_module(exc: BaseException) -> str:
    """Best-effort name of the module whose forward raised during tracing, from the traceback."""
    tb = exc.__traceback__
    last = None
    while tb is not None:
        frame_self = tb.tb_frame.f_locals.get("self")
        if isinstance(frame_self, torch.nn.Module):
            last = type(frame_self).__name__
        tb = tb.tb_next
    return f" (in the forward of {last})" if last else ""


def _is_small_value(value: Any) -> bool:
    """Values worth keeping on a node: sizes, ints, slices, dtypes; never tensors."""
    if isinstance(value, (int, float, bool, str, slice, torch.dtype, torch.device, type(None))):
        return True
    if isinstance(value, (tuple, list, torch.Size)):
        return len(value) <= 16 and all(_is_small_value(v) for v in value)
    return False


class _RecordingShapeProp(ShapeProp):
    """ShapeProp that also records small non-tensor results (sizes, ints) on node.meta."""

    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        if _is_small_value(result) and n.op != "output":
            n.meta[VALUE_KEY] = result
        return result


def check_example_inputs(gm: torch.fx.GraphModule, example_inputs: Any) -> tuple:
    """Normalize example inputs to a tuple matching the graph's placeholders, or say what is wrong."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise ExampleInputsError(
            f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}"
        )
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    required = [n for n in placeholders if not n.args]  # placeholders with defaults carry them in args
    if not len(required) <= len(example_inputs) <= len(placeholders):
        names = ", ".join(n.target for n in placeholders)
        raise ExampleInputsError(
            f"the model's forward takes {len(placeholders)} input(s) ({names}); "
            f"got {len(example_inputs)} example input(s). Pass one example per forward argument."
        )
    return tuple(example_inputs)


def propagate_shapes(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> torch.fx.GraphModule:
    """Run ShapeProp on ``example_inputs``, in place on ``gm`` (fxprune's own copy).

    Runs in eval mode so no BatchNorm statistic moves; every module's training flag is restored after.
    """
    inputs = check_example_inputs(gm, example_inputs)
    printed = io.StringIO()  # ShapeProp prints the traceback of a failing node before it raises
    try:
        with inference(gm), contextlib.redirect_stderr(printed):
            _RecordingShapeProp(gm).propagate(*inputs)
        sys.stderr.write(printed.getvalue())  # the model's own warnings, when it ran
    except Exception as exc:
        node = _failing_node(exc)
        shapes = ", ".join(
            str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs
        )
        raise ExampleInputsError(
            f"the model failed on the example inputs ({shapes}){node}: {exc.__cause__ or exc}\n"
            "Fix: pass inputs of the shape, dtype and device the model expects "
            "(e.g. torch.randn(1, 3, 224, 224) for an ImageNet classifier)."
        ) from exc
    return gm


def _failing_node(exc: BaseException) -> str:
    text = str(exc)
    if text.startswith("ShapeProp error for: node="):
        return " at " + text.split(" with meta=")[0].removeprefix("ShapeProp error for: node=")
    return ""

