"""An opt-in fast path: PyTorch's int4 weight-only matmul on the CPU for Linear layers with 4-bit codes.

``torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, g, scales_and_zeros)`` computes ``x @ w_hat.T`` with
``w_hat[n, k] = (u[n, k] - 8) * scale[k // g, n] + zero[k // g, n]`` for unsigned 4-bit codes ``u`` (packed by
``_convert_weight_to_int4pack_for_cpu`` in a blocked layout of its own), group sizes ``g`` of 32, 64, 128 or
256 along the inputs, ``N`` a multiple of 16 and ``scales_and_zeros`` (K/g, N, 2) in the dtype of ``x``.

postquant's grid is ``w_hat = (q + Z) / S`` with ``q`` in [-8, 7]; with ``u = q + 8`` that is
``(u - 8) * (1/S) + Z/S``: ``scale = 1/S`` and ``zero = Z/S``, rounded to the kernel's dtype. So the kernel's
weights are *not* bit-identical to the dequantized weight of `QuantizedLayer` (the reference): ``1/S`` and
``Z/S`` are rounded (to float32: about one float32 ulp per weight; to bfloat16: 8 significant bits per group
scale), and the kernel sums in its own order. ``benchmarks/packed_bench.py`` measures the difference.
llama.cpp's Q4_0 and Q4_1 grids (``w = d*(q + Z) + m``, `postquant.grids.gguf`) run the same way, with
``scale = d`` and ``zero = Z*d + m`` per block of 32 inputs.
"""

from __future__ import annotations

import torch
from torch import nn

from postquant.choices import Granularity, GridKind
from postquant.errors import UnsupportedModelError
from postquant.grids import GGUFGrid
from postquant.nn.layer import HALF, QuantizedLayer

__all__ = ["KERNEL_GROUP_SIZES", "Int4Linear", "int4_kernel_group"]

KERNEL_GROUP_SIZES = (256, 128, 64, 32)  # what the kernel accepts, largest first
_KERNEL_KINDS = (GridKind.UNIFORM, GridKind.GGUF_Q4_0, GridKind.GGUF_Q4_1)  # 4-bit affine grids
_INNER_K_TILES = 2  # the CPU packing's tiling argument (its layout does not depend on it)


def int4_kernel_group(layer: QuantizedLayer) -> int:
    """The kernel group size that expresses `layer`'s grid exactly (scales repeated across kernel groups).

    Raises:
        UnsupportedModelError: the layer is not a plain Linear with a 4-bit uniform grid on the CPU, its
            output features are not a multiple of 16, or its rows of one step are not a multiple of 32.
    """
    inner = layer.inner
    why = ""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        why = f"torch {torch.__version__} has no _weight_int4pack_mm_for_cpu; upgrade torch (2.13 has it)"
    elif not isinstance(inner, nn.Linear) or type(inner).forward is not nn.Linear.forward:
        why = f"it is a {type(inner).__name__}, not a plain nn.Linear"
    elif layer.grid_config.kind not in _KERNEL_KINDS or layer.bits != 4:
        why = f"its grid is {layer.bits}-bit {layer.grid_config.kind.value}, not 4-bit uniform or GGUF Q4"
    elif layer.packed.device.type != "cpu":
        why = f"it is on {layer.packed.device}; the kernel runs on the CPU"
    elif inner.out_features % 16:
        why = f"its {inner.out_features} output features are not a multiple of 16"
    if why:
        raise UnsupportedModelError(f"the int4 kernel cannot run this layer: {why}")
    granularity = layer.grid_config.granularity
    row = layer.grid_config.group_size if granularity is Granularity.GROUP else inner.in_features
    for g in KERNEL_GROUP_SIZES:
        if row % g == 0:
            return g
    raise UnsupportedModelError(
        f"the int4 kernel cannot run this layer: its {granularity.value} grid has rows of {row} inputs, not a multiple "
        f"of one of the kernel's group sizes {KERNEL_GROUP_SIZES}"
    )


class Int4Linear(nn.Module):
    """A `QuantizedLayer` of a Linear with 4-bit codes, computed by PyTorch's int4 CPU kernel.

    Holds the kernel's packed codes (N, K/2) uint8, ``scales_and_zeros`` (K/g, N, 2) in `dtype`, the bias and
    the input quantizer of the layer; computes ``act_quant(x) @ w_hat.T + bias`` in `dtype` and returns the
    input's dtype. See the module docstring for how ``w_hat`` differs from the layer's dequantized weight.
    """

    def __init__(self, layer: QuantizedLayer, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        if dtype not in (*HALF, torch.float32):
            raise ValueError(f"the int4 kernel computes in bfloat16, float16 or float32, not {dtype}")
        self.group_size = int4_kernel_group(layer)
        self.dtype = dtype
        self.out_features, self.in_features = layer.weight_shape
        self.act_quant = layer.act_quant
        bias = layer.inner.bias
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        unsigned = layer.codes.to(torch.int32) + 8  # (N, K) in [0, 15]
        self.register_buffer(
            "weight_int4", torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, _INNER_K_TILES)
        )  # (N, K/2) uint8
        self.register_buffer("scales_and_zeros", self._scales_and_zeros(layer))  # (K/g, N, 2)

    def _scales_and_zeros(self, layer: QuantizedLayer) -> torch.Tensor:
        grid = layer.grid
        # w = (q + Z) * step + m: step 1/S (uniform, m = 0) or the block's fp16 d (GGUF, m its minimum)
        if isinstance(grid, GGUFGrid):
            step, m = grid.scale.double(), grid.offset.double()  # (G, 1)
        else:
            step, m = 1.0 / grid.inv_scale.double(), torch.zeros_like(grid.inv_scale, dtype=torch.float64)
        n, k, g = self.out_features, self.in_features, self.group_size
        rows = (-1, 1) if step.numel() == 1 else (n, -1)
        scale = step.reshape(rows)  # (N, K/row) or (1, 1)
        zero = (grid.zero_point.double() * step + m).reshape(rows)
        repeat = k // g // scale.shape[1]  # kernel groups per grid row
        pair = torch.stack([scale, zero], dim=-1).repeat_interleave(repeat, dim=1).expand(n, k // g, 2)
        return pair.transpose(0, 1).to(self.dtype).contiguous()  # (K/g, N, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if self.act_quant is not None:
            x = self.act_quant(x.float()).to(dtype) if dtype in HALF else self.act_quant(x)
        rows = x.reshape(-1, self.in_features).to(self.dtype).contiguous()  # (M, K)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            rows, self.weight_int4, self.group_size, self.scales_and_zeros
        )  # (M, N)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
            f"dtype={self.dtype}"
        )
