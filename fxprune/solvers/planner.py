"""The planner: turn importance and a cost model into a Plan that meets a budget.

Each prunable group is one knapsack class whose options are "keep the top-k channels" for k on a grid.
A cost term (a layer's FLOPs, a tensor's size) depends on the widths of its input and output groups,
so each term is owned by one group and priced with the other widths held at their current values
(HALP's approximation); the knapsack is re-solved with updated widths until the plan stops changing.
The exact cost of the final plan is then checked, and the capacity tightened if it is over.
"""

from __future__ import annotations

import time
from collections import ChainMap
from collections.abc import Callable, Mapping, Set
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch.fx

from fxprune.errors import AnalysisRequiredError, BudgetError, SolverError
from fxprune.ir.channels import Analysis, Block, ChannelGroup, ChannelSpace, Nest, Plan
from fxprune.ir.cost import CostModel
from fxprune.ir.keys import ANALYSIS_KEY, IMPORTANCE_KEY
from fxprune.ir.solution import PlanResult
from fxprune.solvers.knapsack import Choice, solve_group_knapsack, solve_halp

SOLVERS = {"sp_lamp": solve_group_knapsack, "halp": solve_halp}
BELOW_STEP = 4  # below_step: keep counts under the first step on multiples of 1/BELOW_STEP of it


@dataclass
class _GroupOptions:
    """Everything the planner needs about one prunable group."""

    group: ChannelGroup
    order: np.ndarray  # channels by decreasing importance
    options: np.ndarray  # allowed keep counts, ascending
    values: np.ndarray  # kept importance per option
    shares: dict[int, np.ndarray]  # member space id -> kept share of its positions per option
    combos: dict[int, dict[int, np.ndarray]] | None = None  # a nest's class: per option, what each group keeps

    @property
    def full(self) -> int:
        """The option that keeps everything (the last)."""
        return int(self.options[-1])

    def kept(self, option: int) -> dict[int, np.ndarray]:
        """Channels ``option`` keeps, per group this class decides that loses any (option 0, a removed block:
        none; its groups are left to the block's removal)."""
        if option == 0 or option == self.full:
            return {}
        if self.combos is not None:
            whole = self.combos[self.full]
            return {gid: kept for gid, kept in self.combos[option].items() if kept.size < whole[gid].size}
        return {self.group.id: np.sort(self.order[:option])}

    def counts(self, option: int) -> dict[int, int]:
        """Channels ``option`` keeps, counted per group this class decides."""
        if self.combos is None:
            return {self.group.id: option}
        return {gid: 0 if option == 0 else len(self.combos[option][gid]) for gid in self.combos[self.full]}


def analysis(gm: torch.fx.GraphModule) -> Analysis:
    """The dependency pass's result on ``gm``, or an error saying how to get it."""
    if ANALYSIS_KEY not in gm.meta:
        raise AnalysisRequiredError("this GraphModule has not been analysed; call fxprune.analyze(model, inputs)")
    return gm.meta[ANALYSIS_KEY]


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


def uniform_plan(gm: torch.fx.GraphModule, keep_ratio: float, round_to: int | Mapping[int, int] = 1) -> Plan:
    """Keep the first ``keep_ratio`` share of every prunable group's channels, on multiples of ``round_to``
    (one number, or one per group id), at least one multiple; of query heads nested under kv heads, the
    first ``keep_ratio`` share under each kv head."""
    keep = {}
    nested = {nest.inner: nest for nest in analysis(gm).nests}
    for group in analysis(gm).prunable_groups():
        if group.id in nested:
            children = nested[group.id].children()  # the query heads under each kv head
            under = max(1, int(round(len(children[0]) * keep_ratio)))
            if under < len(children[0]):
                keep[group.id] = np.sort(np.concatenate([c[:under] for c in children]))
            continue
        step = round_to.get(group.id, 1) if isinstance(round_to, Mapping) else round_to
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
        fixed = result.groups[gid].fixed
        if fixed is not None:  # channels every plan keeps
            kept.update(fixed.tolist())
        for member in result.member_channels(gid):
            if not kept.intersection(member.tolist()):
                kept.add(int(rng.choice(member)) if rng is not None else int(member[0]))
        plan[gid] = np.array(sorted(kept), dtype=np.int64)
    for nest in result.nests:  # query heads: none under a dropped kv head, as many under each kept one
        outer = plan.get(nest.outer, np.arange(result.groups[nest.outer].size))
        inner = nest.completed(set(plan.get(nest.inner, np.arange(nest.parent.size)).tolist()), set(outer.tolist()))
        if len(inner) < nest.parent.size:
            plan[nest.inner] = np.array(sorted(inner), dtype=np.int64)
        else:
            plan.pop(nest.inner, None)
    return Plan(plan)


MAX_OPTIONS = 128  # per group: wide groups step by a multiple of round_to so the DP stays fast


def _group_options(group: ChannelGroup, importance: np.ndarray, spaces: list[ChannelSpace],
                   round_to: int, below_step: bool = False) -> _GroupOptions:
    importance = np.asarray(importance, dtype=np.float64)
    fixed = np.zeros(group.size, dtype=bool)
    if group.fixed is not None:
        fixed[group.fixed] = True
    order = np.lexsort((-importance, ~fixed))  # the fixed channels first, then by decreasing importance
    rank = np.empty(group.size, dtype=np.int64)
    rank[order] = np.arange(group.size)
    smallest = max([int(rank[np.unique(s.group_channels)].min()) + 1 for s in spaces]  # one channel per member
                   + [int(fixed.sum())])
    # On the grid only: an off-grid width (one channel, say) can make the engine leave its fast layout
    # around the layer, which no per-layer cost sees. A group narrower than one step stays whole.
    # ``below_step``: under the first step too, on multiples of a quarter step (BELOW_STEP).
    floor = max(1, round_to // BELOW_STEP) if below_step else round_to
    lowest = min(-(-smallest // floor) * floor, group.size)
    step = round_to * max(1, -(-group.size // (round_to * MAX_OPTIONS)))
    grid = np.arange(step, group.size + 1, step)
    under = np.arange(lowest, min(round_to, group.size), floor)
    options = np.unique(np.concatenate([[lowest, group.size], grid[grid >= lowest], under]))
    values = np.concatenate([[0.0], np.cumsum(importance[order])])[options]
    shares = {}
    for space in spaces:
        positions = np.bincount(space.group_channels, minlength=group.size)[order]
        shares[space.id] = np.concatenate([[0], np.cumsum(positions)])[options] / space.size
    return _GroupOptions(group, order, options, values, shares)


def _nested_options(nest: Nest, outer: _GroupOptions, inner: _GroupOptions, importance: Mapping[int, np.ndarray],
                    spaces: list[ChannelSpace]) -> _GroupOptions:
    """One knapsack class for a nest (query heads under kv heads): option = (kv heads kept, query heads kept under
    each), both on their groups' grids, by increasing query heads kept. For a count under each, every kv head
    is worth its score and its best query heads' scores, and the best kv heads by that are kept."""
    outer_scores = np.asarray(importance[nest.outer], dtype=np.float64)
    inner_scores = np.asarray(importance[nest.inner], dtype=np.float64)
    children = [c[np.argsort(-inner_scores[c], kind="stable")] for c in nest.children()]
    per_outer, inner_counts = min(c.size for c in children), set(inner.options.tolist())
    pairs = sorted({(int(n) * under, int(n), under) for n in outer.options for under in range(1, per_outer + 1)
                    if int(n) * under in inner_counts})
    combos: dict[int, dict[int, np.ndarray]] = {}
    values, masks = [], []
    for option, (_, n, under) in enumerate(pairs, start=1):
        worth = outer_scores + np.array([inner_scores[c[:under]].sum() for c in children])
        kept_outer = np.sort(np.argsort(-worth, kind="stable")[:n])
        kept_inner = np.sort(np.concatenate([children[o][:under] for o in kept_outer]))
        combos[option] = {nest.outer: kept_outer, nest.inner: kept_inner}
        values.append(float(worth[kept_outer].sum()))
        masks.append({gid: np.isin(np.arange(size), combos[option][gid])
                      for gid, size in ((nest.outer, outer.group.size), (nest.inner, inner.group.size))})
    shares = {s.id: np.array([m[s.group_id][s.group_channels].mean() for m in masks]) for s in spaces}
    return _GroupOptions(outer.group, outer.order, np.arange(1, len(pairs) + 1), np.array(values), shares, combos)


@dataclass
class _Depth:
    """A removable block in the knapsack: its primary group's class gains option 0, the block removed
    (its block space's share 0, so every cost term inside it prices 0); its other groups' classes are
    priced, and valued, at the block's current share (held like a neighbour width, HALP's approximation)."""

    block: Block
    primary: int
    others: tuple[int, ...]


def _whole(entry: _GroupOptions) -> _GroupOptions:
    """``entry`` with its full-width option only."""
    return _GroupOptions(entry.group, entry.order, entry.options[-1:], entry.values[-1:],
                         {s: v[-1:] for s, v in entry.shares.items()}, entry.combos)


def _with_removal(entry: _GroupOptions, block_space: int) -> _GroupOptions:
    """``entry`` with option 0 in front: the block removed, worth nothing and costing nothing."""
    shares = {s: np.concatenate([[v[0]], v]) for s, v in entry.shares.items()}
    shares[block_space] = np.concatenate([[0.0], np.ones(entry.options.size)])
    return _GroupOptions(entry.group, entry.order, np.concatenate([[0], entry.options]),
                         np.concatenate([[0.0], entry.values]), shares, entry.combos)


def _depth_values(entries: dict[int, _GroupOptions], depth: list[_Depth], current: Mapping[int, float],
                  previous: Mapping[int, int]) -> dict[int, np.ndarray]:
    """Values for one solve: a block's other groups count as much as the block is kept now, and keeping
    the block is worth their current values too, so removing it loses all its channels' importance."""
    values = {}
    for item in depth:
        kept = current.get(item.block.space, 1.0)
        extra = 0.0
        for g in item.others:
            values[g] = entries[g].values * kept
            width = previous.get(g, entries[g].full) if kept > 0 else entries[g].full
            extra += float(entries[g].values[_index(entries[g], width)])
        values[item.primary] = entries[item.primary].values + np.where(entries[item.primary].options > 0, extra, 0.0)
    return values


def _normalized(entries: dict[int, _GroupOptions], depth: list[_Depth], keep_counts: dict[int, int]) -> dict[int, int]:
    """Keep counts with the other groups of removed blocks at full width (what they keep is moot)."""
    keep_counts = dict(keep_counts)
    for item in depth:
        if keep_counts[item.primary] == 0:
            keep_counts.update({g: entries[g].full for g in item.others})
    return keep_counts


def _plan_value(entries: dict[int, _GroupOptions], depth: list[_Depth], keep_counts: dict[int, int]) -> float:
    """Importance kept: a removed block keeps none of its groups' channels."""
    gone = {g for item in depth if keep_counts[item.primary] == 0 for g in item.others}
    return sum(float(entries[g].values[_index(entries[g], k)]) for g, k in keep_counts.items() if g not in gone)


def _owner(term_spaces: tuple[int, ...], group_of: dict[int, int], charged: Set[int] = frozenset()) -> int | None:
    """The class a cost term is charged to: the last prunable group among its spaces (the output side), but a
    nest or a block with no prunable channels where one is among them (an attention's output projection: what
    its query heads cost; a frozen branch: what its removal saves)."""
    owners = [group_of[s] for s in term_spaces if s in group_of]
    return next((g for g in reversed(owners) if g in charged), owners[-1] if owners else None)


def _option_costs(entry: _GroupOptions, terms, current: dict[int, float]) -> np.ndarray:
    """Cost of each option of one group, other groups' widths held at ``current``."""
    # this group's spaces: one share per option (an array); the others' one share (a float)
    shares: ChainMap[int, Any] = ChainMap(entry.shares, current)
    costs = np.zeros(entry.options.size)
    for term in terms:
        costs += term.price(shares)
    return costs


def _index(entry: _GroupOptions, keep: int) -> int:
    return int(np.searchsorted(entry.options, keep))


def _solve_once(entries, owned, current, target, solve, resolution,
                values: Mapping[int, np.ndarray] | None = None) -> dict[int, int]:
    """One knapsack solve with every group's neighbour widths held at ``current`` (``values``: per group,
    values other than its own, where removable blocks weigh them)."""
    classes, ids = [], []
    for gid, entry in entries.items():
        value = values.get(gid, entry.values) if values else entry.values
        classes.append(Choice(entry.options, value, _option_costs(entry, owned.get(gid, []), current)))
        ids.append(gid)
    fixed = sum(t.price(current) for t in owned.get(None, []))
    solved = solve(classes, target - fixed, resolution=resolution)
    return {gid: int(k) for gid, k in zip(ids, solved.keep)}


def _fill(entries: dict[int, _GroupOptions], cost: CostModel, keep_counts: dict[int, int],
          capacity: float) -> tuple[dict[int, int], float]:
    """Greedily grow groups while the exact cost fits: spends budget the width approximation left over.

    Each step takes the next option (a nest: any option worth more) of the group with the best importance gained
    per exact cost added.
    Only the terms touching a group are priced, and after a step only that group and the groups sharing
    a term with it are re-priced.
    """
    index = {g: _index(entries[g], k) for g, k in keep_counts.items()}
    share = {s: float(entries[g].shares[s][i]) for g, i in index.items() for s in entries[g].shares}
    group_of = {s: g for g, e in entries.items() for s in e.shares}
    touching: dict[int, list] = {g: [] for g in entries}
    neighbours: dict[int, set[int]] = {g: {g} for g in entries}
    for term in cost.terms:
        groups = {group_of[s] for s in term.spaces if s in group_of}
        for g in groups:
            touching[g].append(term)
            neighbours[g] |= groups

    def priced(g: int) -> list[tuple[float, float, int]]:
        """(gain per cost, added cost, option index) of the options group g may grow to: its next one; for a
        nest, whose options are pairs in no order of worth, every one worth more."""
        entry, i = entries[g], index[g]
        nexts = range(i + 1, min(i + 2, entry.options.size)) if entry.combos is None else \
            [j for j in range(i + 1, entry.options.size) if entry.values[j] > entry.values[i]]
        found = []
        for j in nexts:
            grown = ChainMap({s: float(entry.shares[s][j]) for s in entry.shares}, share)  # no copy of share
            added = sum(term.price(grown) - term.price(share) for term in touching[g])
            gain = float(entry.values[j] - entry.values[i])
            found.append(((gain / added if added > 0 else float("inf")), added, j))
        return found

    total = cost.total(share)
    candidates = {g: priced(g) for g in entries}
    while True:
        fitting = [(ratio, g, added, j) for g, options in candidates.items() for ratio, added, j in options
                   if total + added <= capacity * (1 + 1e-9)]
        if not fitting:
            break
        _, g, added, j = max(fitting)  # (g, j) is unique: the added costs are never compared
        total += added
        index[g] = j
        share.update({s: float(entries[g].shares[s][index[g]]) for s in entries[g].shares})
        for h in neighbours[g]:
            candidates[h] = priced(h)
    return {g: int(entries[g].options[i]) for g, i in index.items()}, cost.total(share)


Depth = bool | Literal["only"]  # whole blocks removable too (True), or not (False), or alone, widths kept ("only")


def check_solver(solver: str, round_to: int | Mapping[int, int] | None = None, resolution: int = 4000,
                 depth: Depth = False) -> None:
    """SolverError, saying what is allowed, for an unknown solver, a round_to or resolution that is not a
    positive integer, or a depth other than True, False and "only"."""
    if depth is not True and depth is not False and depth != "only":
        raise SolverError(f"depth={depth!r}: give True (blocks removed whole where that buys the budget more cheaply "
                          "than thinning), False (widths only) or 'only' (whole blocks only, every width kept)")
    if solver not in SOLVERS:
        raise SolverError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 1:
        raise SolverError(f"resolution must be a positive integer (budget steps of the knapsack), got {resolution!r}")
    values = [] if round_to is None else list(round_to.values()) if isinstance(round_to, Mapping) else [round_to]
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise SolverError(f"round_to must be a positive integer, got {value!r}")


def _narrower_hint(round_to: int | Mapping[int, int]) -> str:
    """How to reach below the smallest plan when every group keeps at least one step of channels."""
    step = max(round_to.values(), default=1) if isinstance(round_to, Mapping) else round_to
    if step <= 1:
        return ""
    return f", or let groups keep fewer channels with a smaller round_to (now {step})"


def solve_plan(gm: torch.fx.GraphModule, cost: CostModel, capacity: float, *,
               importance: Mapping[int, np.ndarray] | None = None, round_to: int | Mapping[int, int] = 8,
               solver: str = "sp_lamp", resolution: int = 4000, max_iterations: int = 10,
               below_step: bool = False, depth: Depth = False) -> PlanResult:
    """The best plan (by kept importance) whose cost under ``cost`` is at most ``capacity``.

    ``importance``: one score per channel of each prunable group (default: the score pass's).
    ``round_to``: keep counts on multiples of this, one number for every group or one per group id.
    ``below_step``: a group may also keep fewer than one ``round_to``, on multiples of a quarter of it.
    ``depth``: the removable blocks (``Analysis.blocks``) may be removed whole, in the same knapsack: a
    removed block keeps none of its channels' importance and costs nothing (its cost terms carry its space);
    ``"only"``: blocks removed whole and every group at full width otherwise. Of the blocks that alone
    compute an operation (``Analysis.sole``), a plan keeps at least one: the one whose branch adds the most.
    """
    check_solver(solver, round_to, depth=depth)
    kept: set[int] = set()  # blocks kept as the last of the blocks that alone compute an operation
    while True:
        result = _solve_plan(gm, cost, capacity, importance, round_to, solver, resolution, max_iterations,
                             below_step, depth, frozenset(kept))
        emptied = [ids for _, ids in analysis(gm).sole if set(ids) <= set(result.plan.drop)]
        if not emptied:
            return result
        shares = {b.id: b.share for b in analysis(gm).blocks}
        kept |= {max(ids, key=lambda b: (shares[b], -b)) for ids in emptied}  # the one adding the most


def _solve_plan(gm: torch.fx.GraphModule, cost: CostModel, capacity: float,
                importance: Mapping[int, np.ndarray] | None, round_to: int | Mapping[int, int], solver: str,
                resolution: int, max_iterations: int, below_step: bool, depth: Depth,
                kept_blocks: frozenset[int]) -> PlanResult:
    """``solve_plan`` with the blocks ``kept_blocks`` not removable."""
    groups = analysis(gm)
    if importance is None:
        if IMPORTANCE_KEY not in gm.meta:
            raise AnalysisRequiredError("groups have no importance yet: run the score pass first")
        importance = gm.meta[IMPORTANCE_KEY].scores
    members: dict[int, list[ChannelSpace]] = {}
    for space in groups.spaces:
        members.setdefault(space.group_id, []).append(space)
    prunable = groups.prunable_groups()
    entries = {g.id: _group_options(g, importance[g.id], members[g.id],
                                    int(round_to.get(g.id, 1) if isinstance(round_to, Mapping) else round_to),
                                    below_step)
               for g in prunable}
    group_of = {s.id: g.id for g in prunable for s in members[g.id]}
    classes = {g.id: g.id for g in prunable}  # group -> the knapsack class that decides it
    for nest in groups.nests:  # both sides prunable, or both frozen (KeepPass freezes the other side)
        if nest.inner in entries and nest.outer in entries:
            entries[nest.outer] = _nested_options(nest, entries[nest.outer], entries.pop(nest.inner), importance,
                                                  members[nest.outer] + members[nest.inner])
            group_of.update({s.id: nest.outer for s in members[nest.inner]})
            classes[nest.inner] = nest.outer
    charged = {g for g, e in entries.items() if e.combos is not None}  # classes that take the terms they are in
    depth_items = _removable(groups, entries, classes, kept_blocks) if depth else []
    if depth == "only":  # a group decides nothing but, through its block's primary class, the block's removal
        entries = {g: _whole(e) for g, e in entries.items()}
    worth = _block_worth(entries, depth_items)
    for item, weight in zip(depth_items, _block_weights(depth_items)):
        if not item.block.groups:
            entries[item.primary] = _whole_block(item.block, worth * weight)
            group_of[item.block.space] = item.primary
            charged.add(item.primary)  # charged what its branch costs, though other groups' widths price it too
            continue
        for g in (item.primary, *item.others):
            entries[g].values = entries[g].values * weight
        entries[item.primary] = _with_removal(entries[item.primary], item.block.space)
        group_of[item.block.space] = item.primary
    owned: dict[int | None, list] = {}
    for term in cost.terms:
        owned.setdefault(_owner(term.spaces, group_of, charged), []).append(term)
    smallest = {s: float(e.shares[s][0]) for e in entries.values() for s in e.shares}  # every group at its min
    minimum = cost.total(smallest)
    if minimum > capacity * (1 + 1e-9):
        unit = {"latency": " ms", "flops": " FLOPs", "params": " parameters"}.get(cost.metric, "")
        advice = f"raise the budget{_narrower_hint(round_to)}"
        raise BudgetError(f"the {cost.metric} budget {capacity / cost.baseline:.3f} of the model "
                          f"({capacity:.6g}{unit}) cannot be met: the smallest achievable is "
                          f"{minimum / cost.baseline:.3f} of the model "
                          f"({minimum:.6g}{unit}); {advice}", smallest=minimum, smallest_share=minimum / cost.baseline,
                          advice=advice)
    start = time.perf_counter()
    target, iterations, best, exact = capacity, 0, None, None
    for _ in range(8):  # tighten the target while no solve gave a plan whose exact cost fits
        current: dict[int, float] = {}  # start from full widths: costs are over- rather than underestimated
        previous: dict[int, int] = {}
        for _ in range(max_iterations):
            iterations += 1
            try:
                values = _depth_values(entries, depth_items, current, previous) if depth_items else None
                keep_counts = _normalized(entries, depth_items, _solve_once(entries, owned, current, target,
                                                                            SOLVERS[solver], resolution, values))
            except BudgetError:
                if current == smallest:
                    break  # a tightened target below every plan: the fallback below grows the smallest plan
                current = dict(smallest)  # infeasible with these neighbour widths: restart from the smallest
                continue
            shares = {s: float(entries[g].shares[s][_index(entries[g], k)])
                      for g, k in keep_counts.items() for s in entries[g].shares}
            exact = cost.total(shares)
            value = _plan_value(entries, depth_items, keep_counts)
            if exact <= capacity * (1 + 1e-9) and (best is None or value > best[0]):
                best = (value, keep_counts, exact)
            if keep_counts == previous:
                break
            previous = keep_counts
            # damped update: widths move halfway, which stops the plan from oscillating between solves
            current = {s: 0.5 * (current.get(s, 1.0) + shares[s]) for s in shares}
        if best is not None or exact is None or target < minimum:
            break
        target *= capacity / exact * 0.999
    if best is None:  # the width approximation never produced a fitting plan: grow from the smallest one,
        best = (0.0, {g: int(e.options[0]) for g, e in entries.items()}, minimum)  # which fits (checked above)
    keep_counts, predicted = _fill(entries, cost, best[1], capacity)
    keep_counts = _normalized(entries, depth_items, keep_counts)
    removed = [item.block.id for item in depth_items if keep_counts[item.primary] == 0]
    plan = Plan({gid: kept for g, k in keep_counts.items() for gid, kept in entries[g].kept(k).items()},
                tuple(removed))
    counts = {gid: n for g, k in keep_counts.items() for gid, n in entries[g].counts(k).items()
              if gid in groups.groups}  # not a block's own class
    return PlanResult(plan, counts, predicted, capacity, iterations, time.perf_counter() - start)


def _removable(analysis: Analysis, entries: dict[int, _GroupOptions], classes: dict[int, int],
               kept: frozenset[int]) -> list[_Depth]:
    """The blocks the knapsack may remove (but ``kept``), each with its primary class (its widest group's)."""
    items = []
    for block in analysis.blocks:
        if block.id in kept:
            continue
        if not block.groups:
            items.append(_Depth(block, block.space, ()))  # no width to choose: a class of its own, kept or removed
        elif all(g in classes for g in block.groups):
            own = list(dict.fromkeys(classes[g] for g in block.groups))
            primary = max(own, key=lambda g: (entries[g].group.size, -g))
            items.append(_Depth(block, primary, tuple(g for g in own if g != primary)))
    return items


def _block_worth(entries: dict[int, _GroupOptions], items: list[_Depth]) -> float:
    """What keeping a block with no prunable channels is worth before its share weighs it: the median of
    the other removable blocks' channel values (all they keep), else of every group's. Its own channels are
    frozen, so unscored; like any block, its share of its residual then says how much it adds."""
    grouped = [sum(float(entries[g].values[-1]) for g in (item.primary, *item.others))
               for item in items if item.block.groups]
    every = grouped or [float(e.values[-1]) for e in entries.values()]
    return float(np.median(every)) if every else 1.0


def _whole_block(block: Block, worth: float) -> _GroupOptions:
    """The knapsack class of a block with no prunable channels: removed (option 0) or kept whole (1)."""
    return _GroupOptions(ChannelGroup(block.space, 1, []), np.zeros(1, dtype=np.int64), np.array([0, 1]),
                         np.array([0.0, worth]), {block.space: np.array([0.0, 1.0])})


def _block_weights(items: list[_Depth]) -> list[float]:
    """Per removable block, the weight of its channels' scores: its branch's share of its residual over the
    median block's, at most 1. Channel scores are normalized per layer (LAMP) or sized by weights a
    following norm rescales, so a branch that adds almost nothing to its residual can score as high as any
    other; this is what its removal would lose, on the same scale as the channel scores."""
    if not items:
        return []
    median = float(np.median([item.block.share for item in items]))
    return [min(1.0, item.block.share / median) if median > 0 else 1.0 for item in items]


def nearest_plan(solve: Callable[[float], PlanResult], capacity: float) -> PlanResult:
    """``solve(capacity)``, or where no plan is that small, the smallest plan (``BudgetError.smallest``):
    for a caller that reads a budget through a measured correction, the nearest plan it can time."""
    try:
        return solve(capacity)
    except BudgetError as error:
        if error.smallest is None:
            raise
        return solve(error.smallest * (1 + 1e-9))
