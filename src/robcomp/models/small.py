"""Small networks: tiny test models, the on-manifold paper's LeNet, and TRADES' SmallCNN."""

from __future__ import annotations

import math
from collections import OrderedDict

from torch import Tensor, nn

from robcomp.models._shape import image_shape
from robcomp.models.base import MODELS


def maybe_pool(height: int, width: int) -> tuple[nn.Module, int, int]:
    """A 2x2 max-pool and the size after it, or Identity once a side is down to 1 pixel.

    Skipping the pool lets the same architecture run on inputs as small as 4x4 or 1x1.
    """
    if min(height, width) < 2:
        return nn.Identity(), height, width
    return nn.MaxPool2d(2, 2), height // 2, width // 2


class TinyMLP(nn.Module):
    """A one-hidden-layer perceptron, for fast tests."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)  # (B, C*H*W)
        return self.fc2(self.fc1(x).relu())  # (B, num_classes)


class TinyCNN(nn.Module):
    """Two 3x3 conv-BN-ReLU layers (16, 32 channels; the second with stride 2), for fast tests."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn1(self.conv1(x)).relu()  # (B, 16, H, W)
        x = self.bn2(self.conv2(x)).relu()  # (B, 32, ceil(H/2), ceil(W/2))
        return self.fc(self.pool(x).flatten(1))  # (B, num_classes)


class LeNet5(nn.Module):
    """The modified LeNet of Kwon & Lee, "Improving the Robustness of Model Compression by
    On-Manifold Adversarial Training", Future Internet 2021.

    Two 3x3 convolutions (32, 64 channels, padding 1) each followed by LeakyReLU and a 2x2
    max-pool, then fully connected 64 -> 32 -> classes. Adaptive average pooling to 1x1 before
    the classifier, and skipping a max-pool once the map is 1 pixel wide, make it run on inputs
    from 1x4x4 (the paper's 16-D simulation data) up to 3x32x32.
    """

    def __init__(self, in_channels: int, num_classes: int, height: int, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1)
        self.pool1, height, width = maybe_pool(height, width)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.pool2, height, width = maybe_pool(height, width)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, num_classes)
        self.act = nn.LeakyReLU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(self.act(self.conv1(x)))  # (B, 32, H/2, W/2)
        x = self.pool2(self.act(self.conv2(x)))  # (B, 64, H/4, W/4)
        x = self.avgpool(x).flatten(1)  # (B, 64)
        return self.fc2(self.act(self.fc1(x)))  # (B, num_classes)


class SmallCNN(nn.Module):
    """The MNIST SmallCNN of TRADES (Zhang et al., "Theoretically Principled Trade-off between
    Robustness and Accuracy", ICML 2019).

    Module names match the TRADES code so its checkpoints load. An adaptive average pool to 4x4
    (a no-op on 28x28 inputs) lets it run on any input of at least 16x16. As in TRADES, the last
    layer starts at zero, so an untrained model outputs zero logits with zero input gradient.
    """

    def __init__(self, in_channels: int, num_classes: int, drop: float = 0.5) -> None:
        super().__init__()
        self.feature_extractor = nn.Sequential(
            OrderedDict(
                [
                    ("conv1", nn.Conv2d(in_channels, 32, 3)),
                    ("relu1", nn.ReLU()),
                    ("conv2", nn.Conv2d(32, 32, 3)),
                    ("relu2", nn.ReLU()),
                    ("maxpool1", nn.MaxPool2d(2, 2)),
                    ("conv3", nn.Conv2d(32, 64, 3)),
                    ("relu3", nn.ReLU()),
                    ("conv4", nn.Conv2d(64, 64, 3)),
                    ("relu4", nn.ReLU()),
                    ("maxpool2", nn.MaxPool2d(2, 2)),
                ]
            )
        )
        self.pool = nn.AdaptiveAvgPool2d((4, 4))
        fc3 = nn.Linear(200, num_classes)
        self.classifier = nn.Sequential(
            OrderedDict(
                [
                    ("fc1", nn.Linear(64 * 4 * 4, 200)),
                    ("relu1", nn.ReLU()),
                    ("drop", nn.Dropout(drop)),
                    ("fc2", nn.Linear(200, 200)),
                    ("relu2", nn.ReLU()),
                    ("fc3", fc3),
                ]
            )
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.zeros_(fc3.weight)
        nn.init.zeros_(fc3.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.feature_extractor(x)  # (B, 64, 4, 4) for 28x28 inputs
        x = self.pool(x).flatten(1)  # (B, 1024)
        return self.classifier(x)  # (B, num_classes)


@MODELS.register("tiny_mlp")
def tiny_mlp(*, num_classes: int, in_shape: tuple[int, ...], hidden: int = 64) -> nn.Module:
    """Flatten -> Linear(hidden) -> ReLU -> Linear; any input shape."""
    return TinyMLP(math.prod(in_shape), num_classes, hidden)


@MODELS.register("tiny_cnn")
def tiny_cnn(*, num_classes: int, in_shape: tuple[int, ...]) -> nn.Module:
    """Two conv-BN-ReLU layers and a linear head; any image size."""
    channels, _, _ = image_shape(in_shape, "tiny_cnn")
    return TinyCNN(channels, num_classes)


@MODELS.register("lenet5")
def lenet5(*, num_classes: int, in_shape: tuple[int, ...]) -> nn.Module:
    """Kwon & Lee (2021)'s modified LeNet; images from 1x1 pixels up."""
    channels, height, width = image_shape(in_shape, "lenet5")
    return LeNet5(channels, num_classes, height, width)


@MODELS.register("small_cnn")
def small_cnn(*, num_classes: int, in_shape: tuple[int, ...], drop: float = 0.5) -> nn.Module:
    """TRADES' SmallCNN (Zhang et al. 2019); images of at least 16x16."""
    channels, _, _ = image_shape(in_shape, "small_cnn", min_size=16)
    return SmallCNN(channels, num_classes, drop)
