"""Observers: the selection-based quantiles equal torch.quantile bit for bit; calibration shows progress."""

from __future__ import annotations

import pytest
import torch

from postquant.calib.act_ranges import bn_noise_ranges
from postquant.calib.observers import RangeObserver, quantiles
from tests.calib.test_act_ranges import ConvBN


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


def test_percentile_observer_matches_its_definition():
    """The mean over batches of the torch.quantile of each batch's seeded subsample (as before the change)."""
    x = torch.randn(3, 1 << 21)
    obs = RangeObserver("percentile", percentile=99.99, seed=1)
    expected = []
    for batch in x:
        obs.update(batch)
        expected.append(
            torch.quantile(batch, torch.tensor([1e-4, 1 - 1e-4])).tolist()
        )  # under 2^22: no sample
    lo = sum(e[0] for e in expected) / 3
    hi = sum(e[1] for e in expected) / 3
    assert obs.range(8) == (lo, hi)


def test_bn_noise_calibration_shows_a_progress_bar(capsys, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    bn_noise_ranges(ConvBN().eval(), {"conv": 8, "head": 8}, torch.zeros(2, 3, 8, 8), "percentile", n=128)
    err = capsys.readouterr().err
    assert "activation ranges (bn-noise, percentile)" in err and "4/4" in err  # 2 layers x 2 batches of 64
