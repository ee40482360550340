"""Facts about models that the code running them asks for, instead of testing names or types.

- :func:`capabilities`: what a model can do (input gradients, training, moving between
  devices), as the model declares it; the experiment pipeline asks once per model and passes
  the answer on instead of testing the model's type.
- :class:`GradientFree`: a model whose forward pass has no useful gradient (an int8 model) and
  that carries a differentiable ``twin`` to attack through (BPDA, Athalye et al. 2018). It
  cannot be trained, and ``eager()`` gives the same model without per-shape compilation.
- :func:`normalizes_inputs`: a model factory whose models normalize their own inputs (an
  ensemble of checkpoints that bring their statistics), so the Normalize in front must be the
  identity.
- :func:`reads_files`: a model factory that loads checkpoints while it builds (an ensemble of
  checkpoint folders), so checking it means building it for real, not on the meta device.
- :func:`input_statistics`: a model factory whose models expect given normalization statistics
  for some options (ImageNet's for torchvision's pretrained weights), used unless the
  experiment file sets ``model.mean``/``model.std``.
- :func:`model_device`: where a model's tensors live, so probes are created there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar, cast, runtime_checkable

import torch
from torch import Tensor, nn

F = TypeVar("F", bound=Callable[..., Any])


@runtime_checkable
class GradientFree(Protocol):
    """A model without useful input gradients, attacked through its differentiable ``twin``.

    Attributes:
        twin: the differentiable copy whose gradients attacks use (fake quantization for int8).
        trainable: always False: fine-tuning such a model is skipped.
    """

    trainable: ClassVar[bool]

    @property
    def twin(self) -> nn.Module: ...

    def eager(self) -> nn.Module:
        """The same model, run eagerly for any batch shape (attacks use many)."""
        ...

    def __call__(self, x: Tensor) -> Tensor: ...


@dataclass(frozen=True, kw_only=True)
class Capabilities:
    """What a model can do, declared by the model (a ``capabilities()`` method) and read once
    by whoever runs it.

    Attributes:
        gradients: its input gradients are useful to attacks; without them (an int8 model, a
            :class:`GradientFree`) a gradient attack goes through the model's ``twin``
            (BPDA), transfer from a surrogate and a black-box attack.
        trainable: fine-tuning applies to it (an int8 model cannot be trained).
        pinned: its kernels run on one device (oneDNN int8: the CPU), so it is never moved
            and its data follow it there.
        eager: ``eager()`` gives the same model without per-shape compilation, the form
            attacks should call (they use many batch shapes).
    """

    gradients: bool = True
    trainable: bool = True
    pinned: bool = False
    eager: bool = False


def capabilities(model: nn.Module) -> Capabilities:
    """What ``model`` declares it can do; a model that declares nothing is an ordinary
    differentiable, trainable, movable module."""
    declared = getattr(model, "capabilities", None)
    return declared() if callable(declared) else Capabilities()


def attack_form(model: nn.Module, caps: Capabilities) -> nn.Module:
    """The form of ``model`` attacks call: its eager form when it has one (see
    :class:`Capabilities`), else the model itself."""
    return cast(GradientFree, model).eager() if caps.eager else model


def gradient_form(model: nn.Module, caps: Capabilities) -> nn.Module:
    """The differentiable form of ``model`` whose gradients stand in for its own: its
    ``twin`` when it has no useful gradients, else the model itself."""
    return model if caps.gradients else cast(GradientFree, model).twin


def self_normalizing(factory: F) -> F:
    """Mark a model factory whose models normalize their own inputs (see
    :func:`normalizes_inputs`)."""
    factory.normalizes_inputs = True  # type: ignore[attr-defined]
    return factory


def normalizes_inputs(factory: Callable[..., Any]) -> bool:
    """Whether models from ``factory`` normalize their own inputs, so the Normalize layer in
    front of them must be the identity (normalizing twice would be wrong)."""
    return bool(getattr(factory, "normalizes_inputs", False))


def reads_files(factory: F) -> F:
    """Mark a model factory that loads checkpoint files while it builds (see
    :func:`builds_from_files`)."""
    factory.builds_from_files = True  # type: ignore[attr-defined]
    return factory


def builds_from_files(factory: Callable[..., Any]) -> bool:
    """Whether ``factory`` reads checkpoints and inspects their values while it builds: such a
    model cannot be built on the meta device (there are no values there), and building it for
    real is the check that its files load, are trusted and fit."""
    return bool(getattr(factory, "builds_from_files", False))


Statistics = tuple[tuple[float, ...], tuple[float, ...]]


def input_statistics(
    rule: Callable[[Mapping[str, Any], int], Statistics | None],
) -> Callable[[F], F]:
    """Mark a model factory with ``rule(options, channels) -> (mean, std) | None``: the
    statistics its models expect under those options (see :func:`statistics_for`)."""

    def mark(factory: F) -> F:
        factory.input_statistics = rule  # type: ignore[attr-defined]
        return factory

    return mark


def statistics_for(
    factory: Callable[..., Any], options: Mapping[str, Any], channels: int
) -> Statistics | None:
    """The normalization statistics a model of ``factory`` expects under ``options`` (pretrained
    weights were trained with their own), or ``None`` to use the training data's."""
    rule = getattr(factory, "input_statistics", None)
    return None if rule is None else rule(options, channels)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer; CPU for a model with neither (a
    lowered int8 graph keeps its packed weights outside ``parameters()``)."""
    for param in model.parameters():
        return param.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def resolve_device(setting: str) -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU; anything else as
    :class:`torch.device` reads it (``cpu``, ``cuda``, ``cuda:1``)."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(setting)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"device must be auto, cpu, cuda, cuda:N or another torch device, got {setting!r}"
        ) from None
