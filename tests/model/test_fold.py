from __future__ import annotations

import pytest
import torch
from torch import nn

import postquant
from postquant.errors import DataError
from postquant.model import fold_batchnorm, quantizable_layers


def test_fold_gives_equal_outputs_and_removes_bn(tiny_cnn, images):
    folded, pairs = fold_batchnorm(tiny_cnn, images)
    assert pairs == [("conv1", "bn1"), ("conv2", "bn2")]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in tiny_cnn.modules())  # original untouched
    with torch.no_grad():
        torch.testing.assert_close(folded(images), tiny_cnn(images), rtol=1e-5, atol=1e-5)
    assert folded.conv1.bias is not None  # a bias was created for the bias-free conv


class WrongOrder(nn.Module):
    """The BN is registered after the conv but applied to the input, not the conv's output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.bn.running_mean.fill_(0.7)
        self.bn.running_var.fill_(3.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(x))


def test_fold_is_verified_and_refused_when_wrong(images):
    model = WrongOrder().eval()
    folded, pairs = fold_batchnorm(model, images)
    assert pairs == [] and folded is model
    assert isinstance(model.bn, nn.BatchNorm2d)


def test_walker_finds_layers_in_order_with_ignore(tiny_cnn):
    assert list(quantizable_layers(tiny_cnn)) == ["conv1", "conv2", "conv3", "fc"]
    assert list(quantizable_layers(tiny_cnn, ignore=["fc"])) == ["conv1", "conv2", "conv3"]
    assert list(quantizable_layers(tiny_cnn, ignore=["conv*"])) == ["fc"]
    assert list(quantizable_layers(tiny_cnn, ignore=["Linear"])) == ["conv1", "conv2", "conv3"]
    assert list(quantizable_layers(tiny_cnn, ignore=["type:Conv2d"])) == ["fc"]
    assert list(quantizable_layers(tiny_cnn, ignore=["re:^conv[12]$"])) == ["conv3", "fc"]


def test_walker_sees_modulelist_children():
    model = nn.Sequential(nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)]))
    assert list(quantizable_layers(model)) == ["0.0", "0.1"]


def test_nan_example_inputs_are_a_data_error_not_a_silently_skipped_fold(tiny_cnn, images):
    """NaN example inputs used to leave BatchNorm unfolded with only a warning (the check compared NaNs)."""
    bad = images.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN or Inf"):
        fold_batchnorm(tiny_cnn, bad)
    with pytest.raises(DataError, match="NaN or Inf"):
        postquant.quantize(tiny_cnn, {"method": "squant", "w_bits": 4}, example_inputs=bad)
