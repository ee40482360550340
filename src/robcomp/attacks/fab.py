"""FAB-T (Croce & Hein 2020), for now through the official AutoAttack code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from robcomp.attacks.apgd import AutoAttackNorm, check_norm, seeded_global_rng
from robcomp.attacks.base import ATTACKS, check_eps, check_positive
from robcomp.attacks.labels import settings_label
from robcomp.attacks.reference import (
    REFERENCE_NORM,
    into_threat_model,
    num_classes,
    parameters_frozen,
    reference,
)


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
        fab_cls = reference("fab_pt", "FABAttack_PT", "fab-t")
        if len(x) == 0:
            return x.clone()
        targets = min(self.n_target_classes, num_classes(model, x) - 1)
        if targets < 1:
            raise ValueError("fab-t needs a model with at least 2 classes")
        with parameters_frozen(model), seeded_global_rng(self.seed, x.device):
            attack = fab_cls(
                model,
                norm=REFERENCE_NORM[self.norm],
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
        return into_threat_model(x, x_adv, self.eps, self.norm)
