"""Small networks: tiny test models, LeNet-5, the on-manifold paper's LeNet, TRADES' SmallCNN."""

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
    """LeNet-5 of LeCun et al., "Gradient-Based Learning Applied to Document Recognition",
    Proc. IEEE 1998, with the changes every modern reimplementation makes.

    C1 conv 5x5 (6) -> S2 pool 2x2 -> C3 conv 5x5 (16) -> S4 pool 2x2 -> C5 fc 120 -> F6 fc 84
    -> output fc ``num_classes``: 61,706 parameters on 1x28x28 with 10 classes.

    Kept from the paper: the layers, their sizes and the 32x32 field. The paper feeds a 28x28
    digit centred in a 32x32 image, so the first convolution pads a side shorter than 32 pixels
    by 2 (MNIST: the paper's 28x28 C1 maps) and leaves a side of 32 or more as it is (the
    original on 32x32 inputs, e.g. MNIST-M). Every size from 28 to 32 pixels thus reaches S4 at
    the paper's 16x5x5 and has the same fully connected layers; other sizes change only C5's
    input width (16x16 USPS: 16x2x2). The smallest input is 12x12, the first that leaves S4 a
    map of at least one pixel.

    Changed, as in modern reimplementations (and the LeNets behind the published source-only
    MNIST->USPS baselines, e.g. ADDA's, Tzeng et al. CVPR 2017): ReLU instead of the scaled
    tanh, 2x2 max-pooling instead of the trainable average subsampling, a full C3 connection
    table instead of the paper's partial one (which gives 60,000 parameters), and a linear
    output with cross-entropy instead of the Euclidean RBF units. ReLU and max-pooling are also
    what the rest of the zoo uses, so comparisons between zoo models differ only in their
    layers. Shen et al. (2024) use no LeNet (their networks are ResNets on Office-31), so their
    paper fixes neither choice.
    """

    min_size = 12

    def __init__(self, in_channels: int, num_classes: int, height: int, width: int) -> None:
        super().__init__()
        pad = (_lecun_padding(height), _lecun_padding(width))
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=pad)  # C1
        self.pool1 = nn.MaxPool2d(2, 2)  # S2
        self.conv2 = nn.Conv2d(6, 16, 5)  # C3
        self.pool2 = nn.MaxPool2d(2, 2)  # S4
        height, width = (_lenet_features(s + 2 * p) for s, p in zip((height, width), pad))
        self.fc1 = nn.Linear(16 * height * width, 120)  # C5
        self.fc2 = nn.Linear(120, 84)  # F6
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(self.conv1(x).relu())  # (B, 6, (H+2p-4)/2, ...): 14x14 on 28x28
        x = self.pool2(self.conv2(x).relu())  # (B, 16, 5, 5) on 28x28 and 32x32
        x = self.fc1(x.flatten(1)).relu()  # (B, 120)
        return self.fc3(self.fc2(x).relu())  # (B, num_classes)


def _lecun_padding(side: int) -> int:
    """C1's padding on one side: 2 below 32 pixels (a 28x28 digit in LeNet-5's 32x32 field)."""
    return 2 if side < 32 else 0


def _lenet_features(side: int) -> int:
    """S4's size from the padded input's: 5x5 conv, 2x2 pool, 5x5 conv, 2x2 pool."""
    return ((side - 4) // 2 - 4) // 2


class KwonLeNet(nn.Module):
    """The modified LeNet of Kwon & Lee, "Improving the Robustness of Model Compression by
    On-Manifold Adversarial Training", Future Internet 2021 (Sec. 5.1): not LeNet-5.

    Two convolutions (32, 64 channels, padding 1) each followed by LeakyReLU and a 2x2
    max-pool, then fully connected 64 -> 32 -> classes; 21,226 parameters on 1x28x28 with 10
    classes. The paper gives 5x5 kernels and 32/64 channels for its simulation (64/128 for
    MNIST) but no fully connected widths; these are 3x3. Adaptive average pooling to 1x1 before
    the classifier, and skipping a max-pool once the map is 1 pixel wide, make it run on inputs
    from 1x4x4 (the paper's 16-D simulation data) up to 3x32x32, and on 1x1 pixels.
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
    """LeNet-5 (LeCun et al. 1998) with ReLU and max-pooling; images of at least 12x12."""
    if len(in_shape) == 3 and min(in_shape[1:]) < LeNet5.min_size:
        raise ValueError(
            f"model 'lenet5' needs images of at least {LeNet5.min_size}x{LeNet5.min_size} "
            f"pixels (two 5x5 convolutions and two 2x2 pools), got in_shape={tuple(in_shape)}; "
            "resize the data or use 'kwon_lenet', which runs on inputs from 1x1"
        )
    channels, height, width = image_shape(in_shape, "lenet5")
    return LeNet5(channels, num_classes, height, width)


@MODELS.register("kwon_lenet")
def kwon_lenet(*, num_classes: int, in_shape: tuple[int, ...]) -> nn.Module:
    """Kwon & Lee (2021)'s modified LeNet; images from 1x1 pixels up."""
    channels, height, width = image_shape(in_shape, "kwon_lenet")
    return KwonLeNet(channels, num_classes, height, width)


@MODELS.register("small_cnn")
def small_cnn(*, num_classes: int, in_shape: tuple[int, ...], drop: float = 0.5) -> nn.Module:
    """TRADES' SmallCNN (Zhang et al. 2019); images of at least 16x16."""
    channels, _, _ = image_shape(in_shape, "small_cnn", min_size=16)
    return SmallCNN(channels, num_classes, drop)
