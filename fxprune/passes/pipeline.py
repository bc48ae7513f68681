"""The passes put together: analysis (trace, shapes, groups) and a runner that checks every pass."""

from __future__ import annotations

import logging
from typing import Any, Iterable, cast

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassBase

from fxprune.errors import ExampleInputsError
from fxprune.ir.capture import flat_inputs, split_inputs
from fxprune.ir.channels import Plan
from fxprune.passes.blocks import BlockPass, record_returns
from fxprune.passes.capture import capture as capture_model
from fxprune.passes.dependency import DependencyPass
from fxprune.passes.rewrite import RewritePass

logger = logging.getLogger("fxprune")


def analyze(model: torch.nn.Module, example_inputs: Any, *, example_kwargs: dict | None = None,
            capture: str = "auto", leaf_modules: Iterable[type | str] = (),
            concrete_args: dict[str, Any] | None = None, autowrap_functions: Iterable = ()) -> torch.fx.GraphModule:
    """Capture a copy of ``model``, propagate shapes and find its channel groups; the model is not modified.

    The result is fxprune's own GraphModule: it shares nothing writable with the passes that follow
    (the rewrite copies before it writes). A graph captured by torch.export takes the leaves of the
    inputs (``graph_inputs`` gives them); the modules fxprune returns are called like the model.
    """
    return analyze_inputs(model, example_inputs, example_kwargs=example_kwargs, capture=capture,
                          leaf_modules=leaf_modules, concrete_args=concrete_args,
                          autowrap_functions=autowrap_functions)[0]


def analyze_inputs(model: torch.nn.Module, example_inputs: Any, *, example_kwargs: dict | None = None,
                   capture: str = "auto", leaf_modules: Iterable[type | str] = (),
                   concrete_args: dict[str, Any] | None = None,
                   autowrap_functions: Iterable = ()) -> tuple[torch.fx.GraphModule, tuple]:
    """``analyze``, and the example inputs as the analysed graph takes them."""
    if example_inputs is None and not example_kwargs:
        raise ExampleInputsError("example_inputs is required: pass e.g. (torch.randn(1, 3, 224, 224),)")
    args, kwargs = split_inputs(example_inputs, example_kwargs)
    gm, inputs = capture_model(model, args, kwargs, mode=capture, leaf_modules=leaf_modules,
                               autowrap_functions=autowrap_functions, concrete_args=concrete_args)
    run_passes(gm, [DependencyPass(), BlockPass(inputs)])  # the capture left shapes on the graph
    record_returns(model, args, kwargs, gm)
    return gm, inputs


def graph_inputs(gm: torch.fx.GraphModule, example_inputs: Any, example_kwargs: dict | None = None) -> tuple:
    """The inputs of a model call as ``gm``, an analysed graph, takes them (the leaves, for torch.export's)."""
    return flat_inputs(gm, *split_inputs(example_inputs, example_kwargs))


def run_passes(gm: torch.fx.GraphModule, passes: Iterable[PassBase]) -> torch.fx.GraphModule:
    """Run each pass on ``gm`` in order (``PassBase.__call__`` checks its ``requires`` before and its
    ``ensures`` after); returns the last pass's module."""
    for each in passes:
        result = each(gm)
        assert result is not None  # fxprune's passes return a PassResult (PassBase.__call__ passes it on)
        gm = cast(torch.fx.GraphModule, result.graph_module)
    return gm


def prune(gm: torch.fx.GraphModule, plan: Plan) -> torch.fx.GraphModule:
    """A new, physically smaller GraphModule keeping ``plan``'s channels; ``gm`` is left as it was."""
    return run_passes(gm, [RewritePass(plan)])


def infer_example_inputs(model: torch.nn.Module) -> tuple:
    """Batch 1, the first convolution's input channels, 224x224: what image classifiers take."""
    first_conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    if first_conv is None:
        raise ExampleInputsError("could not infer example inputs (the model has no Conv2d); "
                                 "pass example_inputs=(tensor, ...)")
    shape = (1, first_conv.in_channels, 224, 224)
    logger.info("fxprune: example_inputs not given; using torch.randn%s", shape)
    return (torch.randn(*shape),)
