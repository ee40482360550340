"""CIFAR ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, Sec. 4.2).

Module names follow akamaster/pytorch_resnet_cifar10, so its pretrained files load as they are.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from robcomp.models._shape import image_shape
from robcomp.models.base import MODELS


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the channels; it has no parameters.

    The new channels are split evenly before and after the old ones, as in akamaster's code
    (``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4))``); pretrained weights
    depend on that placement.
    """

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.before = (planes - in_planes) // 2
        self.after = planes - in_planes - self.before

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]  # (B, C_in, H/s, W/s)
        return F.pad(x, (0, 0, 0, 0, self.before, self.after))  # (B, C_out, H/s, W/s)

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad=({self.before}, {self.after})"


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus the identity (or an option-A shortcut), then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = PadShortcut(in_planes, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x)).relu()  # (B, planes, H/s, W/s)
        out = self.bn2(self.conv2(out))  # (B, planes, H/s, W/s)
        return (out + self.shortcut(x)).relu()


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for CIFAR: a 3x3 stem, three stages of n blocks at 16/32/64 channels.

    Args:
        depth: 6n + 2 (20, 32, 44, 56, 110, ...).
        num_classes: number of logits.
        in_channels: input channels (3 for CIFAR).
    """

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 (20, 32, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, 16, n, stride=1)
        self.layer2 = self._make_layer(16, 32, n, stride=2)
        self.layer3 = self._make_layer(32, 64, n, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _make_layer(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn1(self.conv1(x)).relu()  # (B, 16, H, W)
        x = self.layer1(x)  # (B, 16, H, W)
        x = self.layer2(x)  # (B, 32, H/2, W/2)
        x = self.layer3(x)  # (B, 64, H/4, W/4)
        return self.linear(self.pool(x).flatten(1))  # (B, num_classes)


def _resnet(depth: int, num_classes: int, in_shape: tuple[int, ...]) -> CifarResNet:
    channels, _, _ = image_shape(in_shape, f"resnet{depth}")
    return CifarResNet(depth, num_classes, channels)


@MODELS.register("resnet20")
def resnet20(*, num_classes: int, in_shape: tuple[int, ...]) -> nn.Module:
    """CIFAR ResNet-20 (He et al. 2016), 0.27M parameters."""
    return _resnet(20, num_classes, in_shape)


@MODELS.register("resnet32")
def resnet32(*, num_classes: int, in_shape: tuple[int, ...]) -> nn.Module:
    """CIFAR ResNet-32 (He et al. 2016), 0.46M parameters."""
    return _resnet(32, num_classes, in_shape)


@MODELS.register("resnet44")
def resnet44(*, num_classes: int, in_shape: tuple[int, ...]) -> nn.Module:
    """CIFAR ResNet-44 (He et al. 2016), 0.66M parameters."""
    return _resnet(44, num_classes, in_shape)


@MODELS.register("resnet56")
def resnet56(*, num_classes: int, in_shape: tuple[int, ...]) -> nn.Module:
    """CIFAR ResNet-56 (He et al. 2016), 0.85M parameters."""
    return _resnet(56, num_classes, in_shape)
