"""LinearAttention computes what nn.MultiheadAttention computes, for every call form that it accepts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from postquant.nn.attention import LinearAttention, convertible


def _close(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    batch_first=st.booleans(),
    bias=st.booleans(),
    separate_kv=st.booleans(),
    heads=st.sampled_from([1, 2, 4]),
    tgt=st.integers(1, 5),
    src=st.integers(1, 5),
    masks=st.sampled_from(["none", "bool2d", "float3d", "padding", "both", "causal"]),
    need_weights=st.booleans(),
    average=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_multihead_attention(
    batch_first, bias, separate_kv, heads, tgt, src, masks, need_weights, average, seed
):
    torch.manual_seed(seed)
    e = 8
    kdim, vdim = (6, 5) if separate_kv else (e, e)
    mha = nn.MultiheadAttention(e, heads, bias=bias, batch_first=batch_first, kdim=kdim, vdim=vdim).eval()
    attention = LinearAttention(mha).eval()
    if masks == "causal":
        src = tgt
    shape = (lambda n, d: (2, n, d)) if batch_first else (lambda n, d: (n, 2, d))
    q, k, v = torch.randn(shape(tgt, e)), torch.randn(shape(src, kdim)), torch.randn(shape(src, vdim))
    kwargs: dict = {"need_weights": need_weights, "average_attn_weights": average}
    if masks in ("bool2d", "both"):
        kwargs["attn_mask"] = torch.rand(tgt, src) < 0.3
        kwargs["attn_mask"][:, 0] = False  # every query attends somewhere (else both give NaN)
    if masks == "float3d":
        kwargs["attn_mask"] = torch.randn(2 * heads, tgt, src)
    if masks in ("padding", "both"):
        kwargs["key_padding_mask"] = torch.zeros(2, src, dtype=torch.bool)
        kwargs["key_padding_mask"][1, 1:] = True
    if masks == "causal":
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(tgt)
        kwargs["is_causal"] = True
    with torch.no_grad():
        want, got = mha(q, k, v, **kwargs), attention(q, k, v, **kwargs)
    assert _close(want[0], got[0]) and _close(want[1], got[1])


def test_unbatched_inputs_and_a_causal_hint_without_a_mask():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2).eval()
    attention = LinearAttention(mha).eval()
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert all(_close(a, b) for a, b in zip(mha(x, x, x), attention(x, x, x), strict=True))
        causal = nn.Transformer.generate_square_subsequent_mask(5)
        want = mha(x, x, x, attn_mask=causal, need_weights=False)[0]
        assert _close(want, attention(x, x, x, is_causal=True, need_weights=False)[0])


def test_what_cannot_be_converted_says_why():
    mha = nn.MultiheadAttention(8, 2, add_bias_kv=True)
    assert convertible(mha) == "add_bias_kv=True"
    assert convertible(nn.MultiheadAttention(8, 2, add_zero_attn=True)) == "add_zero_attn=True"
    with pytest.raises(ValueError, match="add_bias_kv"):
        LinearAttention(mha)
