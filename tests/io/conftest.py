"""Fixtures for the io tests: a small CNN with BatchNorms (folded and not) and the shared ResNet-20."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from postquant.paths import shared_path
from tests.conftest import randomize_bn


class SmallNet(nn.Module):
    """conv-BN-ReLU x2, conv-ReLU, pooling, an unfoldable BatchNorm1d and a linear head."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, width, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(width, 16, 1)
        self.relu3 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.bn3 = nn.BatchNorm1d(16)  # follows the pooling, not a conv: stays a BatchNorm
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.conv3(x))
        return self.fc(self.bn3(self.pool(x).flatten(1)))


def make_small_net(seed: int = 0, width: int = 16) -> SmallNet:
    torch.manual_seed(seed)
    model = SmallNet(width)
    randomize_bn(model.bn1, model.bn2, model.bn3)
    return model.eval()


@pytest.fixture
def small_net() -> SmallNet:
    return make_small_net()


@pytest.fixture
def net_factory():
    """`make_small_net(seed, width)`, for tests that need a second or a differently shaped model."""
    return make_small_net


@pytest.fixture
def batches() -> list[torch.Tensor]:
    """Calibration/test inputs: 4 batches of 16 images of 3x16x16."""
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 3, 16, 16, generator=g) for _ in range(4)]


@pytest.fixture(scope="session")
def resnet20():
    path = shared_path("models", "cifar10", "resnet20.th")
    if not path.exists():
        pytest.skip(f"shared data not found at {path}; set POSTQUANT_SHARED to the folder holding it")
    from postquant_lab.zoo import load_model

    return load_model("resnet20-cifar10")


@pytest.fixture(scope="session")
def cifar_images(resnet20) -> torch.Tensor:
    """512 CIFAR-10 test images spread over the classes (skip if the data is missing)."""
    if resnet20.eval_data is None or not resnet20.eval_data.exists():
        pytest.skip(f"CIFAR-10 test set not found at {resnet20.eval_data}")
    return torch.cat([x for x, _ in resnet20.eval_batches(limit=512, batch_size=256)])
