"""Group knapsack solvers: pick one keep count per channel group, maximizing importance under a cost budget.

Two exact dynamic programs over a discretized budget share the same discretization, so on the same
instance they reach the same optimum: ``solve_group_knapsack`` (SP-LAMP's multiple-choice knapsack,
one decision per group) and ``solve_halp`` (HALP's augmented knapsack, one decision per block of
channels with the prefix constraint explicit). Pure numpy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from fxprune.errors import BudgetError, SolverError


@dataclass
class Choice:
    """One group's options: keep ``options[i]`` channels for ``values[i]`` importance at ``costs[i]``."""

    options: np.ndarray
    values: np.ndarray
    costs: np.ndarray

    def __post_init__(self) -> None:
        self.options = np.asarray(self.options, dtype=np.int64)
        self.values = np.asarray(self.values, dtype=np.float64)
        self.costs = np.asarray(self.costs, dtype=np.float64)
        n = self.options.shape
        if len(n) != 1 or n[0] == 0 or self.values.shape != n or self.costs.shape != n:
            raise ValueError(f"options, values and costs must be equal-length 1-D arrays, got shapes "
                             f"{self.options.shape}, {self.values.shape}, {self.costs.shape}")
        if np.any(np.diff(self.options) <= 0):
            raise ValueError(f"options must be strictly ascending, got {self.options.tolist()}")
        if not (np.all(np.isfinite(self.values)) and np.all(np.isfinite(self.costs))):
            raise ValueError("values and costs must be finite")


@dataclass
class KnapsackResult:
    """A solved plan: chosen option index and keep count per class, real value and cost totals."""

    choices: list[int]
    keep: list[int]
    value: float
    cost: float
    capacity: float
    seconds: float


def _shift_capacity(classes: list[Choice], capacity: float) -> float:
    """Capacity left once every class pays its cheapest option; raise BudgetError if it is negative."""
    if not np.isfinite(capacity):
        raise BudgetError(f"capacity must be a finite number, got {capacity!r}")
    smallest = float(sum(c.costs.min() for c in classes))
    if capacity < smallest:
        raise BudgetError(f"capacity {capacity:.10g} is below the smallest achievable cost {smallest:.10g} "
                          f"(every group at its cheapest option); raise the budget to at least that")
    return capacity - smallest


def _discretize(classes: list[Choice], spare: float, resolution: int) -> tuple[list[np.ndarray], int]:
    """Integer weights (cost above each class's minimum, rounded up) and the integer budget."""
    if int(resolution) != resolution or resolution < 1:
        raise SolverError(f"resolution must be a positive integer, got {resolution!r}")
    shifted = [c.costs - c.costs.min() for c in classes]
    if spare <= 0:
        return [(s > 0).astype(np.int64) for s in shifted], 0
    if spare <= resolution and all(np.array_equal(s, np.round(s)) for s in shifted):
        budget = int(np.floor(spare))
        scaled = shifted
    else:
        budget = resolution
        scaled = [s * resolution / spare for s in shifted]
    # Clip to budget + 1: anything above the budget is infeasible, and the arrays stay small.
    return [np.minimum(np.ceil(s), budget + 1).astype(np.int64) for s in scaled], budget


def _shift(row: np.ndarray, weight: int) -> np.ndarray:
    """``row`` moved ``weight`` budget cells up (down if negative), filling vacated cells with -inf."""
    out = np.full_like(row, -np.inf)
    n = row.shape[0]
    if 0 <= weight < n:
        out[weight:] = row[:n - weight]
    elif -n < weight < 0:
        out[:n + weight] = row[-weight:]
    return out


def _start_row(budget: int) -> np.ndarray:
    """DP row before any class: value 0 at exactly zero used budget, unreachable elsewhere."""
    row = np.full(budget + 1, -np.inf)
    row[0] = 0.0
    return row


def _backtrack(pointers: list[np.ndarray], weights: list[np.ndarray], row: np.ndarray) -> list[int]:
    """Option index per class, read from the back-pointers starting at the best final budget cell."""
    cell = int(np.argmax(row))
    picks = []
    for pointer, weight in zip(reversed(pointers), reversed(weights)):
        pick = int(pointer[cell])
        picks.append(pick)
        cell -= int(weight[pick])
    return picks[::-1]


def _result(classes: list[Choice], picks: list[int], capacity: float, start: float) -> KnapsackResult:
    """Package the picks with their real (undiscretized) value and cost totals."""
    return KnapsackResult(
        choices=picks,
        keep=[int(c.options[i]) for c, i in zip(classes, picks)],
        value=float(sum(c.values[i] for c, i in zip(classes, picks))),
        cost=float(sum(c.costs[i] for c, i in zip(classes, picks))),
        capacity=float(capacity),
        seconds=time.perf_counter() - start,
    )


def _group_step(row: np.ndarray, choice: Choice, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One class of the multiple-choice DP: best option per exact used budget, and which option."""
    best = np.full_like(row, -np.inf)
    pointer = np.zeros(row.shape[0], dtype=np.int64)
    for i, (w, v) in enumerate(zip(weight, choice.values)):
        candidate = _shift(row, int(w)) + v
        better = candidate > best
        best = np.where(better, candidate, best)
        pointer[better] = i
    return best, pointer


def solve_group_knapsack(classes: list[Choice], capacity: float, *, resolution: int = 4000) -> KnapsackResult:
    """SP-LAMP's group (multiple-choice) knapsack: exactly one option per class, exact DP.

    Costs are shifted by each class's minimum (so negative and non-monotone costs are fine), then
    rounded up onto ``resolution`` budget cells (integer costs with capacity <= resolution are used
    as is, so the DP is exact). Any DP-feasible plan is feasible for the real costs; the plan is at
    least as good as the true optimum under ``capacity - len(classes) * spare / resolution``.
    O(classes x options x resolution) time, O(classes x resolution) memory for back-pointers.
    """
    return _solve(classes, capacity, resolution, _group_step)


def _solve(classes: list[Choice], capacity: float, resolution: int, step) -> KnapsackResult:
    """Shared driver: discretize, run ``step`` class by class, then backtrack the choices."""
    start = time.perf_counter()
    weights, budget = _discretize(classes, _shift_capacity(classes, capacity), resolution)
    row, pointers = _start_row(budget), []
    for choice, weight in zip(classes, weights):
        row, pointer = step(row, choice, weight)
        pointers.append(pointer)
    return _result(classes, _backtrack(pointers, weights, row), capacity, start)


def _halp_class(row: np.ndarray, choice: Choice, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One class of HALP's item DP: mandatory first block, then blocks taken while the prefix holds.

    ``open_`` is the best value per exact used budget with the prefix still unbroken (every block so
    far taken); ``closed`` is the best with the prefix stopped, and ``stop`` where it stopped. The
    budget axis is enlarged by the class's largest prefix weight, because a block of negative cost
    can bring a prefix whose running cost overshot the budget back under it.
    """
    budget = row.shape[0] - 1
    axis = np.concatenate([row, np.full(int(weight.max()), -np.inf)])
    open_ = _shift(axis, int(weight[0])) + choice.values[0]
    closed = np.full_like(axis, -np.inf)
    stop = np.zeros(axis.shape[0], dtype=np.int64)
    for j in range(1, weight.shape[0]):
        better = open_ > closed
        closed = np.where(better, open_, closed)
        stop = np.where(better, j - 1, stop)
        item_cost, item_value = weight[j] - weight[j - 1], choice.values[j] - choice.values[j - 1]
        open_ = _shift(open_, int(item_cost)) + item_value
    better = open_ > closed
    stop = np.where(better, weight.shape[0] - 1, stop)
    return np.maximum(open_, closed)[:budget + 1], stop[:budget + 1]


def solve_halp(classes: list[Choice], capacity: float, *, resolution: int = 4000) -> KnapsackResult:
    """HALP's augmented knapsack: item-level DP where each class keeps a prefix of its blocks.

    Unlike ``solve_group_knapsack``, which picks one whole option per class, this takes one block
    (item) at a time: item j costs ``costs[j] - costs[j-1]`` (possibly negative) and is worth
    ``values[j] - values[j-1]``; the first option is mandatory and the order (prefix) constraint is
    explicit as an "unbroken so far" DP state. Negative item costs are handled as HALP says, by
    enlarging the capacity: costs are shifted by each class's minimum (the capacity grows by that
    amount) and the budget axis is widened by the class's largest prefix cost while it is solved.
    Same discretization as ``solve_group_knapsack``, hence the same optimum.
    O(items x resolution) time with items = sum of options, O(classes x resolution) memory.
    """
    return _solve(classes, capacity, resolution, _halp_class)
