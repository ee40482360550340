"""torchvision's ImageNet architectures adapted to small inputs and any channel count.

Weights are never downloaded. A network starts from random initialization, or (ResNets,
``weights: torchvision``) from torchvision's ImageNet weights already in the user's torch hub
cache, as Shen et al. (2024) fine-tune ImageNet-pretrained ResNets on Office-31.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchvision import models as tvm

from robcomp.models._shape import image_shape
from robcomp.models.base import MODELS
from robcomp.models.capabilities import input_statistics

Stem = Literal["cifar", "torchvision"]

# The statistics torchvision's ImageNet weights were trained with: set them as the model's
# mean/std to feed a pretrained network the inputs it expects.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _imagenet_when_pretrained(
    options: Mapping[str, Any], channels: int
) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """ImageNet's statistics for a model built from torchvision's ImageNet weights (Shen et al.
    2024 fine-tune with the pretrained transforms); a grey input, whose first layer sums the RGB
    filters, gets their channel means."""
    if not options.get("weights"):
        return None
    if channels == 1:
        return (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
    return IMAGENET_MEAN, IMAGENET_STD


_WEIGHT_ENUMS: dict[str, type[tvm.WeightsEnum]] = {
    "resnet18": tvm.ResNet18_Weights,
    "resnet34": tvm.ResNet34_Weights,
    "resnet50": tvm.ResNet50_Weights,
}


def _kaiming_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """Initialize a replaced convolution the way torchvision initializes its own."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def pretrained_path(name: str, weights: str = "torchvision") -> Path:
    """Where torchvision keeps the ImageNet weights ``weights`` of ``name`` in the torch hub
    cache (``torch.hub.get_dir()/checkpoints/<torchvision's file name>``; ``TORCH_HOME`` moves
    it). ``torchvision`` means ``IMAGENET1K_V1``, the original weights; any other value is the
    name of one of the architecture's torchvision weights (``IMAGENET1K_V2``)."""
    enum = _WEIGHT_ENUMS.get(name)
    if enum is None:
        raise ValueError(f"model {name!r}: weights are available for {', '.join(_WEIGHT_ENUMS)}")
    choice = "IMAGENET1K_V1" if weights == "torchvision" else weights
    if choice not in enum.__members__:
        allowed = ", ".join(["torchvision", *enum.__members__])
        raise ValueError(f"model {name!r}: weights must be one of {allowed}; got {weights!r}")
    filename = enum[choice].url.rsplit("/", 1)[-1]
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def pretrained_state_dict(name: str, weights: str = "torchvision") -> dict[str, Tensor]:
    """The ImageNet weights of ``name`` read from the torch hub cache, never downloaded.

    Raises:
        FileNotFoundError: the file is not in the cache; the message says where we looked and
            the one command that downloads it.
    """
    path = pretrained_path(name, weights)
    if not path.is_file():
        choice = "IMAGENET1K_V1" if weights == "torchvision" else weights
        raise FileNotFoundError(
            f"model {name!r}: weights {weights!r} are read from the torch hub cache, and "
            f"{path} does not exist. Download them once (needs network) with: python -c "
            f"\"import torchvision; torchvision.models.{name}(weights='{choice}')\" "
            "(set TORCH_HOME to use another cache)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: one line naming it
        raise ValueError(f"model {name!r}: cannot read weights {path}: {err}") from None
    if not isinstance(state, dict):
        raise ValueError(f"model {name!r}: {path} holds {type(state).__name__}, not a state dict")
    return state


def _load_pretrained(net: tvm.ResNet, name: str, weights: str, channels: int) -> None:
    """Load ImageNet weights into ``net`` in place, keeping its own (new) classifier head."""
    state = pretrained_state_dict(name, weights)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    if channels == 1 and "conv1.weight" in state:  # grey = RGB with equal channels: sum filters
        state["conv1.weight"] = state["conv1.weight"].sum(dim=1, keepdim=True)
    own = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    wrong = sorted(set(own) ^ set(state)) or [
        k for k, v in own.items() if tuple(v.shape) != tuple(state[k].shape)
    ]
    if wrong:
        raise ValueError(
            f"model {name!r}: weights {pretrained_path(name, weights)} do not fit the "
            f"architecture (keys missing, unexpected or of another shape: {wrong[:5]})"
        )
    if next(net.parameters()).is_meta:  # a shape check (the runner's preflight): no values
        return
    net.load_state_dict(state, strict=False)


def _resnet(
    builder: Callable[..., tvm.ResNet],
    name: str,
    num_classes: int,
    in_shape: tuple[int, ...],
    stem: str,
    weights: str | None = None,
) -> tvm.ResNet:
    channels, _, _ = image_shape(in_shape, name)
    if stem not in ("cifar", "torchvision"):
        raise ValueError(f"model {name!r}: stem must be 'cifar' or 'torchvision', got {stem!r}")
    if weights is not None and (stem != "torchvision" or channels not in (1, 3)):
        raise ValueError(
            f"model {name!r}: weights {weights!r} need stem: torchvision (the 7x7 stem they were "
            f"trained with) and 1 or 3 input channels; got stem {stem!r}, {channels} channels"
        )
    net = builder(weights=None, num_classes=num_classes)
    if stem == "cifar":
        # 3x3 stride-1 stem without max-pool: 32x32 inputs keep 32x32 maps in the first stage.
        net.conv1 = _kaiming_conv(nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False))
        net.maxpool = nn.Identity()
    elif channels != 3:
        net.conv1 = _kaiming_conv(nn.Conv2d(channels, 64, 7, stride=2, padding=3, bias=False))
    if weights is not None:
        _load_pretrained(net, name, weights, channels)
    return net


@MODELS.register("resnet18")
@input_statistics(_imagenet_when_pretrained)
def resnet18(
    *,
    num_classes: int,
    in_shape: tuple[int, ...],
    stem: Stem = "cifar",
    weights: str | None = None,
) -> nn.Module:
    """ResNet-18 (He et al. 2016) from torchvision.

    Args:
        num_classes: number of logits.
        in_shape: input shape (C, H, W).
        stem: ``"cifar"`` (3x3 stride-1 conv, no max-pool; for 32x32 inputs) or
            ``"torchvision"`` (the ImageNet 7x7 stride-2 conv and max-pool).
        weights: ``None`` (random initialization), ``"torchvision"`` (torchvision's original
            ImageNet weights, ``IMAGENET1K_V1``) or the name of another of its ImageNet weights,
            read from the torch hub cache (never downloaded; see :func:`pretrained_path`).
            Needs ``stem: torchvision``; the classifier head is new (``num_classes`` logits),
            and a grey input sums the first layer's RGB filters. The weights expect ImageNet
            normalization, which the model gets unless ``model.mean``/``model.std`` are set.
    """
    return _resnet(tvm.resnet18, "resnet18", num_classes, in_shape, stem, weights)


@MODELS.register("resnet34")
@input_statistics(_imagenet_when_pretrained)
def resnet34(
    *,
    num_classes: int,
    in_shape: tuple[int, ...],
    stem: Stem = "cifar",
    weights: str | None = None,
) -> nn.Module:
    """ResNet-34 (He et al. 2016) from torchvision; ``stem`` and ``weights`` as in
    :func:`resnet18`."""
    return _resnet(tvm.resnet34, "resnet34", num_classes, in_shape, stem, weights)


@MODELS.register("resnet50")
@input_statistics(_imagenet_when_pretrained)
def resnet50(
    *,
    num_classes: int,
    in_shape: tuple[int, ...],
    stem: Stem = "cifar",
    weights: str | None = None,
) -> nn.Module:
    """ResNet-50 (He et al. 2016, bottleneck blocks) from torchvision; ``stem`` and ``weights``
    as in :func:`resnet18` (``"torchvision"`` is ``IMAGENET1K_V1``; ``IMAGENET1K_V2`` is the
    newer recipe)."""
    return _resnet(tvm.resnet50, "resnet50", num_classes, in_shape, stem, weights)


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
