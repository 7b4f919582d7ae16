"""The exact allocator against brute force, budgets, fixed layers and its errors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postquant.errors import BudgetError, RecipeError
from postquant.mixed import allocate_bits, codes_bytes, solve_knapsack


def brute_force(cost: np.ndarray, weight: np.ndarray, capacity: int) -> float:
    """The least total cost over every allowed choice vector within `capacity` (inf if none)."""
    best = math.inf
    options = [[j for j in range(cost.shape[1]) if np.isfinite(cost[i, j])] for i in range(cost.shape[0])]
    for choice in itertools.product(*options):
        rows = np.arange(len(choice))
        if weight[rows, choice].sum() <= capacity:
            best = min(best, float(cost[rows, choice].sum()))
    return best


@st.composite
def problems(draw):
    n_layers = draw(st.integers(1, 5))
    choices = sorted(draw(st.sets(st.integers(2, 8), min_size=1, max_size=4)))
    numel = {f"l{i}": draw(st.integers(1, 60)) * draw(st.sampled_from([1, 4, 9])) for i in range(n_layers)}
    cost = {
        name: {b: draw(st.floats(0, 10, allow_nan=False, allow_infinity=False)) for b in choices}
        for name in numel
    }
    fraction = draw(st.floats(0, 1))
    return choices, numel, cost, fraction


def _tables(choices, numel, cost, bits_of):
    names = list(numel)
    c = np.array([[cost[n][b] for b in choices] for n in names])
    w = np.array([[bits_of(n, b) for b in choices] for n in names], dtype=np.int64)
    return c, w


@settings(max_examples=150, deadline=None)
@given(problems(), st.sampled_from(["dp", "milp"]))
def test_average_bits_budget_matches_brute_force(problem, solver):
    choices, numel, cost, fraction = problem
    total = sum(numel.values())
    budget = min(choices) + fraction * (max(choices) - min(choices))
    bits = allocate_bits(cost, numel, choices, w_bits_budget=budget, solver=solver)
    assert sum(numel[n] * bits[n] for n in numel) <= budget * total + 1e-9
    c, w = _tables(choices, numel, cost, lambda n, b: numel[n] * b)
    optimum = brute_force(c, w, math.floor(round(budget * total, 6)))
    # dp is exact; HiGHS stops within an absolute gap of ~1e-6 of the (normalised) largest cost
    tol = 1e-9 if solver == "dp" else 2e-6 * max(c.max(), 1e-300)
    assert math.isclose(sum(cost[n][bits[n]] for n in numel), optimum, rel_tol=1e-9, abs_tol=tol)


@settings(max_examples=100, deadline=None)
@given(problems(), st.integers(0, 40))
def test_size_budget_matches_brute_force(problem, grid):
    choices, numel, cost, fraction = problem
    nbytes = {n: {b: codes_bytes(numel[n], b) + grid + b % 3 for b in choices} for n in numel}
    lo = sum(min(row.values()) for row in nbytes.values())
    hi = sum(max(row.values()) for row in nbytes.values())
    budget = lo + round(fraction * (hi - lo)) + 100
    bits = allocate_bits(cost, numel, choices, size_budget=budget, nbytes=nbytes, other_bytes=100)
    assert 100 + sum(nbytes[n][bits[n]] for n in numel) <= budget
    c, w = _tables(choices, numel, cost, lambda n, b: nbytes[n][b])
    optimum = brute_force(c, w, budget - 100)
    assert math.isclose(sum(cost[n][bits[n]] for n in numel), optimum, rel_tol=1e-9, abs_tol=1e-9)


def test_milp_path_when_the_table_is_large():
    rng = np.random.default_rng(0)
    cost = rng.random((6, 5))
    weight = rng.integers(1, 1000, size=(6, 5))
    capacity = int(weight.min(axis=1).sum() + 1500)
    auto = solve_knapsack(cost, weight, capacity, max_dp_cells=10)  # the integer program
    dp = solve_knapsack(cost, weight, capacity, solver="dp")
    rows = np.arange(6)
    assert math.isclose(cost[rows, auto].sum(), brute_force(cost, weight, capacity), rel_tol=1e-12)
    assert math.isclose(cost[rows, auto].sum(), cost[rows, dp].sum(), rel_tol=1e-12)


def test_sensitive_layer_gets_more_bits():
    numel = {"a": 100, "b": 100}
    cost = {"a": {2: 10.0, 4: 1.0, 8: 0.0}, "b": {2: 0.5, 4: 0.1, 8: 0.0}}
    assert allocate_bits(cost, numel, [2, 4, 8], w_bits_budget=5.0) == {"a": 8, "b": 2}
    assert allocate_bits(cost, numel, [2, 4, 8], w_bits_budget=3.0) == {"a": 4, "b": 2}


def test_fixed_layers_keep_their_bits_and_count_in_the_budget():
    numel = {"first": 100, "mid": 100, "last": 100}
    cost = {"mid": {2: 1.0, 3: 0.5, 4: 0.1}}
    bits = allocate_bits(cost, numel, [2, 3, 4], w_bits_budget=6.0, fixed={"first": 8, "last": 8})
    assert bits == {"first": 8, "mid": 2, "last": 8}  # 8 + 8 + 2 = 18 = 6.0 * 3
    with pytest.raises(BudgetError, match=r"feasible range is 6 to 6\.66667 average weight bits"):
        allocate_bits(cost, numel, [2, 3, 4], w_bits_budget=5.0, fixed={"first": 8, "last": 8})


@pytest.mark.parametrize(
    "budget,side", [(1.5, "below the smallest"), (8.5, "above the largest")], ids=["below", "above"]
)
def test_infeasible_budget_says_the_feasible_range(budget, side):
    numel = {"a": 10, "b": 30}
    cost = {n: {b: 1.0 / b for b in (2, 4, 8)} for n in numel}
    with pytest.raises(BudgetError, match=rf"{side}.*feasible range is 2 to 8 average weight bits"):
        allocate_bits(cost, numel, [2, 4, 8], w_bits_budget=budget)


def test_infeasible_size_budget_in_bytes():
    numel = {"a": 80}
    cost = {"a": {2: 1.0, 4: 0.5}}
    # 80 weights: 20 bytes at 2 bits, 40 at 4, plus 10 other bytes
    with pytest.raises(BudgetError, match="feasible range is 30 to 50 bytes"):
        allocate_bits(cost, numel, [2, 4], size_budget=29, other_bytes=10)
    assert allocate_bits(cost, numel, [2, 4], size_budget=30, other_bytes=10) == {"a": 2}


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"numel": {}}, RecipeError, "no layers"),
        ({"bit_choices": [2, 9]}, RecipeError, "from 2 to 8"),
        ({"bit_choices": [1, 4]}, RecipeError, "from 2 to 8"),
        ({"fixed": {"a": 12}}, RecipeError, "from 2 to 8"),
        ({"w_bits_budget": None}, BudgetError, "exactly one budget"),
        ({"size_budget": 100}, BudgetError, "exactly one budget"),
        ({"cost": {"a": {2: 1.0}}}, RecipeError, r"no importance cost for layer 'a' at bits \[4\]"),
    ],
    ids=["empty", "nine", "one", "fixed-12", "no-budget", "two-budgets", "missing-cost"],
)
def test_bad_arguments(kwargs, error, match):
    args = {"cost": {"a": {2: 1.0, 4: 0.5}}, "numel": {"a": 8}, "bit_choices": [2, 4], "w_bits_budget": 3.0}
    args |= kwargs
    with pytest.raises(error, match=match):
        allocate_bits(
            args["cost"],
            args["numel"],
            args["bit_choices"],
            **{k: v for k, v in args.items() if k not in ("cost", "numel", "bit_choices")},
        )
