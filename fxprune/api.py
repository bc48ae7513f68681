"""The public calls: analyze a model, inspect its channel groups, prune it with a plan, compile to a budget."""

from __future__ import annotations

import functools
import inspect
from dataclasses import replace
from typing import Any, Iterable

import numpy as np
import torch
import torch.fx

from fxprune.backends.ort import OnnxRuntimeEngine, OnnxRuntimeInt8Engine
from fxprune.backends.registry import get_engine
from fxprune.budgets import Budget, Latency, UserBudget, as_budget
from fxprune.errors import AnalysisRequiredError, BudgetError, ExampleInputsError, OutputError
from fxprune.frontends.partition import assemble, split
from fxprune.huggingface import DecodeStep, Prefill, decodes
from fxprune.ir.capture import capture_of, is_partitioned, split_inputs, structured
from fxprune.ir.channels import Block, ChannelGroup, Plan
from fxprune.ir.graph import space as graph_space
from fxprune.ir.keys import (
    CAPTURE_KEY,
    COST_KEY,
    IMPORTANCE_KEY,
    LATENCY_KEY,
    PLAN_KEY,
    REPORT_KEY,
    SOLUTION_KEY,
)
from fxprune.ir.solution import Solution
from fxprune.passes.budget import DEFAULT_STEP, PlanPass, parts_budget
from fxprune.passes.context import Context
from fxprune.passes.cost import CostPass, count_flops, count_params
from fxprune.passes.keep import KeepPass
from fxprune.passes.latency import LatencyPass
from fxprune.passes.pipeline import (
    analyze,
    analyze_inputs,
    graph_inputs,
    infer_example_inputs,
    run_passes,
)
from fxprune.passes.pipeline import prune as prune_graph
from fxprune.passes.score import ScorePass
from fxprune.passes.verify import own_model
from fxprune.reports import GroupReport, PartReport, Report
from fxprune.rules import RULES
from fxprune.rules.attention import ScaledDotProductAttention
from fxprune.solvers.planner import analysis, random_plan, uniform_plan, with_every_member

__all__ = ["analysis", "analyze", "capture_of", "compile", "graph_inputs", "groups", "importance", "plan_of", "prune",
           "random_plan", "report", "uniform_plan", "with_every_member"]


def groups(gm: torch.fx.GraphModule) -> list[ChannelGroup]:
    """All channel groups of an analysed GraphModule, prunable or frozen."""
    return list(analysis(gm).groups.values())


def blocks(gm: torch.fx.GraphModule) -> tuple[list[Block], dict[str, str]]:
    """The residual blocks a plan may remove (``compile(..., depth=True)``), and for every other residual
    add of the graph, why its block is not removable."""
    return analysis(gm).blocks, analysis(gm).kept_blocks


def importance(gm: torch.fx.GraphModule) -> dict[int, np.ndarray]:
    """One score per channel of every group, from the score pass (``compile`` runs it)."""
    if IMPORTANCE_KEY not in gm.meta:
        raise AnalysisRequiredError("this GraphModule has not been scored; run "
                                    "fxprune.passes.score.ScorePass(criterion)(gm) on an analysed module")
    return gm.meta[IMPORTANCE_KEY].scores


def plan_of(gm: torch.fx.GraphModule) -> Plan | None:
    """The plan a pruned GraphModule was made with, or None for an unpruned one."""
    return gm.meta.get(PLAN_KEY)


def compile(
    model: torch.nn.Module,
    budget: UserBudget | float,
    example_inputs: Any = None,
    *,
    example_kwargs: dict | None = None,
    capture: str = "auto",
    importance: str = "sp_lamp",
    engine: Any = "onnxruntime",
    threads: int | None = None,
    round_to: int | None = None,
    solver: str = "sp_lamp",
    calibration: Iterable[Any] | None = None,
    loss_fn: Any = None,
    resolution: int = 4000,
    measure: bool = False,
    refine: int = 4,
    leaf_modules: Iterable[type | str] = (),
    autowrap_functions: Iterable = (),
    cache: Any = None,
    remeasure: bool = False,
    progress: bool = True,
    output: str = "module",
    depth: bool = True,
    keep: Iterable[str | type] = (),
) -> torch.nn.Module:
    """Prune ``model`` to fit ``budget``: trace, group, score, cost, solve, rewrite. Returns a new module:
    ``output="module"`` (default) a copy of ``model``, its own class, with the removed channels sliced out
    of its modules (``model`` is not modified), verified against the pruned graph at the example inputs
    and against the masked original at other shapes; where that fails (code that keeps a size no update
    reaches), the pruned graph, with a report note naming the module. ``output="graph"``: the pruned
    ``GraphModule`` (the export-ready form) directly. ``depth``: the plan may also remove whole residual
    blocks (``x + f(x)`` becomes ``x``) where that buys the budget more cheaply than thinning them (default:
    on, docs/depth.md says why; ``fxprune.blocks(gm)`` lists them); ``depth=False``: width only. ``keep``:
    modules whose output channels every plan keeps (qualified names, ``fnmatch`` patterns such as
    ``"model.layers.*.self_attn"``, or classes; their submodules too), and which are not removed.

    ``budget``: a float in (0, 1] (share of the baseline latency on ``engine``), or ``fxprune.Latency``,
    ``fxprune.FLOPs``, ``fxprune.Params``. ``engine``: ``"onnxruntime"`` (CPU, default), ``"torch"``,
    ``"cuda"`` or an ``Engine``; ``threads``: its thread count (default: torch's). ``round_to``: keep
    counts on multiples of this (default: the engine's latency step for latency budgets, else 8).
    ``cache``: a ``LatencyCache`` or a folder for the latency tables (default ``~/.cache/fxprune``);
    ``remeasure``: time every table and plan again instead of reading them (and overwrite them).
    ``measure``: also time the model before and after on ``engine`` for the report.
    ``refine``: for latency budgets, how many solved plans may be timed on ``engine`` and solved again
    through the measurements (``passes/refine.py``); 0 trusts the tables alone.
    ``example_inputs``: a tensor, a tuple of positional inputs (a list of images is one input), or a
    dict of keyword inputs; ``example_kwargs`` adds keyword inputs. ``capture``: ``"auto"`` (torch.fx,
    then torch.export non-strict, then strict), ``"fx"``, ``"export"`` or ``"export-strict"``. The
    module returned is called like ``model`` and returns the same structure.
    """
    options = {name: value for name, value in locals().items()  # what a decoder's both-phase compile passes on
               if name not in ("model", "budget", "example_inputs", "example_kwargs")}
    budget = as_budget(budget)
    if isinstance(budget, Latency) and _phase(model, budget) == "both":
        return _both_phases(model, budget, example_inputs, example_kwargs, options)
    if output not in ("module", "graph"):
        raise OutputError(f"output={output!r}: compile returns output='module' (the model's own class, "
                                 "smaller) or output='graph' (the pruned GraphModule)")
    latency = budget.metric == "latency"
    calibration = list(calibration) if calibration is not None else None
    if example_inputs is None and not example_kwargs:
        example_inputs = infer_example_inputs(model)
    if isinstance(budget, Latency) and budget.phase == "decode":  # the decode step: the model analysed, timed, pruned
        step = _decode_step(model, budget, example_inputs, example_kwargs)
        config: Any = model.config  # a Hugging Face decoder's (_decode_step checked)
        model, keep = step, [f"model.{k}" if isinstance(k, str) else k for k in keep]  # the step holds the model
        example_inputs, example_kwargs = {"input_ids": torch.randint(
            0, config.vocab_size, (step.batch, 1), generator=torch.Generator().manual_seed(1))}, None
    with Context((), engine, threads=threads, cache=cache, progress=progress, check=latency or measure,
                 remeasure=remeasure) as context:
        if isinstance(context.engine, OnnxRuntimeInt8Engine) and calibration:  # activations calibrated on them too
            context.engine = context.engine.calibrated([batch[0] if isinstance(batch, (tuple, list)) and len(batch) == 2
                                                        else batch for batch in calibration])
        plan_pass = PlanPass(context, budget, solver=solver, resolution=resolution, round_to=round_to, refine=refine,
                             depth=depth)
        gm, context.example_inputs = analyze_inputs(model, example_inputs, example_kwargs=example_kwargs,
                                                    capture=capture, leaf_modules=leaf_modules,
                                                    autowrap_functions=autowrap_functions)
        run_passes(gm, [KeepPass(keep, model), ScorePass(importance, calibration, loss_fn),
                        CostPass(context.example_inputs),
                        *([LatencyPass(context, round_to=round_to)] if latency else [])])
        whole = _Whole(model, *split_inputs(example_inputs, example_kwargs)) if is_partitioned(gm) else None
        if whole is not None:
            plan_pass.budget = whole.budget(budget, gm, context)
        try:
            run_passes(gm, [plan_pass])
        except BudgetError as error:  # a partitioned model's parts out of reach: say so of the whole model
            if whole is None or (restated := whole.unreachable(error, budget)) is error:
                raise
            raise restated from error
        plan = gm.meta[SOLUTION_KEY].result.plan
        pruned = context.pruned(gm, plan)
        report = _report(gm, pruned, context, budget, importance, solver, measure and whole is None, depth)
        result: torch.nn.Module
        if whole is None:
            result = structured(pruned)
            meta = pruned.meta
        else:
            result = assemble(model, split(pruned))
            whole.report(report, gm, result, context if measure or latency else None)
            meta = {PLAN_KEY: plan, CAPTURE_KEY: capture_of(gm)}
            result.meta = meta  # type: ignore[assignment]  # torch types Module attributes as tensors or modules
        report.note_over_budget()
    meta[REPORT_KEY] = report
    if output == "graph":
        return result
    returned = own_model(model, gm, result, plan, example_inputs, example_kwargs)
    if isinstance(returned, DecodeStep):  # the decoder the step ran, pruned, with the step's plan and report
        returned.model.meta = returned.meta
        report.returned = type(returned.model).__name__
        report.blocks_removed = [path.removeprefix("model.") for path in report.blocks_removed]
        return returned.model
    return returned


def _phase(model: torch.nn.Module, budget: Latency) -> str:
    """The phase a latency budget times: the one given, or for ``phase=None`` both of a decoder's (its prefill
    and one decode step) and any other model's forward."""
    if decodes(model):
        return budget.phase or "both"
    if budget.phase == "both":
        raise BudgetError(f"Latency(phase='both') times a Hugging Face decoder's prefill and decode step; a "
                          f"{type(model).__name__} is none: give Latency(fraction) alone")
    if budget.phase is not None:
        return budget.phase
    if budget.tokens is not None or budget.batch is not None:
        raise BudgetError(f"Latency(tokens=..., batch=...) sets a decoder's decode step; a {type(model).__name__} "
                          "is none: give Latency(fraction) alone")
    return "prefill"


BOTH_TRIES = 3  # decode-step solves a both-phase budget may take, each lowered by the prefill's excess


def _both_phases(model: torch.nn.Module, budget: Latency, example_inputs: Any, example_kwargs: dict | None,
                 options: dict[str, Any]) -> torch.nn.Module:
    """A decoder within ``budget`` in both phases: the decode step is solved (a step's time is mostly weight
    reads and per-op overhead, which thinning cuts less than a prefill's compute, so decode usually binds),
    then the returned model's prefill of the example is timed against the model's; where it is over, the
    decode budget is lowered by its excess and solved again."""
    if budget.fraction is None:
        raise BudgetError(f"{budget}: milliseconds name one phase of a decoder; give phase='prefill' or "
                          "'decode', or a fraction (Latency(0.5)) for both")
    if example_inputs is None and not example_kwargs:
        raise ExampleInputsError("a decoder's latency budget needs example inputs: pass {'input_ids': ids}")
    args, kwargs = split_inputs(example_inputs, example_kwargs)
    prompt = inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments
    engine = get_engine(options["engine"], options["threads"], check=True)
    decode, prefill_share = budget.of_phase("decode"), None
    with engine.deploy(Prefill(model, list(prompt)), tuple(prompt.values())) as full:
        for _ in range(BOTH_TRIES):
            pruned = compile(model, decode, example_inputs, example_kwargs=example_kwargs, **options)
            if not isinstance(pruned, type(model)):  # the step's pruned graph: it has no prefill to time
                break
            with engine.deploy(Prefill(pruned, list(prompt)), tuple(prompt.values())) as after:
                _, (prefill_share,) = engine.time_shares(full.run, [after.run])
            if prefill_share <= budget.share(1.0):
                break
            decode = replace(decode, fraction=decode.share(1.0) * budget.share(1.0) / prefill_share)
    summary = report(pruned)
    summary.budget, summary.prefill_share = str(replace(budget, phase="both")), prefill_share
    summary.notes.append(
        f"both phases: the decode step solved to {decode.share(1.0):.3f}; the prefill of the example measured "
        f"{prefill_share:.3f} of the model's" if prefill_share is not None else
        "both phases: the decode step only (the step's pruned graph was returned, so no prefill was timed)")
    if prefill_share is not None and round(prefill_share, 3) > round(budget.share(1.0), 3):
        summary.notes.append(f"the prefill is over the budget after {BOTH_TRIES} decode solves: compile with "
                            "phase='prefill' to hold it, or ask for a little less")
    return pruned


def _decode_step(model: torch.nn.Module, budget: Latency, example_inputs: Any,
                 example_kwargs: dict | None) -> DecodeStep:
    """One generated token of ``model`` with a cache of ``budget.tokens`` tokens (default: the example's
    length) at ``budget.batch`` (default: the example's batch): what a decode budget analyses and times."""
    if not decodes(model):
        raise BudgetError(f"Latency(phase='decode') times one generated token of a Hugging Face decoder with its "
                          f"key-value cache; a {type(model).__name__} is none: give a prefill budget "
                          "(Latency(0.5)) instead")
    args, kwargs = split_inputs(example_inputs, example_kwargs)
    ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise BudgetError("Latency(phase='decode') reads the cache length and batch from the example's input_ids "
                          "(batch, tokens); give them as example_inputs={'input_ids': ids}, or set "
                          "Latency(..., tokens=N, batch=B)")
    return DecodeStep(model, budget.tokens or ids.shape[1], budget.batch or ids.shape[0])


class _Whole:
    """A partitioned model's budget and report over the whole forward, not only its captured parts."""

    def __init__(self, model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.model, self.args, self.kwargs = model, args, kwargs
        self.prunable_latency: float | None = None  # the parts' share of the whole model's latency
        self.budget_share: float | None = None  # a latency budget as a share of the whole model
        self.prunable: float = 1.0  # the parts' share of the whole model in the budget's metric

    @functools.cached_property
    def flops(self) -> int:
        """The unpruned model's FLOPs, whole forward (the budget and the report read it)."""
        return count_flops(self.model, self.args, self.kwargs)

    def budget(self, budget: UserBudget, gm: torch.fx.GraphModule, context: Context) -> Budget:
        """The parts' budget: what the whole model's budget leaves them once the rest is paid for."""
        if budget.metric != "latency":
            whole = self.flops if budget.metric == "flops" else count_params(self.model)
            parts = gm.meta[COST_KEY][budget.metric].baseline
            self.prunable = min(parts / whole, 1.0)
            return parts_budget(budget, parts, whole)
        # end to end on the engine: the whole model exported as it runs, against its captured parts alone
        whole_ms, (share,) = context.timing_engine().time_shares(context.deploy(self.model, self.args).run,
                                                                 [context.deployed(gm).run])
        self.prunable_latency = self.prunable = share = min(share, 1.0)
        self.budget_share = budget.share(whole_ms)
        amount = parts_budget(budget, share * whole_ms, whole_ms, " ms")
        return Latency(amount.value / (share * whole_ms))

    def unreachable(self, error: BudgetError, budget: Budget) -> BudgetError:
        """``error``, raised for the parts' budget, restated for the whole model: its smallest plan as a
        share of the whole model (what the parts' smallest plan leaves plus the rest, which stays)."""
        if error.smallest_share is None:
            return error
        smallest = 1 - self.prunable + self.prunable * error.smallest_share
        return BudgetError(
            f"the budget {budget} cannot be met: the smallest plan reaches {smallest:.3f} of the whole model "
            f"({self.prunable:.1%} of its {budget.metric} is in the parts fxprune captured and can prune, and "
            f"pruned to their smallest they keep {error.smallest_share:.3f} of it); {error.advice}",
            smallest_share=smallest, advice=error.advice)

    def report(self, report: Report, gm: torch.fx.GraphModule, result: torch.nn.Module,
               context: Context | None) -> None:
        """FLOPs and parameters of the whole model, before and after, each part's share kept, and (with
        ``context``) the whole model timed end to end on the engine, before and after."""
        parts_flops = gm.meta[COST_KEY]["flops"].baseline
        report.flops_before = self.flops
        report.flops_after = count_flops(result, self.args, self.kwargs)
        report.params_before, report.params_after = count_params(self.model), count_params(result)
        report.budget_share = self.budget_share
        capture = capture_of(gm)
        assert capture is not None  # a graph captured in parts lists them
        for part in capture.parts:
            report.parts.append(PartReport(
                part.path, part.capture.path, part.calls, count_params(self.model.get_submodule(part.path)),
                count_params(result.get_submodule(part.path)), len(part.coupled)))
        report.notes.append(f"{parts_flops / max(report.flops_before, 1):.1%} of the model's FLOPs are in the "
                            f"{len(report.parts)} parts fxprune captured and can prune; the rest runs as written")
        if context is None:
            return
        engine = context.timing_engine()
        with engine.deploy(result, self.args) as after:
            before_ms, (share,) = engine.time_shares(context.deploy(self.model, self.args).run, [after.run])
        report.measured_latency_ms_before, report.measured_latency_ms_after = before_ms, share * before_ms
        if self.prunable_latency is not None:
            report.notes.append(f"{self.prunable_latency:.1%} of the model's latency on {engine.name} is in the parts "
                                f"(the rest: post-processing and code no front end captured); end to end the pruned "
                                f"model measured {share:.3f} of the model")


def prune(gm: torch.fx.GraphModule, plan: Plan) -> torch.fx.GraphModule:
    """A new, physically smaller module keeping ``plan``'s channels of an analysed ``gm`` (left as it was),
    called like the model ``gm`` was captured from."""
    return structured(prune_graph(gm, plan))


def _report(gm: torch.fx.GraphModule, pruned: torch.fx.GraphModule, context: Context, budget: Budget,
            importance_name: str, solver: str, measure: bool, depth: bool = False) -> Report:
    """What compile did: the solution, FLOPs and parameters before and after, latency where measured."""
    solution: Solution = gm.meta[SOLUTION_KEY]
    result, scores, inputs = solution.result, gm.meta[IMPORTANCE_KEY].scores, context.example_inputs
    report = Report(
        budget=str(budget), importance=importance_name, solver=solver,
        groups=[GroupReport(g.id, g.members[0].node, g.size, result.keep_counts[g.id], float(scores[g.id].sum()),
                            float(np.sort(scores[g.id])[::-1][:result.keep_counts[g.id]].sum()))
                for g in groups(gm) if g.id in result.keep_counts],
        flops_before=int(gm.meta[COST_KEY]["flops"].baseline), flops_after=count_flops(pruned, inputs),
        params_before=count_params(gm), params_after=count_params(pruned),
        predicted_before=solution.cost.baseline, predicted_after=result.predicted_cost, capacity=solution.capacity,
        solver_seconds=result.solver_seconds, iterations=result.iterations,
        engine=context.timing_engine().name,
    )
    if solution.below_step is not None:
        step = gm.meta[LATENCY_KEY].step if LATENCY_KEY in gm.meta else DEFAULT_STEP
        report.notes.append(f"the budget is under the smallest plan whose groups keep whole {step}-channel steps "
                            f"({solution.below_step:.3f} of the model): some may keep less, on multiples of a quarter "
                            "step, which can leave the engine's fast layout (round_to sets the grid)")
    blocks = analysis(gm).blocks
    report.blocks_removed = [blocks[b].module for b in result.plan.drop]
    if depth:
        report.notes.append(f"depth: {len(result.plan.drop)} of {len(blocks)} removable residual blocks removed"
                            if blocks else "depth: the model has no removable residual block (see "
                            "fxprune.blocks(gm) for why each add is not one); the plan is width-only")
    if heads := _heads_kept(gm, result.keep_counts):
        report.notes.append("attention heads kept per layer: " + ", ".join(heads))
    if (capture := capture_of(gm)) is not None:
        report.capture = capture.path
        report.notes.append(f"model {capture.describe()}")
    if LATENCY_KEY in gm.meta:
        calibration = gm.meta[LATENCY_KEY]
        report.predicted_latency_ms_before = solution.cost.baseline
        report.predicted_latency_ms_after = result.predicted_cost
        report.latency_step = calibration.step
        report.budget_share = budget.share(solution.cost.baseline)  # a partitioned model's: _Whole.report
        if solution.measured_solve is not None:
            _report_measured_solve(report, solution.measured_solve, solution.cost.baseline)
        engine = context.timing_engine()
        report.notes.append(f"latency tables on {engine.name} ({engine.threads} threads): "
                            + calibration.summary())
        report.notes += [f"timed again: {why}" for why in calibration.healed[:HEALED_SHOWN]]
        if len(calibration.healed) > HEALED_SHOWN:
            report.notes.append(f"timed again: {len(calibration.healed) - HEALED_SHOWN} more tables")
    if measure:
        engine = context.timing_engine()
        with engine.deploy(pruned, inputs) as deployed:
            before_ms, (share,) = engine.time_shares(context.deployed(gm).run, [deployed.run])
        report.measured_latency_ms_before, report.measured_latency_ms_after = before_ms, share * before_ms
        if isinstance(engine, OnnxRuntimeInt8Engine):  # the FP32 model too: what quantizing bought
            fp32 = OnnxRuntimeEngine(engine.threads)
            with fp32.deploy(gm, inputs) as full, fp32.deploy(pruned, inputs) as deployed:
                before_ms, (share,) = fp32.time_shares(full.run, [deployed.run])
            report.fp32_latency_ms_before, report.fp32_latency_ms_after = before_ms, share * before_ms
    return report


def _heads_kept(gm: torch.fx.GraphModule, keep_counts: dict[int, int]) -> list[str]:
    """``name kept/total`` for every attention whose heads are a channel group."""
    found = []
    for node in gm.graph.nodes:
        space = graph_space(node)
        if isinstance(RULES.recorded(node), ScaledDotProductAttention) and space is not None:
            total = analysis(gm).groups[space.group_id].size
            found.append(f"{node.name} {keep_counts.get(space.group_id, total)}/{total}")
    return found


def _report_measured_solve(report: Report, solved, baseline_ms: float) -> None:
    """What the closed loop measured, and where the plan's predicted latency comes from."""
    report.predicted_latency_ms_tables_after = solved.tables_share * baseline_ms
    report.predicted_latency_ms_after = report.predicted_after = solved.predicted_share * baseline_ms
    report.latency_points = [(p.predicted, p.measured, p.source) for p in solved.points]
    plans = sum(p.source == "plan" for p in solved.points)
    report.latency_prediction = "measured" if solved.measured else "corrected" if plans else "tables"
    report.plan_timed_now = solved.timed_now


HEALED_SHOWN = 5  # tables timed again listed one by one in the report's notes


def report(gm: torch.nn.Module) -> Report:
    """The Report of a module returned by ``fxprune.compile``."""
    meta = getattr(gm, "meta", {}) if isinstance(gm, torch.nn.Module) else {}
    if REPORT_KEY not in meta:
        raise AnalysisRequiredError("this module was not made by fxprune.compile, so it has no report")
    return meta[REPORT_KEY]

