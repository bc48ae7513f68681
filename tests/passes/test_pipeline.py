"""compile is its pipeline: one list of passes over one Context made on the captured graph's inputs, the
partitioned case a pass (a no-op on a graph captured whole), INT8 calibration the engine's, compile short."""

from __future__ import annotations

import ast
import inspect
import textwrap

import pytest
import torch

import fxprune
from fxprune import api
from fxprune.backends.ort import OnnxRuntimeEngine, OnnxRuntimeInt8Engine
from fxprune.errors import OutputError, SolverError
from fxprune.ir.keys import SOLUTION_KEY, WHOLE_KEY
from fxprune.passes import context as context_module
from fxprune.passes.blocks import BlockPass
from fxprune.passes.budget import PlanPass
from fxprune.passes.context import Context, calibrated
from fxprune.passes.cost import CostPass
from fxprune.passes.dependency import DependencyPass
from fxprune.passes.keep import KeepPass
from fxprune.passes.latency import LatencyPass
from fxprune.passes.pipeline import Options, SolvedRewritePass, capture_inputs, compile_passes, run_passes
from fxprune.passes.score import ScorePass
from fxprune.passes.whole import WholeModelBudgetPass
from tests.doubles import SyntheticEngine, tiny_cnn

INPUTS = (torch.randn(1, 3, 32, 32),)
ORDER = [DependencyPass, BlockPass, KeepPass, ScorePass, CostPass, LatencyPass, WholeModelBudgetPass, PlanPass,
         SolvedRewritePass]


@pytest.mark.parametrize("budget", [fxprune.Latency(0.5), fxprune.FLOPs(0.5)])
def test_one_list_holds_every_pass_in_order(budget):
    model = tiny_cnn().eval()
    gm, inputs = capture_inputs(model, INPUTS)
    with Context(inputs, SyntheticEngine()) as context:
        passes = compile_passes(context, budget, Options(), model, (INPUTS, {}))
    expected = ORDER if budget.metric == "latency" else [p for p in ORDER if p is not LatencyPass]
    assert [type(p) for p in passes] == expected


def test_the_passes_run_by_one_runner_return_the_pruned_graph_of_the_solved_plan():
    model = tiny_cnn().eval()
    gm, inputs = capture_inputs(model, INPUTS)
    with Context(inputs) as context:
        pruned = run_passes(gm, compile_passes(context, fxprune.FLOPs(0.5), Options(), model, (INPUTS, {})))
        assert pruned is context.pruned(gm, gm.meta[SOLUTION_KEY].result.plan)  # built once, through the context
    assert fxprune.plan_of(pruned) == gm.meta[SOLUTION_KEY].result.plan
    assert WHOLE_KEY not in gm.meta  # captured whole: the whole-model budget pass leaves nothing
    assert fxprune.count_flops(pruned, inputs) <= 0.5 * fxprune.count_flops(gm, inputs) * 1.001


def test_compile_makes_one_context_on_the_captured_graphs_inputs(monkeypatch):
    made: list[tuple] = []
    real = Context.__init__
    monkeypatch.setattr(Context, "__init__", lambda self, inputs, *a, **k: made.append(inputs) or real(
        self, inputs, *a, **k))
    fxprune.compile(tiny_cnn().eval(), fxprune.FLOPs(0.5), INPUTS, progress=False)
    assert len(made) == 1 and len(made[0]) == 1 and made[0][0] is INPUTS[0]


@pytest.mark.parametrize("options", [dict(output="onnx"), dict(solver="knapsack"), dict(refine=-1)])
def test_options_are_checked_before_the_model_is_captured(options, monkeypatch):
    monkeypatch.setattr(api, "capture_inputs", lambda *a, **k: pytest.fail("captured before the options were checked"))
    with pytest.raises((OutputError, SolverError, fxprune.FxpruneError)):
        fxprune.compile(tiny_cnn().eval(), fxprune.FLOPs(0.5), INPUTS, **options)


def test_an_engine_that_quantizes_is_calibrated_on_the_batches_inputs_once_when_the_context_resolves_it(monkeypatch):
    resolved = []
    real = context_module.get_engine
    monkeypatch.setattr(context_module, "get_engine", lambda *a, **k: resolved.append(a) or real(*a, **k))
    user = OnnxRuntimeInt8Engine(threads=1)
    batches = [(torch.randn(2, 3, 32, 32), torch.tensor([0, 1])), torch.randn(2, 3, 32, 32)]
    with Context(INPUTS, user, calibration=batches, check=False) as context:
        engine = context.engine
    assert isinstance(engine, OnnxRuntimeInt8Engine) and engine is not user and user.calibration == []
    assert len(engine.calibration) == 2 and engine.calibration[0] is batches[0][0]  # the labels left out
    assert len(resolved) == 1
    fp32 = OnnxRuntimeEngine(threads=1)
    assert calibrated(fp32, batches) is fp32 and fp32.unquantized() is None  # FP32 quantizes nothing
    assert type(engine.unquantized()) is OnnxRuntimeEngine  # what the report times quantizing against


def test_compiles_body_is_at_most_15_lines():
    source = textwrap.dedent(inspect.getsource(api.compile))
    function = ast.parse(source).body[0]
    assert isinstance(function, ast.FunctionDef)
    body = function.body[1:]  # after the docstring
    lines = body[-1].end_lineno - body[0].lineno + 1
    assert lines <= 15, f"compile's body is {lines} lines"
