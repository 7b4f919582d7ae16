"""QuantizedEmbedding: a lookup is exactly a row of the dequantized table; codes stay packed."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from postquant.errors import UnsupportedModelError
from postquant.grids import fit_uniform_grid
from postquant.nn import QuantizedEmbedding


def _quantized(
    num: int, dim: int, bits: int, group: int | None = None, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[nn.Embedding, QuantizedEmbedding]:
    torch.manual_seed(seed)
    table = nn.Embedding(num, dim).to(dtype)
    w = table.weight.detach().float()
    grid = fit_uniform_grid(w, bits, "group" if group else "channel", group_size=group or 0)
    return table, QuantizedEmbedding(table, grid, grid.nearest(w))


@settings(max_examples=25, deadline=None)
@given(
    bits=st.integers(2, 8),
    dim=st.sampled_from([8, 10, 24, 30]),
    grouped=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_a_lookup_is_the_row_of_the_dequantized_table(bits, dim, grouped, seed):
    """Per row or per group, byte-aligned rows or not (3 bits x 10 values = 30 bits): exact equality."""
    group = (dim // 2 if dim % 2 == 0 else dim) if grouped else None
    _, q = _quantized(37, dim, bits, group, seed)
    ids = torch.randint(0, 37, (3, 5), generator=torch.Generator().manual_seed(seed))
    got = q(ids)
    assert got.shape == (3, 5, dim)
    torch.testing.assert_close(got, F.embedding(ids, q.weight), rtol=0, atol=0)


def test_codes_are_packed_and_no_float_table_is_kept():
    _, q = _quantized(100, 24, 3, group=8)
    assert q.packed.dtype == torch.uint8 and q.packed.numel() == math.ceil(100 * 24 * 3 / 8)
    assert list(q.parameters()) == []
    assert all(t.numel() < 100 * 24 for k, t in q.state_dict().items() if k != "packed")
    assert q.codes.shape == (100, 24) and int(q.codes.min()) >= -4 and int(q.codes.max()) <= 3


def test_the_lookup_returns_the_tables_dtype():
    _, q = _quantized(20, 16, 4, dtype=torch.bfloat16)
    ids = torch.tensor([[0, 5, 19]])
    out = q(ids)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, F.embedding(ids, q.weight).to(torch.bfloat16), rtol=0, atol=0)


def test_quantization_error_is_small_at_8_bits():
    table, q = _quantized(50, 32, 8)
    w = table.weight.detach()
    sqnr = 10 * torch.log10(w.pow(2).sum() / (w - q.weight).pow(2).sum())
    assert sqnr > 40


def test_ids_outside_the_table_and_float_ids_are_refused():
    _, q = _quantized(10, 8, 4)
    with pytest.raises(IndexError):
        q(torch.tensor([10]))
    with pytest.raises(IndexError):
        q(torch.tensor([-1]))
    with pytest.raises(TypeError, match="integer ids"):
        q(torch.tensor([1.0]))


def test_max_norm_and_per_tensor_grids_are_refused():
    table = nn.Embedding(10, 8, max_norm=1.0)
    w = table.weight.detach()
    with pytest.raises(UnsupportedModelError, match="max_norm"):
        QuantizedEmbedding(table, fit_uniform_grid(w, 4), fit_uniform_grid(w, 4).nearest(w))
    table = nn.Embedding(10, 8)
    grid = fit_uniform_grid(table.weight.detach(), 4, "tensor")
    with pytest.raises(UnsupportedModelError, match="per-row or per-group"):
        QuantizedEmbedding(table, grid, grid.nearest(table.weight.detach()))


def test_set_codes_changes_the_lookup():
    _, q = _quantized(10, 8, 4)
    codes = torch.zeros(10, 8, dtype=torch.int8)
    codes[3] = 5
    q.set_codes(codes)
    torch.testing.assert_close(q(torch.tensor([3])), q.grid.dequantize(codes)[3:4], rtol=0, atol=0)
    with pytest.raises(ValueError, match="shape"):
        q.set_codes(torch.zeros(9, 8, dtype=torch.int8))
