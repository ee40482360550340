"""Projected gradient descent (Madry et al. 2018) and FGSM (Goodfellow et al. 2015)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from robcomp.attacks.base import ATTACKS, check_eps, check_positive
from robcomp.attacks.labels import settings_label
from robcomp.attacks.norms import L1, Linf, Norm, NormName, box_feasible, get_norm

LossOfLogits = Callable[[Tensor], Tensor]


def summed_ce(y: Tensor) -> LossOfLogits:
    """Cross-entropy with labels ``y``, summed over the batch: each sample's gradient is then
    independent of the batch size."""
    return lambda logits: F.cross_entropy(logits, y, reduction="sum")


def ascend(
    model: nn.Module,
    x: Tensor,
    start: Tensor,
    loss_fn: LossOfLogits,
    *,
    eps: float,
    step: float,
    steps: int,
    norm: Norm | str = "linf",
) -> Tensor:
    """``steps`` steps of projected steepest ascent of ``loss_fn(model(x'))`` from ``start``.

    The core of PGD (Madry et al. 2018), FGSM and the inner maximisation of adversarial
    training (TRADES and the robust distillations included): ``start`` is first projected onto
    the eps ball around ``x`` (in ``norm``) intersected with [0, 1]; each step then moves by
    ``step`` along ``norm``'s ascent direction and projects back. ``loss_fn`` must sum over the
    batch, so that each point's step does not depend on the batch size.
    """
    norm = get_norm(norm) if isinstance(norm, str) else norm
    x_adv = (x + norm.project(start - x, eps)).clamp(0.0, 1.0).detach()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(model(x_adv)), x_adv)
        with torch.no_grad():
            if isinstance(norm, Linf):
                x_adv = _linf_step(x, x_adv, grad, step, eps)
            else:
                if isinstance(norm, L1):
                    # A sparse step must not be spent on pixels pinned at a box face.
                    grad = box_feasible(grad, x_adv)
                moved = x_adv + step * norm.ascent(grad)
                x_adv = (x + norm.project(moved - x, eps)).clamp(0.0, 1.0)
    return x_adv.detach()


def _linf_step(x: Tensor, x_adv: Tensor, grad: Tensor, step: float, eps: float) -> Tensor:
    """``clamp(x + clamp(x_adv + step * sign(grad) - x, -eps, eps), 0, 1)``, in place.

    The same operations in the same order as the generic step (so the same bits: the two
    additions only swap their operands), but on one fresh tensor instead of six. Each
    temporary has the batch's size, which CPU allocators hand back to the OS and fault in
    again every step: on a busy 2-core machine the update of a batch of 128 CIFAR images
    took 24 ms this way instead of 5 ms (a ResNet-20 forward/backward takes ~350 ms).
    """
    out = grad.sign()  # a new tensor: ``grad`` may be an expanded view, unsafe to write
    out.mul_(step).add_(x_adv)
    return out.sub_(x).clamp_(-eps, eps).add_(x).clamp_(0.0, 1.0)


@ATTACKS.register("pgd")
@dataclass(frozen=True, kw_only=True)
class PGD:
    """Projected gradient ascent on the cross-entropy (Madry et al. 2018, "Towards Deep Learning
    Models Resistant to Adversarial Attacks").

    Attributes:
        eps: radius of the threat model, in pixel units of [0, 1] inputs.
        norm: ``linf``, ``l2`` or ``l1`` (sparse SLIDE steps, see
            :class:`~robcomp.attacks.norms.L1`).
        steps: gradient steps per restart.
        step_size: size of each step; default ``2.5 * eps / steps`` (Madry et al.).
        random_start: start from a uniform point in the eps ball instead of ``x``.
        restarts: independent runs; a point counts as broken if any run breaks it.
        seed: seeds the random starts, so the attack is deterministic.
    """

    eps: float
    norm: NormName = "linf"
    steps: int = 10
    step_size: float | None = None
    random_start: bool = True
    restarts: int = 1
    seed: int = 0

    uses_gradients: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_eps(self.eps, "pgd")
        if self.steps < 1 or self.restarts < 1:
            raise ValueError("steps and restarts must be >= 1")
        if self.step_size is not None:
            check_positive(self, "step_size")
        get_norm(self.norm)

    @property
    def alpha(self) -> float:
        return self.step_size if self.step_size is not None else 2.5 * self.eps / self.steps

    def label(self) -> str:
        """``pgd10-linf``, plus every other setting not at its default (``-s0.01-r5``)."""
        return settings_label(self, f"pgd{self.steps}-{self.norm}", ("steps", "norm"))

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        norm = get_norm(self.norm)
        delta = (
            norm.random_start(x, self.eps, generator) if self.random_start else torch.zeros_like(x)
        )
        return ascend(
            model, x, x + delta, summed_ce(y), eps=self.eps, step=self.alpha, steps=self.steps,
            norm=norm,
        )  # fmt: skip

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        x_best = x.clone()
        todo = torch.ones(len(x), dtype=torch.bool, device=x.device)  # no restart broke them yet
        for restart in range(self.restarts):
            idx = todo.nonzero().squeeze(1)
            if len(idx) == 0:
                break
            x_adv = self._run(model, x[idx], y[idx], generator)
            x_best[idx] = x_adv
            if restart + 1 == self.restarts:
                break  # only later restarts need to know which points broke: save a forward
            with torch.no_grad():
                broken = model(x_adv).argmax(1) != y[idx]
            todo[idx[broken]] = False
        return x_best


@ATTACKS.register("fgsm")
@dataclass(frozen=True, kw_only=True)
class FGSM:
    """The fast gradient sign method (Goodfellow et al. 2015): PGD with one full step.

    With ``norm="l2"`` it is the fast gradient method (one step of size eps along the gradient).
    """

    eps: float
    norm: NormName = "linf"
    random_start: bool = False
    seed: int = 0

    uses_gradients: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_eps(self.eps, "fgsm")
        get_norm(self.norm)

    def label(self) -> str:
        """``fgsm-linf``, plus every other setting not at its default."""
        return settings_label(self, f"fgsm-{self.norm}", ("norm",))

    def as_pgd(self) -> PGD:
        return PGD(
            eps=self.eps,
            norm=self.norm,
            steps=1,
            step_size=self.eps,
            random_start=self.random_start,
            seed=self.seed,
        )

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return self.as_pgd()(model, x, y)
