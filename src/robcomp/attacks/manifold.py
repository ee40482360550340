"""On-manifold adversarial examples: projected gradient ascent in a generative model's latent
space (Kwon & Lee 2021, "Improving the Robustness of Model Compression by On-Manifold
Adversarial Training", Future Internet 13(12):300, Sec. 4.1 and Algorithm 1; after Stutz et al.
2019; reference code sanglee/MC-ATON).

The threat model is not an Lp ball around ``x``: it is an L-inf ball of radius ``eps`` (the
paper's eta) around the latent code ``z = encode(x)``, mapped through the decoder, and a point
counts only if it also keeps its true class on the manifold (Definition 1). The evaluator checks
exactly that (``threat = "latent"``): the latent ball, that ``x_adv`` is the decoding of the
reported latent, and that points not kept are returned unchanged.

The generative model (a :class:`~robcomp.models.generative.Manifold`) is bound at run time,
either explicitly (``attack.bind(manifold)``) or for a whole block of code with
:func:`using_manifold` (how the runner provides it to attacks, shifts and to objectives built
deep inside a compressor): the component stays a plain, hashable, YAML-writable config.
"""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from robcomp.attacks.base import ATTACKS, check_eps, check_positive
from robcomp.attacks.labels import settings_label
from robcomp.models.generative import Manifold

ManifoldSource = Manifold | Callable[[], Manifold]


class _Active:
    """A manifold for a block of code; a factory is called once, on first use (so a cell whose
    components never ask for a manifold never trains a VAE)."""

    def __init__(self, source: ManifoldSource) -> None:
        self.source = source
        self.built: Manifold | None = source if _is_manifold(source) else None  # type: ignore[assignment]

    def get(self) -> Manifold:
        if self.built is None:
            self.built = self.source()  # type: ignore[operator]
        return self.built


def _is_manifold(obj: Any) -> bool:
    return all(callable(getattr(obj, name, None)) for name in ("encode", "decode", "keeps_class"))


_ACTIVE: contextvars.ContextVar[_Active | None] = contextvars.ContextVar("manifold", default=None)


@contextmanager
def using_manifold(source: ManifoldSource) -> Iterator[None]:
    """Provide ``source`` (a manifold, or a no-argument factory of one, called at most once, on
    first use) to every on-manifold component that runs inside the block without its own."""
    token = _ACTIVE.set(_Active(source))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_manifold() -> Manifold | None:
    """The manifold provided by the innermost :func:`using_manifold`, or None."""
    active = _ACTIVE.get()
    return None if active is None else active.get()


def is_latent(attack: Any) -> bool:
    """Whether ``attack``'s threat model is a latent ball (``threat = "latent"``), checked by
    the evaluator in latent space instead of as an Lp ball around the input."""
    return getattr(attack, "threat", "lp") == "latent"


def needs_manifold(component: Any) -> bool:
    """Whether ``component`` (an attack, objective or shift) needs a generative model."""
    return bool(getattr(component, "needs_manifold", False))


class ManifoldMissing(RuntimeError):
    """An on-manifold component ran without a generative model."""


def resolve_manifold(bound: Manifold | None, who: str) -> Manifold:
    """``bound`` if set, else the active manifold; raise a clear error if neither."""
    manifold = bound if bound is not None else active_manifold()
    if manifold is None:
        raise ManifoldMissing(
            f"{who} needs a generative model of the data: bind one with .bind(manifold) or run "
            "inside robcomp.attacks.manifold.using_manifold(...) (the experiment runner does; "
            "see robcomp.evaluate.manifold.manifold_for)"
        )
    return manifold


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

    Bind the generative model with :meth:`bind` or :func:`using_manifold`.

    Attributes:
        eps: the latent L-inf radius (the paper's eta), in latent units (not pixels).
        step_size: the signed step (the paper's alpha).
        steps: iterations (the paper's k).
        reanchor: re-anchor at ``z`` every step, as the reference code.
        seed: unused (the attack draws nothing at random); kept so that training code that
            re-seeds attacks per batch treats it like the others.
    """

    eps: float
    step_size: float = 0.01
    steps: int = 7
    reanchor: bool = False
    seed: int = 0
    _manifold: Manifold | None = field(default=None, init=False, repr=False, compare=False)

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
        bound = dataclasses.replace(self)
        object.__setattr__(bound, "_manifold", manifold)
        return bound

    def manifold(self) -> Manifold:
        """The bound manifold, else the active one (:func:`using_manifold`)."""
        return resolve_manifold(self._manifold, "the on-manifold attack")

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> LatentOutcome:
        """The attack with its latents and its selection, for the evaluator's checks."""
        manifold = self.manifold()
        z = manifold.encode(x).detach()
        z_adv = latent_pgd(
            model, manifold, z, y, eps=self.eps, step=self.step_size, steps=self.steps,
            reanchor=self.reanchor,
        )  # fmt: skip
        return select_on_manifold(model, manifold, x, y, z, z_adv)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return self.perturb(model, x, y).x_adv
