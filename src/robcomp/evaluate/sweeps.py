"""Robust accuracy against an increasingly strong adversary (Marshall 2020, Algorithm 2)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from robcomp.attacks.base import Attack
from robcomp.data.base import Split
from robcomp.evaluate.adversarial import AttackResult, evaluate_attack


@dataclass(frozen=True)
class SweepResult:
    """Robust accuracy per eps, in increasing eps, stopped once it fell below chance."""

    eps: list[float]
    robust_accuracy: list[float]
    results: list[AttackResult]
    stopped_early: bool


def eps_sweep(
    model: nn.Module,
    attack: Attack,
    split: Split,
    eps_values: Sequence[float],
    num_classes: int,
    batch_size: int = 256,
) -> SweepResult:
    """Algorithm 2: attack at each eps in increasing order until accuracy < 1/k.

    ``attack`` is a dataclass attack whose ``eps`` field is replaced for each value (its other
    fields, such as ``steps``, stay fixed; the thesis uses PGD with 100 steps).
    """
    values = sorted(float(e) for e in eps_values)
    results: list[AttackResult] = []
    stopped = False
    for eps in values:
        attack_at = dataclasses.replace(attack, eps=eps)  # type: ignore[type-var]
        results.append(evaluate_attack(model, attack_at, split, batch_size))
        if results[-1].robust_accuracy < 1.0 / num_classes and eps != values[-1]:
            stopped = True
            break
    return SweepResult(
        eps=[r.eps for r in results],
        robust_accuracy=[r.robust_accuracy for r in results],
        results=results,
        stopped_early=stopped,
    )
