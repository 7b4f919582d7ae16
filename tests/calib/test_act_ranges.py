from __future__ import annotations

import pytest
import torch
from torch import nn

from postquant.calib.act_ranges import (
    NOISE_STD_MULTIPLIER,
    bn_matched,
    bn_noise_ranges,
    centred_channel_std,
    input_hooks,
    reference_noise_range,
)
from postquant.calib.observers import make_observer


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
    mm = make_observer("minmax")
    pct = make_observer("percentile", percentile=99.9)
    mse = make_observer("mse")
    for obs in (mm, pct, mse):
        obs.update(x[:50000])
        obs.update(x[50000:])
    assert mm.range(4) == (x.min().item(), 50.0)
    assert pct.range(4)[1] < 5.0  # the outlier does not set the range
    assert 0 < mse.range(4)[1] < 50.0
    with pytest.raises(RuntimeError):
        make_observer().range(4)


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


@pytest.mark.parametrize(
    "shape, channels_last",
    [
        ((8, 5, 6, 7), False),
        ((8, 5, 6, 7), True),
        ((8, 5, 9), False),
        ((40, 5), False),
        ((3, 5, 2, 2, 2), False),
    ],
    ids=["nchw", "channels_last", "ncl", "nc", "ncdhw"],
)
def test_centred_channel_std_is_the_channel_std(shape, channels_last):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 4 + 2
    dims = [d for d in range(x.dim()) if d != 1]
    y = x - x.mean(dim=dims, keepdim=True)
    if channels_last:
        y = y.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(centred_channel_std(y), y.std(dim=dims), rtol=1e-5, atol=0)


def _reference_bn_noise_ranges(model: nn.Module, names: list[str], noise: torch.Tensor) -> dict:
    """Min/max inputs of `names` with the re-standardisation written as before the speed-up, in NCHW."""

    def restandardise(bn, args):
        x = args[0]
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, -1] + [1] * (x.dim() - 2)
        mean, std = x.mean(dim=dims, keepdim=True), x.std(dim=dims, keepdim=True).clamp(min=1e-6)
        target = torch.sqrt(bn.running_var + bn.eps).reshape(shape)
        return ((x - mean) / std * target + bn.running_mean.reshape(shape),)

    seen: dict[str, list[float]] = {}

    def record(name, _, x):
        lo, hi = seen.get(name, [float("inf"), float("-inf")])
        seen[name] = [min(lo, x.min().item()), max(hi, x.max().item())]

    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    handles = [bn.register_forward_pre_hook(restandardise) for bn in bns]
    try:
        with torch.no_grad(), input_hooks({n: model.get_submodule(n) for n in names}, record):
            for batch in noise.split(64):
                model(batch)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_bn_noise_ranges_agree_with_the_nchw_reference_and_leave_the_model_alone():
    torch.manual_seed(0)
    model = ConvBN()  # in train mode: the ranges use its running statistics, and its mode stays
    before = {k: v.clone() for k, v in model.state_dict().items()}
    example = torch.zeros(1, 3, 8, 8)
    ranges = bn_noise_ranges(model, {"conv": 8, "head": 8}, example, "minmax", seed=2, n=200, progress=False)
    assert model.training and all(m.training for m in model.modules())
    noise = torch.randn(200, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    reference = _reference_bn_noise_ranges(model.eval(), ["conv", "head"], noise)
    for name in ("conv", "head"):
        torch.testing.assert_close(
            torch.tensor(ranges[name]), torch.tensor(reference[name]), rtol=1e-5, atol=1e-6
        )
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].is_contiguous() for k in before)


class Flattening(ConvBN):
    """A forward that views an activation: it runs only on NCHW (contiguous) tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(self.bn(self.conv(x)))
        return self.fc(y.view(y.shape[0], -1))


def test_bn_noise_runs_a_model_that_needs_nchw_again_in_nchw(caplog):
    model = Flattening().eval()
    with caplog.at_level("INFO", logger="postquant.calib.act_ranges"):
        ranges = bn_noise_ranges(
            model, {"conv": 8, "fc": 8}, torch.zeros(1, 3, 8, 8), "minmax", n=64, progress=False
        )
    assert "channels-last" in caplog.text
    noise = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    reference = _reference_bn_noise_ranges(model, ["conv", "fc"], noise)
    for name in ("conv", "fc"):
        torch.testing.assert_close(
            torch.tensor(ranges[name]), torch.tensor(reference[name]), rtol=1e-5, atol=1e-6
        )
