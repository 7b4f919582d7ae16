"""llama.cpp's block formats Q8_0, Q4_0 and Q4_1 (GGUF) as weight grids, reproduced bit for bit.

Each format quantizes blocks of 32 consecutive inputs of one output row with an fp16 scale ``d`` (Q4_1 adds an
fp16 minimum ``m``); the file stores a code ``c`` per weight (ggml-quants.c ``dequantize_row_q*``, the gguf
package's ``gguf.quants``):

======  ====================  ===============  =================  ===================
format  file code c           weight           our code q          ``w = d*(q+Z) + m``
======  ====================  ===============  =================  ===================
Q8_0    int8 in [-127, 127]   ``d * c``        ``c``               Z = 0, m = 0
Q4_0    nibble in [0, 15]     ``d * (c - 8)``  ``c - 8``           Z = 0, m = 0
Q4_1    nibble in [0, 15]     ``d * c + m``    ``c - 8``           Z = 8
======  ====================  ===============  =================  ===================

Our codes are signed (``[-8, 7]`` at 4 bits, as every postquant grid), so every rounding method (nearest,
SQuant, learned) works unchanged on ``x = (w - m)/d - Z``. The grid keeps ``d`` and ``m`` as the fp16 values
the file holds and dequantizes with the same float32 operations as llama.cpp's reference dequantizer
(``d * k`` then ``+ m``), so the simulated weights are exactly what llama.cpp reads from the file. The scale is
stored as its inverse ``S = 1/d`` (the `inv_scale` every grid has, so learned weight scales work) and read
back as ``fp16(1/S)``, which is ``d`` again; a learned ``S`` is rounded to fp16 in the forward pass with a
straight-through gradient.

Fitting: ``minmax`` is llama.cpp's reference rule (Q8_0 ``d = max|w|/127``; Q4_0 ``d = w_max/-8`` with
``w_max`` the weight of largest magnitude, so it lands on the code with 8 levels on its side; Q4_1
``d = (max - min)/15``, ``m = min``), with the codes then chosen on the fp16 values. ``mse`` searches, per
block, shrunk ranges (Q4_0 also with the 8-level side on the other sign) and keeps the one whose nearest
rounding reconstructs the block with the least squared error, measured on the fp16 values.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from postquant.choices import Granularity, GridKind
from postquant.errors import RecipeError
from postquant.grids.uniform import IntegerCodes, RangeMethod, check_weight, grouped

__all__ = [
    "BLOCK",
    "FORMATS",
    "BlockFormat",
    "GGUFGrid",
    "fit_gguf_grid",
    "fp16_scale",
    "gguf_kind_for_bits",
    "to_fp16",
]

BLOCK = 32  # weights per block along the input dimension, in every format here
FP16_TINY = 2.0**-24  # the smallest positive fp16 (subnormal): the scale of a block of zeros
FP16_MAX = 65504.0


@dataclass(frozen=True)
class BlockFormat:
    """One llama.cpp block format: its code range, how our codes map to the file and to weights."""

    kind: GridKind
    ggml_name: str  # the GGML type name: "Q4_0"
    bits: int
    qmin: int
    qmax: int
    file_offset: int  # file code = q + file_offset
    zero_point: int  # w = d * (q + zero_point) + m
    has_min: bool  # Q4_1: an fp16 minimum m per block


FORMATS: dict[GridKind, BlockFormat] = {
    GridKind.GGUF_Q8_0: BlockFormat(GridKind.GGUF_Q8_0, "Q8_0", 8, -127, 127, 0, 0, False),
    GridKind.GGUF_Q4_0: BlockFormat(GridKind.GGUF_Q4_0, "Q4_0", 4, -8, 7, 8, 0, False),
    GridKind.GGUF_Q4_1: BlockFormat(GridKind.GGUF_Q4_1, "Q4_1", 4, -8, 7, 8, 8, True),
}


def block_format(kind: GridKind | str) -> BlockFormat:
    """The `BlockFormat` of a GGUF grid kind, or a `RecipeError` listing the supported ones."""
    try:
        return FORMATS[GridKind(kind)]
    except (ValueError, KeyError):
        known = ", ".join(k.value for k in FORMATS)
        raise RecipeError(f"{kind!r} is not a GGUF grid; the supported ones are {known}") from None


def gguf_grid_kind(type_name: str) -> GridKind:
    """The grid kind of a GGUF type name (``q4_0``, ``Q4_0`` or ``gguf-q4_0``), or a `RecipeError` listing the
    supported ones."""
    name = type_name.strip().lower().removeprefix("gguf-")
    for fmt in FORMATS.values():
        if fmt.ggml_name.lower() == name:
            return fmt.kind
    supported = ", ".join(fmt.ggml_name for fmt in FORMATS.values())
    raise RecipeError(
        f"{type_name!r} is not a GGUF type postquant writes with its own codes; supported: {supported} "
        "(llama.cpp's k-quants and i-quants use grids postquant does not reproduce)"
    )


def gguf_kind_for_bits(kind: GridKind | str, bits: int) -> GridKind:
    """The GGUF format of a layer given `bits` bits in a recipe with grid `kind`.

    The recipe's own bit width gives its format; a per-layer override to 8 bits gives Q8_0, and to 4 bits in a
    Q8_0 recipe gives Q4_0 (llama.cpp mixes formats per tensor). Other widths have no format here.
    """
    fmt = block_format(kind)
    if bits == fmt.bits:
        return fmt.kind
    if bits == 8:
        return GridKind.GGUF_Q8_0
    if bits == 4:
        return GridKind.GGUF_Q4_0
    raise RecipeError(
        f"grid {fmt.kind.value} (llama.cpp {fmt.ggml_name}) has no {bits}-bit form: GGUF grids are 4-bit "
        "(gguf-q4_0, gguf-q4_1) or 8-bit (gguf-q8_0); set the layer's w_bits to 4 or 8, or keep it float "
        "with w_bits: null"
    )


def to_fp16(t: torch.Tensor) -> torch.Tensor:
    """`t` rounded to the nearest fp16 value (round half to even), as float32."""
    return t.float().to(torch.float16).float()


def fp16_scale(t: torch.Tensor) -> torch.Tensor:
    """A block scale as the file stores it: `t` rounded to fp16 (as float32), never 0 (a zero becomes
    ``+-2^-24``, fp16's smallest step, so ``1/d`` stays finite). With gradients on, the rounding is
    straight-through (identity backward)."""
    h = to_fp16(t.detach())
    h = torch.where(h == 0, torch.where(t.detach() < 0, -FP16_TINY, FP16_TINY), h)
    if not t.requires_grad:
        return h
    return t + (h - t).detach()


@dataclass
class GGUFGrid(IntegerCodes):
    """A llama.cpp block grid: ``w = d*(q + Z) + m`` per block of 32 inputs, ``d = fp16(1/S)``, fp16 ``m``.

    `inv_scale` (S), `zero_point` (Z, integer) and `offset` (m) have shape (G, 1), one row per block of
    ``grouped(w, 'group', 32)``. Always float32, whatever the weight's dtype (llama.cpp's arithmetic).
    """

    inv_scale: torch.Tensor  # (G, 1) float32, 1/d
    zero_point: torch.Tensor  # (G, 1) float32, integer-valued Z (8 for Q4_1, else 0)
    offset: torch.Tensor  # (G, 1) float32, fp16-valued m (zeros but for Q4_1)
    kind: GridKind
    bits: int
    granularity: Granularity = Granularity.GROUP
    group_size: int = BLOCK

    @property
    def format(self) -> BlockFormat:
        return FORMATS[self.kind]

    @property
    def qmin(self) -> int:
        return self.format.qmin

    @property
    def qmax(self) -> int:
        return self.format.qmax

    @property
    def scale(self) -> torch.Tensor:
        """The fp16 scale d of each block, (G, 1) float32 (what the file stores)."""
        return fp16_scale(1.0 / self.inv_scale)

    def to_int(self, w: torch.Tensor) -> torch.Tensor:
        """Integer-domain values ``x = (w - m)/d - Z`` (float32, same shape as `w`); rounding x gives codes."""
        rows = self._rows(w).float()  # (G, 32)
        x = (rows - self.offset) / self.scale.detach() - self.zero_point
        return x.reshape(w.shape)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        """Float32 weights ``d*(q + Z) + m`` for (possibly soft) codes `q`, as llama.cpp computes them."""
        k = self._rows(q).float() + self.zero_point  # (G, 32): the file's code for Q4_1, q otherwise
        w = self.scale * k
        if self.format.has_min:
            w = w + self.offset
        return w.reshape(q.shape)

    def with_inv_scale(self, inv_scale: torch.Tensor) -> GGUFGrid:
        """The same grid with another inverse step `inv_scale` (G, 1) (learned weight scales)."""
        return replace(self, inv_scale=inv_scale)


def _block_error(rows: torch.Tensor, d: torch.Tensor, m: torch.Tensor, fmt: BlockFormat) -> torch.Tensor:
    """Per-block squared error (G, 1) of nearest rounding with fp16 scale `d` and minimum `m` (G, 1)."""
    if fmt.has_min:
        centred = rows - m  # (G, 32)
        q = torch.round(centred / d - fmt.zero_point).clamp_(fmt.qmin, fmt.qmax).add_(fmt.zero_point)
    else:
        centred = rows
        q = torch.round(rows / d).clamp_(fmt.qmin, fmt.qmax)
    return (q.mul_(d).sub_(centred)).pow_(2).sum(dim=1, keepdim=True)


def _candidates(rows: torch.Tensor, fmt: BlockFormat) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Unshrunk (d, m) per block (G, 1) before fp16 rounding; llama.cpp's rule comes first."""
    zeros = torch.zeros_like(rows[:, :1])
    if fmt.has_min:  # Q4_1: d = (max - min)/15, m = min
        lo, hi = rows.min(dim=1, keepdim=True).values, rows.max(dim=1, keepdim=True).values
        return [((hi - lo) / (fmt.qmax - fmt.qmin), lo)]
    if fmt.qmin == -fmt.qmax:  # Q8_0: symmetric codes, d = max|w|/127
        return [(rows.abs().amax(dim=1, keepdim=True) / fmt.qmax, zeros)]
    # Q4_0: the weight of largest magnitude on the code -8 (llama.cpp), or on +7 (the other sign of d)
    peak = rows.gather(1, rows.abs().argmax(dim=1, keepdim=True))
    return [(peak / fmt.qmin, zeros), (peak / fmt.qmax, zeros)]


def fit_gguf_grid(
    w: torch.Tensor,
    kind: GridKind | str,
    range_method: RangeMethod | str = RangeMethod.MINMAX,
    *,
    mse_candidates: int = 40,
    mse_min_ratio: float = 0.6,
) -> GGUFGrid:
    """Fit llama.cpp block format `kind` (gguf-q8_0, gguf-q4_0, gguf-q4_1) to weight `w`.

    Args:
        w: the float weight (OC, ...); its inputs per output channel must be a multiple of 32.
        kind: the GGUF grid kind.
        range_method: ``minmax``: llama.cpp's reference rule; ``mse``: per block, the least squared error of
            nearest rounding over ranges shrunk by ratios in ``[mse_min_ratio, 1]`` (`mse_candidates` of
            them; for Q4_0 both signs of the scale), the fp16 values included.
    """
    fmt = block_format(kind)
    range_method = RangeMethod(range_method)
    if range_method is RangeMethod.LP:
        raise RecipeError(
            f"w_range 'lp' searches integer zero points, which llama.cpp's {fmt.ggml_name} does not have; "
            "use w_range 'minmax' or 'mse' with a GGUF grid"
        )
    inputs = w[0].numel() if w.dim() else 0
    if w.dim() < 2 or inputs % BLOCK:
        raise RecipeError(
            f"llama.cpp's {fmt.ggml_name} quantizes blocks of {BLOCK} inputs, and this weight of shape "
            f"{tuple(w.shape)} has {inputs} inputs per output channel; keep the layer float (ignore=[...]) "
            "or choose another grid"
        )
    rows = check_weight(grouped(w.detach(), Granularity.GROUP, BLOCK).float())  # (G, 32)
    if rows.abs().max() / max(-fmt.qmin, fmt.qmax) > FP16_MAX:
        raise RecipeError(
            f"weights up to {float(rows.abs().max()):.3g} need a scale above fp16's largest ({FP16_MAX:.0f}); "
            f"llama.cpp's {fmt.ggml_name} cannot hold them: keep the layer float (ignore=[...])"
        )
    ratios = (
        torch.linspace(1.0, mse_min_ratio, mse_candidates).tolist()
        if range_method is RangeMethod.MSE
        else [1.0]
    )
    base = _candidates(rows, fmt)
    fits = [(fp16_scale(d * r), to_fp16(m * r)) for r in ratios for d, m in base]
    best_d, best_m = fits[0]  # llama.cpp's rule
    if range_method is RangeMethod.MSE:
        best_err = _block_error(rows, best_d, best_m, fmt)
        for d, m in fits[1:]:
            err = _block_error(rows, d, m, fmt)
            better = err < best_err  # (G, 1)
            best_err = torch.where(better, err, best_err)
            best_d, best_m = torch.where(better, d, best_d), torch.where(better, m, best_m)
    zero_point = torch.full_like(best_d, float(fmt.zero_point))
    return GGUFGrid(1.0 / best_d, zero_point, best_m, fmt.kind, fmt.bits)
