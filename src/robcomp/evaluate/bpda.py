"""Attacking models without useful gradients: BPDA / straight-through, transfer, black-box.

An int8 model, or any model with a non-differentiable layer (an input quantizer, a rounding
step), gives zero or meaningless input gradients, so a gradient attack on it fails and its
robust accuracy looks high: gradient masking, not robustness (Athalye et al. 2018; Shen et al.
saw it on their int8 models). The remedy is to keep the real model's forward pass and take
gradients from a differentiable twin (BPDA), and to add attacks that need no gradients.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from robcomp.attacks.base import Attack
from robcomp.data.base import Split
from robcomp.evaluate.adversarial import attack_batch, attack_mode, check_threat_model


class _ValueOfFirstGradOfSecond(torch.autograd.Function):
    """Returns ``exact`` bit for bit; sends the incoming gradient to ``surrogate``."""

    @staticmethod
    def forward(ctx: Any, exact: Tensor, surrogate: Tensor) -> Tensor:
        return exact.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor]:
        return None, grad


class StraightThrough(nn.Module):
    """Forward in ``real``, backward through ``twin`` (Athalye et al. 2018, BPDA).

    The output equals ``real(x)`` exactly, so attacks are scored on the real model, while the
    gradient is that of ``twin(x)``: a fake-quant model for an int8 one, or the same network
    with its non-differentiable layer replaced by the identity.
    """

    def __init__(self, real: nn.Module, twin: nn.Module) -> None:
        super().__init__()
        self.real = real
        self.twin = twin

    def forward(self, x: Tensor) -> Tensor:
        surrogate = self.twin(x)
        with torch.no_grad():
            exact = self.real(x)
        out: Tensor = _ValueOfFirstGradOfSecond.apply(exact, surrogate)
        return out


class IdentityGradient(nn.Module):
    """Wrap a non-differentiable layer: forward ``layer(x)``, backward as the identity (BPDA)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return x + (self.layer(x) - x).detach()


@dataclass(frozen=True)
class WorstCase:
    """Per-point worst case over several attacks on the same model and threat model.

    Attributes:
        robust_accuracy: fraction of points no attack broke (and classified correctly).
        per_attack: robust accuracy of each attack alone.
        found_by: for each point, the first attack (in the given order) that broke it; None if
            robust, ``"clean"`` if misclassified without attack.
        strongest: the attack with the lowest robust accuracy alone.
    """

    robust_accuracy: float
    per_attack: dict[str, float]
    found_by: list[str | None]
    strongest: str


def worst_case(
    model: nn.Module,
    attacks: Mapping[str, tuple[nn.Module, Attack]],
    split: Split,
    batch_size: int = 256,
) -> WorstCase:
    """Run every ``(attacked_model, attack)`` and score the result on ``model``.

    ``attacked_model`` is what the attack sees: ``StraightThrough(model, twin)`` for BPDA, a
    surrogate such as the fp32 model for a transfer attack, or ``model`` itself for a black-box
    attack. Each adversarial batch is checked against the threat model and scored on ``model``.
    """
    broken_by: list[str | None] = []
    per_attack_correct = dict.fromkeys(attacks, 0)
    for x, y in split.batches(batch_size):
        with attack_mode(model), torch.no_grad():
            clean_ok = model(x).argmax(1) == y
        first: list[str | None] = [None if ok else "clean" for ok in clean_ok.tolist()]
        for name, (attacked, attack) in attacks.items():
            x_adv = attack_batch(attacked, attack, x, y).x_adv
            check_threat_model(x, x_adv, attack.eps, attack.norm, where=name)
            with attack_mode(model), torch.no_grad():
                still_ok = (model(x_adv).argmax(1) == y) & clean_ok
            per_attack_correct[name] += int(still_ok.sum())
            for i, ok in enumerate(still_ok.tolist()):
                if not ok and first[i] is None:
                    first[i] = name
        broken_by += first
    n = len(split)
    per_attack = {k: v / n for k, v in per_attack_correct.items()}
    return WorstCase(
        robust_accuracy=sum(b is None for b in broken_by) / n,
        per_attack=per_attack,
        found_by=broken_by,
        strongest=min(per_attack, key=lambda k: per_attack[k]),
    )
