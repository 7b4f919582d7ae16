"""llama.cpp block packing (postquant.io.gguf_blocks) against the gguf package's reference dequantizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from postquant.grids import GGUFGrid, GridKind
from postquant.grids.gguf import FORMATS
from postquant.io.gguf_blocks import BLOCK_BYTES, pack_blocks, unpack_blocks

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType, quants  # noqa: E402

KINDS = [GridKind.GGUF_Q4_0, GridKind.GGUF_Q4_1, GridKind.GGUF_Q8_0]


def _fp16(draw_values: list[float]) -> torch.Tensor:
    return torch.tensor(draw_values, dtype=torch.float32).half().float()


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(KINDS), blocks=st.integers(1, 6), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_packing_round_trips_and_dequantizes_as_llama_cpp(kind, blocks, seed, data):
    fmt = FORMATS[kind]
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(fmt.qmin, fmt.qmax + 1, (blocks, 32), generator=g, dtype=torch.int32)
    finite = st.floats(-100.0, 100.0, allow_nan=False, width=16).filter(lambda v: v != 0)
    scale = _fp16(data.draw(st.lists(finite, min_size=blocks, max_size=blocks)))
    offset = _fp16(data.draw(st.lists(finite, min_size=blocks, max_size=blocks))) if fmt.has_min else None
    packed = pack_blocks(codes, scale, offset, kind)
    assert packed.dtype == np.uint8 and packed.shape == (blocks, BLOCK_BYTES[kind])
    back_codes, back_scale, back_offset = unpack_blocks(packed, kind)
    assert torch.equal(back_codes, codes) and torch.equal(back_scale, scale)
    assert (back_offset is None) == (offset is None)
    if offset is not None:
        assert torch.equal(back_offset, offset)
    # the gguf package (llama.cpp's reference dequantizer) reads exactly postquant's weights
    grid = GGUFGrid(
        1.0 / scale.reshape(-1, 1),
        torch.full((blocks, 1), float(fmt.zero_point)),
        (offset if offset is not None else torch.zeros(blocks)).reshape(-1, 1),
        kind,
        fmt.bits,
    )
    theirs = quants.dequantize(packed, GGMLQuantizationType[fmt.ggml_name])
    assert np.array_equal(theirs, grid.dequantize(codes).numpy())


def test_nibble_order_is_llama_cpp_s():
    """Byte j of a Q4 block holds input j (low nibble) and input j + 16 (high nibble), codes + 8."""
    codes = (
        torch.arange(32, dtype=torch.int32).reshape(1, 32) % 16 - 8
    )  # inputs 0..15 and 16..31: 0..15 again
    packed = pack_blocks(codes, torch.ones(1), None, GridKind.GGUF_Q4_0)
    nibbles = packed[0, 2:]
    assert list(nibbles & 0x0F) == list(range(16)) and list(nibbles >> 4) == list(range(16))
    codes2 = torch.cat([torch.full((1, 16), -8), torch.full((1, 16), 7)], dim=1).to(torch.int32)
    assert set(pack_blocks(codes2, torch.ones(1), None, GridKind.GGUF_Q4_0)[0, 2:].tolist()) == {0xF0}


def test_codes_off_the_format_and_non_fp16_scales_are_refused():
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_blocks(torch.full((1, 32), 8), torch.ones(1), None, GridKind.GGUF_Q4_0)
    with pytest.raises(ValueError, match=r"\[-127, 127\]"):
        pack_blocks(torch.full((1, 32), -128), torch.ones(1), None, GridKind.GGUF_Q8_0)
    with pytest.raises(ValueError, match="fp16"):
        pack_blocks(torch.zeros(1, 32), torch.tensor([0.1]), None, GridKind.GGUF_Q4_0)
    with pytest.raises(ValueError, match="minimums"):
        pack_blocks(torch.zeros(1, 32), torch.ones(1), None, GridKind.GGUF_Q4_1)
