"""The solver pass: both knapsack DPs against brute force, discretization bounds, errors, scale."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fxprune.errors import BudgetError, SolverError
from fxprune.solvers.knapsack import Choice, KnapsackResult, solve_group_knapsack, solve_halp

SOLVERS = [solve_group_knapsack, solve_halp]


def _brute_force(classes: list[Choice], capacity: float) -> float:
    """Best total value over every combination of one option per class, -inf if none fits."""
    best = -np.inf
    for picks in itertools.product(*(range(len(c.options)) for c in classes)):
        cost = sum(c.costs[i] for c, i in zip(classes, picks))
        if cost <= capacity + 1e-9:
            best = max(best, sum(c.values[i] for c, i in zip(classes, picks)))
    return best


def _random_classes(rng: np.random.Generator, integer: bool) -> list[Choice]:
    """2-5 classes of 2-6 options, non-decreasing values, non-monotone costs that may be negative."""
    classes = []
    for _ in range(rng.integers(2, 6)):
        n = int(rng.integers(2, 7))
        options = np.sort(rng.choice(np.arange(1, 65), size=n, replace=False))
        values = np.cumsum(rng.uniform(0, 1, size=n))
        costs = rng.integers(-10, 21, size=n).astype(float) if integer else rng.uniform(-3, 7, size=n)
        classes.append(Choice(options, values, costs))
    return classes


def _assert_consistent(result: KnapsackResult, classes: list[Choice], capacity: float) -> None:
    """Keep counts, value and cost must all describe the chosen options, and the plan must fit."""
    assert result.keep == [int(c.options[i]) for c, i in zip(classes, result.choices)]
    assert result.value == pytest.approx(sum(c.values[i] for c, i in zip(classes, result.choices)))
    assert result.cost == pytest.approx(sum(c.costs[i] for c, i in zip(classes, result.choices)))
    assert result.cost <= capacity + 1e-9
    assert result.capacity == capacity


@st.composite
def integer_instances(draw) -> tuple[list[Choice], float]:
    """Small instances with integer, possibly negative and non-monotone costs, and a capacity."""
    classes = []
    for _ in range(draw(st.integers(2, 5))):
        n = draw(st.integers(2, 6))
        options = sorted(draw(st.sets(st.integers(1, 64), min_size=n, max_size=n)))
        gains = draw(st.lists(st.integers(0, 20), min_size=n, max_size=n))
        costs = draw(st.lists(st.integers(-15, 25), min_size=n, max_size=n))
        classes.append(Choice(np.array(options), np.cumsum(gains).astype(float), np.array(costs, float)))
    low = int(sum(c.costs.min() for c in classes))
    high = int(sum(c.costs.max() for c in classes))
    return classes, float(draw(st.integers(low, high)))


@pytest.mark.parametrize("solver", SOLVERS)
@settings(max_examples=150, deadline=None)
@given(instance=integer_instances())
def test_integer_costs_reach_brute_force_optimum(solver, instance):
    classes, capacity = instance
    result = solver(classes, capacity)
    _assert_consistent(result, classes, capacity)
    assert result.value == pytest.approx(_brute_force(classes, capacity))


def test_random_integer_instances_both_solvers_optimal():
    rng = np.random.default_rng(0)
    for _ in range(200):
        classes = _random_classes(rng, integer=True)
        low = sum(c.costs.min() for c in classes)
        high = sum(c.costs.max() for c in classes)
        capacity = float(rng.integers(int(low), int(high) + 1))
        best = _brute_force(classes, capacity)
        for solver in SOLVERS:
            result = solver(classes, capacity)
            _assert_consistent(result, classes, capacity)
            assert result.value == pytest.approx(best)


@pytest.mark.parametrize("resolution", [5, 17, 50])
def test_float_costs_coarse_resolution_feasible_and_within_bound(resolution):
    """Bound: rounding each class's cost up by < 1 cell costs at most n_classes cells of budget, so the
    value is >= the true optimum at ``capacity - n_classes * (capacity - min_cost) / resolution``."""
    rng = np.random.default_rng(resolution)
    for _ in range(150):
        classes = _random_classes(rng, integer=False)
        low = sum(c.costs.min() for c in classes)
        capacity = float(rng.uniform(low, sum(c.costs.max() for c in classes)))
        cell = (capacity - low) / resolution
        best, shrunk = _brute_force(classes, capacity), _brute_force(classes, capacity - len(classes) * cell)
        values = []
        for solver in SOLVERS:
            result = solver(classes, capacity, resolution=resolution)
            _assert_consistent(result, classes, capacity)
            assert shrunk - 1e-9 <= result.value <= best + 1e-9
            values.append(result.value)
        assert values[0] == pytest.approx(values[1])


def test_coarse_resolution_actually_loses_value_somewhere():
    """Guards the bound test against a vacuous pass: at resolution 5 some instance must be suboptimal."""
    rng = np.random.default_rng(1)
    gaps = []
    for _ in range(100):
        classes = _random_classes(rng, integer=False)
        low = sum(c.costs.min() for c in classes)
        capacity = float(rng.uniform(low, sum(c.costs.max() for c in classes)))
        gaps.append(_brute_force(classes, capacity) - solve_group_knapsack(classes, capacity, resolution=5).value)
    assert max(gaps) > 1e-6


@pytest.mark.parametrize("solver", SOLVERS)
def test_halp_prefix_overshooting_the_budget_is_still_found(solver):
    """Keeping 24 costs 10 but keeping 32 costs 3: a running prefix cost above capacity 5 must not
    hide the cheaper, better full option."""
    classes = [Choice(np.array([8, 24, 32]), np.array([1.0, 2.0, 3.0]), np.array([0.0, 10.0, 3.0])),
               Choice(np.array([8, 16]), np.array([1.0, 1.5]), np.array([-2.0, 0.0]))]
    result = solver(classes, 5.0)
    assert result.keep == [32, 16]
    assert result.value == pytest.approx(4.5)
    assert result.cost == pytest.approx(3.0)


@pytest.mark.parametrize("solver", SOLVERS)
def test_integer_capacity_above_resolution_is_scaled_and_feasible(solver):
    rng = np.random.default_rng(7)
    classes = [Choice(np.arange(1, 7) * 8, np.cumsum(rng.uniform(0, 1, 6)), rng.integers(-500, 2000, 6).astype(float))
               for _ in range(4)]
    capacity = float(sum(c.costs.min() for c in classes) + 3000)
    result = solver(classes, capacity, resolution=100)
    _assert_consistent(result, classes, capacity)
    assert result.value <= _brute_force(classes, capacity) + 1e-9


@pytest.mark.parametrize("solver", SOLVERS)
def test_infeasible_capacity_raises_with_smallest_cost(solver):
    classes = [Choice(np.array([8, 16]), np.array([1.0, 2.0]), np.array([5.0, 3.0])),
               Choice(np.array([8, 16, 24]), np.array([1.0, 2.0, 3.0]), np.array([-1.0, 4.0, 2.0]))]
    with pytest.raises(BudgetError, match=r"smallest achievable cost 2\b"):
        solver(classes, 1.5)
    assert solver(classes, 2.0).keep == [16, 8]


@pytest.mark.parametrize("solver", SOLVERS)
def test_non_finite_capacity_raises(solver):
    classes = [Choice(np.array([8]), np.array([1.0]), np.array([1.0]))]
    with pytest.raises(BudgetError, match="finite"):
        solver(classes, float("nan"))


@pytest.mark.parametrize("solver", SOLVERS)
def test_bad_resolution_raises(solver):
    classes = [Choice(np.array([8, 16]), np.array([1.0, 2.0]), np.array([1.5, 2.5]))]
    with pytest.raises(SolverError, match="resolution"):
        solver(classes, 2.0, resolution=0)


@pytest.mark.parametrize("bad", [
    dict(options=[16, 8], values=[1, 2], costs=[1, 2]),
    dict(options=[8, 16], values=[1], costs=[1, 2]),
    dict(options=[], values=[], costs=[]),
    dict(options=[8, 16], values=[1, np.inf], costs=[1, 2]),
])
def test_choice_rejects_malformed_options(bad):
    with pytest.raises(ValueError):
        Choice(**bad)


@pytest.mark.parametrize("solver", SOLVERS)
def test_scale_60_classes_64_options(solver):
    rng = np.random.default_rng(3)
    classes = [Choice(np.arange(1, 65) * 8, np.cumsum(rng.uniform(0, 1, 64)), rng.normal(10, 30, 64).cumsum())
               for _ in range(60)]
    low, high = sum(c.costs.min() for c in classes), sum(c.costs.max() for c in classes)
    capacity = low + 0.4 * (high - low)
    start = time.perf_counter()
    result = solver(classes, capacity, resolution=4000)
    elapsed = time.perf_counter() - start
    print(f"{solver.__name__}: 60x64 at resolution 4000 in {elapsed:.3f} s")
    assert elapsed < 2.0
    _assert_consistent(result, classes, capacity)
    assert result.value > sum(c.values[np.argmin(c.costs)] for c in classes)
