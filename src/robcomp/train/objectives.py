"""Training objectives: ``objective(model, x, y) -> {"loss": ..., "logits": ...}``.

Plain cross-entropy, adversarial training, TRADES, distillation and ADMM penalties are all
objectives, so the one training loop never branches on the method.

An objective that changes over training (a curriculum, a warm-up) defines
``set_progress(epoch, step, steps_per_epoch, epochs)`` (:class:`ProgressAware`); the loop calls
it before every batch. Objectives are frozen dataclasses, so they keep the position in a mutable
:class:`Progress` field.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor, nn
from torch.nn import functional as F

from robcomp.registry import Registry


class Objective(Protocol):
    """Returns a dict with a scalar ``"loss"`` to minimise; ``"logits"`` (on the clean batch,
    for training accuracy) and any other scalar entries are logged."""

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]: ...


# An objective class (a frozen dataclass) or a function building one from its fields.
ObjectiveFactory = Callable[..., Objective]
OBJECTIVES: Registry[ObjectiveFactory] = Registry("objective")


@runtime_checkable
class ProgressAware(Protocol):
    """An objective told where training is: ``fit`` calls ``set_progress`` before each batch
    (``epoch`` and ``step`` from 0, ``steps_per_epoch`` batches per epoch, ``epochs`` in all)."""

    def set_progress(self, epoch: int, step: int, steps_per_epoch: int, epochs: int) -> None: ...


@dataclass
class Progress:
    """Mutable training position, for a frozen objective to hold in a field
    (``field(default_factory=Progress, init=False, compare=False)``)."""

    epoch: int = 0
    step: int = 0
    steps_per_epoch: int = 1
    epochs: int = 0  # 0: never reported (the objective is used outside the training loop)

    def update(self, epoch: int, step: int, steps_per_epoch: int, epochs: int) -> None:
        self.epoch, self.step = epoch, step
        self.steps_per_epoch, self.epochs = max(steps_per_epoch, 1), epochs

    @property
    def fraction(self) -> float | None:
        """Fraction of training done before the current batch, in [0, 1); None if unknown."""
        if self.epochs <= 0:
            return None
        return (self.epoch + self.step / self.steps_per_epoch) / self.epochs


@OBJECTIVES.register("ce")
@dataclass(frozen=True, kw_only=True)
class CrossEntropy:
    """Standard (natural) training: cross-entropy on clean inputs.

    Attributes:
        label_smoothing: Szegedy et al. 2016 label smoothing, 0 for none.
    """

    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        return {"loss": loss, "logits": logits}
