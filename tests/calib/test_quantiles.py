"""Selection by row extremes: the k most extreme values equal topk's, quantiles equal torch.quantile exactly."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from postquant.calib.quantiles import _ROW, OrderStatistics, quantiles


def _tensor(seed: int, n: int, kind: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen)
    if kind == "relu6":
        return (2 * x + 1).clamp(0, 6)  # ties at both ends
    if kind == "few":
        return torch.randint(-3, 4, (n,), generator=gen).float()  # 7 distinct values
    if kind == "sorted":
        return x.sort().values  # the extremes packed into the first and last rows
    return x


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(1, 40 * _ROW),
    kind=st.sampled_from(["normal", "relu6", "few", "sorted"]),
    fraction=st.floats(0.0, 1.0),
    largest=st.booleans(),
)
def test_extreme_values_equal_topk(seed, n, kind, fraction, largest):
    x = _tensor(seed, n, kind)
    k = max(1, int(fraction * n))
    expected = x.topk(k, largest=largest).values
    torch.testing.assert_close(OrderStatistics(x).values(k, largest), expected, rtol=0, atol=0)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(1 << 14, 1 << 17),
    kind=st.sampled_from(["normal", "relu6", "few", "sorted"]),
    pct=st.floats(50.0, 100.0),
)
def test_quantiles_equal_torch_quantile(seed, n, kind, pct):
    x = _tensor(seed, n, kind)
    probs = [1 - pct / 100, pct / 100]
    assert quantiles(x, probs) == torch.quantile(x, x.new_tensor(probs)).tolist()


@pytest.mark.parametrize("n", [1, _ROW - 1, _ROW, 10 * _ROW + 7])
def test_extremes_are_min_and_max(n):
    x = _tensor(n, n, "normal")
    stats = OrderStatistics(x)
    assert stats.extreme(largest=False) == x.min().item() and stats.extreme(largest=True) == x.max().item()


def test_a_strided_input_is_read_like_its_copy():
    x = _tensor(0, 1 << 16, "normal")[::3]
    assert quantiles(x, [1e-3, 0.999]) == torch.quantile(x.contiguous(), torch.tensor([1e-3, 0.999])).tolist()


def _data(kind: str, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=gen)
    if kind == "relu":
        return x.relu()  # half the values tie at 0
    if kind == "ties":
        return torch.randint(-5, 6, (n,), generator=gen).float()
    if kind == "heavy":
        return x.pow(3) * 1e3
    return x


@pytest.mark.parametrize("kind", ["normal", "relu", "ties", "heavy"])
@pytest.mark.parametrize("n", [1, 7, 20_000, 1_000_003])
@pytest.mark.parametrize("pct", [99.99, 99.9, 99.0, 75.3, 50.0, 100.0])
def test_quantiles_equal_torch_quantile_exactly(kind, n, pct):
    x = _data(kind, n)
    probs = [1 - pct / 100, pct / 100]
    assert quantiles(x, probs) == torch.quantile(x, x.new_tensor(probs)).tolist()
