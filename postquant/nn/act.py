"""Per-tensor activation fake-quantizer (ONNX QuantizeLinear/DequantizeLinear semantics)."""

from __future__ import annotations

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
