"""The trainable parameters of learned rounding: rounding variables, weight scales, biases, activation steps.

Rounding (AdaRound, Nagel et al., ICML 2020, eq. 22-23): in the integer domain ``x = S*w - Z`` of the grid,
the code of a weight is ``floor(x) + h`` with ``h`` in [0, 1]. Three variables:

* ``adaround``: ``h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``, zeta = 1.1, gamma = -0.1, with the
  regulariser ``sum(1 - |2h - 1|^beta)`` that pushes h to 0 or 1; the code is ``floor(x) + [h >= 0.5]``.
* ``sigmoid``: ``h = sigmoid(V)`` without regulariser; rounded at the end.
* ``ste``: a direct offset ``x + d`` rounded in the forward pass with a straight-through gradient
  (Bengio et al. 2013); codes in {floor, floor+1} (``codes='rounding'``) or anywhere on the grid.

Weights not selected for learning keep their initial code.

Learned ranges (``learn_weight_range``, AutoRound's min/max tuning, Cheng et al. 2023): each row of a uniform
grid covers ``[lo, hi] = [(qmin + Z)/S, (qmax + Z)/S]``; two multipliers ``a, b`` in `RANGE_BOUNDS` move it to
``[a*lo, b*hi]``, and the step and the integer zero point follow as the grid fit computes them,
``S' = levels / (b*hi - a*lo)``, ``Z' = round(S' * a*lo) - qmin`` (straight-through rounding). In the integer
domain that is ``x' = r*x + (r*Z - Z')`` with ``r = S'/S``: exactly ``x`` at the start (``a = b = 1``), so the
starting codes are kept bit for bit. The rounding offset then acts on ``x'``. The grid of a symmetric recipe
(``symmetric=True``) learns one multiplier ``b`` on its largest magnitude and keeps ``Z = 0``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from postquant.errors import RecipeError
from postquant.grids import Grid
from postquant.grids.uniform import UniformGrid, as_float, grouped
from postquant.nn import ActQuantizer, DynamicActQuantizer, QuantizedLayer, quantize_tokens
from postquant.reconstruct.config import (
    AUTO_RANDOM_MAX_BITS,
    RANGE_BOUNDS,
    CodeRange,
    LearnedConfig,
    Selection,
    Variable,
)

ZETA, GAMMA = 1.1, -0.1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """AdaRound eq. 23: ``clip(sigmoid(v) * (zeta - gamma) + gamma, 0, 1)``."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def _inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    h = h.clamp(0.01, 0.99)
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1)


def selection_mask(
    frac: torch.Tensor, cfg: LearnedConfig, generator: torch.Generator, bits: int
) -> torch.Tensor:
    """Which weights of a `bits`-bit layer are learned, from their fractional parts ``x - floor(x)``
    (docs/algorithms.md 2.4 (i))."""
    selection = cfg.selection
    if selection is Selection.AUTO:
        selection = Selection.RANDOM if bits <= AUTO_RANDOM_MAX_BITS else Selection.ALL
    if selection is Selection.BAND:
        return (frac - 0.5).abs() <= cfg.band
    if selection is Selection.RANDOM:
        return (torch.rand(frac.shape, generator=generator) < cfg.fraction).to(frac.device)  # CPU generator
    return torch.ones_like(frac, dtype=torch.bool)


class LayerRounding(nn.Module):
    """The learned codes (and optionally the weight scales and bias) of one quantized layer.

    Args:
        x: the float weight in the integer domain of `grid`, ``S*w - Z`` (same shape as the weight).
        init_codes: starting codes (nearest or SQuant), int32.
        grid: the layer's grid.
        bias: the layer's float bias or None.
        cfg: the learned config.
        generator: seeded RNG for ``selection='random'``.
        symmetric: the grid is symmetric (the recipe's ``symmetric``): a learned range keeps its zero points 0.
    """

    def __init__(
        self,
        x: torch.Tensor,
        init_codes: torch.Tensor,
        grid: Grid,
        bias: torch.Tensor | None,
        cfg: LearnedConfig,
        generator: torch.Generator,
        symmetric: bool = False,
    ) -> None:
        super().__init__()
        self.grid = grid
        self.symmetric = symmetric
        self.variable = cfg.variable
        self.code_range = cfg.codes
        x = as_float(x.detach())  # float32 (float64 for a float64 model)
        floor = torch.floor(x)
        frac = x - floor
        init = init_codes.to(x.dtype)
        # Start where the initial codes are: a weight whose initial code differs from nearest rounding
        # (a SQuant flip) starts mirrored across the rounding threshold, as far from it as it was.
        nearest = torch.round(x)
        start = torch.where(init != nearest, init - (x - nearest), x)  # integer domain
        self.register_buffer("floor", floor)
        self.register_buffer("init_codes", init)
        self.register_buffer("mask", selection_mask(frac, cfg, generator, grid.bits))
        self.learn_all = bool(self.mask.all())
        if cfg.variable is Variable.STE:
            self.offset = nn.Parameter(start - x)
            self.register_buffer("x", x)
        else:
            h0 = (start - floor).clamp(0, 1)
            v0 = (
                _inverse_rectified_sigmoid(h0)
                if cfg.variable is Variable.ADAROUND
                else torch.logit(h0.clamp(0.01, 0.99))
            )
            self.v = nn.Parameter(v0)
        self.log_scale = nn.Parameter(torch.zeros_like(grid.inv_scale)) if cfg.learn_weight_scales else None
        self.range_lo: nn.Parameter | None = None  # multipliers on each row's lower and upper end
        self.range_hi: nn.Parameter | None = None
        if cfg.learn_weight_range:
            self._init_range(grid)
        self.range_lr = cfg.range_lr if cfg.range_lr is not None else cfg.lr
        self.bias = nn.Parameter(bias.detach().clone()) if (cfg.learn_bias and bias is not None) else None

    def _init_range(self, grid: Grid) -> None:
        if not isinstance(grid, UniformGrid):
            raise RecipeError(
                f"learn_weight_range needs the uniform grid (got {type(grid).__name__}): the power and GGUF "
                "grids fix their range's form; use learn_weight_scales there"
            )
        self.range_hi = nn.Parameter(torch.ones_like(grid.inv_scale))
        if not self.symmetric:
            self.range_lo = nn.Parameter(torch.ones_like(grid.inv_scale))

    def _range_grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(r, Z')`` of the learned range (module docstring): the step ratio ``S'/S`` and the zero point,
        (G, 1) each, differentiable in the multipliers."""
        grid = self.grid
        assert self.range_hi is not None
        b = self.range_hi.clamp(*RANGE_BOUNDS)  # `weight` keeps the variables in bounds; this is exact
        if self.symmetric:
            return 1 / b, grid.zero_point
        assert self.range_lo is not None
        a = self.range_lo.clamp(*RANGE_BOUNDS)
        z = grid.zero_point
        lo, hi = grid.qmin + z, grid.qmax + z  # the row's ends times S
        r = (grid.qmax - grid.qmin) / (b * hi - a * lo)
        return r, round_ste(r * a * lo) - grid.qmin

    def _domain(self) -> torch.Tensor:
        """The integer-domain weights on the current grid: ``x`` itself, or ``r*x + r*Z - Z'`` with a learned
        range."""
        if self.range_hi is None:
            return self.x
        r, z = self._range_grid()
        rows = grouped(self.x, self.grid.granularity, self.grid.group_size)
        return (r * rows + (r * self.grid.zero_point - z)).reshape(self.x.shape)

    # ---- codes --------------------------------------------------------------------------------------
    def _h(self) -> torch.Tensor:
        return rectified_sigmoid(self.v) if self.variable is Variable.ADAROUND else torch.sigmoid(self.v)

    def int_weight(self) -> torch.Tensor:
        """Integer-domain weights used in training (soft for adaround/sigmoid, rounded for ste)."""
        if self.variable is Variable.STE:
            x = self._domain()
            w = x + self.offset
            if self.code_range is CodeRange.ROUNDING:
                floor = self.floor if self.range_hi is None else torch.floor(x.detach())
                w = torch.minimum(torch.maximum(w, floor), floor + 1)
            w = round_ste(w)
        else:
            w = self.floor + self._h()
        w = torch.clamp(w, self.grid.qmin, self.grid.qmax)
        return w if self.learn_all else torch.where(self.mask, w, self.init_codes)

    @torch.no_grad()
    def hard_codes(self) -> torch.Tensor:
        """The final integer codes (int32)."""
        if self.variable is Variable.STE:
            w = self.int_weight()
        else:
            w = torch.where(self.mask, self.floor + (self._h() >= 0.5).float(), self.init_codes)
        return torch.clamp(torch.round(w), self.grid.qmin, self.grid.qmax).to(torch.int32)

    # ---- weights ------------------------------------------------------------------------------------
    def current_grid(self) -> Grid:
        """The grid with the learned step sizes (``S / exp(log_scale)``; the zero point stays) or the learned
        range (step and zero point)."""
        if self.range_hi is not None:
            r, z = self._range_grid()
            return UniformGrid(
                r * self.grid.inv_scale, z, self.grid.bits, self.grid.granularity, self.grid.group_size
            )
        if self.log_scale is None:
            return self.grid
        return self.grid.with_inv_scale(self.grid.inv_scale * torch.exp(-self.log_scale))

    def weight(self) -> torch.Tensor:
        """The float weight of the forward pass, the grid's dequantization of the (soft) codes."""
        if self.range_hi is not None:  # once per step, before its graph: a multiplier the last step moved
            with torch.no_grad():  # out of bounds comes back (a clamp alone would stop its gradient there)
                for p in self.range_params():
                    p.clamp_(*RANGE_BOUNDS)
        return self.current_grid().dequantize(self.int_weight())

    def regulariser(self, beta: float) -> torch.Tensor:
        """AdaRound eq. 24: ``sum(1 - |2h - 1|^beta)`` over the learned weights (0 for other variables)."""
        if self.variable is not Variable.ADAROUND:
            return self.floor.new_zeros(())
        # Over the whole tensor, masked by `where`: a boolean index (``h[mask]``) costs a nonzero, a gather
        # and a scatter in the backward pass, more than this whole term; the gradients are the same (to the
        # last bit when every weight is learned, else within a rounding of the vectorised pow).
        term = 1 - (2 * self._h() - 1).abs().pow(beta)
        return (term if self.learn_all else torch.where(self.mask, term, 0.0)).sum()

    def groups(self, cfg: LearnedConfig) -> list[dict[str, object]]:
        """Optimizer parameter groups: rounding variables at `lr`, scales and bias at `scale_lr`."""
        main = [self.offset] if self.variable is Variable.STE else [self.v]
        out: list[dict[str, object]] = [{"params": main, "lr": cfg.lr}]
        extra = [p for p in (self.log_scale, self.bias) if p is not None]
        if extra:
            out.append({"params": extra, "lr": cfg.scale_lr})
        ranges = self.range_params()
        if ranges:
            out.append({"params": ranges, "lr": self.range_lr})
        return out

    def range_params(self) -> list[nn.Parameter]:
        """The learned range multipliers (none unless ``learn_weight_range``)."""
        return [p for p in (self.range_lo, self.range_hi) if p is not None]


class TrainableActQuant(nn.Module):
    """An activation fake-quantizer for training: LSQ-style learnable step (Esser et al., ICLR 2020) and
    QDrop (Wei et al., ICLR 2022): each element is kept float with probability `drop_prob`.

    ``x_q = (clamp(round_ste(x / s) + zp, qmin, qmax) - zp) * s``; the zero point stays fixed.
    """

    def __init__(
        self, source: ActQuantizer, learn: bool, drop_prob: float, generator: torch.Generator
    ) -> None:
        super().__init__()
        scale = source.scale.detach().clone()
        if learn:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.register_buffer("zero_point", source.zero_point.detach().clone())
        self.qmin, self.qmax = source.qmin, source.qmax
        self.drop_prob = drop_prob
        self.generator = generator
        self.window: Rows | None = None  # data-parallel steps: this rank's rows of the batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale.abs().clamp_min(1e-8)
        q = torch.clamp(round_ste(x / scale) + self.zero_point, self.qmin, self.qmax)
        xq = (q - self.zero_point) * scale
        if self.drop_prob > 0:
            keep_float = (uniform_rows(x.shape, self.generator, self.window) < self.drop_prob).to(x.device)
            xq = torch.where(keep_float, x, xq)
        return xq


class SteDynamicActQuant(nn.Module):
    """A dynamic per-token input quantizer for training: `quantize_tokens` with straight-through rounding
    (each token's step is recomputed from the input, without gradient: it has no step to learn), and QDrop's
    random float elements as `TrainableActQuant`."""

    scale = None  # nothing to learn or write back

    def __init__(self, source: DynamicActQuantizer, drop_prob: float, generator: torch.Generator) -> None:
        super().__init__()
        self.bits = source.bits
        self.drop_prob = drop_prob
        self.generator = generator
        self.window: Rows | None = None  # data-parallel steps: this rank's rows of the batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = quantize_tokens(x, self.bits, round_ste)
        if self.drop_prob > 0:
            keep_float = (uniform_rows(x.shape, self.generator, self.window) < self.drop_prob).to(x.device)
            xq = torch.where(keep_float, x, xq)
        return xq


Rows = tuple[int, int, int] | tuple[torch.Tensor, int]
"""This rank's rows of a batch of ``total`` rows: ``(start, stop, total)`` for rows [start, stop), or
``(positions, total)`` for the rows at `positions` (a rank holding a shard of the data, `postquant.blockwise`)."""


def uniform_rows(
    shape: torch.Size | tuple[int, ...], generator: torch.Generator, rows: Rows | None
) -> torch.Tensor:
    """``torch.rand(shape, generator=generator)`` on the CPU; with `rows`, the draw for the whole batch
    (``total`` rows) restricted to this rank's rows, so that ranks that each hold some rows of one batch draw
    together what one process draws for all of them, and consume the generator alike (a rank with no rows of
    the batch draws too, with ``shape[0] == 0``).

    Raises:
        RuntimeError: `shape` does not have this rank's rows (an input that is not batch-first).
    """
    if rows is None:
        return torch.rand(shape, generator=generator)
    if len(rows) == 3:
        start, stop, total = rows
        held: torch.Tensor | slice = slice(start, stop)
        count = stop - start
    else:
        held, total = rows
        count = len(held)
    if shape[0] != count:
        raise RuntimeError(
            f"data-parallel QDrop draws per batch row, but a layer input of shape {tuple(shape)} does not have "
            f"the {count} rows of this rank: run this model's QDrop in one process (or drop_prob 0)"
        )
    return torch.rand((total, *shape[1:]), generator=generator)[held]


def beta_at(step: int, cfg: LearnedConfig) -> float:
    """AdaRound's annealing: beta from `beta_start` to `beta_end` linearly after the warm-up."""
    start = cfg.warmup * cfg.iters
    if step < start:
        return cfg.beta_start
    t = (step - start) / max(cfg.iters - start, 1)
    return cfg.beta_end + (cfg.beta_start - cfg.beta_end) * max(0.0, 1.0 - t)


def reg_active(step: int, cfg: LearnedConfig) -> bool:
    """The regulariser is off during the warm-up (AdaRound Sec. 5, BRECQ's ``warmup=0.2``)."""
    return step >= math.ceil(cfg.warmup * cfg.iters)


@contextlib.contextmanager
def ste_act_quantizers(
    layers: dict[str, QuantizedLayer],
    learn: set[str],
    drop: set[str],
    drop_prob: float,
    generator: torch.Generator,
) -> Iterator[dict[str, TrainableActQuant | SteDynamicActQuant]]:
    """Swap the input quantizers of `layers` for straight-through ones, so that gradients pass them.

    Steps of the layers in `learn` are trainable; those in `drop` keep elements float w.p. `drop_prob`
    (QDrop). Dynamic per-token quantizers become `SteDynamicActQuant`s (their ``scale`` is None: no step to
    learn, whatever `learn` says). The original quantizers always come back; the caller writes learned steps
    back on success.
    """
    saved = {n: layer.act_quant for n, layer in layers.items() if layer.act_quant is not None}
    swapped: dict[str, TrainableActQuant | SteDynamicActQuant] = {
        n: SteDynamicActQuant(aq, drop_prob if n in drop else 0.0, generator)
        if isinstance(aq, DynamicActQuantizer)
        else TrainableActQuant(aq, n in learn, drop_prob if n in drop else 0.0, generator)
        for n, aq in saved.items()
    }
    try:
        for n, tq in swapped.items():
            layers[n].act_quant = tq
        yield swapped
    finally:
        for n, aq in saved.items():
            layers[n].act_quant = aq
