"""Exact bit allocation: a multiple-choice knapsack over layers (docs/algorithms.md 3).

Choose one bit width ``b_l`` per layer to minimise the summed predicted damage ``sum_l cost[l, b_l]``
subject to ``sum_l weight[l, b_l] <= capacity``, where the weight of a choice is an integer: ``n_l * b``
(bits of the layer's codes) for an average-bits budget, or the layer's bytes in a checkpoint
(`postquant.mixed.size`) for a size budget. Because every weight is an integer the problem is solved exactly by dynamic programming over
the capacity, after subtracting each layer's cheapest choice and dividing by the gcd of what remains (layer
sizes share large factors, so for an average-bits budget the table stays small: ~17k cells for ResNet-20, a few
for MiniLM; a size budget in bytes has no common factor and takes one cell per byte of slack). When the
table would still be too large, the same problem goes to an integer program (HiGHS via
`scipy.optimize.milp`). Everything here is pure arithmetic on arrays: no modules, no tensors.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

from postquant.errors import BudgetError, RecipeError
from postquant.mixed.size import codes_bytes

__all__ = ["MAX_DP_CELLS", "allocate_bits", "budget_table", "solve_knapsack"]

log = logging.getLogger(__name__)

MAX_DP_CELLS = 50_000_000  # layers x capacity cells (int8 back-pointers: 50 MB) before switching to milp
Solver = Literal["auto", "dp", "milp"]


def solve_knapsack(
    cost: np.ndarray,
    weight: np.ndarray,
    capacity: int,
    solver: Solver = "auto",
    max_dp_cells: int = MAX_DP_CELLS,
) -> np.ndarray:
    """The exact minimum-cost choice of one column per row with total weight at most `capacity`.

    Args:
        cost: (L, B) float costs; ``inf`` marks a choice that is not allowed.
        weight: (L, B) non-negative integer weights.
        capacity: the integer budget.
        solver: ``dp`` (dynamic programming, exact in integer arithmetic), ``milp`` (HiGHS integer
            program: the budget is checked exactly, the optimum is within HiGHS's absolute gap of about 1e-6
            of the largest cost) or ``auto`` (dp unless its table exceeds `max_dp_cells`).
        max_dp_cells: for ``auto``, the largest dp table (layers x capacity cells, one int8 back-pointer
            each) before the integer program is used instead.

    Returns:
        (L,) column indices. Among equal-cost optima, dp prefers lower columns.

    Raises:
        BudgetError: no choice fits `capacity`.
    """
    cost = np.asarray(cost, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.int64)
    allowed = np.isfinite(cost)
    if cost.ndim != 2 or cost.shape != weight.shape or not allowed.any(axis=1).all():
        raise RecipeError("every layer needs at least one allowed bit width with a finite cost")
    base = np.where(allowed, weight, np.iinfo(np.int64).max).min(axis=1)  # (L,) cheapest weight
    extra = np.where(allowed, weight - base[:, None], 0)  # (L, B) >= 0
    room = int(capacity) - int(base.sum())
    if room < 0:
        raise BudgetError(f"the budget is {-room} units below the smallest allocation")
    room = min(room, int(extra.max(axis=1).sum()))  # more room than all-max buys nothing
    positive = extra[allowed & (extra > 0)]
    step = int(np.gcd.reduce(positive)) if positive.size else 1
    cells = room // step + 1
    if solver == "dp" or (solver == "auto" and cells * len(cost) <= max_dp_cells):
        return _solve_dp(cost, extra // step, cells)
    return _solve_milp(cost, extra // step, room // step)


def _solve_dp(cost: np.ndarray, extra: np.ndarray, cells: int) -> np.ndarray:
    """Dynamic programming: best[c] = least cost of the layers so far within extra weight c."""
    n_layers, n_choices = cost.shape
    best = np.zeros(cells)  # no layer yet: cost 0 at every capacity
    back = np.empty((n_layers, cells), dtype=np.int8)  # (L, cells) chosen column
    for layer in range(n_layers):
        new = np.full(cells, np.inf)
        for j in range(n_choices):
            if not np.isfinite(cost[layer, j]) or extra[layer, j] >= cells:
                continue
            s = int(extra[layer, j])
            cand = np.full(cells, np.inf)
            cand[s:] = best[: cells - s] + cost[layer, j]
            better = cand < new
            new[better] = cand[better]
            back[layer, better] = j
        best = new
    choice = np.empty(n_layers, dtype=np.int64)
    c = cells - 1
    for layer in reversed(range(n_layers)):
        choice[layer] = back[layer, c]
        c -= int(extra[layer, choice[layer]])
    return choice


def _solve_milp(cost: np.ndarray, extra: np.ndarray, room: int) -> np.ndarray:
    """The same problem as a 0/1 integer program (one binary per layer and choice), solved by HiGHS."""
    from scipy.optimize import (  # heavy (~300 modules): only this solver uses it
        Bounds,
        LinearConstraint,
        milp,
    )

    n_layers, n_choices = cost.shape
    allowed = np.isfinite(cost)
    finite = np.where(allowed, cost, 0.0)
    scale = float(np.abs(finite).max()) or 1.0  # HiGHS has an absolute gap tolerance: work near 1
    c = (finite / scale).reshape(-1)
    one_each = np.kron(np.eye(n_layers), np.ones(n_choices))  # (L, L*B)
    constraints = [
        LinearConstraint(one_each, 1, 1),
        LinearConstraint(extra.reshape(1, -1).astype(np.float64), -np.inf, room),
    ]
    bounds = Bounds(0, allowed.reshape(-1).astype(np.float64))
    res = milp(
        c, integrality=np.ones_like(c), bounds=bounds, constraints=constraints, options={"mip_rel_gap": 0}
    )
    if res.x is None:
        raise BudgetError(f"the integer program found no allocation: {res.message}")
    choice = np.round(res.x).reshape(n_layers, n_choices).argmax(axis=1)
    used = int(extra[np.arange(n_layers), choice].sum())
    if used > room:  # a feasibility tolerance let it through: never return an over-budget plan
        raise BudgetError(f"the integer program's solution uses {used} > {room} units; use solver='dp'")
    return choice


def budget_table(
    numel: Mapping[str, int],
    bit_choices: Sequence[int],
    *,
    w_bits_budget: float | None = None,
    size_budget: int | None = None,
    fixed: Mapping[str, int] | None = None,
    nbytes: Mapping[str, Mapping[int, int]] | None = None,
    other_bytes: int = 0,
) -> tuple[list[int], np.ndarray, np.ndarray, int]:
    """Check a budget before any importance is measured, and build the knapsack's integer weights.

    Arguments as in `allocate_bits`.

    Returns:
        (columns: the bit widths, allowed: (L, B) bool, weight: (L, B) int64, capacity).

    Raises:
        BudgetError, RecipeError: as `allocate_bits`.
    """
    fixed = dict(fixed or {})
    names = list(numel)
    if not names:
        raise RecipeError("no layers to allocate bits to: the model has no quantized layer in the budget")
    choices = sorted(set(bit_choices))
    bad = [b for b in [*choices, *fixed.values()] if not isinstance(b, int) or not 2 <= b <= 8]
    if bad or not choices:
        raise RecipeError(f"bit widths must be integers from 2 to 8, got {bad or 'no choices'}")
    if (w_bits_budget is None) == (size_budget is None):
        raise BudgetError("give exactly one budget: w_bits_budget or size_budget")
    columns = sorted(set(choices) | set(fixed.values()))
    allowed = np.array([[b == fixed[n] if n in fixed else b in choices for b in columns] for n in names])
    sizes = np.array([numel[n] for n in names], dtype=np.int64)
    if w_bits_budget is not None:
        weight = sizes[:, None] * np.array(columns, dtype=np.int64)[None, :]  # (L, B) bits
        capacity = math.floor(round(w_bits_budget * int(sizes.sum()), 6))
        unit, offset, scale = "average weight bits", 0, 1.0 / int(sizes.sum())
    else:
        size = nbytes or {n: {b: codes_bytes(numel[n], b) for b in columns} for n in names}
        weight = np.zeros(allowed.shape, dtype=np.int64)  # (L, B) bytes of the allowed choices
        for i, j in zip(*np.nonzero(allowed), strict=True):
            if columns[j] not in size.get(names[i], {}):
                raise RecipeError(f"no size for layer {names[i]!r} at {columns[j]} bits")
            weight[i, j] = size[names[i]][columns[j]]
        capacity = int(size_budget) - other_bytes  # type: ignore[arg-type]
        unit, offset, scale = "bytes", other_bytes, 1.0
    lo = int(np.where(allowed, weight, np.iinfo(np.int64).max).min(axis=1).sum())
    hi = int(np.where(allowed, weight, 0).max(axis=1).sum())
    if capacity < lo or (capacity > hi and len(fixed) < len(names)):  # all fixed: only the budget must hold
        budget = w_bits_budget if w_bits_budget is not None else size_budget
        side = "below the smallest" if capacity < lo else "above the largest"
        raise BudgetError(
            f"a budget of {budget} {unit} is {side} allocation of bits {columns} to these "
            f"{len(names)} layers ({len(fixed)} fixed): the feasible range is "
            f"{(lo * scale + offset):.6g} to {(hi * scale + offset):.6g} {unit}. Choose a budget in that range "
            "(or use a uniform w_bits for the maximum)."
        )
    return columns, allowed, weight, capacity


def allocate_bits(
    cost: Mapping[str, Mapping[int, float]],
    numel: Mapping[str, int],
    bit_choices: Sequence[int],
    *,
    w_bits_budget: float | None = None,
    size_budget: int | None = None,
    fixed: Mapping[str, int] | None = None,
    nbytes: Mapping[str, Mapping[int, int]] | None = None,
    other_bytes: int = 0,
    solver: Solver = "auto",
) -> dict[str, int]:
    """Bits per layer minimising ``sum_l cost[l][b_l]`` under one budget (exact).

    Args:
        cost: layer -> {bits -> predicted damage}; needs every bit choice for every free layer.
        numel: layer -> number of weights, for every layer in the budget (free and fixed), in order.
        bit_choices: allowed bit widths for free layers (2..8).
        w_bits_budget: ``sum_l n_l b_l <= w_bits_budget * sum_l n_l`` (average over all layers of `numel`).
        size_budget: bytes: ``other_bytes + sum_l nbytes[l][b_l] <= size_budget``.
        fixed: layer -> pinned bits (counted in the budget, never changed).
        nbytes: layer -> {bits -> bytes of the layer's codes and grid} (size budget only; default: the packed
            codes alone, `postquant.mixed.size.codes_bytes`).
        other_bytes: bytes that do not depend on the allocation (size budget only).
        solver: see `solve_knapsack`.

    Returns:
        layer -> bits, in the order of `numel`.

    Raises:
        BudgetError: the budget is below the smallest or above the largest allocation (the message gives
            the feasible range; above is fine when every layer is fixed), or not exactly one budget is given.
        RecipeError: no layers, bit choices outside 2..8, or a missing cost.
    """
    columns, allowed, weight, capacity = budget_table(
        numel,
        bit_choices,
        w_bits_budget=w_bits_budget,
        size_budget=size_budget,
        fixed=fixed,
        nbytes=nbytes,
        other_bytes=other_bytes,
    )
    names = list(numel)
    cost_table = np.where(allowed, 0.0, np.inf)  # (L, B); fixed layers cost 0 at their bits
    for i, name in enumerate(names):
        if fixed and name in fixed:
            continue
        missing = [columns[j] for j in np.nonzero(allowed[i])[0] if columns[j] not in cost.get(name, {})]
        if missing:
            raise RecipeError(f"no importance cost for layer {name!r} at bits {missing}")
        for j in np.nonzero(allowed[i])[0]:
            cost_table[i, j] = float(cost[name][columns[j]])
    choice = solve_knapsack(cost_table, weight, capacity, solver)
    return {name: columns[int(j)] for name, j in zip(names, choice, strict=True)}
