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
    LP = "lp"


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


LP_P = 8
"""The ``lp`` range's default exponent: a soft maximum of each row's errors (docs/algorithms.md 1.1)."""
LP_RATIOS = (0.84, 1.12, 15)
"""The ``lp`` range's first pass: step ratios ``linspace(lo, hi, n)`` of min/max's step."""
_LP_CHUNK = 1 << 15  # rows per pass of the lp search (a few MiB of temporaries, cache-sized)


def _lp_cost(
    rows: torch.Tensor, ratio: torch.Tensor, s0: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int, p: int
) -> torch.Tensor:
    """``sum |w - w_hat|^p`` per row (R, 1) of nearest rounding with step ``ratio / s0`` and offset `z`, the
    error measured in min/max steps ``1/s0`` (so that ``|e|^p`` neither overflows nor underflows)."""
    x = rows * (s0 / ratio) - z  # (R, n)
    e = (torch.round(x).clamp_(qmin, qmax) - x).abs_().mul_(ratio)  # (R, n) in steps 1/s0
    return e.pow_(p).sum(dim=1, keepdim=True)


def fit_lp_grid(
    rows: torch.Tensor,
    s0: torch.Tensor,
    z0: torch.Tensor,
    bits: int,
    symmetric: bool = False,
    p: int = LP_P,
    ratios: tuple[float, float, int] = LP_RATIOS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse steps and integer zero points (G, 1) that lower each row's ``sum |w - w_hat|^p``.

    The step is searched around min/max's (``1/s0``, `z0` its zero point): first ``ratio/s0`` for the ratios
    ``linspace(*ratios)``, each with the zero point that centres the row's range on the codes
    (``round(S*(lo+hi)/2 - (qmin+qmax)/2)``; 0 on a symmetric grid); then, around each row's best ratio, the
    ratios half a first-pass step either side and the zero points one above and one below. Min/max's own
    grid is a candidate, so the error never exceeds its. A large `p` (8) makes the cost a soft maximum: the
    largest errors of a row count most, and unlike a squared error it does not trade large weights' accuracy
    for the many small ones. Rows are processed in chunks; deterministic (fixed candidates, first best kept).

    Args:
        rows: weights (G, n), float32 or float64.
        s0, z0: min/max's inverse steps and zero points (G, 1).
        bits: 2..8; codes lie in the signed range `signed_range(bits)`.
        symmetric: keep ``Z = 0`` (search the step only).
        p: a positive even integer exponent of the error.
        ratios: (first, last, count) of the first pass's step ratios.
    """
    if isinstance(p, bool) or not isinstance(p, int) or p < 2 or p % 2:
        raise RecipeError(f"lp_p must be an even integer >= 2, got {p!r}")
    r_first, r_last, count = ratios
    if not (0 < r_first <= r_last) or count < 1:
        raise RecipeError(f"lp_ratios must be (first, last, count) with 0 < first <= last, got {ratios!r}")
    qmin, qmax = signed_range(bits)
    first = torch.linspace(r_first, r_last, count, dtype=rows.dtype).tolist()
    half = (r_last - r_first) / max(count - 1, 1) / 2
    inv, zero = torch.empty_like(s0), torch.empty_like(z0)
    for a in range(0, rows.shape[0], _LP_CHUNK):
        part = slice(a, a + _LP_CHUNK)
        search = _LpSearch(rows[part], s0[part], z0[part], qmin, qmax, p, symmetric)
        for r in first:
            search.keep(torch.full_like(search.s0, r))
        r1 = search.ratio
        for r in (r1 - half, r1 + half):
            search.keep(r)
        if not symmetric:
            r2, z2 = search.ratio, search.zero
            for dz in (-1.0, 1.0):
                search.keep(r2, z2 + dz)
        inv[part] = search.s0 / search.ratio
        zero[part] = search.zero
    return inv, zero


class _LpSearch:
    """The best (ratio, zero point) so far of each row of one chunk of `fit_lp_grid`, min/max's at the start."""

    def __init__(
        self,
        rows: torch.Tensor,
        s0: torch.Tensor,
        z0: torch.Tensor,
        qmin: int,
        qmax: int,
        p: int,
        symmetric: bool,
    ) -> None:
        self.rows, self.s0, self.qmin, self.qmax, self.p, self.symmetric = rows, s0, qmin, qmax, p, symmetric
        self.mid = (rows.amin(dim=1, keepdim=True) + rows.amax(dim=1, keepdim=True)) / 2  # (R, 1)
        self.ratio, self.zero = torch.ones_like(s0), z0
        self.cost = _lp_cost(rows, self.ratio, s0, z0, qmin, qmax, p)

    def keep(self, ratio: torch.Tensor, zero: torch.Tensor | None = None) -> None:
        """Try step ``ratio/s0`` with zero point `zero` (None: the one centring the row's range on the codes)."""
        if zero is None:
            zero = (
                torch.zeros_like(self.mid)
                if self.symmetric
                else torch.round(self.mid * (self.s0 / ratio) - (self.qmin + self.qmax) / 2)
            )
        cost = _lp_cost(self.rows, ratio, self.s0, zero, self.qmin, self.qmax, self.p)
        better = cost < self.cost  # (R, 1)
        self.cost = torch.where(better, cost, self.cost)
        self.ratio = torch.where(better, ratio, self.ratio)
        self.zero = torch.where(better, zero, self.zero)


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
    lp_p: int = LP_P,
    lp_ratios: tuple[float, float, int] = LP_RATIOS,
) -> UniformGrid:
    """Fit a uniform grid to weight `w`.

    Args:
        w: the float weight (OC, ...).
        bits: 2..8.
        granularity: channel, tensor or group (group size along the flattened input dimension).
        symmetric: ``Z = 0`` and ``S = (2^(b-1)-1)/max|w|``; otherwise the reference affine grid.
        range_method: ``minmax`` (exact reference convention, docs/algorithms.md 1.1); ``mse``: shrink the
            range by a ratio in ``[mse_min_ratio, 1]`` per row and keep the ratio with the lowest
            ``sum |w - w_hat|^mse_p`` under nearest rounding; ``lp``: search the step and the integer zero
            point around min/max's per row for the lowest ``sum |w - w_hat|^lp_p`` (`fit_lp_grid`).
        group_size: inputs per group for ``granularity="group"``.
        lp_p, lp_ratios: the ``lp`` search's exponent and its first-pass step ratios (`fit_lp_grid`).
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
    if range_method is RangeMethod.LP:
        s, z = fit_lp_grid(rows, best.inv_scale, best.zero_point, bits, symmetric, lp_p, lp_ratios)
        return UniformGrid(s, z, bits, granularity, gsize)
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
