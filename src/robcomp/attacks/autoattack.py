"""FAB-T and Square, run through the official AutoAttack code (``pyautoattack``, fra31/auto-attack).

These two complete AutoAttack's standard ensemble. They are rarely the attack that decides a
robust accuracy, so we wrap the authors' implementation instead of maintaining our own; the
gradient attacks that dominate the run time (APGD) are native, in :mod:`robcomp.attacks.apgd`.

The reference draws from torch's global random generator and reseeds it; each call here seeds
it from the attack's ``seed`` and restores the caller's state afterwards, so the attacks are
deterministic and leave no trace on the rest of the program.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from robcomp.attacks.apgd import AutoAttackNorm, check_norm, seeded_global_rng
from robcomp.attacks.base import ATTACKS, check_eps, check_positive
from robcomp.attacks.labels import settings_label
from robcomp.attacks.norms import get_norm

# The reference spells the norms as "Linf" and "L2".
_REFERENCE_NORM = {"linf": "Linf", "l2": "L2"}


@contextmanager
def _parameters_frozen(model: nn.Module) -> Iterator[None]:
    """Turn off parameter gradients inside, restoring each flag afterwards.

    The evaluator already freezes them; FAB calls ``.backward()``, which would otherwise
    accumulate ``.grad`` into the caller's model when an attack is used on its own.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _reference(module: str, name: str, attack: str) -> Any:
    """``pyautoattack.<module>.<name>``, imported on first use with an actionable error."""
    try:
        imported = importlib.import_module(f"pyautoattack.{module}")
    except ImportError as err:
        raise ImportError(
            f"the {attack!r} attack runs the official AutoAttack code, which is not installed "
            f"({err}); install it with: pip install 'pyautoattack==0.2.0'"
        ) from err
    return getattr(imported, name)


def _into_threat_model(x: Tensor, x_adv: Tensor, eps: float, norm: str) -> Tensor:
    """Project the reference's output back into the eps ball and [0, 1].

    The reference clips in float32 (Square's Linf step clamps to ``x + eps``, whose distance
    to ``x`` rounds up to ``eps + 2e-8`` on some pixels), so its outputs can leave the ball by
    float rounding. Projecting is the identity on valid points and bounds the violation by the
    rounding of ``x + delta`` itself, which the evaluator's tolerance is for.
    """
    delta = get_norm(norm).project(x_adv.to(x.dtype) - x, eps)
    return (x + delta).clamp(0.0, 1.0)


def _num_classes(model: nn.Module, x: Tensor) -> int:
    with torch.no_grad():
        return int(model(x[:1]).shape[1])


@ATTACKS.register("fab-t")
@dataclass(frozen=True, kw_only=True)
class FABT:
    """Targeted Fast Adaptive Boundary attack (Croce & Hein 2020, "Minimally distorted
    adversarial examples with a fast adaptive boundary attack", ICML), as run by AutoAttack
    (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of
    diverse parameter-free attacks", ICML).

    FAB looks for the smallest perturbation that crosses the decision boundary towards each
    target (the classes ranked 2nd, 3rd, ... by the clean logits); a point counts as broken only
    if that perturbation fits in the eps ball. Wraps ``pyautoattack.fab_pt.FABAttack_PT``.

    Attributes:
        eps: radius of the threat model, in pixel units of [0, 1] inputs (FAB also uses it for
            its random restarts).
        norm: ``linf`` or ``l2``.
        steps: iterations per target and restart (100 in AutoAttack).
        restarts: runs per target; runs after the first start from a random point.
        n_target_classes: how many top wrong classes to target (9 in AutoAttack), capped at
            ``num_classes - 1``, where the reference fails.
        alpha_max: largest weight of the step towards the clean point (0.1, paper's alpha_max).
        eta: overshooting factor of each step (1.05).
        beta: backward step towards the clean point after a success (0.9).
        seed: seeds torch's global generator for the call.
    """

    eps: float
    norm: AutoAttackNorm = "linf"
    steps: int = 100
    restarts: int = 1
    n_target_classes: int = 9
    alpha_max: float = 0.1
    eta: float = 1.05
    beta: float = 0.9
    seed: int = 0

    requires: ClassVar[tuple[str, ...]] = ("pyautoattack",)
    uses_gradients: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_eps(self.eps, "fab-t")
        if self.steps < 1 or self.restarts < 1 or self.n_target_classes < 1:
            raise ValueError("steps, restarts and n_target_classes must be >= 1")
        check_positive(self, "eta", "beta")
        check_positive(self, "alpha_max", strict=False)
        if not self.alpha_max <= 1 or not self.beta <= 1:
            raise ValueError(f"alpha_max and beta must be <= 1, got {self.alpha_max}, {self.beta}")
        check_norm(self.norm, "fab-t")

    def label(self) -> str:
        """``fab-t100-linf``, plus every other setting not at its default."""
        return settings_label(self, f"fab-t{self.steps}-{self.norm}", ("steps", "norm"))

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        fab_cls = _reference("fab_pt", "FABAttack_PT", "fab-t")
        if len(x) == 0:
            return x.clone()
        targets = min(self.n_target_classes, _num_classes(model, x) - 1)
        if targets < 1:
            raise ValueError("fab-t needs a model with at least 2 classes")
        with _parameters_frozen(model), seeded_global_rng(self.seed, x.device):
            attack = fab_cls(
                model,
                norm=_REFERENCE_NORM[self.norm],
                n_restarts=self.restarts,
                n_iter=self.steps,
                eps=self.eps,
                alpha_max=self.alpha_max,
                eta=self.eta,
                beta=self.beta,
                verbose=False,
                seed=self.seed,
                targeted=True,
                device=x.device,
                n_target_classes=targets,
            )
            x_adv = attack.perturb(x, y)
        return _into_threat_model(x, x_adv, self.eps, self.norm)


@ATTACKS.register("square")
@dataclass(frozen=True, kw_only=True)
class Square:
    """Square Attack (Andriushchenko, Croce, Flammarion & Hein 2020, "Square Attack: a
    query-efficient black-box adversarial attack via random search", ECCV), as run by AutoAttack.

    A score-based black-box attack: random square-shaped updates at the boundary of the eps
    ball, kept when they lower the margin loss. It uses no gradients, so it is the member of the
    ensemble that gradient masking cannot fool. Wraps ``pyautoattack.square.SquareAttack`` with
    AutoAttack's settings (margin loss, untargeted, the square-size schedule not rescaled to the
    query budget). Inputs must be images (N, C, H, W).

    Attributes:
        eps: radius of the threat model, in pixel units of [0, 1] inputs.
        norm: ``linf`` or ``l2``.
        queries: model queries per point and restart (5000 in AutoAttack).
        p_init: initial fraction of pixels a square covers (0.8 in AutoAttack).
        restarts: independent runs on the points still unbroken.
        seed: seeds torch's global generator for the call.
    """

    eps: float
    norm: AutoAttackNorm = "linf"
    queries: int = 5000
    p_init: float = 0.8
    restarts: int = 1
    seed: int = 0

    requires: ClassVar[tuple[str, ...]] = ("pyautoattack",)
    uses_gradients: ClassVar[bool] = False  # score-based: queries the model's outputs only

    def __post_init__(self) -> None:
        check_eps(self.eps, "square")
        if self.queries < 1 or self.restarts < 1:
            raise ValueError("queries and restarts must be >= 1")
        if not 0.0 < self.p_init <= 1.0:
            raise ValueError(f"p_init must be in (0, 1], got {self.p_init}")
        check_norm(self.norm, "square")

    def label(self) -> str:
        """``square5000-linf``, plus every other setting not at its default (``-p_init=0.3``)."""
        return settings_label(self, f"square{self.queries}-{self.norm}", ("queries", "norm"))

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ValueError(
                f"square attacks images (N, C, H, W); got inputs of shape {tuple(x.shape)}"
            )
        square_cls = _reference("square", "SquareAttack", "square")
        if len(x) == 0:
            return x.clone()
        with _parameters_frozen(model), seeded_global_rng(self.seed, x.device):
            attack = square_cls(
                model,
                norm=_REFERENCE_NORM[self.norm],
                n_queries=self.queries,
                eps=self.eps,
                p_init=self.p_init,
                n_restarts=self.restarts,
                seed=self.seed,
                verbose=False,
                targeted=False,
                loss="margin",
                resc_schedule=False,
                device=x.device,
            )
            with torch.no_grad():
                x_adv = attack.perturb(x, y)
        return _into_threat_model(x, x_adv, self.eps, self.norm)
