"""The public calls: analyze a model, inspect its channel groups, prune it with a plan, compile to a budget."""

from __future__ import annotations

import inspect
from dataclasses import fields, replace
from typing import Any, Callable, Iterable, cast

import numpy as np
import torch
import torch.fx

from fxprune.backends.registry import get_engine
from fxprune.budgets import Budget, Latency, UserBudget, as_budget
from fxprune.errors import AnalysisRequiredError, BudgetError, ExampleInputsError
from fxprune.huggingface import DecodeStep, Prefill, decodes
from fxprune.ir.capture import capture_of, split_inputs, structured
from fxprune.ir.channels import Block, ChannelGroup, Plan
from fxprune.ir.graph import space as graph_space
from fxprune.ir.keys import (
    COST_KEY,
    IMPORTANCE_KEY,
    LATENCY_KEY,
    PLAN_KEY,
    REPORT_KEY,
    SOLUTION_KEY,
    WHOLE_KEY,
)
from fxprune.ir.solution import MeasuredSolve, Solution
from fxprune.ir.whole import WholeModel
from fxprune.passes.budget import DEFAULT_STEP
from fxprune.passes.context import Context
from fxprune.passes.cost import count_flops, count_params
from fxprune.passes.pipeline import (
    Options,
    analyze,
    called_like,
    capture_inputs,
    compile_passes,
    graph_inputs,
    infer_example_inputs,
    run_passes,
)
from fxprune.passes.pipeline import prune as prune_graph
from fxprune.passes.verify import own_model
from fxprune.reports import GroupReport, PartReport, Report
from fxprune.rules import RULES
from fxprune.rules.attention import ScaledDotProductAttention
from fxprune.solvers.planner import Depth, analysis, random_plan, uniform_plan, with_every_member

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
    depth: Depth = True,
    keep: Iterable[str | type] = (),
) -> torch.nn.Module:
    """Prune ``model`` to fit ``budget``: trace, group, score, cost, solve, rewrite. Returns a new module:
    ``output="module"`` (default) a copy of ``model``, its own class, with the removed channels sliced out
    of its modules (``model`` is not modified), verified against the pruned graph at the example inputs
    and against the masked original at other shapes; where that fails (code that keeps a size no update
    reaches), the pruned graph, with a report note naming the module. ``output="graph"``: the pruned
    ``GraphModule`` (the export-ready form) directly. ``depth``: the plan may also remove whole residual
    blocks (``x + f(x)`` becomes ``x``) where that buys the budget more cheaply than thinning them (default:
    on, docs/depth.md says why; ``fxprune.blocks(gm)`` lists them); ``depth=False``: width only;
    ``depth="only"``: blocks only, every width kept (the layer dropping of ShortGPT, by the budget). ``keep``:
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
    budget = as_budget(budget)
    options = Options(capture=capture, leaf_modules=leaf_modules, autowrap_functions=autowrap_functions,
                      importance=importance, calibration=calibration, loss_fn=loss_fn, engine=engine, threads=threads,
                      cache=cache, remeasure=remeasure, progress=progress, measure=measure, round_to=round_to,
                      solver=solver, resolution=resolution, refine=refine, depth=depth, output=output, keep=keep)
    if _phase(model, budget) == "both":  # a decoder's default: its decode step solved, then its prefill timed
        return _both_phases(model, budget, example_inputs, example_kwargs, options)
    model, example_inputs, example_kwargs, options = _decoded(model, budget, example_inputs, example_kwargs, options)
    call = split_inputs(example_inputs, example_kwargs)
    gm, inputs = capture_inputs(model, example_inputs, example_kwargs, capture=capture, leaf_modules=leaf_modules,
                                autowrap_functions=autowrap_functions)
    with options.context(inputs, budget) as context:
        pruned = run_passes(gm, compile_passes(context, budget, options, model, call))
        result = _reported(model, call, gm, pruned, context, budget, options)
    return _returned(model, gm, result, options.output, example_inputs, example_kwargs)


def _decoded(model: torch.nn.Module, budget: UserBudget, example_inputs: Any, example_kwargs: dict | None,
             options: Options) -> tuple[torch.nn.Module, Any, dict | None, Options]:
    """What compile analyses, times and prunes, its example call and options: for a decode budget the decode
    step (``_decode_step``) on one new token, ``keep`` naming the decoder inside it; else the model as given
    (example inputs inferred where none were given)."""
    if not (isinstance(budget, Latency) and budget.phase == "decode"):
        if example_inputs is None and not example_kwargs:
            example_inputs = infer_example_inputs(model)
        return model, example_inputs, example_kwargs, options
    step = _decode_step(model, budget, example_inputs, example_kwargs)
    config: Any = model.config  # a Hugging Face decoder's (_decode_step checked)
    keep = [f"model.{k}" if isinstance(k, str) else k for k in options.keep]  # the step holds the decoder
    return step, {"input_ids": torch.randint(0, config.vocab_size, (step.batch, 1),
                                             generator=torch.Generator().manual_seed(1))}, None, \
        replace(options, keep=keep)


def _phase(model: torch.nn.Module, budget: UserBudget) -> str | None:
    """The phase a latency budget times (None for other budgets): the one given, or for ``phase=None`` both
    of a decoder's (its prefill and one decode step) and any other model's forward."""
    if not isinstance(budget, Latency):
        return None
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


def _both_phases(model: torch.nn.Module, budget: UserBudget, example_inputs: Any, example_kwargs: dict | None,
                 options: Options) -> torch.nn.Module:
    """A decoder within ``budget`` in both phases: the decode step is solved (a step's time is mostly weight
    reads and per-op overhead, which thinning cuts less than a prefill's compute, so decode usually binds),
    then the returned model's prefill of the example is timed against the model's; where it is over, the
    decode budget is lowered by its excess and solved again."""
    assert isinstance(budget, Latency)  # _phase says "both" of latency budgets only
    if budget.fraction is None:
        raise BudgetError(f"{budget}: milliseconds name one phase of a decoder; give phase='prefill' or "
                          "'decode', or a fraction (Latency(0.5)) for both")
    if example_inputs is None and not example_kwargs:
        raise ExampleInputsError("a decoder's latency budget needs example inputs: pass {'input_ids': ids}")
    args, kwargs = split_inputs(example_inputs, example_kwargs)
    prompt = inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments
    engine = get_engine(options.engine, options.threads, check=True)
    keywords = {field.name: getattr(options, field.name) for field in fields(options)}
    decode, prefill_share = budget.of_phase("decode"), None
    with engine.deploy(Prefill(model, list(prompt)), tuple(prompt.values())) as full:
        for _ in range(BOTH_TRIES):
            pruned = compile(model, decode, example_inputs, example_kwargs=example_kwargs, **keywords)
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


def _reported(model: torch.nn.Module, call: tuple[tuple, dict], gm: torch.fx.GraphModule,
              pruned: torch.fx.GraphModule, context: Context, budget: Budget, options: Options) -> torch.nn.Module:
    """The pruned model called like ``model``, compile's Report on its ``meta``: of the graph pruned, or for
    a model captured in parts (``gm.meta["fxprune_whole"]``), of the whole model."""
    result, whole = called_like(model, pruned), gm.meta.get(WHOLE_KEY)
    report = _report(gm, pruned, context, budget, options.importance, options.solver,
                     options.measure and whole is None, options.depth, _user_path(model))
    if whole is not None:
        timed = options.measure or budget.metric == "latency"
        _whole_report(report, gm, whole, model, call, result, context if timed else None)
    report.note_over_budget()
    cast(dict, result.meta)[REPORT_KEY] = report  # a graph's meta, or the one called_like gave a model in parts
    return result


def _returned(model: torch.nn.Module, gm: torch.fx.GraphModule, result: torch.nn.Module, output: str,
              example_inputs: Any, example_kwargs: dict | None) -> torch.nn.Module:
    """What compile returns: the pruned graph (``output="graph"``), else the model's own class made smaller
    and verified (``own_model``); for a decode step, the decoder inside it."""
    if output == "graph":
        return result
    returned = own_model(model, gm, result, cast(dict, result.meta)[PLAN_KEY], example_inputs, example_kwargs)
    if isinstance(returned, DecodeStep):  # the decoder the step ran, pruned, with the step's plan and report
        returned.model.meta = returned.meta
        report: Report = cast(dict, returned.meta)[REPORT_KEY]
        report.returned = type(returned.model).__name__
        return returned.model
    return returned


def _whole_report(report: Report, gm: torch.fx.GraphModule, whole: WholeModel, model: torch.nn.Module,
                  call: tuple[tuple, dict], result: torch.nn.Module, context: Context | None) -> None:
    """A partitioned model's report over the whole forward: FLOPs and parameters of the whole model, before
    and after, each part's share kept, and (with ``context``) the whole model timed end to end on the
    engine, before and after."""
    args, kwargs = call
    parts_flops = gm.meta[COST_KEY]["flops"].baseline
    report.flops_before = whole.flops
    report.flops_after = count_flops(result, args, kwargs)
    report.params_before, report.params_after = whole.params, count_params(result)
    report.budget_share = whole.budget_share
    capture = capture_of(gm)
    assert capture is not None  # a graph captured in parts lists them
    for part in capture.parts:
        report.parts.append(PartReport(
            part.path, part.capture.path, part.calls, count_params(model.get_submodule(part.path)),
            count_params(result.get_submodule(part.path)), len(part.coupled)))
    report.notes.append(f"{parts_flops / max(report.flops_before, 1):.1%} of the model's FLOPs are in the "
                        f"{len(report.parts)} parts fxprune captured and can prune; the rest runs as written")
    if context is None:
        return
    engine = context.timing_engine()
    with engine.deploy(result, args) as after:
        before_ms, (share,) = engine.time_shares(context.deploy(model, args).run, [after.run])
    report.measured_latency_ms_before, report.measured_latency_ms_after = before_ms, share * before_ms
    if whole.prunable_latency is not None:
        report.notes.append(f"{whole.prunable_latency:.1%} of the model's latency on {engine.name} is in the parts "
                            f"(the rest: post-processing and code no front end captured); end to end the pruned "
                            f"model measured {share:.3f} of the model")


def prune(gm: torch.fx.GraphModule, plan: Plan) -> torch.fx.GraphModule:
    """A new, physically smaller module keeping ``plan``'s channels of an analysed ``gm`` (left as it was),
    called like the model ``gm`` was captured from."""
    return structured(prune_graph(gm, plan))


def _user_path(model: torch.nn.Module) -> Callable[[str], str]:
    """A module's path in ``model`` as the user names it: in the decoder a decode step runs (``model.``
    dropped), else as it is."""
    if isinstance(model, DecodeStep):
        return lambda path: path.removeprefix("model.")
    return str


def _report(gm: torch.fx.GraphModule, pruned: torch.fx.GraphModule, context: Context, budget: Budget,
            importance_name: str, solver: str, measure: bool, depth: Depth = False,
            user_path: Callable[[str], str] = str) -> Report:
    """What compile did: the solution, FLOPs and parameters before and after, latency where measured; modules
    named by ``user_path`` (the user's paths)."""
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
    report.blocks_removed = [user_path(blocks[b].module) for b in result.plan.drop]
    if depth:
        report.notes.append(f"depth: {len(result.plan.drop)} of {len(blocks)} removable residual blocks removed"
                            if blocks else "depth: the model has no removable residual block (see "
                            "fxprune.blocks(gm) for why each add is not one); the plan is width-only")
        report.notes.extend(f"depth: one of {', '.join(user_path(blocks[b].module) for b in ids)} is kept: only they "
                            f"compute {operation}" for operation, ids in analysis(gm).sole if blocks)
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
        report.machine_busy = report.machine_busy or calibration.busy
        report.notes += [f"timed again: {why}" for why in calibration.healed[:HEALED_SHOWN]]
        if len(calibration.healed) > HEALED_SHOWN:
            report.notes.append(f"timed again: {len(calibration.healed) - HEALED_SHOWN} more tables")
    if measure:
        engine = context.timing_engine()
        with engine.deploy(pruned, inputs) as deployed:
            before_ms, (share,) = engine.time_shares(context.deployed(gm).run, [deployed.run])
        report.measured_latency_ms_before, report.measured_latency_ms_after = before_ms, share * before_ms
        fp32 = getattr(engine, "unquantized", lambda: None)()  # an engine that quantizes: what it bought
        if fp32 is not None:
            with fp32.deploy(gm, inputs) as full, fp32.deploy(pruned, inputs) as deployed:
                before_ms, (share,) = fp32.time_shares(full.run, [deployed.run])
            report.fp32_latency_ms_before, report.fp32_latency_ms_after = before_ms, share * before_ms
    return report


def _heads_kept(gm: torch.fx.GraphModule, keep_counts: dict[int, int]) -> list[str]:
    """``name kept/total`` for every attention whose heads are a channel group (grouped-query attention: and
    its kv heads)."""
    found = []
    groups, outer = analysis(gm).groups, {nest.inner: nest.outer for nest in analysis(gm).nests}
    for node in gm.graph.nodes:
        space = graph_space(node)
        if isinstance(RULES.recorded(node), ScaledDotProductAttention) and space is not None:
            total = groups[space.group_id].size
            heads = f"{node.name} {keep_counts.get(space.group_id, total)}/{total}"
            if (kv := outer.get(space.group_id)) is not None:
                heads += f" (kv heads {keep_counts.get(kv, groups[kv].size)}/{groups[kv].size})"
            found.append(heads)
    return found


def _report_measured_solve(report: Report, solved: MeasuredSolve, baseline_ms: float) -> None:
    """What the closed loop measured, where the plan's predicted latency comes from, and whether the machine
    was busy while it timed plans."""
    report.predicted_latency_ms_tables_after = solved.tables_share * baseline_ms
    report.predicted_latency_ms_after = report.predicted_after = solved.predicted_share * baseline_ms
    report.latency_points = [(p.predicted, p.measured, p.source) for p in solved.points]
    plans = sum(p.source == "plan" for p in solved.points)
    report.latency_prediction = "measured" if solved.measured else "corrected" if plans else "tables"
    report.plan_timed_now = solved.timed_now
    if solved.busy_spread:
        report.machine_busy = True
        report.notes.append(f"the machine was busy while plans were timed (their pairs scattered by up to "
                            f"{solved.busy_spread:.0%}): the plan returned fits the budget by the upper confidence "
                            "bound of its share, which that scatter widens")


HEALED_SHOWN = 5  # tables timed again listed one by one in the report's notes


def report(gm: torch.nn.Module) -> Report:
    """The Report of a module returned by ``fxprune.compile``."""
    meta = getattr(gm, "meta", {}) if isinstance(gm, torch.nn.Module) else {}
    if REPORT_KEY not in meta:
        raise AnalysisRequiredError("this module was not made by fxprune.compile, so it has no report")
    return meta[REPORT_KEY]

