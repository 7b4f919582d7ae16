"""Uniform integer grids for weights: per output channel, per tensor or per group.

A grid maps a float weight to the integer domain, ``x = S * w - Z`` (S is the *inverse* step), and
back, ``w_hat = (q + Z) / S``, with integer codes ``q`` in ``[qmin, qmax]``. This is the convention of
the SQuant reference (inherited from ZeroQ; docs/algorithms.md 1.1), kept exactly so that SQuant codes are
bit-identical to the published implementation. Every rounding method works through this interface:
``to_int`` (float values in the integer domain), a rounding rule (nearest, SQuant flips, learned) and
``dequantize``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

import torch

from postquant.choices import Granularity
from postquant.errors import NonFiniteWeightError, RecipeError

_EPS = 1e-8


def as_float(t: torch.Tensor) -> torch.Tensor:
    """`t` in the precision grids compute in: float64 stays float64 (a float64 model keeps its precision);
    half precision, float32 and integer codes become float32."""
    return t if t.dtype == torch.float64 else t.float()


class RangeMethod(enum.StrEnum):
    """How the float range covered by the grid is chosen."""

    MINMAX = "minmax"
    MSE = "mse"


def check_bits(bits: int) -> int:
    """Return `bits` if it is an integer in 2..8, else raise a `RecipeError` that says so."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise RecipeError(f"bits must be an integer from 2 to 8, got {bits!r}")
    return bits


def signed_range(bits: int) -> tuple[int, int]:
    """The reference's integer range ``[-2^(b-1), 2^(b-1) - 1]``."""
    check_bits(bits)
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def check_weight(rows: torch.Tensor) -> torch.Tensor:
    """Return `rows` if it is a non-empty, finite weight; else raise a typed error that says what to do."""
    if rows.numel() == 0:
        raise RecipeError("cannot fit a grid to an empty weight")
    if not torch.isfinite(rows).all():
        raise NonFiniteWeightError(
            "weight holds NaN or Inf values; fix or re-train the layer before quantizing"
        )
    return rows


def grouped(w: torch.Tensor, granularity: Granularity, group_size: int) -> torch.Tensor:
    """View `w` as (G, n): one row per set of weights that share a step size."""
    if granularity is Granularity.TENSOR:
        return w.reshape(1, -1)
    if granularity is Granularity.CHANNEL:
        return w.reshape(w.shape[0], -1)
    inner = w.reshape(w.shape[0], -1)  # (OC, IC*k)
    if inner.shape[1] % group_size:
        raise RecipeError(
            f"group_size {group_size} does not divide the {inner.shape[1]} inputs per output channel; "
            "choose a divisor or use granularity='channel'"
        )
    return inner.reshape(-1, group_size)  # (OC*IC/g, g)


class IntegerCodes:
    """What every grid shares: the signed integer range of its codes and nearest rounding in its integer
    domain. A grid class adds ``bits``, ``granularity``, ``group_size`` and ``to_int`` / ``dequantize``."""

    bits: int
    granularity: Granularity
    group_size: int

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def _rows(self, w: torch.Tensor) -> torch.Tensor:
        return grouped(w, self.granularity, self.group_size)

    def to_int(self, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def clamp(self, r: torch.Tensor) -> torch.Tensor:
        return r.clamp(self.qmin, self.qmax)

    def nearest(self, w: torch.Tensor) -> torch.Tensor:
        """Nearest-rounding codes in the grid's integer domain (round half to even), int32."""
        return self.clamp(torch.round(self.to_int(w))).to(torch.int32)


@dataclass
class UniformGrid(IntegerCodes):
    """An affine integer grid: ``x = S*w - Z``, ``w_hat = (q + Z)/S``, ``q`` in ``[qmin, qmax]``.

    `inv_scale` and `zero_point` have shape (G, 1), one row per group of `grouped(w, ...)`.
    """

    inv_scale: torch.Tensor  # (G, 1) float32 (float64 for float64 weights), S
    zero_point: torch.Tensor  # (G, 1) float32, integer-valued Z
    bits: int
    granularity: Granularity = Granularity.CHANNEL
    group_size: int = 0

    def to_int(self, w: torch.Tensor) -> torch.Tensor:
        """Integer-domain values ``x = S*w - Z`` (float, same shape as `w`); rounding x gives codes."""
        x = self.inv_scale * as_float(self._rows(w)) - self.zero_point  # (G, n)
        return x.reshape(w.shape)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        """Float weights ``(q + Z)/S`` for integer codes `q` (same shape as the weight)."""
        w_hat = (as_float(self._rows(q)) + self.zero_point) / self.inv_scale  # (G, n)
        return w_hat.reshape(q.shape)

    def with_inv_scale(self, inv_scale: torch.Tensor) -> UniformGrid:
        """The same grid with another inverse step `inv_scale` (G, 1) (learned weight scales)."""
        return replace(self, inv_scale=inv_scale)


def _affine_params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference (ZeroQ/SQuant) parameters for a range [lo, hi] (float32, or float64 for float64 weights),
    each op rounded separately."""
    levels = torch.tensor(2.0**bits - 1, dtype=lo.dtype, device=lo.device)
    inv_scale = levels / torch.clamp(hi - lo, min=_EPS)
    zero_point = torch.round(inv_scale * lo) + 2.0 ** (bits - 1)
    return inv_scale, zero_point


def _symmetric_params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    absmax = torch.maximum(lo.abs(), hi.abs())
    inv_scale = (2.0 ** (bits - 1) - 1) / torch.clamp(absmax, min=_EPS)
    return inv_scale, torch.zeros_like(inv_scale)


def _grid_error(rows: torch.Tensor, grid: UniformGrid, p: float) -> torch.Tensor:
    """Per-row reconstruction error ``sum |w - w_hat|^p`` of nearest rounding on `grid`."""
    x = grid.inv_scale * rows - grid.zero_point
    q = torch.round(x).clamp(grid.qmin, grid.qmax)
    return ((q + grid.zero_point) / grid.inv_scale - rows).abs().pow(p).sum(dim=1, keepdim=True)


def fit_uniform_grid(
    w: torch.Tensor,
    bits: int,
    granularity: Granularity | str = Granularity.CHANNEL,
    *,
    symmetric: bool = False,
    range_method: RangeMethod | str = RangeMethod.MINMAX,
    group_size: int = 128,
    mse_candidates: int = 80,
    mse_min_ratio: float = 0.2,
    mse_p: float = 2.0,
) -> UniformGrid:
    """Fit a uniform grid to weight `w`.

    Args:
        w: the float weight (OC, ...).
        bits: 2..8.
        granularity: channel, tensor or group (group size along the flattened input dimension).
        symmetric: ``Z = 0`` and ``S = (2^(b-1)-1)/max|w|``; otherwise the reference affine grid.
        range_method: ``minmax`` (exact reference convention, docs/algorithms.md 1.1) or ``mse``: shrink the
            range by a ratio in ``[mse_min_ratio, 1]`` per row and keep the ratio with the lowest
            ``sum |w - w_hat|^mse_p`` under nearest rounding.
        group_size: inputs per group for ``granularity="group"``.
    """
    check_bits(bits)
    granularity = Granularity(granularity)
    range_method = RangeMethod(range_method)
    rows = check_weight(as_float(grouped(w.detach(), granularity, group_size)))  # (G, n)
    lo = rows.min(dim=1, keepdim=True).values
    hi = rows.max(dim=1, keepdim=True).values
    params = _symmetric_params if symmetric else _affine_params
    gsize = group_size if granularity is Granularity.GROUP else 0

    def grid_for(ratio: torch.Tensor | float) -> UniformGrid:
        s, z = params(lo * ratio, hi * ratio, bits)
        return UniformGrid(s, z, bits, granularity, gsize)

    best = grid_for(1.0)
    if range_method is RangeMethod.MINMAX:
        return best
    best_err = _grid_error(rows, best, mse_p)
    for ratio in torch.linspace(1.0, mse_min_ratio, mse_candidates)[1:].tolist():
        cand = grid_for(ratio)
        err = _grid_error(rows, cand, mse_p)
        better = err < best_err  # (G, 1)
        best_err = torch.where(better, err, best_err)
        best = UniformGrid(
            torch.where(better, cand.inv_scale, best.inv_scale),
            torch.where(better, cand.zero_point, best.zero_point),
            bits,
            granularity,
            gsize,
        )
    return best
