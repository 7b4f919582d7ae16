from __future__ import annotations

import pytest
import torch
from torch import nn

from postquant.calib.act_ranges import (
    NOISE_STD_MULTIPLIER,
    bn_matched,
    bn_noise_ranges,
    reference_noise_range,
)
from postquant.calib.observers import RangeObserver


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_reference_rule_unsigned(bits):
    torch.manual_seed(0)
    x = torch.randn(10000).relu()
    lo, hi = reference_noise_range(x, bits)
    alpha = NOISE_STD_MULTIPLIER[bits] * x[x > 0].std().item()
    if bits < 6:
        alpha = min(alpha, x.max().item())
    assert lo == 0.0 and hi == pytest.approx(alpha, rel=1e-5)


def test_reference_rule_signed_is_symmetric_and_capped():
    torch.manual_seed(0)
    x = torch.randn(10000)
    lo, hi = reference_noise_range(x, 8)
    assert lo == -hi and hi == pytest.approx(25 * x.std().item() / 1.25, rel=1e-5)
    _, hi4 = reference_noise_range(x, 4)
    assert hi4 == pytest.approx(x.abs().max().item())  # 12*std/1.25 > max for Gaussian data: capped


def test_observers():
    x = torch.cat([torch.randn(100000), torch.tensor([50.0])])
    mm = RangeObserver("minmax")
    pct = RangeObserver("percentile", percentile=99.9)
    mse = RangeObserver("mse")
    for obs in (mm, pct, mse):
        obs.update(x[:50000])
        obs.update(x[50000:])
    assert mm.range(4) == (x.min().item(), 50.0)
    assert pct.range(4)[1] < 5.0  # the outlier does not set the range
    assert 0 < mse.range(4)[1] < 50.0
    with pytest.raises(RuntimeError):
        RangeObserver().range(4)


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)
        self.bn.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0]))
        self.bn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0, 9.0]))
        self.bn.weight.data.copy_(torch.tensor([1.0, 2.0, 0.5, 1.0]))
        self.bn.bias.data.copy_(torch.tensor([0.3, -0.1, 2.0, 1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.conv(x)))


def test_bn_matched_gives_bn_outputs_with_beta_mean_and_gamma_std():
    torch.manual_seed(0)
    model = ConvBN().eval()
    seen = []
    model.head.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with bn_matched(model) as n_bn:
        model(torch.rand(64, 3, 8, 8))
    assert n_bn == 1
    out = seen[0]  # BN output
    mean, std = out.mean(dim=(0, 2, 3)), out.std(dim=(0, 2, 3))
    torch.testing.assert_close(mean, model.bn.bias.detach(), atol=1e-4, rtol=0)
    torch.testing.assert_close(std, model.bn.weight.detach().abs(), atol=1e-3, rtol=1e-3)
    assert all(len(m._forward_pre_hooks) == 0 for m in (model.bn,))  # hooks removed


def test_bn_noise_ranges_are_seeded():
    model = ConvBN().eval()
    x = torch.zeros(2, 3, 8, 8)
    a = bn_noise_ranges(model, {"head": 4}, x, "minmax", seed=3)
    b = bn_noise_ranges(model, {"head": 4}, x, "minmax", seed=3)
    assert a == b and a["head"][0] < 0 < a["head"][1]
