"""Dense bit packing: exact round trips and the documented byte layout."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from postquant.io import pack_codes, packed_nbytes, unpack_codes


@settings(max_examples=300, deadline=None)
@given(bits=st.integers(2, 8), data=st.data())
def test_unpack_inverts_pack_and_size_is_dense(bits, data):
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    values = data.draw(st.lists(st.integers(lo, hi), max_size=200))
    codes = torch.tensor(values, dtype=torch.int32)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(len(values) * bits / 8) == packed_nbytes(len(values), bits)
    out = unpack_codes(packed, bits, len(values))
    assert out.dtype == torch.int8
    assert torch.equal(out.int(), codes)


@pytest.mark.parametrize("bits", range(2, 9), ids=lambda b: f"w{b}")
def test_round_trip_of_a_full_weight_tensor(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (64, 27, 3, 3), generator=g, dtype=torch.int8)
    packed = pack_codes(codes, bits)
    assert packed.numel() == math.ceil(codes.numel() * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, codes.numel()).reshape(codes.shape), codes)


def test_byte_layout_low_bits_first():
    # 3 bits: codes -4..3 are stored as 0..7; 8 codes in 3 bytes, little-endian
    packed = pack_codes(torch.arange(-4, 4), 3)
    value = sum(u << (3 * i) for i, u in enumerate(range(8)))
    assert packed.tolist() == list(value.to_bytes(3, "little"))
    assert pack_codes(torch.tensor([-8, 7]), 4).tolist() == [0xF0]  # two per byte, first in the low nibble
    assert pack_codes(torch.tensor([-32, 31, 0, -1]), 6).numel() == 3  # four 6-bit codes in three bytes


def test_out_of_range_codes_and_bad_lengths_are_refused():
    with pytest.raises(ValueError, match=r"\[-4, 3\]"):
        pack_codes(torch.tensor([4]), 3)
    with pytest.raises(ValueError, match="integer"):
        pack_codes(torch.tensor([0.5]), 3)
    with pytest.raises(ValueError, match="need 3 bytes"):
        unpack_codes(torch.zeros(2, dtype=torch.uint8), 3, 8)
