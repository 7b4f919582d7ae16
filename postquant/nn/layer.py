"""The quantized layer: integer weight codes on a grid, an optional input quantizer, the float op."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call

from postquant.grids import Grid, grid_from_state, grid_state
from postquant.nn.act import ActQuantizer

QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)
HALF = (torch.bfloat16, torch.float16)


def upcast_half(t: torch.Tensor) -> torch.Tensor:
    """Half-precision (bfloat16, float16) tensors as float32; every other tensor unchanged."""
    return t.float() if t.dtype in HALF else t


class QuantizedLayer(nn.Module):
    """A Conv1d/Conv2d/Linear (or a subclass, e.g. TF-"same"-padded convs) with quantized weights.

    It keeps the float module without its weight (`inner`) and runs it on the dequantized weight, so the
    forward is *exactly* ``inner(act_quant(x))`` with ``weight = grid.dequantize(codes)``: whatever the
    float module does around its weight (static padding, groups, dilation) is preserved.
    """

    def __init__(
        self, layer: nn.Module, grid: Grid, codes: torch.Tensor, act_quant: ActQuantizer | None = None
    ) -> None:
        super().__init__()
        inner = copy.deepcopy(layer)
        del inner.weight
        self.inner = inner
        self.act_quant = act_quant
        self.grid_config, tensors = grid_state(grid)
        for key, value in tensors.items():
            self.register_buffer(f"grid_{key}", value.detach().clone())
        self.register_buffer("codes", codes.to(torch.int8))
        self.register_buffer("weight", grid.dequantize(codes.to(torch.int32)), persistent=False)

    @property
    def grid(self) -> Grid:
        tensors = {k.removeprefix("grid_"): v for k, v in self.named_buffers() if k.startswith("grid_")}
        return grid_from_state(self.grid_config, tensors)

    @property
    def bits(self) -> int:
        return self.grid_config.bits

    def input_quantizer(self, bits: int, lo: float, hi: float) -> ActQuantizer:
        """An `ActQuantizer` for this layer's input range [lo, hi], on the layer's device, its step in the
        dtype the layer quantizes inputs in (float32; float64 for a float64 layer). Not installed."""
        return ActQuantizer(bits, lo, hi, device=self.weight.device, dtype=self.weight.dtype)

    def set_codes(self, codes: torch.Tensor) -> None:
        """Replace the integer codes (and the cached dequantized weight), on the layer's device."""
        codes = codes.to(self.codes.device)
        self.codes = codes.to(torch.int8)
        self.weight = self.grid.dequantize(codes.to(torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Codes are dequantized (and inputs quantized) in float32; a half-precision model (bfloat16 or float16
        # inputs) then computes the layer in its own dtype, as its float version did.
        dtype = x.dtype
        if self.act_quant is not None:
            x = self.act_quant(x.float()).to(dtype) if dtype in HALF else self.act_quant(x)
        weight = self.weight if self.weight.dtype == dtype else self.weight.to(dtype)
        return functional_call(self.inner, {"weight": weight}, (x,))

    def extra_repr(self) -> str:
        return f"w_bits={self.bits}, grid={self.grid_config.kind.value}, granularity={self.grid_config.granularity.value}"
