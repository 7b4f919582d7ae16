"""Packing postquant's codes and fp16 block parameters into llama.cpp's Q8_0 / Q4_0 / Q4_1 blocks, and back.

One block covers 32 consecutive inputs of one output row (ggml-quants.h ``block_q8_0`` etc., little endian):

* Q8_0, 34 bytes: fp16 ``d``, then the 32 codes as int8.
* Q4_0, 18 bytes: fp16 ``d``, then 16 bytes of nibbles ``q + 8``: byte ``j`` holds input ``j`` in its low
  nibble and input ``j + 16`` in its high nibble (not inputs ``2j`` and ``2j + 1``).
* Q4_1, 20 bytes: fp16 ``d``, fp16 ``m``, then the nibbles as in Q4_0.

Pure array code (numpy), no ``gguf`` import: the exporter and the tests check it against ``gguf.quants``.
"""

from __future__ import annotations

import numpy as np
import torch

from postquant.choices import GridKind
from postquant.grids.gguf import BLOCK, block_format

__all__ = ["BLOCK_BYTES", "pack_blocks", "unpack_blocks"]

BLOCK_BYTES: dict[GridKind, int] = {GridKind.GGUF_Q8_0: 34, GridKind.GGUF_Q4_0: 18, GridKind.GGUF_Q4_1: 20}


def _fp16_bytes(values: torch.Tensor) -> np.ndarray:
    """(G,) fp16-valued floats as (G, 2) little-endian bytes; raises if a value is not an fp16 value."""
    half = values.detach().cpu().float().numpy().astype(np.float16)
    if not np.array_equal(half.astype(np.float32), values.detach().cpu().float().numpy()):
        raise ValueError("block scales must be fp16 values (fp16_scale / to_fp16 of the grid)")
    return half.astype("<f2").view(np.uint8).reshape(-1, 2)


def pack_blocks(
    codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, kind: GridKind | str
) -> np.ndarray:
    """llama.cpp blocks (G, bytes) uint8 from our signed codes (G, 32), fp16 scales `scale` (G,) and, for
    Q4_1, fp16 minimums `offset` (G,)."""
    fmt = block_format(kind)
    codes = codes.detach().cpu().to(torch.int32).reshape(-1, BLOCK)  # (G, 32)
    if int(codes.min()) < fmt.qmin or int(codes.max()) > fmt.qmax:
        raise ValueError(f"{fmt.ggml_name} codes must lie in [{fmt.qmin}, {fmt.qmax}]")
    parts = [_fp16_bytes(scale.reshape(-1))]
    if fmt.has_min:
        if offset is None:
            raise ValueError("Q4_1 blocks need their minimums (offset)")
        parts.append(_fp16_bytes(offset.reshape(-1)))
    file_codes = (codes + fmt.file_offset).numpy()  # (G, 32): int8 values for Q8_0, nibbles 0..15 for Q4
    if fmt.bits == 8:
        parts.append(file_codes.astype(np.int8).view(np.uint8))
    else:
        nib = file_codes.astype(np.uint8)
        parts.append(nib[:, : BLOCK // 2] | (nib[:, BLOCK // 2 :] << 4))  # (G, 16)
    return np.concatenate(parts, axis=1)


def unpack_blocks(
    blocks: np.ndarray, kind: GridKind | str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Our codes (G, 32) int32, scales (G,) and Q4_1 minimums (G,) (None otherwise) from blocks (G, bytes)."""
    fmt = block_format(kind)
    blocks = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(-1, BLOCK_BYTES[fmt.kind])
    scale = torch.from_numpy(blocks[:, 0:2].copy().view("<f2").astype(np.float32).reshape(-1))
    offset = None
    start = 2
    if fmt.has_min:
        offset = torch.from_numpy(blocks[:, 2:4].copy().view("<f2").astype(np.float32).reshape(-1))
        start = 4
    data = blocks[:, start:]
    if fmt.bits == 8:
        file_codes = data.copy().view(np.int8).astype(np.int32)
    else:
        file_codes = np.concatenate([data & 0x0F, data >> 4], axis=1).astype(np.int32)  # (G, 32)
    return torch.from_numpy(file_codes - fmt.file_offset), scale, offset
