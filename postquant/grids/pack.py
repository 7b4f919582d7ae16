"""Dense bit packing of signed integer codes: ``b``-bit codes take exactly ``b`` bits each.

Codes ``q`` in ``[-2^(b-1), 2^(b-1) - 1]`` are stored offset to unsigned, ``u = q + 2^(b-1)``. Eight codes
make one chunk of ``b`` bytes: the chunk is the little-endian integer ``sum_i u_i << (b * i)``, so code ``i``
of a chunk sits at bits ``b*i .. b*i + b - 1`` (the low bits of the first byte first). The last chunk is cut
to ``ceil(numel * b / 8)`` bytes in total. 4-bit codes are two per byte, 3-bit codes 8 per 3 bytes,
6-bit codes 4 per 3 bytes.

Widths that divide a byte (2, 4 and 8 bits) never straddle bytes: byte ``j`` holds codes
``j*k .. j*k + k - 1`` (``k = 8 / b``), the first in the low bits. They are packed and unpacked in uint8
arithmetic (the same bytes as the general chunked path, tested), which is what a packed layer pays per forward.
"""

from __future__ import annotations

import math

import torch

from postquant.grids import check_bits

__all__ = ["pack_codes", "packed_nbytes", "unpack_codes"]

_CHUNK = 8  # codes per chunk; a chunk of b-bit codes is b bytes


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes needed for `numel` codes of `bits` bits: ``ceil(numel * bits / 8)``."""
    return math.ceil(numel * bits / 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed integer codes densely into bytes.

    Args:
        codes: integer tensor of any shape with values in ``[-2^(bits-1), 2^(bits-1) - 1]``.
        bits: 2..8.

    Returns:
        A 1-D uint8 tensor of ``ceil(codes.numel() * bits / 8)`` bytes (read back with `unpack_codes`).

    Raises:
        ValueError: non-integer codes or codes outside the signed range of `bits`.
    """
    check_bits(bits)
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"pack_codes needs an integer tensor, got {codes.dtype}")
    offset = 2 ** (bits - 1)
    u = codes.reshape(-1).to(torch.int64) + offset  # (numel,) unsigned codes
    if u.numel() and (int(u.min()) < 0 or int(u.max()) >= 2**bits):
        raise ValueError(
            f"codes must lie in [{-offset}, {offset - 1}] for {bits} bits, got [{int(u.min()) - offset}, "
            f"{int(u.max()) - offset}]"
        )
    numel = u.numel()
    if bits == 8:
        return u.to(torch.uint8)
    if 8 % bits == 0:
        return _pack_bytewise(u.to(torch.uint8), bits)
    pad = (-numel) % _CHUNK
    chunks = torch.nn.functional.pad(u, (0, pad)).reshape(-1, _CHUNK)  # (C, 8)
    shifts = torch.arange(_CHUNK, dtype=torch.int64, device=u.device) * bits  # (8,)
    value = (chunks << shifts).sum(dim=1, keepdim=True)  # (C, 1), at most 56 bits
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=u.device) * 8  # (bits,)
    packed = ((value >> byte_shifts) & 0xFF).to(torch.uint8)  # (C, bits)
    return packed.reshape(-1)[: packed_nbytes(numel, bits)]


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of `pack_codes`: the first `numel` codes as a 1-D int8 tensor.

    Args:
        packed: the uint8 bytes written by `pack_codes`.
        bits: the bit width they were packed with (2..8).
        numel: the number of codes.

    Raises:
        ValueError: `packed` is not uint8 or not exactly ``ceil(numel * bits / 8)`` bytes long.
    """
    check_bits(bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed codes must be uint8, got {packed.dtype}")
    expected = packed_nbytes(numel, bits)
    if packed.numel() != expected:
        raise ValueError(f"{numel} codes of {bits} bits need {expected} bytes, got {packed.numel()}")
    offset = 2 ** (bits - 1)
    if bits == 8:
        return (packed.reshape(-1) ^ 0x80).view(torch.int8)  # u - 128 in two's complement
    if 8 % bits == 0:
        return _unpack_bytewise(packed.reshape(-1), bits, numel).to(torch.int8) - offset
    data = packed.reshape(-1).to(torch.int64)
    pad = (-data.numel()) % bits
    chunks = torch.nn.functional.pad(data, (0, pad)).reshape(-1, bits)  # (C, bits) bytes
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=data.device) * 8
    value = (chunks << byte_shifts).sum(dim=1, keepdim=True)  # (C, 1)
    shifts = torch.arange(_CHUNK, dtype=torch.int64, device=data.device) * bits  # (8,)
    u = (value >> shifts) & (2**bits - 1)  # (C, 8)
    return (u.reshape(-1)[:numel] - offset).to(torch.int8)


def _pack_bytewise(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned `bits`-bit codes u (uint8, 1-D) as bytes of ``8 / bits`` codes, the first in the low bits."""
    per = 8 // bits
    rows = torch.nn.functional.pad(u, (0, (-u.numel()) % per)).reshape(-1, per)  # (B, per)
    packed = rows[:, 0].clone()
    for i in range(1, per):
        packed |= rows[:, i] << (bits * i)
    return packed  # (ceil(numel / per),)


def _unpack_bytewise(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of `_pack_bytewise`: the first `numel` unsigned codes, uint8."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)  # (8 / bits,)
    u = (packed.unsqueeze(1) >> shifts) & (2**bits - 1)  # (B, 8 / bits)
    return u.reshape(-1)[:numel]
