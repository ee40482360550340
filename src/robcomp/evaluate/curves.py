"""Robust accuracy as a function of eps, from one minimal-norm attack run.

A minimal-norm attack (DDN, FMN, C&W, ...) gives every point the size of the smallest
perturbation that breaks it. Robust accuracy at *any* eps is then the fraction of points whose
minimal norm exceeds eps, so one run replaces a PGD run per eps, and the mean minimal norm is the
"average perturbation" metric of the 2025 compression-robustness benchmark.

Conventions: a point the model already misclassifies has minimal norm 0 (broken at every eps);
a point the attack never breaks has minimal norm ``inf`` (robust at every eps).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

from robcomp.attacks.norms import get_norm
from robcomp.evaluate.adversarial import attack_mode, check_threat_model


class MinimalNormAttack(Protocol):
    """An attack that can return unbounded minimal adversarial examples."""

    norm: str

    def label(self) -> str: ...

    def minimal(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor: ...


def minimal_norms(
    model: nn.Module,
    attack: MinimalNormAttack,
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int | None = None,
) -> Tensor:
    """Per-sample minimal adversarial perturbation norm, in the attack's norm, shape (B,).

    0 for points already misclassified, ``inf`` for points the attack never breaks. The attack
    runs in :func:`~robcomp.evaluate.attack_mode`, and its output is checked to be a valid input
    (shape, dtype, finite, inside [0, 1]). ``batch_size`` splits large inputs; note that some
    attacks (C&W, EAD) stop early on the *batch* loss, so batching can change their results.
    """
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
    step = batch_size or max(len(x), 1)
    norm = get_norm(attack.norm)
    parts: list[Tensor] = []
    with attack_mode(model):
        for start in range(0, len(x), step):
            xb, yb = x[start : start + step], y[start : start + step]
            x_min = attack.minimal(model, xb, yb)
            check_threat_model(xb, x_min, math.inf, attack.norm, where=f"{attack.label()} minimal")
            with torch.no_grad():
                correct = model(xb).argmax(dim=1) == yb
                broken = model(x_min).argmax(dim=1) != yb
            lengths = norm.measure((x_min - xb).detach())
            inf = torch.full_like(lengths, math.inf)
            parts.append(torch.where(correct, torch.where(broken, lengths, inf), 0.0))
    return torch.cat(parts) if parts else torch.empty(0)


def robust_curve(norms: Tensor, eps_values: Sequence[float]) -> list[float]:
    """Robust accuracy at each eps: the fraction of points whose minimal norm exceeds eps.

    Misclassified points (norm 0) count as broken at every eps >= 0; a point whose minimal norm
    equals eps is broken at that eps.
    """
    if len(norms) == 0:
        raise ValueError("robust_curve needs at least one point")
    return [float((norms > eps).float().mean()) for eps in eps_values]


def average_minimal_perturbation(norms: Tensor) -> float:
    """Mean minimal norm over the originally correct points the attack broke (nan if none)."""
    broken = torch.isfinite(norms) & (norms > 0)
    return float(norms[broken].mean()) if bool(broken.any()) else math.nan
