"""The public calls: analyze a model, inspect its channel groups, prune it with a plan."""

from __future__ import annotations

import logging
from typing import Any, Iterable

import numpy as np
import torch
import torch.fx

from fxprune.errors import AnalysisRequiredError, ExampleInputsError, FxpruneError
from fxprune.ir import META_KEY, ChannelGroup, Plan
from fxprune.passes.dependency import Analysis, DependencyPass
from fxprune.passes.rewrite import PLAN_KEY, RewritePass
from fxprune.passes.trace import propagate_shapes, trace, unfed_defaults

logger = logging.getLogger("fxprune")


def analyze(
    model: torch.nn.Module,
    example_inputs: Any,
    *,
    leaf_modules: Iterable[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
    autowrap_functions: Iterable = (),
) -> torch.fx.GraphModule:
    """Trace ``model``, propagate shapes and find its channel groups; the model is not modified.

    The result is fxprune's own GraphModule: it shares nothing writable with the passes that follow
    (the rewrite copies before it writes).
    """
    if example_inputs is None:
        raise ExampleInputsError("example_inputs is required: pass e.g. (torch.randn(1, 3, 224, 224),)")
    concrete_args = {**unfed_defaults(model, example_inputs), **(concrete_args or {})} or None
    gm = trace(model, leaf_modules=leaf_modules, concrete_args=concrete_args, autowrap_functions=autowrap_functions)
    propagate_shapes(gm, example_inputs)
    DependencyPass()(gm)
    return gm


def analysis(gm: torch.fx.GraphModule) -> Analysis:
    if META_KEY not in gm.meta:
        raise AnalysisRequiredError("this GraphModule has not been analysed; call fxprune.analyze(model, inputs)")
    return gm.meta[META_KEY]


def groups(gm: torch.fx.GraphModule) -> list[ChannelGroup]:
    """All channel groups of an analysed GraphModule, prunable or frozen."""
    return list(analysis(gm).groups.values())


def random_plan(gm: torch.fx.GraphModule, keep_ratio: float = 0.5, seed: int = 0,
                include_norm_coupled: bool = True) -> Plan:
    """Keep a random ``keep_ratio`` share of every prunable group's channels.

    At least one channel of every member survives (a concat member may own only a few channels), so
    the share kept can be slightly above ``keep_ratio``.
    """
    rng = np.random.default_rng(seed)
    keep = {}
    for group in analysis(gm).groups.values():
        if not group.prunable or (group.norm_coupled and not include_norm_coupled):
            continue
        count = max(1, int(round(group.size * keep_ratio)))
        keep[group.id] = rng.choice(group.size, size=count, replace=False)
    return with_every_member(gm, keep, rng)


def uniform_plan(gm: torch.fx.GraphModule, keep_ratio: float, round_to: int | dict[int, int] = 1) -> Plan:
    """Keep the first ``keep_ratio`` share of every prunable group's channels, on multiples of ``round_to``
    (one number, or one per group id), at least one multiple."""
    keep = {}
    for group in analysis(gm).prunable_groups():
        step = round_to.get(group.id, 1) if isinstance(round_to, dict) else round_to
        count = min(group.size, max(step, int(round(group.size * keep_ratio / step)) * step))
        if count < group.size:
            keep[group.id] = np.arange(count)
    return with_every_member(gm, keep)


def with_every_member(gm: torch.fx.GraphModule, keep: dict[int, np.ndarray],
                      rng: np.random.Generator | None = None) -> Plan:
    """A plan from kept channels per group, adding one channel to any member left without one (the
    first of its channels, or a random one with ``rng``): a plan must leave every member a channel."""
    result = analysis(gm)
    plan = {}
    for gid, channels in keep.items():
        kept = set(np.asarray(channels).tolist())
        for member in result.member_channels(gid):
            if not kept.intersection(member.tolist()):
                kept.add(int(rng.choice(member)) if rng is not None else int(member[0]))
        plan[gid] = np.array(sorted(kept), dtype=np.int64)
    return Plan(plan)


def prune(gm: torch.fx.GraphModule, plan: Plan) -> torch.fx.GraphModule:
    """A new, physically smaller GraphModule keeping ``plan``'s channels; ``gm`` is left as it was."""
    return RewritePass(plan)(gm).graph_module


def plan_of(gm: torch.fx.GraphModule) -> Plan | None:
    """The plan a pruned GraphModule was made with, or None for an unpruned one."""
    return gm.meta.get(PLAN_KEY)


REPORT_KEY = "fxprune_report"


def infer_example_inputs(model: torch.nn.Module) -> tuple:
    """Batch 1, the first convolution's input channels, 224x224: what image classifiers take."""
    first_conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    if first_conv is None:
        raise ExampleInputsError("could not infer example inputs (the model has no Conv2d); "
                                 "pass example_inputs=(tensor, ...)")
    shape = (1, first_conv.in_channels, 224, 224)
    logger.info("fxprune: example_inputs not given; using torch.randn%s", shape)
    return (torch.randn(*shape),)


def compile(
    model: torch.nn.Module,
    budget: Any,
    example_inputs: Any = None,
    *,
    importance: str = "sp_lamp",
    engine: Any = "onnxruntime",
    threads: int | None = None,
    round_to: int | None = None,
    solver: str = "sp_lamp",
    calibration: Iterable[Any] | None = None,
    loss_fn: Any = None,
    resolution: int = 4000,
    measure: bool = False,
    refine: int = 2,
    leaf_modules: Iterable[type | str] = (),
    autowrap_functions: Iterable = (),
    cache: Any = None,
    progress: bool = True,
) -> torch.fx.GraphModule:
    """Prune ``model`` to fit ``budget``: trace, group, score, cost, solve, rewrite. Returns a new module.

    ``budget``: a float in (0, 1] (share of the baseline latency on ``engine``), or ``fxprune.Latency``,
    ``fxprune.FLOPs``, ``fxprune.Params``. ``engine``: ``"onnxruntime"`` (CPU, default), ``"torch"``,
    ``"cuda"`` or an ``Engine``; ``threads``: its thread count (default: torch's). ``round_to``: keep
    counts on multiples of this (default: the engine's latency step for latency budgets, else 8).
    ``cache``: a ``LatencyCache`` or a folder for the latency tables (default ``~/.cache/fxprune``).
    ``measure``: also time the model before and after on ``engine`` for the report.
    ``refine``: for latency budgets, how many solved plans may be timed on ``engine`` and solved again
    through the measurements (``passes/refine.py``); 0 trusts the tables alone.
    """
    from fxprune.budgets import as_budget
    from fxprune.cache import LatencyCache
    from fxprune.passes.cost import COST_KEY, CostPass, count_params, measure_flops
    from fxprune.passes.engines import get_engine
    from fxprune.passes.latency import LATENCY_KEY, LatencyPass, latency_cost
    from fxprune.passes.plan import solve_plan
    from fxprune.passes.refine import solve_measured
    from fxprune.passes.score import ScorePass
    from fxprune.reports import GroupReport, Report

    budget = as_budget(budget)
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise FxpruneError(f"refine must be a number of measured solves >= 0, got {refine!r}")
    engine = get_engine(engine, threads, check=budget.metric == "latency" or measure)
    example_inputs = infer_example_inputs(model) if example_inputs is None else example_inputs
    gm = analyze(model, example_inputs, leaf_modules=leaf_modules, autowrap_functions=autowrap_functions)
    example_inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    ScorePass(importance, calibration, loss_fn)(gm)
    CostPass(example_inputs)(gm)
    costs = dict(gm.meta[COST_KEY])
    granularity: Any = round_to or 8
    if budget.metric == "latency":
        cache = cache if isinstance(cache, LatencyCache) else LatencyCache(*(() if cache is None else (cache,)))
        LatencyPass(example_inputs, engine, round_to=round_to, cache=cache, progress=progress)(gm)
        costs["latency"] = latency_cost(gm)
        granularity = gm.meta[LATENCY_KEY].granularity
    cost = costs[budget.metric]
    measured_solve = None
    if budget.metric == "latency" and refine:
        measured_solve = solve_measured(gm, cost, budget.capacity(cost.baseline) / cost.baseline, engine,
                                        example_inputs, steps=refine, cache=cache, round_to=granularity,
                                        solver=solver, resolution=resolution)
        result = measured_solve.result
    else:
        result = solve_plan(gm, cost, budget.capacity(cost.baseline), round_to=granularity, solver=solver,
                            resolution=resolution)
    pruned = prune(gm, result.plan)
    groups = analysis(gm).groups
    report = Report(
        budget=str(budget), importance=importance, solver=solver,
        groups=[GroupReport(g.id, g.members[0].node, g.size, result.keep_counts[g.id],
                            float(g.importance.sum()), float(np.sort(g.importance)[::-1][:result.keep_counts[g.id]].sum()))
                for g in groups.values() if g.id in result.keep_counts],
        flops_before=measure_flops(gm, example_inputs), flops_after=measure_flops(pruned, example_inputs),
        params_before=count_params(gm), params_after=count_params(pruned),
        predicted_before=cost.baseline, predicted_after=result.predicted_cost, capacity=result.capacity,
        solver_seconds=result.solver_seconds, iterations=result.iterations, engine=engine.name,
    )
    if "latency" in costs:
        calibration_ = gm.meta[LATENCY_KEY]
        report.predicted_latency_ms_before = costs["latency"].baseline
        report.predicted_latency_ms_after = result.predicted_cost
        report.latency_step = calibration_.step
        if measured_solve is not None:
            _report_measured_solve(report, measured_solve, costs["latency"].baseline)
        report.notes.append(f"latency tables on {engine.name} ({engine.threads} threads): {calibration_.tables} "
                            f"layers, {calibration_.tables_measured} measured now, the rest from the cache; "
                            f"latency step {calibration_.step} channels")
    if measure:
        before_ms, (share,) = engine.compare_to(gm, [pruned], example_inputs)
        report.measured_latency_ms_before, report.measured_latency_ms_after = before_ms, share * before_ms
    pruned.meta[REPORT_KEY] = report
    return pruned


def _report_measured_solve(report, solved, baseline_ms: float) -> None:
    """What the closed loop measured, and where the plan's predicted latency comes from."""
    report.predicted_latency_ms_tables_after = solved.tables_share * baseline_ms
    report.predicted_latency_ms_after = report.predicted_after = solved.predicted_share * baseline_ms
    report.latency_points = [(p.predicted, p.measured, p.source) for p in solved.points]
    plans = sum(p.source == "plan" for p in solved.points)
    report.latency_prediction = "measured" if solved.measured else "corrected" if plans else "tables"
    report.notes.append(
        f"{plans} plan(s) timed on the engine while solving; the returned plan's prediction is "
        + ("its measurement" if solved.measured else "the tables' corrected by the measured points")
        + f" (tables alone: {solved.tables_share:.3f} of the model)")
    if solved.predicted_share > report.capacity / baseline_ms * (1 + 1e-9):
        report.notes.append(f"the returned plan is predicted at {solved.predicted_share:.3f} of the model, above "
                            "the budget: no timed or corrected plan fit it (the tables allow nothing smaller, or "
                            "timings disagree); raise the budget, or compile with a larger refine")


def report(gm: torch.fx.GraphModule):
    """The Report of a GraphModule returned by ``fxprune.compile``."""
    if REPORT_KEY not in gm.meta:
        raise AnalysisRequiredError("this module was not made by fxprune.compile, so it has no report")
    return gm.meta[REPORT_KEY]
