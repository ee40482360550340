"""Square Attack (Andriushchenko et al. 2020), for now through the official AutoAttack code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from robcomp.attacks.apgd import AutoAttackNorm, check_norm, seeded_global_rng
from robcomp.attacks.base import ATTACKS, check_eps
from robcomp.attacks.labels import settings_label
from robcomp.attacks.reference import (
    REFERENCE_NORM,
    into_threat_model,
    parameters_frozen,
    reference,
)


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
        square_cls = reference("square", "SquareAttack", "square")
        if len(x) == 0:
            return x.clone()
        with parameters_frozen(model), seeded_global_rng(self.seed, x.device):
            attack = square_cls(
                model,
                norm=REFERENCE_NORM[self.norm],
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
        return into_threat_model(x, x_adv, self.eps, self.norm)
