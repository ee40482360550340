"""Minimal-norm and gradient-free attacks: DeepFool, C&W, DDN, EAD, salt-and-pepper, FMN.

A minimal-norm attack looks for the *smallest* adversarial perturbation of each point instead of
the strongest one inside a fixed ball. One run therefore gives the whole robust-accuracy-versus-eps
curve (:mod:`robcomp.evaluate.curves`), where PGD needs one run per eps.

Each attack has two entry points:

* ``attack.minimal(model, x, y)``: the unbounded minimal adversarial examples. Points the attack
  never breaks, and points the model already misclassifies, are returned unchanged.
* ``attack(model, x, y)``: the :class:`~robcomp.attacks.base.Attack` protocol. The minimal
  perturbation is clipped to the eps ball (rescaled in L1/L2, clamped in Linf) as Foolbox does for
  a minimization attack called with ``epsilons=eps``; a clipped point may or may not still be
  adversarial, and the evaluator checks. So ``attack(eps)`` is at least as strong as reading the
  minimal-norm curve at eps. ``eps=inf`` returns the minimal examples themselves.

The algorithms are Foolbox 3's (imported lazily; part of the base install), run on a
:class:`foolbox.PyTorchModel` with bounds (0, 1) and made deterministic by seeding torch's global
generator inside the call (and restoring it afterwards).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from robcomp.attacks.base import ATTACKS, check_eps, check_positive, parameters_frozen
from robcomp.attacks.labels import settings_label
from robcomp.attacks.norms import get_norm

# Rows whose float32 norm still exceeds eps after clipping are shrunk by this extra factor.
_SHRINK = 1.0 - 1e-6


def _foolbox() -> Any:
    try:
        import foolbox
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the minimal-norm attacks (deepfool, cw, ddn, ead, salt-and-pepper, fmn) wrap "
            "Foolbox 3; install it with: pip install 'foolbox==3.3.4'"
        ) from error
    return foolbox


def clip_to_ball(x: Tensor, x_adv: Tensor, eps: float, norm: str) -> Tensor:
    """Move ``x_adv`` into the ``eps`` ball around ``x`` (and [0, 1]) the way Foolbox does.

    Linf clamps each coordinate of the perturbation; L1 and L2 rescale perturbations longer than
    ``eps`` to length ``eps``. Both keep the point between ``x`` and ``x_adv``, hence in [0, 1].
    """
    if math.isinf(eps):
        return x_adv.clone()
    measure = get_norm(norm).measure
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        lengths = measure(delta).clamp_min(1e-12)
        delta = delta * (eps / lengths).clamp(max=1.0).reshape((-1,) + (1,) * (x.ndim - 1))
    clipped = (x + delta).clamp(0.0, 1.0)
    # x + delta - x rounds in float32 (and float32(eps) may exceed eps): shrink the few rows
    # that land a few ulps outside, comparing in float64.
    for _ in range(5):
        lengths = measure(clipped - x).double()
        over = lengths > eps
        if not bool(over.any()):
            break
        factor = torch.where(over, _SHRINK * eps / lengths.clamp_min(1e-12), 1.0).to(x.dtype)
        clipped = (x + (clipped - x) * factor.reshape((-1,) + (1,) * (x.ndim - 1))).clamp(0, 1)
    return clipped


@dataclass(frozen=True, kw_only=True)
class MinimalNormAttack(ABC):
    """Shared machinery of the Foolbox-backed minimal-norm attacks (not registered itself).

    Attributes:
        eps: radius of the threat model for ``attack(model, x, y)``; ``inf`` means unbounded.
        norm: the threat model's norm (each attack narrows the choice and sets a default).
        seed: seeds torch's global generator for the duration of the call.
    """

    eps: float = math.inf
    norm: str
    seed: int = 0

    allowed_norms: ClassVar[tuple[str, ...]]
    short_name: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ("foolbox",)
    uses_gradients: ClassVar[bool] = True
    # Float settings that must be > 0, >= 0, or inside (0, 1), checked when the file is loaded.
    positive: ClassVar[tuple[str, ...]] = ()
    non_negative: ClassVar[tuple[str, ...]] = ()
    unit_interval: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        check_eps(self.eps, self.short_name, unbounded=True)
        check_positive(self, *self.positive, *self.unit_interval)
        check_positive(self, *self.non_negative, strict=False)
        for name in self.unit_interval:
            if not getattr(self, name) < 1:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if self.norm not in self.allowed_norms:
            raise ValueError(
                f"{self.short_name}: norm must be one of {', '.join(self.allowed_norms)}, "
                f"got {self.norm!r}"
            )
        for name in ("steps", "binary_search_steps"):
            value = getattr(self, name, 1)
            if value < 1:
                raise ValueError(f"{self.short_name}: {name} must be >= 1, got {value}")
        if getattr(self, "candidates", 2) < 2:  # DeepFool compares the label with >= 1 other
            raise ValueError(f"candidates must be >= 2, got {getattr(self, 'candidates', 2)}")

    @abstractmethod
    def foolbox_attack(self, fb: Any) -> Any:
        """The configured Foolbox ``MinimizationAttack`` (``fb`` is the foolbox module)."""

    def label(self) -> str:
        """``ddn100-l2``, plus every other setting not at its default."""
        steps = getattr(self, "steps", None)
        short = f"{self.short_name}{steps if steps is not None else ''}-{self.norm}"
        return settings_label(self, short, ("steps", "norm"))

    def minimal(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """The unbounded minimal adversarial examples, float32 and contiguous like ``x``.

        Only correctly classified points are attacked; a point the attack does not break is
        returned unchanged, so ``model(result) == y`` marks the failures.
        """
        fb = _foolbox()
        x = x.detach()
        result = x.clone().contiguous()
        with torch.no_grad():
            correct = model(x).argmax(dim=1) == y
        index = correct.nonzero().squeeze(1)
        if len(index) == 0:
            return result
        devices = [x.device] if x.device.type == "cuda" else []
        # Foolbox calls .backward(), which would accumulate .grad into the caller's parameters
        # when the attack is used outside the evaluator (which freezes them).
        with torch.random.fork_rng(devices=devices), parameters_frozen(model):
            torch.manual_seed(self.seed)
            fmodel = fb.PyTorchModel(model, bounds=(0.0, 1.0), device=x.device)
            criterion = fb.criteria.Misclassification(y[index])
            raw, _, _ = self.foolbox_attack(fb)(
                fmodel, x[index].contiguous(), criterion, epsilons=None
            )
        candidate = torch.as_tensor(raw).detach().to(dtype=x.dtype).clamp(0.0, 1.0)
        with torch.no_grad():
            broken = model(candidate).argmax(dim=1) != y[index]
        result[index[broken]] = candidate[broken]
        return result

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return clip_to_ball(x, self.minimal(model, x, y), self.eps, self.norm)


@ATTACKS.register("deepfool")
@dataclass(frozen=True, kw_only=True)
class DeepFool(MinimalNormAttack):
    """DeepFool (Moosavi-Dezfooli et al. 2016, "DeepFool: a simple and accurate method to fool
    deep neural networks"): linearise the classifier and step to the nearest linearised boundary
    among the top ``candidates`` classes, repeating until the label flips.

    Foolbox's ``L2DeepFoolAttack`` / ``LinfDeepFoolAttack``.

    Attributes:
        norm: ``l2`` (the paper's main algorithm) or ``linf``.
        steps: maximum linearisation steps.
        candidates: number of most likely classes considered.
        overshoot: relative overshoot past the boundary.
        loss: ``logits`` (the paper) or ``crossentropy`` differences.
    """

    norm: Literal["l2", "linf"] = "l2"
    steps: int = 50
    candidates: int = 10
    overshoot: float = 0.02
    loss: Literal["logits", "crossentropy"] = "logits"

    allowed_norms: ClassVar[tuple[str, ...]] = ("l2", "linf")
    short_name: ClassVar[str] = "deepfool"
    non_negative: ClassVar[tuple[str, ...]] = ("overshoot",)

    def foolbox_attack(self, fb: Any) -> Any:
        cls = fb.attacks.L2DeepFoolAttack if self.norm == "l2" else fb.attacks.LinfDeepFoolAttack
        return cls(
            steps=self.steps, candidates=self.candidates, overshoot=self.overshoot, loss=self.loss
        )


@ATTACKS.register("cw")
@dataclass(frozen=True, kw_only=True)
class CarliniWagner(MinimalNormAttack):
    """The Carlini & Wagner L2 attack (Carlini & Wagner 2017, "Towards Evaluating the Robustness of
    Neural Networks"): Adam on ``||delta||_2^2 + c * max(z_y - max_{j!=y} z_j + confidence, 0)``
    in tanh space, with a per-sample binary search over ``c``.

    Foolbox's ``L2CarliniWagnerAttack``; ``steps`` defaults to 1000 instead of Foolbox's 10000
    (with ``abort_early`` most runs stop far sooner anyway).

    Attributes:
        binary_search_steps: searches over the constant ``c``.
        steps: Adam steps per search.
        stepsize: Adam learning rate.
        confidence: logit margin required (kappa in the paper).
        initial_const: first value of ``c``.
        abort_early: stop a search when the loss stalls (checked every ``steps / 10``).
    """

    norm: Literal["l2"] = "l2"
    binary_search_steps: int = 9
    steps: int = 1000
    stepsize: float = 1e-2
    confidence: float = 0.0
    initial_const: float = 1e-3
    abort_early: bool = True

    allowed_norms: ClassVar[tuple[str, ...]] = ("l2",)
    short_name: ClassVar[str] = "cw"
    positive: ClassVar[tuple[str, ...]] = ("stepsize", "initial_const")
    non_negative: ClassVar[tuple[str, ...]] = ("confidence",)

    def label(self) -> str:
        short = f"cw{self.binary_search_steps}x{self.steps}-l2"
        return settings_label(self, short, ("binary_search_steps", "steps", "norm"))

    def foolbox_attack(self, fb: Any) -> Any:
        return fb.attacks.L2CarliniWagnerAttack(
            binary_search_steps=self.binary_search_steps,
            steps=self.steps,
            stepsize=self.stepsize,
            confidence=self.confidence,
            initial_const=self.initial_const,
            abort_early=self.abort_early,
        )


@ATTACKS.register("ddn")
@dataclass(frozen=True, kw_only=True)
class DDN(MinimalNormAttack):
    """Decoupled Direction and Norm (Rony et al. 2019, "Decoupling Direction and Norm for Efficient
    Gradient-Based L2 Adversarial Attacks and Defenses"): normalised cross-entropy ascent steps
    (cosine-annealed from 1 to 0.01), with the perturbation rescaled to a norm ``epsilon`` that
    shrinks by ``1 - gamma`` while adversarial and grows by ``1 + gamma`` otherwise.

    Foolbox's ``DDNAttack``.

    Attributes:
        init_epsilon: initial norm of the rescaled perturbation.
        steps: gradient steps.
        gamma: multiplicative norm update.
    """

    norm: Literal["l2"] = "l2"
    init_epsilon: float = 1.0
    steps: int = 100
    gamma: float = 0.05

    allowed_norms: ClassVar[tuple[str, ...]] = ("l2",)
    short_name: ClassVar[str] = "ddn"
    positive: ClassVar[tuple[str, ...]] = ("init_epsilon",)
    unit_interval: ClassVar[tuple[str, ...]] = ("gamma",)

    def foolbox_attack(self, fb: Any) -> Any:
        return fb.attacks.DDNAttack(
            init_epsilon=self.init_epsilon, steps=self.steps, gamma=self.gamma
        )


@ATTACKS.register("ead")
@dataclass(frozen=True, kw_only=True)
class EAD(MinimalNormAttack):
    """Elastic-net attack (Chen et al. 2018, "EAD: Elastic-Net Attacks to Deep Neural Networks via
    Adversarial Examples"): FISTA on ``c * hinge + ||delta||_2^2 + beta * ||delta||_1`` with a
    binary search over ``c``, keeping the adversarial example of smallest L1 norm (the "L1"
    decision rule; the paper's other rule, "EN", ranks by the elastic-net distance).

    Foolbox's ``EADAttack(decision_rule="L1")``; ``steps`` defaults to 1000 instead of Foolbox's
    10000 (``abort_early`` stops most searches sooner).

    Attributes:
        binary_search_steps: searches over the constant ``c``.
        steps: FISTA iterations per search.
        initial_stepsize: FISTA step size, decayed by ``sqrt(1 - i / steps)``.
        confidence: logit margin required.
        initial_const: first value of ``c``.
        regularization: the L1 weight ``beta``.
        decision_rule: ``L1`` or ``EN``.
        abort_early: stop a search when the loss stalls.
    """

    norm: Literal["l1"] = "l1"
    binary_search_steps: int = 9
    steps: int = 1000
    initial_stepsize: float = 1e-2
    confidence: float = 0.0
    initial_const: float = 1e-3
    regularization: float = 1e-2
    decision_rule: Literal["L1", "EN"] = "L1"
    abort_early: bool = True

    allowed_norms: ClassVar[tuple[str, ...]] = ("l1",)
    short_name: ClassVar[str] = "ead"
    positive: ClassVar[tuple[str, ...]] = ("initial_stepsize", "initial_const")
    non_negative: ClassVar[tuple[str, ...]] = ("confidence", "regularization")

    def label(self) -> str:
        short = f"ead{self.binary_search_steps}x{self.steps}-l1"
        return settings_label(self, short, ("binary_search_steps", "steps", "norm"))

    def foolbox_attack(self, fb: Any) -> Any:
        return fb.attacks.EADAttack(
            binary_search_steps=self.binary_search_steps,
            steps=self.steps,
            initial_stepsize=self.initial_stepsize,
            confidence=self.confidence,
            initial_const=self.initial_const,
            regularization=self.regularization,
            decision_rule=self.decision_rule,
            abort_early=self.abort_early,
        )


@ATTACKS.register("salt-and-pepper")
@dataclass(frozen=True, kw_only=True)
class SaltAndPepper(MinimalNormAttack):
    """Salt-and-pepper noise, a gradient-free baseline (as in Foolbox; see Rauber et al. 2017,
    "Foolbox: A Python toolbox to benchmark the robustness of machine learning models"): set a
    random fraction ``p`` of pixels to 0 or 1, raising ``p`` until the label flips and then
    narrowing the search around the smallest adversarial L2 distance found.

    Foolbox's ``SaltAndPepperNoiseAttack``. Needs no gradients, so it also measures models whose
    gradients are masked (e.g. quantized ones).

    Attributes:
        steps: noise draws.
        across_channels: flip all channels of a pixel together.
    """

    norm: Literal["l2"] = "l2"
    steps: int = 1000
    across_channels: bool = True

    allowed_norms: ClassVar[tuple[str, ...]] = ("l2",)
    short_name: ClassVar[str] = "salt-and-pepper"
    uses_gradients: ClassVar[bool] = False  # random noise, scored by the model's outputs

    def foolbox_attack(self, fb: Any) -> Any:
        return fb.attacks.SaltAndPepperNoiseAttack(
            steps=self.steps, across_channels=self.across_channels
        )


def _l2_fmn(fb: Any) -> Any:
    """Foolbox 3.3.4's ``L2FMNAttack`` with its projection fixed.

    Its ``project`` computes ``factor = min(1, norms / norms)``, which is always 1, so the L2
    attack never projects onto the adaptive ball at all. This subclass projects as the paper's
    Algorithm 1 and the authors' code (pralab/Fast-Minimum-Norm-FMN-Attack) do.
    """
    import eagerpy as ep
    from foolbox.devutils import atleast_kd, flatten

    class FixedL2FMNAttack(fb.attacks.L2FMNAttack):
        def project(self, x: Any, x0: Any, epsilon: Any) -> Any:
            norms = ep.maximum(flatten(x - x0).norms.l2(axis=-1), 1e-12)
            factor = atleast_kd(ep.minimum(1, epsilon / norms), x.ndim)
            return x0 + (x - x0) * factor

    return FixedL2FMNAttack


@ATTACKS.register("fmn")
@dataclass(frozen=True, kw_only=True)
class FMN(MinimalNormAttack):
    """Fast Minimum-Norm attack (Pintor et al. 2021, "Fast Minimum-norm Adversarial Attacks through
    Adaptive Norm Constraints"): L2-normalised steps on the logit margin, projected onto an Lp ball
    whose radius shrinks by ``1 - gamma`` while adversarial and otherwise grows (or jumps to the
    linearised distance to the boundary); step size and ``gamma`` are cosine-annealed.

    Foolbox's ``LInfFMNAttack`` / ``L2FMNAttack`` / ``L1FMNAttack``, with the L2 projection bug of
    Foolbox 3.3.4 fixed (see :func:`_l2_fmn`).

    Started from the clean point (no ``init_attack``), FMN grows its radius to "current norm +
    linearised distance to the boundary" until the first adversarial is found. When the [0, 1] box
    clips the step by about that distance (8x8 digits: many pixels at 0 or 1), the radius stops
    growing and the iterate creeps towards the boundary without crossing it: on a digits CNN the L2
    and L1 variants broke only about half and four fifths of the points that DDN and EAD break.
    Prefer DDN for L2 curves there. The Linf variant breaks every point; its authors advise a larger
    ``max_stepsize`` for Linf (10 is clearly stronger than Foolbox's default 1 on digits).

    Attributes:
        norm: ``linf`` (the default, as for PGD), ``l2`` or ``l1``.
        steps: iterations.
        max_stepsize: initial step size (annealed to ``max_stepsize / 100``).
        gamma: initial norm-update factor (annealed to 0.001).
    """

    norm: Literal["linf", "l2", "l1"] = "linf"
    steps: int = 100
    max_stepsize: float = 1.0
    gamma: float = 0.05

    allowed_norms: ClassVar[tuple[str, ...]] = ("linf", "l2", "l1")
    short_name: ClassVar[str] = "fmn"
    positive: ClassVar[tuple[str, ...]] = ("max_stepsize",)
    unit_interval: ClassVar[tuple[str, ...]] = ("gamma",)

    def foolbox_attack(self, fb: Any) -> Any:
        cls = {
            "linf": fb.attacks.LInfFMNAttack,
            "l2": _l2_fmn(fb),
            "l1": fb.attacks.L1FMNAttack,
        }[self.norm]
        return cls(steps=self.steps, max_stepsize=self.max_stepsize, gamma=self.gamma)
