"""GPTQ rounding: codes chosen one input column at a time, the error of each compensated on the columns not
yet rounded through the inverse Hessian of the layer's squared output error (docs/algorithms.md 2.5).

For a layer ``y = W x`` and calibration inputs X, the squared output error of a quantized ``Q`` is
``tr((W - Q) H (W - Q)^T)`` with ``H = 2 X X^T / n``. GPTQ (Frantar et al., ICLR 2023, after Optimal Brain
Quantization) rounds column j of every row to the nearest grid point and moves the remaining columns by
``-(w_j - q_j) / [H^-1]_jj * [H^-1]_j,j+1:``, the update that minimises that error with column j fixed;
the rows of the upper Cholesky factor of ``H^-1`` give every step's ``[H^-1]`` restricted to the columns left.
Columns are processed in blocks whose updates to later columns are applied once per block (same result,
fewer memory passes). Optional: columns in order of decreasing ``H_jj`` (``act_order``).

The grid is fixed before GPTQ starts (fitted to the float weight like every other rounding method here:
the "static groups" form of GPTQ), so any affine grid ``x = S * w - Z`` per weight works: uniform grids of
every granularity and llama.cpp's block formats. Power grids are not affine and are refused.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from postquant.errors import RecipeError

log = logging.getLogger(__name__)

__all__ = ["HessianAccumulator", "affine_params", "gptq_codes"]


class HessianAccumulator:
    """``H = 2/n * sum x x^T`` over the inputs a Linear / Conv1d / Conv2d sees (one H per conv group).

    `add` takes the layer's input as its forward receives it; a conv's inputs are unfolded into its
    receptive fields, so the columns of H follow ``weight.reshape(OC, -1)``'s order.
    """

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.groups = int(getattr(layer, "groups", 1))
        weight = layer.weight
        cols = weight.reshape(weight.shape[0], -1).shape[1]
        self.h = torch.zeros(self.groups, cols, cols, dtype=torch.float64, device=weight.device)
        self.n = 0

    def _columns(self, x: torch.Tensor) -> torch.Tensor:
        """(groups, samples, cols) of input vectors."""
        layer = self.layer
        x = x.detach().to(torch.float64)
        if isinstance(layer, nn.Conv2d):
            if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
                raise RecipeError("GPTQ: convolutions with string padding or non-zero padding modes")
            cols = F.unfold(
                x if x.dim() == 4 else x.unsqueeze(0),
                layer.kernel_size,
                dilation=layer.dilation,
                padding=layer.padding,
                stride=layer.stride,
            )  # (N, C*kh*kw, L)
            cols = cols.transpose(1, 2).reshape(-1, cols.shape[1])
        elif isinstance(layer, nn.Conv1d):
            if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
                raise RecipeError("GPTQ: convolutions with string padding or non-zero padding modes")
            x4 = (x if x.dim() == 3 else x.unsqueeze(0)).unsqueeze(2)  # (N, C, 1, T)
            cols = F.unfold(
                x4,
                (1, layer.kernel_size[0]),
                dilation=(1, layer.dilation[0]),
                padding=(0, layer.padding[0]),
                stride=(1, layer.stride[0]),
            )
            cols = cols.transpose(1, 2).reshape(-1, cols.shape[1])
        else:
            cols = x.reshape(-1, x.shape[-1])
        return cols.reshape(cols.shape[0], self.groups, -1).transpose(0, 1)

    def add(self, x: torch.Tensor) -> None:
        """Add the input `x` of one call of the layer (a batch)."""
        unbatched = (
            3 if isinstance(self.layer, nn.Conv2d) else 2 if isinstance(self.layer, nn.Conv1d) else None
        )
        if x.dim() == unbatched:  # a conv called on one sample: a batch of one
            x = x.unsqueeze(0)
        per_sample = x.shape[0] if x.dim() > 1 else 1
        step = max(1, _CHUNK_ROWS // max(1, x.numel() // max(1, per_sample)))
        for part in x.split(step) if x.dim() > 1 else (x,):  # bounded memory for the unfolded inputs
            cols = self._columns(part)
            m = cols.shape[1]
            if m == 0:
                continue
            self.h *= self.n / (self.n + m)
            self.n += m
            cols = cols * (2.0 / self.n) ** 0.5
            self.h += cols.transpose(1, 2) @ cols


# Input values unfolded at once when accumulating a Hessian (a 3x3 conv: 9x that in float64, 150 MB).
_CHUNK_ROWS = 1 << 21


def affine_params(grid: object, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-weight ``S`` and ``Z`` with ``grid.to_int(v) == S * v - Z`` for weights `v` shaped like `w`.

    Raises:
        RecipeError: the grid is not affine (a power grid): GPTQ's column updates need one.
    """
    zero = torch.zeros_like(w)
    z = -grid.to_int(zero)  # type: ignore[attr-defined]
    s = grid.to_int(torch.ones_like(w)) + z  # type: ignore[attr-defined]
    probe = grid.to_int(w)  # type: ignore[attr-defined]
    if not torch.allclose(probe, s * w - z, rtol=1e-4, atol=1e-3):
        raise RecipeError(
            f"GPTQ needs an affine grid (uniform or GGUF); grid {type(grid).__name__} is not: use grid: uniform"
        )
    return s, z


def gptq_codes(
    w: torch.Tensor,
    h: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor,
    qmin: int,
    qmax: int,
    *,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
) -> torch.Tensor:
    """Integer codes of weight rows `w` (R, C) on the grid ``x = s * w - z`` by GPTQ with Hessian `h` (C, C).

    Args:
        w: float weight rows; `s`, `z`: per-weight scale and offset of the grid, shaped like `w`.
        h: the inputs' ``2/n X X^T``; columns with ``h_jj == 0`` (inputs always 0) keep nearest rounding.
        qmin, qmax: the code range.
        damp: ``damp * mean(diag h)`` is added to the diagonal before inversion (GPTQ's percdamp).
        act_order: process columns in order of decreasing ``h_jj``.
        block_size: columns per lazy-update block (the result does not depend on it beyond float rounding).

    Returns:
        int32 codes shaped like `w`.

    Raises:
        RecipeError: `h` is not positive definite even after 10x, 100x the damping.
    """
    rows, cols = w.shape
    if h.shape != (cols, cols):
        raise ValueError(f"Hessian {tuple(h.shape)} does not match {cols} weight columns")
    w = w.detach().to(torch.float32).clone()
    s, z = s.to(torch.float32), z.to(torch.float32)
    h = h.detach().to(torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else None
    if perm is not None:
        w, s, z, h = w[:, perm], s[:, perm], z[:, perm], h[perm][:, perm]
    u = _inverse_cholesky(h, damp).to(torch.float32)  # upper factor of H^-1
    codes = torch.empty(rows, cols, dtype=torch.int32, device=w.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.empty_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            j = i1 + i
            q = torch.round(s[:, j] * col - z[:, j]).clamp_(qmin, qmax)
            codes[:, j] = q.to(torch.int32)
            deq = (q + z[:, j]) / s[:, j]
            err = (col - deq) / u1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    mean_diag = float(torch.diagonal(h).mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for factor in (1.0, 10.0, 100.0):
        lower, info = torch.linalg.cholesky_ex(h + damp * factor * mean_diag * eye)
        if int(info) == 0:
            if factor > 1:
                log.warning("GPTQ: the Hessian needed %gx the damping to be positive definite", factor)
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
    raise RecipeError(
        "GPTQ: the layer's input Hessian is not positive definite even with 100x the damping; "
        "give more calibration samples or raise gptq.damp"
    )
