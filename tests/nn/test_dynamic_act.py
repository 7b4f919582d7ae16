"""Dynamic per-token input quantization: one step per row of the last dimension, bounded error, idempotent codes,
zero rows without NaN, half precision kept, straight-through gradients in learned rounding."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import postquant
from postquant.model import quantized_layers
from postquant.nn import DynamicActQuantizer, quantize_tokens, token_codes
from postquant.reconstruct.params import SteDynamicActQuant, ste_act_quantizers
from tests.conftest import make_tiny_llama

rows = st.integers(1, 6)
cols = st.integers(1, 40)


def _tensor(seed: int, shape: tuple[int, ...], spread: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # rows of very different magnitudes (outlier tokens), some exactly zero
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(*shape[:-1], 1, generator=g) * spread)
    zero = torch.rand(*shape[:-1], 1, generator=g) < 0.2
    return torch.where(zero, torch.zeros_like(x), x)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31), rows, rows, cols, st.sampled_from([2, 4, 8]), st.floats(0, 4))
def test_error_is_at_most_half_a_step_per_row(seed, b, t, c, bits, spread):
    x = _tensor(seed, (b, t, c), spread)
    q, scale = token_codes(x, bits)
    assert scale.shape == (b, t, 1)  # one step per token: a wrong axis gives another shape
    qmax = 2 ** (bits - 1) - 1
    absmax = x.abs().amax(-1, keepdim=True)
    torch.testing.assert_close(scale, torch.where(absmax > 0, absmax / qmax, 1.0), rtol=0, atol=0)
    assert bool((q.abs() <= qmax).all()) and torch.equal(q, q.round())
    err = (quantize_tokens(x, bits) - x).abs()
    assert bool((err <= scale / 2 * (1 + 1e-5)).all())


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31), rows, cols, st.sampled_from([2, 3, 8]), st.floats(0, 4))
def test_quantizing_twice_keeps_the_codes(seed, t, c, bits, spread):
    x = _tensor(seed, (t, c), spread)
    once = quantize_tokens(x, bits)
    q1, s1 = token_codes(x, bits)
    q2, s2 = token_codes(once, bits)
    assert torch.equal(q1, q2)
    torch.testing.assert_close(s2, s1, rtol=2e-7, atol=0)
    torch.testing.assert_close(quantize_tokens(once, bits), once, rtol=2e-7, atol=0)


def test_each_token_has_its_own_step():
    """An outlier token does not coarsen the others (a per-tensor or per-channel step would)."""
    x = torch.tensor([[[0.01, -0.02, 0.03], [100.0, 50.0, -25.0]]])  # (1, 2, 3)
    q, scale = token_codes(x, 8)
    torch.testing.assert_close(scale.reshape(-1), torch.tensor([0.03 / 127, 100.0 / 127]))
    assert torch.equal(q[0, 0], torch.tensor([42.0, -85.0, 127.0]))  # 0.01 / (0.03 / 127) = 42.33...
    assert torch.equal(q[0, 1], torch.tensor([127.0, 64.0, -32.0]))  # 63.5 rounds half to even


def test_zero_rows_give_zeros_not_nan():
    x = torch.zeros(2, 3, 8)
    x[0, 1] = torch.linspace(-1, 1, 8)
    out = DynamicActQuantizer(8)(x)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros(3, 8)) and torch.equal(out[0, 0], torch.zeros(8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtype_is_kept(dtype):
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    out = DynamicActQuantizer(8)(x)
    assert out.dtype == dtype
    expected = quantize_tokens(x.float() if dtype != torch.float64 else x, 8).to(dtype)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_straight_through_passes_gradients_and_has_no_step_to_learn():
    quant = DynamicActQuantizer(4)
    ste = SteDynamicActQuant(quant, 0.0, torch.Generator())
    assert ste.scale is None
    x = torch.randn(3, 7, 12, generator=torch.Generator().manual_seed(2), requires_grad=True)
    out = ste(x)
    torch.testing.assert_close(out.detach(), quant(x.detach()), rtol=0, atol=0)
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # nothing is clipped: d out / d x = 1 everywhere


def test_ste_swap_turns_dynamic_quantizers_into_straight_through_ones_and_back():
    pytest.importorskip("transformers")
    qmodel = postquant.quantize(make_tiny_llama(1), {"w_bits": 4, "a_bits": 8, "act_ranges": "dynamic"})
    layers = quantized_layers(qmodel)
    before = {n: m.act_quant for n, m in layers.items()}
    with ste_act_quantizers(layers, set(layers), set(), 0.0, torch.Generator()) as swapped:
        assert swapped and all(isinstance(q, SteDynamicActQuant) for q in swapped.values())
    assert {n: m.act_quant for n, m in layers.items()} == before
