"""Wide ResNets (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016).

This is the variant used by Madry et al. (2018) and TRADES (Zhang et al. 2019) for adversarial
training; module names follow the TRADES code (``conv1``, ``block1.layer.0.bn1``, ...,
``bn1``, ``fc``). TRADES' checkpoints also hold an unused ``sub_block1``, which this version
leaves out: drop those keys before loading such a file.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from robcomp.models._shape import image_shape
from robcomp.models.base import MODELS


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3, BN-ReLU-(dropout)-conv3x3, plus the shortcut.

    When the shape changes, the shortcut is a 1x1 convolution applied to the pre-activated
    input (as in the TRADES code); otherwise it is the identity on the raw input.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.convShortcut: nn.Module | None = None
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.bn1(x).relu()  # (B, C_in, H, W)
        out = self.bn2(self.conv1(pre)).relu()  # (B, C_out, H/s, W/s)
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)  # (B, C_out, H/s, W/s)
        shortcut = x if self.convShortcut is None else self.convShortcut(pre)
        return out + shortcut


class NetworkBlock(nn.Module):
    """A stage of ``n`` wide blocks; the first one changes width and stride."""

    def __init__(
        self, n: int, in_planes: int, out_planes: int, stride: int, drop_rate: float
    ) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *(
                WideBasicBlock(
                    in_planes if i == 0 else out_planes,
                    out_planes,
                    stride if i == 0 else 1,
                    drop_rate,
                )
                for i in range(n)
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k: a 3x3 stem, three stages at 16k/32k/64k channels, BN-ReLU, pool, linear.

    Args:
        depth: 6n + 4 (16, 22, 28, 34, 40, ...).
        widen_factor: the width multiplier k.
        num_classes: number of logits.
        in_channels: input channels.
        drop_rate: dropout between the two convolutions of every block.
    """

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int,
        in_channels: int = 3,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"Wide ResNet depth must be 6n + 4 (16, 22, 28, 34, ...), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)  # (B, 16, H, W)
        x = self.block1(x)  # (B, 16k, H, W)
        x = self.block2(x)  # (B, 32k, H/2, W/2)
        x = self.block3(x)  # (B, 64k, H/4, W/4)
        x = self.bn1(x).relu()
        return self.fc(self.pool(x).flatten(1))  # (B, num_classes)


def wide_resnet(
    depth: int,
    widen_factor: int,
    *,
    num_classes: int,
    in_shape: tuple[int, ...],
    drop_rate: float = 0.0,
) -> WideResNet:
    """Build WRN-``depth``-``widen_factor`` for inputs of shape ``in_shape``."""
    channels, _, _ = image_shape(in_shape, f"wrn_{depth}_{widen_factor}")
    return WideResNet(depth, widen_factor, num_classes, channels, drop_rate)


@MODELS.register("wrn_28_4")
def wrn_28_4(*, num_classes: int, in_shape: tuple[int, ...], drop_rate: float = 0.0) -> nn.Module:
    """WRN-28-4 (Zagoruyko & Komodakis 2016), 5.9M parameters."""
    return wide_resnet(28, 4, num_classes=num_classes, in_shape=in_shape, drop_rate=drop_rate)


@MODELS.register("wrn_34_10")
def wrn_34_10(*, num_classes: int, in_shape: tuple[int, ...], drop_rate: float = 0.0) -> nn.Module:
    """WRN-34-10 (Madry et al. 2018; Zhang et al. 2019), 46M parameters."""
    return wide_resnet(34, 10, num_classes=num_classes, in_shape=in_shape, drop_rate=drop_rate)
