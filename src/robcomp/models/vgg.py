"""CIFAR VGG-16 with BatchNorm (Simonyan & Zisserman, ICLR 2015; CIFAR variant of Li et al.,
"Pruning Filters for Efficient ConvNets", ICLR 2017, as used by HYDRA, Sehwag et al. 2020)."""

from __future__ import annotations

from torch import Tensor, nn

from robcomp.models._shape import image_shape
from robcomp.models.base import MODELS
from robcomp.models.small import maybe_pool

VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip


class VGG(nn.Module):
    """VGG feature stack (3x3 conv-BN-ReLU, 2x2 max-pools), global average pool, one linear.

    A max-pool is replaced by Identity once the feature map is 1 pixel wide, so inputs smaller
    than 32x32 work; layer indices in ``features`` stay the same for every input size.

    Args:
        cfg: channel counts, with ``"M"`` for a max-pool.
        num_classes: number of logits.
        in_channels: input channels.
        height, width: input size, to decide which pools to keep.
    """

    def __init__(
        self,
        cfg: tuple[int | str, ...],
        num_classes: int,
        in_channels: int = 3,
        height: int = 32,
        width: int = 32,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for v in cfg:
            if v == "M":
                pool, height, width = maybe_pool(height, width)
                layers.append(pool)
            else:
                out = int(v)
                layers += [
                    nn.Conv2d(channels, out, 3, padding=1, bias=False),
                    nn.BatchNorm2d(out),
                    nn.ReLU(),
                ]
                channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)  # (B, 512, H/32, W/32)
        return self.classifier(self.pool(x).flatten(1))  # (B, num_classes)


@MODELS.register("vgg16")
def vgg16(*, num_classes: int, in_shape: tuple[int, ...]) -> nn.Module:
    """CIFAR VGG-16-BN (Li et al. 2017), 14.7M parameters; any image size."""
    channels, height, width = image_shape(in_shape, "vgg16")
    return VGG(VGG16_CFG, num_classes, channels, height, width)
