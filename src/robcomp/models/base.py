"""Model registry, the Normalize first layer, and the factory every model comes from."""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robcomp.models.capabilities import builds_from_files
from robcomp.models.ecosystem import ecosystem_factory, is_ecosystem
from robcomp.registry import Registry, code_folders
from robcomp.registry import code_paths as code_paths

# A model factory builds the bare network: factory(num_classes=..., in_shape=..., **options).
ModelFactory = Callable[..., nn.Module]
MODELS: Registry[ModelFactory] = Registry("model")


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` as the model's first layer.

    Keeping normalization inside the model means every input is in [0, 1] and every attack's
    epsilon is in pixel units, as in RobustBench.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2)  # broadcast over (N, C, ...) of any rank
        return (x - self.mean.view(shape)) / self.std.view(shape)

    def extra_repr(self) -> str:
        return f"mean={self.mean.tolist()}, std={self.std.tolist()}"


class Classifier(nn.Module):
    """A network behind its Normalize layer: ``logits = net(normalize(x))`` for x in [0, 1]."""

    def __init__(self, net: nn.Module, normalize: Normalize) -> None:
        super().__init__()
        self.normalize = normalize
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.normalize(x))


# Which ``module:callable`` names may be imported here: True (any: the user's own code), or the
# set allowed by every enclosing :func:`code_trust` block (empty while building from a file
# someone else wrote, such as a checkpoint's spec.json, unless the user opted in).
_TRUSTED: ContextVar[bool | frozenset[str]] = ContextVar("robcomp_trusted_code", default=True)


class UntrustedCodeError(ValueError):
    """A file names a Python callable to import, and the user did not trust its code."""


@contextmanager
def code_trust(trust: bool | Collection[str]) -> Iterator[None]:
    """Within the block, import ``module:callable`` models only if ``trust`` allows them.

    ``trust`` is True (any callable), False (registered models only) or the callables allowed.
    Blocks nest by intersection: an inner block never widens what an outer one allowed, so a
    checkpoint loaded while building another checkpoint's model is no more trusted than it.
    """
    outer = _TRUSTED.get()
    inner = trust if trust is True else frozenset(trust or ())
    if outer is True or inner is True:
        allowed = inner if outer is True else outer
    else:
        allowed = frozenset(outer or ()) & inner
    token = _TRUSTED.set(allowed)
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def _check_trusted(target: str) -> None:
    allowed = _TRUSTED.get()
    if allowed is True or (allowed and target in allowed):
        return
    raise UntrustedCodeError(
        f"model {target!r} is a Python callable to import, and importing runs its code: a "
        "checkpoint may name registered models only (robcomp list models). If you trust the "
        "code it names, pass --trust-code (experiment file: trust_code: true)"
    )


def _add_code_paths() -> None:
    for folder in reversed(code_folders()):
        if folder not in sys.path:
            sys.path.insert(0, folder)
            importlib.invalidate_caches()


def code_origin(name: str) -> str | None:
    """The folder the ``module:callable`` model ``name`` was imported from (the sys.path entry
    holding its top-level package), for a checkpoint to record; None for registered, timm: and
    torchvision: models, and for modules without a file."""
    if ":" not in name or is_ecosystem(name):
        return None
    module_name = name.partition(":")[0]
    module = sys.modules.get(module_name)
    file = getattr(module, "__file__", None)
    if not file:
        return None
    path = Path(file).resolve()
    depth = module_name.count(".") + (path.name == "__init__.py")
    return str(path.parents[depth])


def _import_callable(target: str) -> ModelFactory:
    _check_trusted(target)  # importing a module runs its code
    module_name, _, attr = target.partition(":")
    _add_code_paths()
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"model {target!r}: cannot import module {module_name!r}: {err}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"model {target!r}: module {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"model {target!r}: {attr!r} is not callable")
    return obj


def factory_for(name: str) -> ModelFactory:
    """The registered factory, ``timm:<name>``/``torchvision:<name>`` (see
    :mod:`robcomp.models.ecosystem`), or ``module:callable`` for a bring-your-own model."""
    if is_ecosystem(name):  # a library's own builder: no user code, no trust needed
        return ecosystem_factory(name)
    return _import_callable(name) if ":" in name else MODELS.get(name)


def _call_factory(factory: ModelFactory, name: str, **kwargs: Any) -> nn.Module:
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    # num_classes goes through **kwargs (torchvision and timm take it that way); in_shape only
    # to factories that name it, since foreign constructors reject unknown keywords.
    accepted = {k: v for k, v in kwargs.items() if k in params or (takes_any and k != "in_shape")}
    # An option the user set explicitly but the factory does not take is an error, not ignored.
    for key in kwargs.keys() - accepted.keys() - {"num_classes", "in_shape"}:
        allowed = ", ".join(p for p in params if p not in ("num_classes", "in_shape"))
        raise ValueError(f"model {name!r} has no option {key!r}; its options: {allowed or 'none'}")
    net = factory(**accepted)
    if not isinstance(net, nn.Module):
        raise TypeError(f"model {name!r}: the factory returned {type(net).__name__}, not a Module")
    return net


def create(
    name: str,
    num_classes: int,
    in_shape: Sequence[int],
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **options: Any,
) -> Classifier:
    """Build a registered model (or ``module:callable``) behind a Normalize layer.

    Args:
        name: a registered model name (see ``robcomp list models``), ``timm:<name>``,
            ``torchvision:<name>`` or ``package.module:callable``.
        num_classes: number of output logits.
        in_shape: shape of one input, e.g. ``(3, 32, 32)``; the channel count is ``in_shape[0]``.
        mean, std: per-channel normalization; default to 0 and 1 (no normalization).
        **options: architecture options of that model; ``None`` values are dropped so that an
            unset CLI flag never overrides a model's default.
    """
    channels = int(in_shape[0])
    mean = tuple(mean) if mean is not None else (0.0,) * channels
    std = tuple(std) if std is not None else (1.0,) * channels
    if len(mean) != channels:
        raise ValueError(f"mean/std have {len(mean)} channels but the input has {channels}")
    kwargs = {k: v for k, v in options.items() if v is not None}
    net = _call_factory(
        factory_for(name), name, num_classes=num_classes, in_shape=tuple(in_shape), **kwargs
    )
    return Classifier(net, Normalize(mean, std))


def create_to_check(
    name: str, num_classes: int, in_shape: Sequence[int], **kwargs: Any
) -> Classifier:
    """:func:`create` only to check that the model builds for ``in_shape`` with these options:
    on the meta device (shapes only: no memory, no compute), or for real when its factory
    reads checkpoint files while it builds (there are no values on the meta device, and
    building it is the check that the files load, are trusted and fit)."""
    device = "cpu" if builds_from_files(factory_for(name)) else "meta"
    with torch.device(device):
        return create(name, num_classes, in_shape, **kwargs)
