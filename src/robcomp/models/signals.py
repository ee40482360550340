"""1-D models for sensor time series (NCL inputs): the HAR CNN and ResNet-18-1d of Kwon & Lee.

Kwon & Lee, "Improving the Robustness of Model Compression by On-Manifold Adversarial
Training", Future Internet 2021, classify UCI HAR's 9 x 128 inertial windows with a small 1-D
CNN (three Conv1d and three Linear layers) and with a ResNet-18 whose convolutions are 1-D
(authors' code: sanglee/MC-ATON, ``src/models/har_clf.py`` and ``src/models/resnet.py``).
Module names follow that code, so its state dicts load. Both take ``in_shape = (C, L)``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from robcomp.models.base import MODELS


def signal_shape(in_shape: Sequence[int], model: str, min_length: int = 1) -> tuple[int, int]:
    """Return ``(C, L)`` from ``in_shape``, or raise a ValueError that names the model."""
    if len(in_shape) != 2:
        raise ValueError(
            f"model {model!r} needs signal inputs (C, L), got in_shape={tuple(in_shape)}"
        )
    channels, length = (int(s) for s in in_shape)
    if channels < 1 or length < min_length:
        raise ValueError(
            f"model {model!r} needs at least 1 channel and {min_length} time steps, "
            f"got in_shape={tuple(in_shape)}"
        )
    return channels, length


def _pooled(length: int) -> int:
    """Length after ``MaxPool1d(4, stride=2, padding=1)``."""
    return (length + 2 - 4) // 2 + 1


class HARCNN(nn.Module):
    """Kwon & Lee (2021)'s HARClassifier: three Conv1d (32, 64, 128 channels, kernel 3,
    padding 1) each followed by MaxPool1d(4, 2, padding 1) and ReLU, then Linear layers
    ``128 * L/8 -> 100 -> 100 -> classes`` with Tanh between them.

    The authors hard-code 9 input channels, 128 steps and 6 classes; here they come from the
    data. Initialisation as theirs: Kaiming-normal (fan-out) convolutions, N(0, 0.01) linears.
    """

    def __init__(self, in_channels: int, length: int, num_classes: int, hidden: int = 100) -> None:
        super().__init__()
        self.conv_layers = nn.Sequential(
            nn.Conv1d(in_channels, 32, 3, 1, 1),
            nn.MaxPool1d(4, 2, 1),
            nn.ReLU(),
            nn.Conv1d(32, 64, 3, 1, 1),
            nn.MaxPool1d(4, 2, 1),
            nn.ReLU(),
            nn.Conv1d(64, 128, 3, 1, 1),
            nn.MaxPool1d(4, 2, 1),
            nn.ReLU(),
        )
        reduced = _pooled(_pooled(_pooled(length)))
        self.fc_layers = nn.Sequential(
            nn.Linear(128 * reduced, hidden),
            nn.Tanh(),
            nn.Linear(hidden, hidden),
            nn.Tanh(),
            nn.Linear(hidden, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv1d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_layers(x)  # (B, 128, L/8)
        return self.fc_layers(x.flatten(1))  # (B, num_classes)


class BasicBlock1d(nn.Module):
    """Two 3-tap conv-BN layers plus the identity (or a 1x1 conv-BN shortcut), then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm1d(planes)
        self.conv2 = nn.Conv1d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm1d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv1d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm1d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x)).relu()  # (B, planes, L/s)
        out = self.bn2(self.conv2(out))  # (B, planes, L/s)
        identity = x if self.downsample is None else self.downsample(x)
        return (out + identity).relu()


class ResNet1d(nn.Module):
    """ResNet (He et al. 2016) with 1-D convolutions, torchvision's layout: a 7-tap stride-2
    stem, a stride-2 max-pool, four stages of basic blocks at ``width * (1, 2, 4, 8)``
    channels (stride 2 from the second), global average pooling and one Linear layer.

    Args:
        blocks: blocks per stage, ``(2, 2, 2, 2)`` for ResNet-18.
        in_channels: input channels.
        num_classes: number of logits.
        width: channels of the stem and first stage (64 in ResNet-18).
    """

    def __init__(
        self, blocks: Sequence[int], in_channels: int, num_classes: int, width: int = 64
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm1d(width)
        self.maxpool = nn.MaxPool1d(3, stride=2, padding=1)
        planes = width
        stages = []
        for i, n in enumerate(blocks):
            out = width * 2**i
            stride = 1 if i == 0 else 2
            layers = [BasicBlock1d(planes, out, stride)]
            layers += [BasicBlock1d(out, out) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layers))
            planes = out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv1d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm1d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.bn1(self.conv1(x)).relu())  # (B, width, L/4)
        x = self.layer1(x)  # (B, width, L/4)
        x = self.layer2(x)  # (B, 2 width, L/8)
        x = self.layer3(x)  # (B, 4 width, L/16)
        x = self.layer4(x)  # (B, 8 width, L/32)
        return self.fc(self.avgpool(x).flatten(1))  # (B, num_classes)


@MODELS.register("har_cnn")
def har_cnn(*, num_classes: int, in_shape: tuple[int, ...], hidden: int = 100) -> nn.Module:
    """Kwon & Lee (2021)'s HAR CNN (3 Conv1d + 3 Linear); signals (C, L) with L >= 8."""
    channels, length = signal_shape(in_shape, "har_cnn", min_length=8)
    if hidden < 1:
        raise ValueError(f"har_cnn: hidden must be a positive integer, got {hidden}")
    return HARCNN(channels, length, num_classes, hidden)


@MODELS.register("resnet18_1d")
def resnet18_1d(*, num_classes: int, in_shape: tuple[int, ...], width: int = 64) -> nn.Module:
    """ResNet-18 with Conv1d/BatchNorm1d (Kwon & Lee 2021's ResNet18-1d); any signal (C, L)."""
    channels, _ = signal_shape(in_shape, "resnet18_1d")
    if width < 1:
        raise ValueError(f"resnet18_1d: width must be a positive integer, got {width}")
    return ResNet1d((2, 2, 2, 2), channels, num_classes, width)
