"""Gradient-masking diagnostics: when a robustness number should not be trusted.

Each check follows Carlini et al. 2019 ("On Evaluating Adversarial Robustness", section 5's
checklist) and AutoAttack's own checks (Croce & Hein 2020), and produces a :class:`Flag` with a
sentence a user understands. A raised flag means the robust accuracy may be inflated by gradient
masking; it is stored with the result and shown in the report.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from robcomp.attacks.base import Attack
from robcomp.attacks.pgd import PGD
from robcomp.evaluate.adversarial import attack_batch, attack_mode

# The threat model the checklist probes when the suite has no bounded L-inf or L2 attack to take
# it from: the standard CIFAR-10 L-inf radius (Croce et al. 2021, RobustBench).
DEFAULT_NORM, DEFAULT_EPS = "linf", 8 / 255


def probe_threat_model(
    candidates: Iterable[tuple[str, float]], norms: Sequence[str] = ("linf", "l2")
) -> tuple[str, float]:
    """The first bounded ``(norm, eps)`` of ``candidates`` in ``norms``, else the default one."""
    return next(
        ((n, e) for n, e in candidates if n in norms and math.isfinite(e) and e > 0),
        (DEFAULT_NORM, DEFAULT_EPS),
    )


@dataclass(frozen=True)
class Flag:
    """One check. ``raised`` means the check found a sign of gradient masking."""

    check: str
    raised: bool
    value: float
    message: str


def zero_gradient_fraction(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Fraction of points whose input gradient of the loss is exactly zero."""
    with attack_mode(model):
        x = x.clone().requires_grad_(True)
        loss = F.cross_entropy(model(x), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return float((grad.reshape(len(x), -1).abs().amax(1) == 0).float().mean())


def check_zero_gradients(model: nn.Module, x: Tensor, y: Tensor, limit: float = 0.05) -> Flag:
    frac = zero_gradient_fraction(model, x, y)
    return Flag(
        "zero_gradients",
        frac > limit,
        frac,
        f"{100 * frac:.0f}% of points have an exactly zero input gradient: gradient attacks "
        "cannot move them, so robustness is likely masked. Attack a differentiable twin (BPDA) "
        "or use a black-box attack."
        if frac > limit
        else f"input gradients are nonzero on {100 * (1 - frac):.0f}% of points.",
    )


def _accuracy(model: nn.Module, attack: Attack, x: Tensor, y: Tensor) -> float:
    return 1.0 - float(attack_batch(model, attack, x, y).success.float().mean())


def check_unbounded(
    model: nn.Module, x: Tensor, y: Tensor, norm: str = "linf", steps: int = 50, limit: float = 0.05
) -> Flag:
    """An attack allowed to change the whole image must succeed on (almost) every point."""
    eps = 1.0 if norm == "linf" else float(x[0].numel()) ** 0.5  # the whole [0, 1] box
    acc = _accuracy(model, PGD(eps=eps, norm=norm, steps=steps, step_size=eps / 10), x, y)  # type: ignore[arg-type]
    return Flag(
        "unbounded_attack",
        acc > limit,
        acc,
        f"an unbounded {norm} PGD still leaves {100 * acc:.0f}% of points correct: the attack "
        "is not reaching the model's decision boundary, so every robust accuracy here is "
        "suspect (gradient masking or a broken attack)."
        if acc > limit
        else f"an unbounded {norm} PGD breaks {100 * (1 - acc):.0f}% of points, as it should.",
    )


def check_monotone(
    curve: Mapping[float, float], what: str = "eps", tolerance: float = 0.02
) -> Flag:
    """Robust accuracy must not rise with eps (or with steps): ``curve`` maps the knob to it."""
    points = sorted(curve.items())
    rises = [
        (a, b, vb - va) for (a, va), (b, vb) in itertools.pairwise(points) if vb - va > tolerance
    ]
    worst = max((r[2] for r in rises), default=0.0)
    if rises:
        a, b, d = max(rises, key=lambda r: r[2])
        message = (
            f"robust accuracy rises by {100 * d:.1f} points from {what}={a:g} to {what}={b:g}: a "
            f"stronger attack should never do worse, so the attack is not converging "
            "(gradient masking, or too few steps)."
        )
    else:
        message = f"robust accuracy does not rise with {what}."
    return Flag(f"monotone_in_{what}", bool(rises), worst, message)


def check_steps(
    model: nn.Module, x: Tensor, y: Tensor, attack: PGD, more: int = 10, tolerance: float = 0.02
) -> Flag:
    """More PGD steps must not help the model: compare ``attack`` with ``more`` x its steps."""
    few = _accuracy(model, attack, x, y)
    many = _accuracy(model, dataclasses.replace(attack, steps=attack.steps * more), x, y)
    flag = check_monotone({attack.steps: few, attack.steps * more: many}, "steps", tolerance)
    drop = few - many
    if drop > 0.1:  # a big gain from more steps means the short attack was far from converged
        return Flag(
            "steps_converged",
            True,
            drop,
            f"{attack.steps * more} PGD steps lower robust accuracy by {100 * drop:.0f} points "
            f"over {attack.steps} steps: the short attack has not converged, so numbers from it "
            "overstate robustness.",
        )
    return (
        dataclasses.replace(flag, check="steps_converged")
        if flag.raised
        else Flag(
            "steps_converged", False, drop, f"{attack.steps} and {attack.steps * more} steps agree."
        )
    )


def check_black_box(
    white_box: float, black_box: Mapping[str, float], tolerance: float = 0.02
) -> Flag:
    """A black-box or transfer attack must not beat the white-box one."""
    if not black_box:
        return Flag("black_box_weaker", False, 0.0, "no black-box result to compare.")
    name, acc = min(black_box.items(), key=lambda kv: kv[1])
    gap = white_box - acc
    return Flag(
        "black_box_weaker",
        gap > tolerance,
        gap,
        f"{name} (no gradients) leaves {100 * acc:.1f}% robust vs {100 * white_box:.1f}% for the "
        "white-box attack: gradients are misleading the white-box attack (gradient masking)."
        if gap > tolerance
        else "black-box and transfer attacks are no stronger than the white-box attack.",
    )


def check_randomness(model: nn.Module, x: Tensor, repeats: int = 3) -> Flag:
    """A randomized model needs EOT attacks; detect it by repeated forward passes."""
    with attack_mode(model), torch.no_grad():
        outs = [model(x) for _ in range(repeats)]
    spread = max(float((o - outs[0]).abs().max()) for o in outs)
    return Flag(
        "randomness",
        spread > 1e-5,
        spread,
        f"logits change between identical forward passes (by up to {spread:.3g}): the model is "
        "randomized, so use EOT attacks (autoattack version 'rand') before trusting its numbers."
        if spread > 1e-5
        else "the model is deterministic.",
    )


def diagnose(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    norm: str = DEFAULT_NORM,
    eps: float = DEFAULT_EPS,
    robust_by_eps: Mapping[float, float] | None = None,
    black_box: Mapping[str, float] | None = None,
    white_box: float | None = None,
    steps: int = 10,
) -> list[Flag]:
    """Run the whole checklist on a batch of points; results already computed can be passed in.

    Args:
        robust_by_eps: robust accuracy of one attack at several eps (checked for monotonicity).
        black_box, white_box: robust accuracies of black-box/transfer attacks and of the
            white-box attack at the same eps.
    """
    pgd = PGD(eps=eps, norm=norm, steps=steps)  # type: ignore[arg-type]
    flags = [
        check_zero_gradients(model, x, y),
        check_unbounded(model, x, y, norm),
        check_steps(model, x, y, pgd),
        check_randomness(model, x),
    ]
    if robust_by_eps:
        flags.append(check_monotone(robust_by_eps, "eps"))
    if black_box and white_box is not None:
        flags.append(check_black_box(white_box, black_box))
    return flags


def summarize(flags: Sequence[Flag]) -> str:
    raised = [f for f in flags if f.raised]
    if not raised:
        return "no sign of gradient masking"
    return "POSSIBLE GRADIENT MASKING: " + " ".join(f.message for f in raised)
