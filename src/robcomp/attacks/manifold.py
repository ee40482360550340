"""On-manifold adversarial examples: projected gradient ascent in a generative model's latent
space (Kwon & Lee 2021, "Improving the Robustness of Model Compression by On-Manifold
Adversarial Training", Future Internet 13(12):300, Sec. 4.1 and Algorithm 1; after Stutz et al.
2019; reference code sanglee/MC-ATON).

The threat model is not an Lp ball around ``x``: it is an L-inf ball of radius ``eps`` (the
paper's eta) around the latent code ``z = encode(x)``, mapped through the decoder, and a point
counts only if it also keeps its true class on the manifold (Definition 1). The evaluator checks
exactly that (``threat = "latent"``): the latent ball, that ``x_adv`` is the decoding of the
reported latent, and that points not kept are returned unchanged.

The generative model (a :class:`~robcomp.models.generative.Manifold`) is passed explicitly: a
component that needs one declares ``needs_manifold`` and a ``manifold`` run-time field
(:func:`~robcomp.config.runtime_field`), and :func:`with_manifold` returns a copy holding it. The
experiment pipeline builds the cell's generative model (lazily, once) and binds it to every
component that takes one; the component stays a plain, hashable, YAML-writable config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from robcomp.attacks.base import ATTACKS, check_eps, check_positive
from robcomp.attacks.labels import settings_label
from robcomp.config import is_runtime, runtime_field
from robcomp.models.generative import Manifold

C = TypeVar("C")


def is_latent(attack: Any) -> bool:
    """Whether ``attack``'s threat model is a latent ball (``threat = "latent"``), checked by
    the evaluator in latent space instead of as an Lp ball around the input."""
    return getattr(attack, "threat", "lp") == "latent"


def needs_manifold(component: Any) -> bool:
    """Whether ``component`` (an attack, objective or shift) needs a generative model."""
    return bool(getattr(component, "needs_manifold", False))


def takes_manifold(component: Any) -> bool:
    """Whether ``component`` is a dataclass instance with a ``manifold`` run-time field (it can
    be handed a generative model by :func:`with_manifold`)."""
    if not dataclasses.is_dataclass(component) or isinstance(component, type):
        return False
    return any(f.name == "manifold" and is_runtime(f) for f in dataclasses.fields(component))


def with_manifold(component: C, manifold: Manifold | None) -> C:
    """A copy of ``component`` holding ``manifold`` if it takes one (on-manifold attacks,
    objectives and shifts; compressors that train with a configurable objective); else
    ``component`` itself. ``manifold`` None returns ``component`` unchanged."""
    if manifold is None or not takes_manifold(component):
        return component
    bound: C = dataclasses.replace(component, manifold=manifold)  # type: ignore[type-var]
    return bound


class ManifoldMissing(RuntimeError):
    """An on-manifold component ran without a generative model."""


def require_manifold(bound: Manifold | None, who: str) -> Manifold:
    """``bound``, or a clear error saying how to pass one."""
    if bound is None:
        raise ManifoldMissing(
            f"{who} needs a generative model of the data: pass one with "
            "robcomp.attacks.manifold.with_manifold(component, manifold) (the experiment "
            "pipeline does; robcomp.evaluate.manifold_for builds the one a cell uses)"
        )
    return bound


@dataclass(frozen=True)
class LatentOutcome:
    """One on-manifold attack on a batch.

    Attributes:
        x_adv: the decoded adversarial inputs where ``kept``, the unchanged inputs elsewhere.
        z: latent codes of the inputs, (B, k).
        z_adv: perturbed codes (the final iterate, also where not kept), (B, k).
        fooled: the target model misclassifies ``decode(z_adv)``.
        kept: ``fooled`` and the class is kept on the manifold (Definition 1).
    """

    x_adv: Tensor
    z: Tensor
    z_adv: Tensor
    fooled: Tensor
    kept: Tensor


def latent_pgd(
    model: nn.Module,
    manifold: Manifold,
    z: Tensor,
    y: Tensor,
    *,
    eps: float,
    step: float,
    steps: int,
    reanchor: bool = False,
) -> Tensor:
    """Signed-gradient ascent of the summed CE of ``model(decode(zeta))`` over ``zeta`` in the
    L-inf ball of radius ``eps`` around ``z``, from ``zeta = z``; returns the final ``zeta``.

    ``reanchor=False`` accumulates the steps (PGD, as the paper writes it). ``reanchor=True``
    restarts each step from ``z`` (``zeta = z + clip(step * sign(g), -eps, eps)``, ``g`` taken
    at the previous iterate), as the authors' code (sanglee/MC-ATON) does: every coordinate of
    the result is ``z +- min(step, eps)``, in effect one latent FGSM step.
    """
    z = z.detach()
    zeta = z.clone()
    for _ in range(steps):
        zeta.requires_grad_(True)
        loss = F.cross_entropy(model(manifold.decode(zeta)), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, zeta)
        with torch.no_grad():
            anchor = z if reanchor else zeta
            zeta = z + (anchor + step * grad.sign() - z).clamp(-eps, eps)
    return zeta.detach()


def select_on_manifold(
    model: nn.Module, manifold: Manifold, x: Tensor, y: Tensor, z: Tensor, z_adv: Tensor
) -> LatentOutcome:
    """Apply Definition 1 to perturbed codes: keep ``decode(z_adv)`` where it fools ``model``
    and ``manifold.keeps_class``; elsewhere return ``x`` unchanged (not an adversarial)."""
    with torch.no_grad():
        x_dec = manifold.decode(z_adv).clamp(0.0, 1.0)
        fooled = model(x_dec).argmax(1) != y
        kept = fooled & manifold.keeps_class(z_adv, y)
        mask = kept.reshape(-1, *([1] * (x.ndim - 1)))
        x_adv = torch.where(mask, x_dec, x)
    return LatentOutcome(x_adv=x_adv, z=z, z_adv=z_adv, fooled=fooled, kept=kept)


@ATTACKS.register("on-manifold")
@dataclass(frozen=True, kw_only=True)
class OnManifold:
    """On-manifold adversarial examples (Kwon & Lee 2021, Algorithm 1; Stutz et al. 2019): L-inf
    PGD on a latent perturbation, decoded, filtered by Definition 1.

    ``z = encode(x)``; ``zeta`` starts at ``z``; each of ``steps`` steps ascends the target
    model's cross-entropy of ``decode(zeta)`` by ``step_size * sign(grad)`` and projects
    ``zeta - z`` onto ``[-eps, eps]``; ``x_adv = clip(decode(zeta), 0, 1)``. A point is kept only
    if it fools the model and keeps its true class by the manifold's judge (a latent classifier
    on VAE codes; the exact Bayes rule on the ``gaussians`` simulation); points not kept are
    returned unchanged, so they count as not broken.

    ``reanchor=True`` reproduces the authors' code (sanglee/MC-ATON), which restarts every step
    from ``z``, so the result is one latent FGSM step of size ``min(step_size, eps)``; the
    default accumulates the steps as the paper's PGD does. The paper's settings: simulation
    eps 0.3, step 0.01, 7 steps; HAR eps 0.003, step 0.0003, 7 steps.

    Pass the generative model with :func:`with_manifold` (or :meth:`bind`).

    Attributes:
        eps: the latent L-inf radius (the paper's eta), in latent units (not pixels).
        step_size: the signed step (the paper's alpha).
        steps: iterations (the paper's k).
        reanchor: re-anchor at ``z`` every step, as the reference code.
        seed: unused (the attack draws nothing at random); kept so that training code that
            re-seeds attacks per batch treats it like the others.
        manifold: the generative model, bound at run time (not configuration).
    """

    eps: float
    step_size: float = 0.01
    steps: int = 7
    reanchor: bool = False
    seed: int = 0
    manifold: Manifold | None = runtime_field(was="_manifold")

    uses_gradients: ClassVar[bool] = True
    needs_manifold: ClassVar[bool] = True
    threat: ClassVar[str] = "latent"
    norm: ClassVar[str] = "latent-linf"  # never grouped with pixel-space threat models

    def __post_init__(self) -> None:
        check_eps(self.eps, "on-manifold")
        check_positive(self, "step_size")
        if self.steps < 1:
            raise ValueError(f"on-manifold: steps must be >= 1, got {self.steps}")

    def label(self) -> str:
        """``on-manifold7``, plus every other setting not at its default."""
        return settings_label(self, f"on-manifold{self.steps}", ("steps",))

    def bind(self, manifold: Manifold) -> OnManifold:
        """A copy of this attack that uses ``manifold``."""
        return dataclasses.replace(self, manifold=manifold)

    def generative_model(self) -> Manifold:
        """The bound manifold; :class:`ManifoldMissing` if none was passed."""
        return require_manifold(self.manifold, "the on-manifold attack")

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> LatentOutcome:
        """The attack with its latents and its selection, for the evaluator's checks."""
        manifold = self.generative_model()
        z = manifold.encode(x).detach()
        z_adv = latent_pgd(
            model, manifold, z, y, eps=self.eps, step=self.step_size, steps=self.steps,
            reanchor=self.reanchor,
        )  # fmt: skip
        return select_on_manifold(model, manifold, x, y, z, z_adv)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return self.perturb(model, x, y).x_adv
