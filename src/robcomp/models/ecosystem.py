"""Models from the ecosystem: ``timm:<name>`` and ``torchvision:<name>``.

``timm:resnet18`` is built by ``timm.create_model`` (Wightman 2019, huggingface/pytorch-image-
models; the optional extra ``pip install 'robcomp[timm]'``) and ``torchvision:resnet18`` by
torchvision's builder of that name, both with ``num_classes`` logits and the input's channel
count, and both behind robcomp's Normalize like every other model (see :func:`create`).

Weights never come from the network: ``pretrained``/``weights`` options are refused, and a
checkpoint is loaded from a local file through ``model.weights`` (safetensors, or a PyTorch file
read with ``weights_only=True``). These names import no code of the user's, so a checkpoint's
spec.json may name them without ``--trust-code``.
"""

from __future__ import annotations

import difflib
import importlib
import logging
from collections.abc import Callable
from typing import Any

from torch import nn

from robcomp.models._shape import image_shape

log = logging.getLogger(__name__)

PREFIXES = ("timm", "torchvision")
TIMM_INSTALL = "pip install 'robcomp[timm]'"

# Options that would make timm or torchvision fetch or unpickle weights themselves.
_REFUSED = {
    "timm": ("pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path"),
    "torchvision": ("weights_backbone",),
}


def is_ecosystem(name: str) -> bool:
    """Whether ``name`` is ``timm:<model>`` or ``torchvision:<model>``."""
    prefix, sep, _ = name.partition(":")
    return bool(sep) and prefix in PREFIXES


def ecosystem_factory(name: str) -> Callable[..., nn.Module]:
    """The factory of ``timm:<model>`` or ``torchvision:<model>``:
    ``factory(num_classes=..., in_shape=..., **options)``, as every registered model's.

    Raises:
        ValueError: an unknown model (with the closest names), or timm is not installed.
    """
    prefix, _, model = name.partition(":")
    if prefix == "timm":
        return _timm_factory(name, model)
    if prefix == "torchvision":
        return _torchvision_factory(name, model)
    raise ValueError(f"model {name!r}: the prefix must be one of {', '.join(PREFIXES)}")


def _unknown(name: str, model: str, known: list[str], where: str) -> ValueError:
    close = difflib.get_close_matches(model, known, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ValueError(f"model {name!r}: {where} has no classification model {model!r}{hint}")


def _refuse_downloads(name: str, prefix: str, options: dict[str, Any]) -> None:
    for key in _REFUSED[prefix]:
        if options.get(key) is not None:
            raise ValueError(
                f"model {name!r}: option {key!r} is not allowed: robcomp reads weights only "
                "from a local file, set as model.weights (safetensors or a PyTorch state dict)"
            )


def _timm_factory(name: str, model: str) -> Callable[..., nn.Module]:
    try:
        timm: Any = importlib.import_module("timm")
    except ImportError:
        raise ValueError(
            f"model {name!r} is built by timm, which is not installed; install it with: "
            f"{TIMM_INSTALL}"
        ) from None
    if not timm.is_model(model):
        raise _unknown(name, model, timm.list_models(), "timm")

    def build(
        *, num_classes: int, in_shape: tuple[int, ...], pretrained: bool = False, **options: Any
    ) -> nn.Module:
        if pretrained:
            raise ValueError(
                f"model {name!r}: pretrained: true would download weights, and robcomp reads "
                "weights only from local files: set model.weights to the file (and "
                "model.mean/std to the statistics it was trained with)"
            )
        _refuse_downloads(name, "timm", options)
        channels, _, _ = image_shape(in_shape, name)
        try:
            net: nn.Module = timm.create_model(
                model, pretrained=False, num_classes=num_classes, in_chans=channels, **options
            )
        except TypeError as err:  # an option the architecture does not take
            raise ValueError(f"model {name!r}: {err}") from None
        return net

    build.__doc__ = f"{name}: timm.create_model({model!r}, pretrained=False, ...)."
    return build


def _torchvision_factory(name: str, model: str) -> Callable[..., nn.Module]:
    from torchvision import models as tvm

    known = tvm.list_models(module=tvm)  # classification builders only
    if model not in known:
        raise _unknown(name, model, known, "torchvision")
    builder = tvm.get_model_builder(model)

    def build(
        *, num_classes: int, in_shape: tuple[int, ...], weights: Any = None, **options: Any
    ) -> nn.Module:
        if weights is not None:
            raise ValueError(
                f"model {name!r}: option weights={weights!r} would download weights, and "
                "robcomp reads weights only from local files: set model.weights to the file "
                "(and model.mean/std to the statistics it was trained with)"
            )
        _refuse_downloads(name, "torchvision", options)
        channels, _, _ = image_shape(in_shape, name)
        try:
            net: nn.Module = builder(weights=None, num_classes=num_classes, **options)
        except TypeError as err:
            raise ValueError(f"model {name!r}: {err}") from None
        if channels != 3:
            _adapt_first_conv(net, channels, name)
        return net

    build.__doc__ = f"{name}: torchvision.models.{model}(weights=None, ...)."
    return build


def _adapt_first_conv(net: nn.Module, channels: int, name: str) -> None:
    """Replace the first 3-channel Conv2d by one taking ``channels`` (torchvision's builders
    assume RGB; timm does the same through ``in_chans``), initialized as torchvision does."""
    for path, module in net.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            conv = nn.Conv2d(
                channels,
                module.out_channels,
                module.kernel_size,  # type: ignore[arg-type]
                stride=module.stride,  # type: ignore[arg-type]
                padding=module.padding,  # type: ignore[arg-type]
                dilation=module.dilation,  # type: ignore[arg-type]
                groups=1,
                bias=module.bias is not None,
                padding_mode=module.padding_mode,
            )
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
            parent_path, _, attr = path.rpartition(".")
            setattr(net.get_submodule(parent_path), attr, conv)
            log.info("%s: first convolution %s takes %d channels, not 3", name, path, channels)
            return
    raise ValueError(
        f"model {name!r} takes 3 input channels and has no first 3-channel Conv2d to adapt; "
        f"the data has {channels}"
    )
