"""The training objectives of MC-AT (Kwon & Lee 2021, "Improving the Robustness of Model
Compression by On-Manifold Adversarial Training", Future Internet 13(12):300; reference code
sanglee/MC-ATON): MC-AT(on), MC-AT(off), MC-AT(dual) and MC-TRADES. Each is used as the
objective of the ``proximal-l0`` compressor (the paper's eq. 7 adds the filter-wise L0 penalty,
applied there by proximal steps), e.g.

```yaml
compress: {name: proximal-l0, sparsity: 0.95, objective: {name: mc-at-on, eta: 0.3}}
```

The on-manifold objectives need the data's generative model, passed like the on-manifold
attack's (:func:`robcomp.attacks.manifold.with_manifold`; ``fit`` and the training compressors
take a ``manifold`` and pass it on).

One difference from the paper: Algorithm 1 crafts the on-manifold training set once, against
the pre-trained model, before compression; here each batch's on-manifold examples are crafted
against the model being trained (online, like PGD-AT's), so they follow the compressed model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from robcomp.attacks.manifold import latent_pgd, require_manifold, select_on_manifold
from robcomp.config import runtime_field
from robcomp.models.generative import Manifold
from robcomp.train.adversarial import (
    PGDAT,
    TRADES,
    AttackMode,
    accuracy_of,
    inner_attack_mode,
)
from robcomp.train.objectives import OBJECTIVES


def _check_latent(eta: float, step: float, steps: int, who: str) -> None:
    if not (math.isfinite(eta) and eta > 0):
        raise ValueError(f"{who}: eta must be a finite number > 0 (latent units), got {eta}")
    if not (math.isfinite(step) and step > 0):
        raise ValueError(f"{who}: on_step must be a finite number > 0, got {step}")
    if steps < 1:
        raise ValueError(f"{who}: on_steps must be >= 1, got {steps}")


@dataclass(frozen=True, kw_only=True)
class _OnManifoldPart:
    """The on-manifold half shared by MC-AT(on) and MC-AT(dual)."""

    eta: float = 0.3
    on_step: float = 0.01
    on_steps: int = 7
    reanchor: bool = False
    attack_mode: AttackMode = "eval"
    manifold: Manifold | None = runtime_field(was="_manifold")

    needs_manifold: ClassVar[bool] = True

    def bind(self, manifold: Manifold) -> _OnManifoldPart:
        """A copy of this objective that uses ``manifold``."""
        return dataclasses.replace(self, manifold=manifold)

    def on_manifold_examples(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The batch's on-manifold adversarial examples that pass Definition 1 and their
        labels, ``(x_on (m, ...), y_on (m,))``."""
        manifold = require_manifold(self.manifold, type(self).__name__)
        with inner_attack_mode(model, self.attack_mode):
            z = manifold.encode(x).detach()
            z_adv = latent_pgd(
                model, manifold, z, y, eps=self.eta, step=self.on_step, steps=self.on_steps,
                reanchor=self.reanchor,
            )  # fmt: skip
            outcome = select_on_manifold(model, manifold, x, y, z, z_adv)
        return outcome.x_adv[outcome.kept].detach(), y[outcome.kept]


@OBJECTIVES.register("mc-at-on")
@dataclass(frozen=True, kw_only=True)
class MCATOn(_OnManifoldPart):
    """MC-AT(on) (Kwon & Lee 2021, eq. 7): cross-entropy averaged over the batch and its
    selected on-manifold adversarial examples (the ``m`` of the batch's ``n`` points that fool
    the model and keep their class): ``1/(m+n) sum_i CE(f(x_i), y_i)``.

    Attributes:
        eta: latent L-inf radius (simulation 0.3, HAR 0.003).
        on_step: signed latent step (simulation 0.01, HAR 0.0003).
        on_steps: latent PGD iterations (7 in the paper).
        reanchor: re-anchor at the clean code every step, as the authors' code does.
        attack_mode: model mode while crafting (``eval``: BatchNorm running statistics).
    """

    def __post_init__(self) -> None:
        _check_latent(self.eta, self.on_step, self.on_steps, "mc-at-on")

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        x_on, y_on = self.on_manifold_examples(model, x, y)
        logits = model(torch.cat([x, x_on]))  # (n + m, classes)
        loss = F.cross_entropy(logits, torch.cat([y, y_on]))
        return {
            "loss": loss,
            "logits": logits[: len(x)],
            "on_selected": torch.tensor(len(y_on) / len(y), device=x.device),
        }


@OBJECTIVES.register("mc-at-off")
@dataclass(frozen=True, kw_only=True)
class MCATOff(PGDAT):
    """MC-AT(off) (Kwon & Lee 2021, eq. 3): PGD adversarial training (Madry et al. 2018), i.e.
    ``pgd-at`` with the paper's HAR settings as defaults (eps 0.07, step 0.01, 7 steps); every
    field is ``pgd-at``'s."""

    eps: float = 0.07
    step: float = 0.01
    steps: int = 7


@OBJECTIVES.register("mc-at-dual")
@dataclass(frozen=True, kw_only=True)
class MCATDual(_OnManifoldPart):
    """MC-AT(dual) (Kwon & Lee 2021, Sec. 5.2, after the dual manifold adversarial training of
    Lin et al. 2020): cross-entropy averaged over the batch's off-manifold PGD examples and its
    selected on-manifold examples, as the authors' code does (the clean batch itself is not
    trained on: its place is taken by its PGD examples).

    Attributes:
        eps: L-inf radius of the off-manifold PGD (HAR 0.07).
        step: its step size (HAR 0.01).
        steps: its iterations (HAR 7).
        eta: latent L-inf radius of the on-manifold attack.
        on_step: its signed step.
        on_steps: its iterations.
        reanchor: re-anchor at the clean code every step, as the authors' code does.
        attack_mode: model mode while crafting either kind.
    """

    eps: float = 0.07
    step: float = 0.01
    steps: int = 7

    def __post_init__(self) -> None:
        _check_latent(self.eta, self.on_step, self.on_steps, "mc-at-dual")
        self._off()  # pgd-at's checks name a bad eps, step or steps

    def _off(self) -> PGDAT:
        return PGDAT(eps=self.eps, step=self.step, steps=self.steps, attack_mode=self.attack_mode)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        x_off = self._off().adversarial_examples(model, x, y)
        x_on, y_on = self.on_manifold_examples(model, x, y)
        logits = model(torch.cat([x_off, x_on]))  # (n + m, classes)
        loss = F.cross_entropy(logits, torch.cat([y, y_on]))
        return {
            "loss": loss,
            "adv_accuracy": accuracy_of(logits[: len(x)], y),
            "on_selected": torch.tensor(len(y_on) / len(y), device=x.device),
        }


@OBJECTIVES.register("mc-trades")
@dataclass(frozen=True, kw_only=True)
class MCTRADES(TRADES):
    """MC-TRADES (Kwon & Lee 2021, eq. 4): TRADES (Zhang et al. 2019) with the authors'
    ``beta = 1`` and the paper's HAR PGD settings (eps 0.07, step 0.01, 7 steps) as defaults;
    every field is ``trades``'."""

    eps: float = 0.07
    step: float = 0.01
    steps: int = 7
    beta: float = 1.0
