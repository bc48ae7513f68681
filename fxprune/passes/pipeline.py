"""The passes put together: capture, the list of passes one compile runs, and a runner that checks every pass.

A run captures the model first (the graph and the example inputs as it takes them), makes one ``Context``
on those inputs, then runs ``compile_passes``: dependency, blocks, score, cost, latency (latency budgets),
whole-model budget (a model captured in parts), plan (with its closed loop), rewrite. ``fxprune.compile``
and the training-time methods' ``LiveModel`` build their passes here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, cast

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxprune.budgets import Budget
from fxprune.errors import AnalysisRequiredError, ExampleInputsError, FxpruneError, OutputError
from fxprune.frontends.partition import assemble, split
from fxprune.ir.capture import capture_of, flat_inputs, is_partitioned, split_inputs, structured
from fxprune.ir.channels import Plan
from fxprune.ir.keys import CAPTURE_KEY, PLAN_KEY, SOLUTION_KEY
from fxprune.passes.blocks import BlockPass
from fxprune.passes.budget import PlanPass
from fxprune.passes.capture import capture as capture_model
from fxprune.passes.context import Context
from fxprune.passes.cost import CostPass
from fxprune.passes.dependency import DependencyPass
from fxprune.passes.keep import KeepPass
from fxprune.passes.latency import LatencyPass
from fxprune.passes.refine import check_refine
from fxprune.passes.rewrite import RewritePass
from fxprune.passes.score import ScorePass
from fxprune.passes.whole import WholeModelBudgetPass
from fxprune.solvers.planner import Depth, check_solver

logger = logging.getLogger("fxprune")
OUTPUTS = ("module", "graph")


@dataclass
class Options:
    """What a compile is asked besides its budget (``fxprune.compile``'s keywords, the same defaults): how
    the model is captured, scored, timed and solved, and what is returned. Checked when made, before any
    pass runs."""

    capture: str = "auto"
    leaf_modules: Iterable[type | str] = ()
    autowrap_functions: Iterable = ()
    importance: str = "sp_lamp"
    calibration: Iterable[Any] | None = None
    loss_fn: Any = None
    engine: Any = "onnxruntime"
    threads: int | None = None
    cache: Any = None
    remeasure: bool = False
    progress: bool = True
    measure: bool = False
    round_to: int | None = None
    solver: str = "sp_lamp"
    resolution: int = 4000
    refine: int = 4
    depth: Depth = True
    output: str = "module"
    keep: Iterable[str | type] = ()

    def __post_init__(self) -> None:
        if self.output not in OUTPUTS:
            raise OutputError(f"output={self.output!r}: compile returns output='module' (the model's own class, "
                              "smaller) or output='graph' (the pruned GraphModule)")
        check_solver(self.solver, self.round_to, self.resolution, self.depth)
        check_refine(self.refine, FxpruneError)
        self.calibration = list(self.calibration) if self.calibration is not None else None

    def context(self, example_inputs: tuple, budget: Budget) -> Context:
        """The one Context of a run on ``example_inputs`` (as the captured graph takes them): the engine is
        checked where the run times anything, and calibrated on ``calibration`` where it quantizes."""
        return Context(example_inputs, self.engine, threads=self.threads, cache=self.cache, progress=self.progress,
                       check=budget.metric == "latency" or self.measure, remeasure=self.remeasure,
                       calibration=self.calibration or ())


def capture_inputs(model: torch.nn.Module, example_inputs: Any, example_kwargs: dict | None = None, *,
                   capture: str = "auto", leaf_modules: Iterable[type | str] = (),
                   autowrap_functions: Iterable = (),
                   concrete_args: dict[str, Any] | None = None) -> tuple[torch.fx.GraphModule, tuple]:
    """A GraphModule of a copy of ``model`` (shapes on it, no pass run yet) and the example inputs as that
    graph takes them: what the run's Context is made on."""
    if example_inputs is None and not example_kwargs:
        raise ExampleInputsError("example_inputs is required: pass e.g. (torch.randn(1, 3, 224, 224),)")
    args, kwargs = split_inputs(example_inputs, example_kwargs)
    return capture_model(model, args, kwargs, mode=capture, leaf_modules=leaf_modules,
                         autowrap_functions=autowrap_functions, concrete_args=concrete_args)


def analysis_passes(model: torch.nn.Module, call: tuple[tuple, dict], inputs: tuple) -> list[PassBase]:
    """The passes that find a captured graph's channel groups and removable blocks (``model`` called on
    ``call``, its args and kwargs, is what the blocks' returns are read from; ``inputs``: as the graph takes
    them)."""
    return [DependencyPass(), BlockPass(inputs, model, call)]  # the capture left shapes on the graph


def compile_passes(context: Context, budget: Budget, options: Options, model: torch.nn.Module,
                   call: tuple[tuple, dict]) -> list[PassBase]:
    """Every pass of one compile of ``model`` (called on ``call``) to ``budget``, in order, over ``context``;
    the last one returns the pruned graph."""
    return [*analysis_passes(model, call, context.example_inputs), KeepPass(options.keep, model),
            ScorePass(options.importance, options.calibration, options.loss_fn),
            *cost_passes(context, budget, options.round_to), WholeModelBudgetPass(context, budget, model, *call),
            PlanPass(context, budget, solver=options.solver, resolution=options.resolution, round_to=options.round_to,
                     refine=options.refine, depth=options.depth),
            SolvedRewritePass(context)]


def cost_passes(context: Context, budget: Budget, round_to: int | None = None) -> list[PassBase]:
    """The passes that price a plan for ``budget``: the cost pass (FLOPs, parameters) and, for a latency
    budget, the latency pass on the context's engine (``round_to``: its grid, default the engine's step).
    What compile and the training-time methods' ``LiveModel.cost_model`` run."""
    timed = [LatencyPass(context, round_to=round_to)] if budget.metric == "latency" else []
    return [CostPass(context.example_inputs), *timed]


class SolvedRewritePass(PassBase):
    """The rewrite pass for the plan the plan pass solved, built through the context (``Context.pruned``): the
    copy the closed loop timed last is the one returned, not a second rewrite. Returns the pruned graph."""

    def __init__(self, context: Context) -> None:
        super().__init__()
        self.context = context

    def requires(self, graph_module: torch.fx.GraphModule) -> None:
        if SOLUTION_KEY not in graph_module.meta:
            raise AnalysisRequiredError("the rewrite of a solved plan needs the plan pass's solution: run it first")

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        return PassResult(self.context.pruned(graph_module, graph_module.meta[SOLUTION_KEY].result.plan), True)


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
    gm, inputs = capture_inputs(model, example_inputs, example_kwargs, capture=capture, leaf_modules=leaf_modules,
                                autowrap_functions=autowrap_functions, concrete_args=concrete_args)
    return run_passes(gm, analysis_passes(model, split_inputs(example_inputs, example_kwargs), inputs)), inputs


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


def called_like(model: torch.nn.Module, pruned: torch.fx.GraphModule) -> torch.nn.Module:
    """The pruned graph called like ``model``: the graph itself, or for a model captured in parts, a copy of
    ``model`` with its parts pruned (``split``, ``assemble``), the plan and the capture on its ``meta``."""
    if not is_partitioned(pruned):
        return structured(pruned)
    result = assemble(model, split(pruned))
    result.meta = {PLAN_KEY: pruned.meta[PLAN_KEY], CAPTURE_KEY: capture_of(pruned)}  # type: ignore[assignment]
    return result


def infer_example_inputs(model: torch.nn.Module) -> tuple:
    """Batch 1, the first convolution's input channels, 224x224: what image classifiers take."""
    first_conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    if first_conv is None:
        raise ExampleInputsError("could not infer example inputs (the model has no Conv2d); "
                                 "pass example_inputs=(tensor, ...)")
    shape = (1, first_conv.in_channels, 224, 224)
    logger.info("fxprune: example_inputs not given; using torch.randn%s", shape)
    return (torch.randn(*shape),)
