"""Activation fake-quantizers: static per-tensor (ONNX QuantizeLinear/DequantizeLinear semantics) and dynamic
per-token (one step per row of the last dimension, computed at every forward, as LLM runtimes do)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from postquant.grids import check_bits


def act_qparams(lo: float, hi: float, bits: int) -> tuple[float, int, int, int]:
    """Scale, zero point and integer range for the float range [lo, hi] at `bits`.

    The range is widened to contain 0 so that zero (padding, ReLU's floor) is exact. A non-negative range
    uses the unsigned codes ``[0, 2^b - 1]``; a range with negatives uses ``[-2^(b-1), 2^(b-1) - 1]``.
    """
    check_bits(bits)
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if lo >= 0:
        qmin, qmax = 0, 2**bits - 1
    else:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scale = max(hi - lo, 1e-8) / (qmax - qmin)
    zero_point = int(min(max(qmin - round(lo / scale), qmin), qmax))
    return scale, zero_point, qmin, qmax


class ActQuantizer(nn.Module):
    """``x_q = (clamp(round(x / scale) + zp, qmin, qmax) - zp) * scale``, one scale for the tensor.

    This is exactly what ONNX QuantizeLinear followed by DequantizeLinear computes (round half to even).
    """

    def __init__(
        self,
        bits: int,
        lo: float,
        hi: float,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        scale, zero_point, self.qmin, self.qmax = act_qparams(lo, hi, bits)
        self.bits = bits
        self.register_buffer("scale", torch.tensor(scale, dtype=dtype, device=device))
        self.register_buffer("zero_point", torch.tensor(float(zero_point), dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            q = torch.clamp(torch.round(x / self.scale) + self.zero_point, self.qmin, self.qmax)
            return (q - self.zero_point) * self.scale
        # Without autograd: the same operations in place on one new tensor (the same values, less memory traffic)
        q = x / self.scale
        return (
            q.round_()
            .add_(self.zero_point)
            .clamp_(self.qmin, self.qmax)
            .sub_(self.zero_point)
            .mul_(self.scale)
        )

    def extra_repr(self) -> str:
        return f"bits={self.bits}, scale={self.scale.item():.4g}, zero_point={int(self.zero_point.item())}"


def token_codes(
    x: torch.Tensor, bits: int, round_fn: Callable[[torch.Tensor], torch.Tensor] = torch.round
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric codes of `x` (..., C) and their steps: one step per row of the last dimension.

    ``s = max_j |x_j| / qmax`` with ``qmax = 2^(b-1) - 1`` (the absmax of each row lands on ``+-qmax``, no code
    is clipped), ``q = clamp(round(x / s), -qmax, qmax)``; an all-zero row gets ``s = 1`` (codes 0, never NaN).
    The step is computed from `x` without gradient (a straight-through `round_fn` passes gradients to `x` only).

    Returns:
        ``(q, s)``: codes as floats of `x`'s shape and dtype, and steps (..., 1).
    """
    qmax = 2 ** (check_bits(bits) - 1) - 1
    scale = x.detach().abs().amax(dim=-1, keepdim=True) / qmax  # (..., 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.clamp(round_fn(x / scale), -qmax, qmax), scale


def quantize_tokens(
    x: torch.Tensor, bits: int, round_fn: Callable[[torch.Tensor], torch.Tensor] = torch.round
) -> torch.Tensor:
    """``q * s`` of `token_codes`: `x` fake-quantized per token, the error of each element at most ``s / 2``."""
    q, scale = token_codes(x, bits, round_fn)
    return q * scale


class DynamicActQuantizer(nn.Module):
    """Dynamic per-token input quantizer: `quantize_tokens` at every forward, one step per row of the last
    dimension (for a Linear's (B, T, C) input: per token), symmetric codes in ``[-(2^(b-1)-1), 2^(b-1)-1]``.

    What vLLM's int8 W8A8 kernels compute for compressed-tensors' ``strategy: token, dynamic: true`` inputs
    (step ``absmax / 127`` at 8 bits); compressed-tensors' own reference in transformers divides by 127.5
    instead (`postquant.io.hf_check`). It holds no tensor: nothing to calibrate, save or learn.
    Half-precision inputs are quantized in float32 and returned in their dtype.
    """

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.qmax = 2 ** (bits - 1) - 1
        self.qmin = -self.qmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            return quantize_tokens(x.float(), self.bits).to(x.dtype)
        return quantize_tokens(x, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per-token dynamic, symmetric"
