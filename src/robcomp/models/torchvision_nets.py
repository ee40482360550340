"""torchvision's ImageNet architectures adapted to small inputs and any channel count.

Weights are never downloaded: every network starts from random initialization.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from torch import nn
from torchvision import models as tvm

from robcomp.models._shape import image_shape
from robcomp.models.base import MODELS

Stem = Literal["cifar", "torchvision"]


def _kaiming_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """Initialize a replaced convolution the way torchvision initializes its own."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def _resnet(
    builder: Callable[..., tvm.ResNet],
    name: str,
    num_classes: int,
    in_shape: tuple[int, ...],
    stem: str,
) -> tvm.ResNet:
    channels, _, _ = image_shape(in_shape, name)
    if stem not in ("cifar", "torchvision"):
        raise ValueError(f"model {name!r}: stem must be 'cifar' or 'torchvision', got {stem!r}")
    net = builder(weights=None, num_classes=num_classes)
    if stem == "cifar":
        # 3x3 stride-1 stem without max-pool: 32x32 inputs keep 32x32 maps in the first stage.
        net.conv1 = _kaiming_conv(nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False))
        net.maxpool = nn.Identity()
    elif channels != 3:
        net.conv1 = _kaiming_conv(nn.Conv2d(channels, 64, 7, stride=2, padding=3, bias=False))
    return net


@MODELS.register("resnet18")
def resnet18(*, num_classes: int, in_shape: tuple[int, ...], stem: Stem = "cifar") -> nn.Module:
    """ResNet-18 (He et al. 2016) from torchvision.

    Args:
        num_classes: number of logits.
        in_shape: input shape (C, H, W).
        stem: ``"cifar"`` (3x3 stride-1 conv, no max-pool; for 32x32 inputs) or
            ``"torchvision"`` (the ImageNet 7x7 stride-2 conv and max-pool).
    """
    return _resnet(tvm.resnet18, "resnet18", num_classes, in_shape, stem)


@MODELS.register("resnet34")
def resnet34(*, num_classes: int, in_shape: tuple[int, ...], stem: Stem = "cifar") -> nn.Module:
    """ResNet-34 (He et al. 2016) from torchvision; ``stem`` as in :func:`resnet18`."""
    return _resnet(tvm.resnet34, "resnet34", num_classes, in_shape, stem)


@MODELS.register("resnet50")
def resnet50(*, num_classes: int, in_shape: tuple[int, ...], stem: Stem = "cifar") -> nn.Module:
    """ResNet-50 (He et al. 2016, bottleneck blocks) from torchvision; ``stem`` as in
    :func:`resnet18`."""
    return _resnet(tvm.resnet50, "resnet50", num_classes, in_shape, stem)


@MODELS.register("mobilenet_v2")
def mobilenet_v2(
    *, num_classes: int, in_shape: tuple[int, ...], width_mult: float = 1.0
) -> nn.Module:
    """MobileNetV2 (Sandler et al., CVPR 2018) from torchvision.

    The first convolution takes ``in_shape[0]`` channels. For small inputs (H and W <= 64) its
    stride is 1 instead of 2, the usual CIFAR adaptation, so a 32x32 image ends as a 2x2 map
    rather than 1x1; larger inputs keep the ImageNet stride.

    Args:
        num_classes: number of logits.
        in_shape: input shape (C, H, W).
        width_mult: channel multiplier of every layer.
    """
    channels, height, width = image_shape(in_shape, "mobilenet_v2")
    net = tvm.mobilenet_v2(weights=None, num_classes=num_classes, width_mult=width_mult)
    first = net.features[0][0]
    if not isinstance(first, nn.Conv2d):  # guards against a torchvision layout change
        raise TypeError(f"unexpected first layer of torchvision's MobileNetV2: {first}")
    stride = 1 if max(height, width) <= 64 else 2
    net.features[0][0] = _kaiming_conv(
        nn.Conv2d(channels, first.out_channels, 3, stride=stride, padding=1, bias=False)
    )
    return net
