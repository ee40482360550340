"""Training objectives: ``objective(model, x, y) -> {"loss": ..., "logits": ...}``.

Plain cross-entropy, adversarial training, TRADES, distillation and ADMM penalties are all
objectives, so the one training loop never branches on the method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor, nn
from torch.nn import functional as F

from robcomp.registry import Registry

OBJECTIVES: Registry[Any] = Registry("objective")


class Objective(Protocol):
    """Returns a dict with a scalar ``"loss"`` to minimise; ``"logits"`` (on the clean batch,
    for training accuracy) and any other scalar entries are logged."""

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]: ...


@OBJECTIVES.register("ce")
@dataclass(frozen=True, kw_only=True)
class CrossEntropy:
    """Standard (natural) training: cross-entropy on clean inputs.

    Attributes:
        label_smoothing: Szegedy et al. 2016 label smoothing, 0 for none.
    """

    label_smoothing: float = 0.0

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        return {"loss": loss, "logits": logits}
