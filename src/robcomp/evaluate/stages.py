"""AutoAttack's per-stage account: what each attack of a cascade broke, as the official code
prints it (Croce & Hein 2020, https://github.com/fra31/auto-attack)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from robcomp.attacks.cascade import Cascade, CascadeResult
from robcomp.data.base import Split
from robcomp.evaluate.adversarial import AttackResult, evaluate_attack

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """One attack of an AutoAttack cascade, over the whole split.

    Attributes:
        attack: the member's name (``apgd-ce``, ``apgd-t``, ``fab-t``, ``square``).
        broke: points this stage broke (robust to every earlier stage).
        robust_accuracy: robust accuracy over the split after this stage.
        seconds: wall time of this stage, summed over batches.
    """

    attack: str
    broke: int
    robust_accuracy: float
    seconds: float


@dataclass
class _Recording:
    """The cascade as the evaluator's attack, keeping each batch's :class:`CascadeResult`, so
    the breakdown costs no second run."""

    cascade: Cascade
    batches: list[CascadeResult] = field(default_factory=list)

    def __getattr__(self, name: str) -> Any:  # eps, norm, uses_gradients, label, ...
        return getattr(self.cascade, name)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        result = self.cascade.run(model, x, y)
        self.batches.append(result)
        return result.x_adv


def autoattack_breakdown(
    model: nn.Module, cascade: Cascade, split: Split, batch_size: int = 256
) -> tuple[AttackResult, list[Stage]]:
    """Run an AutoAttack cascade through the evaluator (threat model checked) and report
    what each stage did, as the official code prints it (Croce & Hein 2020, fra31/auto-attack):
    points broken, robust accuracy after it, seconds."""
    recording = _Recording(cascade)
    result = evaluate_attack(model, recording, split, batch_size)
    n = result.n
    robust = round(result.clean_accuracy * n)
    stages = []
    for name, _ in cascade.members():
        broke = sum(r.found_by.count(name) for r in recording.batches)
        robust -= broke
        seconds = sum(r.seconds_per_attack.get(name, 0.0) for r in recording.batches)
        stages.append(Stage(attack=name, broke=broke, robust_accuracy=robust / n, seconds=seconds))
    # The cascade attacks only points the evaluator found correct; one the cascade found wrong
    # on its own forward pass (a nondeterministic model) counts as broken before any stage.
    already = sum(r.found_by.count("clean") for r in recording.batches)
    if already:
        log.warning("%d points changed class between two clean forward passes", already)
    return result, stages
