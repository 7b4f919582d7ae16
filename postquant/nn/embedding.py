"""The quantized embedding: a lookup table held as packed integer codes on a grid, weight-only."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from postquant.choices import Granularity
from postquant.errors import UnsupportedModelError
from postquant.grids import Grid, GridConfig, grid_from_state, grid_state
from postquant.grids.pack import pack_codes, unpack_codes
from postquant.nn.layer import compact_grid_tensor

__all__ = ["QuantizedEmbedding"]

_ROW_GRIDS = (Granularity.CHANNEL, Granularity.GROUP)  # one step per row, or per group along a row


class QuantizedEmbedding(nn.Module):
    """An ``nn.Embedding`` whose table (V, D) is integer codes on a grid: one step per row (each token's
    vector is one channel, dim 0) or per group of ``group_size`` values along dim 1.

    Like `postquant.nn.QuantizedLayer` it keeps the codes packed densely (``packed``: ``b``-bit codes take
    ``b`` bits) and the grid's tensors (``grid_*``; integer-valued zero points as int8/int16), and no float
    copy of the table. A lookup unpacks and dequantizes only the rows it reads, so its output is exactly
    ``F.embedding(ids, grid.dequantize(codes))`` in the table's original dtype. ``weight`` (the whole
    dequantized table) and ``codes`` (int8, (V, D)) are computed on access. ``act_quant`` is always None: the
    output of a lookup is not quantized.
    """

    act_quant = None  # weight-only: the same attribute a QuantizedLayer without an input quantizer has

    def __init__(self, embedding: nn.Embedding, grid: Grid, codes: torch.Tensor) -> None:
        super().__init__()
        if embedding.max_norm is not None:
            raise UnsupportedModelError(
                f"an nn.Embedding with max_norm={embedding.max_norm} renormalizes its table in place at every "
                "lookup; quantized codes cannot: keep it float (ignore=[...])"
            )
        if grid.granularity not in _ROW_GRIDS or codes.dim() != 2:
            raise UnsupportedModelError(
                f"a quantized embedding needs a (V, D) table on a per-row or per-group grid, not a "
                f"{grid.granularity.value} grid on a table of shape {tuple(codes.shape)}"
            )
        self.num_embeddings, self.embedding_dim = (int(n) for n in codes.shape)
        self.padding_idx = embedding.padding_idx
        self.dtype = embedding.weight.dtype  # what a lookup returns, as the float table did
        self.float_type = type(embedding).__name__  # the float module's class (a checkpoint records it)
        self.grid_config: GridConfig
        self.grid_config, tensors = grid_state(grid)
        for key, value in tensors.items():  # the step keeps its float dtype: it sets the grid's precision
            value = value.detach() if key == "inv_scale" else compact_grid_tensor(value.detach())
            self.register_buffer(f"grid_{key}", value.clone())
        codes = codes.to(torch.int32) if codes.is_floating_point() else codes
        self.register_buffer("packed", pack_codes(codes, grid.bits))  # (ceil(V * D * bits / 8),) uint8

    @property
    def weight_shape(self) -> tuple[int, int]:
        return self.num_embeddings, self.embedding_dim

    @property
    def bits(self) -> int:
        return self.grid_config.bits

    @property
    def grid_dtype(self) -> torch.dtype:
        """The precision the grid computes in: float32, or float64 for a float64 table (its step's dtype)."""
        return torch.float64 if self.grid_inv_scale.dtype == torch.float64 else torch.float32

    def _grid_tensors(self) -> dict[str, torch.Tensor]:
        return {
            k.removeprefix("grid_"): v.to(self.grid_dtype)
            for k, v in self._buffers.items()
            if k.startswith("grid_") and v is not None
        }

    @property
    def grid(self) -> Grid:
        """The table's grid, its tensors in `grid_dtype`."""
        return grid_from_state(self.grid_config, self._grid_tensors())

    @property
    def codes(self) -> torch.Tensor:
        """The integer codes, int8, (V, D) (unpacked on each access)."""
        return unpack_codes(self.packed, self.bits, math.prod(self.weight_shape)).reshape(self.weight_shape)

    @property
    def weight(self) -> torch.Tensor:
        """The whole dequantized table ``grid.dequantize(codes)`` (V, D), in `grid_dtype`."""
        return self.grid.dequantize(self.codes)

    def set_codes(self, codes: torch.Tensor) -> None:
        """Replace the integer codes (V, D), on the module's device."""
        if tuple(codes.shape) != self.weight_shape:
            raise ValueError(f"codes of shape {tuple(codes.shape)} for a table of shape {self.weight_shape}")
        self.packed = pack_codes(codes.to(self.packed.device), self.bits)

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The dequantized rows `ids` (n,), (n, D) in `grid_dtype`: only those rows are unpacked."""
        row_bytes = self.embedding_dim * self.bits // 8
        if self.embedding_dim * self.bits % 8:  # rows straddle bytes: dequantize the whole table
            return F.embedding(ids, self.weight)
        codes = unpack_codes(
            self.packed.view(self.num_embeddings, row_bytes).index_select(0, ids).reshape(-1),
            self.bits,
            ids.numel() * self.embedding_dim,
        ).reshape(-1, self.embedding_dim)  # (n, D) int8
        # the grid's rows of those table rows: (V, 1) per row or (V * D/g, 1) per group, read as (V, ...)
        tensors = {
            k: t.reshape(self.num_embeddings, -1).index_select(0, ids).reshape(-1, 1)
            for k, t in self._grid_tensors().items()
        }
        return grid_from_state(self.grid_config, tensors).dequantize(codes)  # (n, D)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"an embedding looks up integer ids, not {ids.dtype}")
        rows = self._rows(ids.reshape(-1).to(torch.long))  # index_select refuses ids outside [0, V)
        return rows.to(self.dtype).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        group = f", group_size={self.grid_config.group_size}" if self.grid_config.group_size else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}{group}"
