"""The non-uniform power grid (PowerQuant-style, docs/algorithms.md 1.2).

Weights are quantized in a transformed space ``u = sign(w) * |w / m|^a`` (``m = max |w|`` of the row, one
exponent ``0 < a <= 1`` per layer) on a uniform grid fitted to ``u``, and mapped back with
``w_hat = sign(u_hat) * |u_hat|^(1/a) * m``. With ``a < 1`` the levels crowd near zero, where weights
concentrate. The integer-domain value is the uniform grid's ``x = S*u - Z``, so every rounding method
(nearest, SQuant flips, learned rounding) works on ``x`` unchanged.

At ``a = 1`` the transform is the identity and ``m`` is stored as 1 (the uniform fit is scale-equivariant,
so ``m`` only conditions the power): the grid is then bitwise the uniform grid of `fit_uniform_grid`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from postquant.errors import RecipeError
from postquant.grids.uniform import (
    Granularity,
    IntegerCodes,
    RangeMethod,
    UniformGrid,
    as_float,
    check_bits,
    check_weight,
    fit_uniform_grid,
    grouped,
)

# Dense scan of the exponent; 1.0 (the uniform grid) is always tried first, so ties keep it.
DEFAULT_EXPONENTS: tuple[float, ...] = tuple(round(0.2 + 0.05 * i, 2) for i in range(17))


def check_exponent(a: float) -> float:
    """Return `a` if ``0 < a <= 1`` (finite), else raise a `RecipeError` that says so."""
    if isinstance(a, bool) or not isinstance(a, int | float) or not (math.isfinite(a) and 0 < a <= 1):
        raise RecipeError(f"the power-grid exponent must be a number in (0, 1], got {a!r}")
    return float(a)


def power_transform(rows: torch.Tensor, max_abs: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """``u = sign(w) * |w / m|^a`` (docs/algorithms.md 1.2) for rows (G, n), `max_abs` (G, 1), `exponent` (1, 1)."""
    return torch.sign(rows) * (rows.abs() / max_abs).pow(exponent)


def power_inverse(u: torch.Tensor, max_abs: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """``w = sign(u) * |u|^(1/a) * m``; differentiable in `u` (``1/a >= 1``, so finite at ``u = 0``)."""
    return torch.sign(u) * u.abs().pow(torch.reciprocal(exponent)) * max_abs


@dataclass
class PowerGrid(IntegerCodes):
    """A uniform grid ``(S, Z)`` on ``u = sign(w)|w/m|^a``: ``x = S*u - Z``, ``w_hat = sign(u_hat)|u_hat|^(1/a) m``.

    Same interface as `UniformGrid`; `inv_scale`, `zero_point` and `max_abs` have shape (G, 1), one row per
    group of `grouped(w, ...)`; `exponent` (1, 1) is shared by the layer.
    """

    inv_scale: torch.Tensor  # (G, 1) float32 (float64 for float64 weights), S of the grid on u
    zero_point: torch.Tensor  # (G, 1) float32, integer-valued Z
    max_abs: torch.Tensor  # (G, 1) float32, m (1 for zero rows and at a = 1)
    exponent: torch.Tensor  # (1, 1) float32, a in (0, 1]
    bits: int
    granularity: Granularity = Granularity.CHANNEL
    group_size: int = 0

    @property
    def uniform(self) -> UniformGrid:
        """The uniform grid of the transformed space u."""
        return UniformGrid(self.inv_scale, self.zero_point, self.bits, self.granularity, self.group_size)

    def to_int(self, w: torch.Tensor) -> torch.Tensor:
        """Integer-domain values ``x = S*u - Z`` of float weights `w` (same shape); rounding x gives codes."""
        u = power_transform(as_float(self._rows(w)), self.max_abs, self.exponent)  # (G, n)
        return self.uniform.to_int(u).reshape(w.shape)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        """Float weights for (possibly soft) codes `q`: ``sign(u_hat)|u_hat|^(1/a) m``, ``u_hat = (q + Z)/S``."""
        u_hat = self._rows(self.uniform.dequantize(q))  # (G, n)
        return power_inverse(u_hat, self.max_abs, self.exponent).reshape(q.shape)

    def with_inv_scale(self, inv_scale: torch.Tensor) -> PowerGrid:
        """The same grid with another inverse step `inv_scale` (G, 1) on u (learned weight scales)."""
        return replace(self, inv_scale=inv_scale)


def _fit_at(
    rows: torch.Tensor, a: float, bits: int, granularity: Granularity, gsize: int, uniform_kw: dict[str, Any]
) -> PowerGrid:
    """The power grid of exponent `a` for rows (G, n): m per row, then a uniform grid fitted to u."""
    exponent = torch.full((1, 1), a, dtype=rows.dtype, device=rows.device)
    max_abs = rows.abs().amax(dim=1, keepdim=True)  # (G, 1)
    max_abs = torch.where((max_abs > 0) & (exponent < 1), max_abs, torch.ones_like(max_abs))
    u = power_transform(rows, max_abs, exponent)  # (G, n)
    ug = fit_uniform_grid(u, bits, Granularity.CHANNEL, **uniform_kw)  # rows are already the groups
    return PowerGrid(ug.inv_scale, ug.zero_point, max_abs, exponent, bits, granularity, gsize)


def power_grid_error(rows: torch.Tensor, grid: PowerGrid, importance: torch.Tensor | None = None) -> float:
    """``sum(imp * (w - w_hat)^2)`` of nearest rounding on `grid` for rows (G, n) (imp = 1 if None)."""
    err = (grid.dequantize(grid.nearest(rows)) - rows).pow(2)  # (G, n)
    if importance is not None:
        err = err * importance
    return float(err.sum())


def fit_power_grid(
    w: torch.Tensor,
    bits: int,
    granularity: Granularity | str = Granularity.CHANNEL,
    *,
    exponent: float | None = None,
    candidates: Sequence[float] = DEFAULT_EXPONENTS,
    importance: torch.Tensor | None = None,
    symmetric: bool = False,
    range_method: RangeMethod | str = RangeMethod.MINMAX,
    group_size: int = 128,
) -> PowerGrid:
    """Fit a power grid (docs/algorithms.md 1.2) to weight `w`, searching the layer's exponent if not given.

    Args:
        w: the float weight (OC, ...).
        bits: 2..8.
        granularity: channel, tensor or group: the rows that share ``m`` and ``(S, Z)``.
        exponent: the exponent ``a`` in (0, 1]; None searches it over ``candidates`` and 1.0 (so the result
            is never worse than the uniform grid), keeping the ``a`` of least weight reconstruction error
            ``sum(importance * (w - w_hat)^2)`` under nearest rounding.
        candidates: exponents to try when searching (each in (0, 1]); a dense scan, as the error is
            unimodal in ``a``.
        importance: optional per-weight factors broadcastable to `w` (e.g. the input second moments
            ``E[x_j^2]`` per input column: an output-aware, diagonal-Hessian error); None = plain SSE.
        symmetric, range_method, group_size: as in `fit_uniform_grid`, applied to the uniform grid on u
            (``range_method='mse'`` measures the error in u).
    """
    check_bits(bits)
    granularity = Granularity(granularity)
    gsize = group_size if granularity is Granularity.GROUP else 0
    rows = check_weight(as_float(grouped(w.detach(), granularity, group_size)))  # (G, n)
    kw = {"symmetric": symmetric, "range_method": range_method}
    if exponent is not None:
        return _fit_at(rows, check_exponent(exponent), bits, granularity, gsize, kw)
    imp = None
    if importance is not None:
        imp = grouped(as_float(torch.broadcast_to(importance, w.shape)), granularity, group_size)  # (G, n)
    best = _fit_at(rows, 1.0, bits, granularity, gsize, kw)
    best_err = power_grid_error(rows, best, imp)
    for a in candidates:
        if check_exponent(a) == 1.0:
            continue
        cand = _fit_at(rows, a, bits, granularity, gsize, kw)
        err = power_grid_error(rows, cand, imp)
        if err < best_err:
            best, best_err = cand, err
    return best
