"""CIFAR-10 ResNets of He et al. 2016 (§4.2), as in akamaster/pytorch_resnet_cifar10 ``resnet.py``.

The layer names match that repository, so its checkpoints load strictly (after stripping the
``module.`` prefix of ``nn.DataParallel``). Unlike the original, the option-A shortcut is a small module
(`ZeroPadShortcut`) rather than a ``LambdaLayer`` wrapping a lambda, so models deep-copy and pickle, and
the ReLUs are modules, so activation quantizers can hook them.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BasicBlock", "CifarResNet", "ZeroPadShortcut", "resnet20", "resnet32", "resnet44", "resnet56"]


class ZeroPadShortcut(nn.Module):
    """Parameter-free "option A" shortcut: subsample by 2, then zero-pad the channel axis.

    Args:
        pad: channels of zeros added on each side (``planes // 4`` when the width doubles).
    """

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, ::2, ::2]  # (N, C, H/2, W/2)
        return F.pad(x, (0, 0, 0, 0, self.pad, self.pad))  # (N, C + 2*pad, H/2, W/2)

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or zero-pad shortcut: ``relu(bn2(conv2(relu(bn1(conv1 x)))) + x)``."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        needs_pad = stride != 1 or in_planes != planes
        self.shortcut: nn.Module = ZeroPadShortcut(planes // 4) if needs_pad else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: a 16-channel stem, three stages of n blocks (16, 32, 64 channels), a linear head.

    Args:
        num_blocks: blocks per stage, e.g. ``(3, 3, 3)`` for ResNet-20.
        num_classes: size of the output.
    """

    def __init__(self, num_blocks: tuple[int, int, int], num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._make_stage(16, 16, num_blocks[0], stride=1)
        self.layer2 = self._make_stage(16, 32, num_blocks[1], stride=2)
        self.layer3 = self._make_stage(32, 64, num_blocks[2], stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _make_stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))  # (N, 16, 32, 32)
        out = self.layer3(self.layer2(self.layer1(out)))  # (N, 64, 8, 8)
        out = self.pool(out).flatten(1)  # (N, 64)
        return self.linear(out)  # (N, num_classes)


def resnet20(num_classes: int = 10) -> CifarResNet:
    """ResNet-20 (0.27 M parameters, 19 Conv2d + 1 Linear)."""
    return CifarResNet((3, 3, 3), num_classes)


def resnet32(num_classes: int = 10) -> CifarResNet:
    """ResNet-32."""
    return CifarResNet((5, 5, 5), num_classes)


def resnet44(num_classes: int = 10) -> CifarResNet:
    """ResNet-44."""
    return CifarResNet((7, 7, 7), num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    """ResNet-56 (0.85 M parameters, 55 Conv2d + 1 Linear)."""
    return CifarResNet((9, 9, 9), num_classes)
