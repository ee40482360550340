"""Running attacks under a checked threat model.

A robustness number is a claim. The evaluator, not the attack, enforces the threat model: every
adversarial batch must lie inside the eps ball (in the attack's norm) and inside [0, 1], or we
raise. Attacks always run with the model in eval mode and its parameters frozen.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from robcomp.attacks.base import Attack
from robcomp.attacks.manifold import LatentOutcome, is_latent
from robcomp.attacks.norms import get_norm
from robcomp.data.base import Split
from robcomp.progress import track


class ThreatModelViolation(RuntimeError):
    """An attack returned a point outside its eps ball or outside [0, 1]: a bug, loudly."""


# float32 rounding of clamp(x + delta) - x can exceed eps by a few ulps; anything more is a bug.
ABS_TOL = 1e-6
REL_TOL = 1e-5


@contextmanager
def attack_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode with parameter gradients off (faster, and no BatchNorm statistics drift)."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def check_threat_model(x: Tensor, x_adv: Tensor, eps: float, norm: str, where: str = "") -> Tensor:
    """Raise :class:`ThreatModelViolation` unless ``x_adv`` is a valid attack on ``x``.

    Returns the per-sample perturbation norms.
    """
    label = f"{where}: " if where else ""
    if x_adv.shape != x.shape or x_adv.dtype != x.dtype:
        raise ThreatModelViolation(
            f"{label}x_adv has shape {tuple(x_adv.shape)} {x_adv.dtype}, "
            f"expected {tuple(x.shape)} {x.dtype}"
        )
    if x_adv.numel() == 0:  # an empty batch is trivially inside any threat model
        return torch.zeros(len(x_adv), device=x_adv.device)
    if not torch.isfinite(x_adv).all():
        raise ThreatModelViolation(f"{label}x_adv contains NaN or inf")
    lo, hi = float(x_adv.min()), float(x_adv.max())
    if lo < 0.0 or hi > 1.0:
        raise ThreatModelViolation(f"{label}x_adv leaves [0, 1]: range [{lo:.6g}, {hi:.6g}]")
    norms = get_norm(norm).measure(x_adv - x)
    worst = float(norms.max()) if len(norms) else 0.0
    if worst > eps * (1 + REL_TOL) + ABS_TOL:
        raise ThreatModelViolation(
            f"{label}perturbation of {norm} norm {worst:.6g} exceeds eps={eps:.6g}"
        )
    return norms


def check_latent_threat_model(
    attack: Any, x: Tensor, outcome: LatentOutcome, where: str = ""
) -> Tensor:
    """The check of an attack with ``threat = "latent"`` (on-manifold, Kwon & Lee 2021) instead
    of an Lp ball: ``x_adv`` has ``x``'s shape and lies in [0, 1]; the latent codes are the
    manifold's encoding of ``x``; every kept point is the decoding of a code within
    ``attack.eps`` (L-inf) of it; every other point is ``x`` unchanged. Recomputes the encoding
    and the decoding itself, so an attack cannot misreport them. Returns the per-sample latent
    L-inf perturbation (0 where not kept)."""
    label = f"{where}: " if where else ""
    check_threat_model(x, outcome.x_adv, float("inf"), "linf", where)  # shape, finite, [0, 1]
    manifold = attack.generative_model()
    with torch.no_grad():
        z = manifold.encode(x)
        if outcome.z.shape != z.shape or not torch.allclose(outcome.z, z, rtol=1e-4, atol=1e-5):
            raise ThreatModelViolation(f"{label}the reported latents are not encode(x)")
        norms = (outcome.z_adv - z).abs().flatten(1).amax(1) * outcome.kept
        worst = float(norms.max()) if len(norms) else 0.0
        if worst > attack.eps * (1 + REL_TOL) + ABS_TOL:
            raise ThreatModelViolation(
                f"{label}latent perturbation of L-inf norm {worst:.6g} exceeds eps={attack.eps:.6g}"
            )
        kept = outcome.kept.reshape(-1, *([1] * (x.ndim - 1)))
        expected = torch.where(kept, manifold.decode(outcome.z_adv).clamp(0.0, 1.0), x)
        if not torch.allclose(outcome.x_adv, expected, rtol=1e-4, atol=1e-5):
            raise ThreatModelViolation(
                f"{label}x_adv is not the decoding of the reported latents where kept and x "
                "elsewhere"
            )
    return norms


def _run_checked(attack: Attack, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``(x_adv, norms)`` of ``attack`` on a batch, checked against the attack's threat model:
    an Lp ball by default, the latent ball for ``threat = "latent"`` attacks."""
    if is_latent(attack):
        outcome: LatentOutcome = attack.perturb(model, x, y)  # type: ignore[attr-defined]
        return outcome.x_adv, check_latent_threat_model(attack, x, outcome, attack.label())
    x_adv = attack(model, x, y)
    return x_adv, check_threat_model(x, x_adv, attack.eps, attack.norm, where=attack.label())


@dataclass(frozen=True)
class AttackOutcome:
    """One attacked batch: adversarial inputs, which points were fooled, and how far they moved."""

    x_adv: Tensor
    success: Tensor  # (B,) bool: misclassified after the attack
    norms: Tensor  # (B,) perturbation norm in the attack's norm


def attack_batch(model: nn.Module, attack: Attack, x: Tensor, y: Tensor) -> AttackOutcome:
    """Run ``attack`` on one batch in attack mode and check the threat model."""
    if len(x) == 0:  # attacks need not handle empty batches
        return AttackOutcome(
            x_adv=x.clone(),
            success=torch.zeros(0, dtype=torch.bool, device=x.device),
            norms=torch.zeros(0, device=x.device),
        )
    with attack_mode(model):
        x_adv, norms = _run_checked(attack, model, x, y)
        with torch.no_grad():
            success = model(x_adv).argmax(1) != y
    return AttackOutcome(x_adv=x_adv.detach(), success=success, norms=norms)


@dataclass(frozen=True)
class AttackResult:
    """Robust accuracy of a model on a split under one attack.

    ``robust`` keeps the verdict per point, so that several attacks at one threat model combine
    into the per-point worst case (a point is robust only if no attack broke it).
    """

    attack: str
    norm: str
    eps: float
    n: int
    clean_accuracy: float
    robust_accuracy: float
    mean_norm: float  # over successful adversarial examples; nan if none succeeded
    median_norm: float
    seconds: float
    robust: Tensor = field(compare=False, repr=False)  # (n,) bool: correct and not broken


def evaluate_attack(
    model: nn.Module, attack: Attack, split: Split, batch_size: int = 256
) -> AttackResult:
    """Robust accuracy: a point counts as robust if it is classified correctly and the attack
    fails on it. Points already misclassified are not attacked (they count as broken)."""
    n = len(split)
    if n == 0:
        raise ValueError("cannot evaluate an attack on an empty split")
    clean_correct = robust_correct = 0
    broken_norms: list[float] = []
    robust: list[Tensor] = []
    start = time.perf_counter()
    with track(f"attack {attack.label()} eps={attack.eps:.4g}", n) as advance:
        for x, y in split.batches(batch_size):
            with attack_mode(model), torch.no_grad():
                correct = model(x).argmax(1) == y
            clean_correct += int(correct.sum())
            still = correct.clone()
            if correct.any():
                outcome = attack_batch(model, attack, x[correct], y[correct])
                robust_correct += int((~outcome.success).sum())
                broken_norms += outcome.norms[outcome.success].tolist()
                still[correct] = ~outcome.success
            robust.append(still.cpu())
            advance(len(y))
    seconds = time.perf_counter() - start
    return AttackResult(
        attack=attack.label(),
        norm=attack.norm,
        eps=float(attack.eps),
        n=n,
        clean_accuracy=clean_correct / n,
        robust_accuracy=robust_correct / n,
        mean_norm=statistics.fmean(broken_norms) if broken_norms else float("nan"),
        median_norm=statistics.median(broken_norms) if broken_norms else float("nan"),
        seconds=seconds,
        robust=torch.cat(robust),
    )
