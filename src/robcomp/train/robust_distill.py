"""Robust distillation objectives: ``ard``, ``rslad``, ``iad-i`` and ``iad-ii``.

Each trains a student against a frozen, adversarially trained teacher, named (like the ``kd``
objective's) by a checkpoint folder or by the ``memory:`` handle of the ``distill`` compressor,
which takes any of them by name (``distill`` with ``objective: rslad``). The loss scalings follow
the authors' code, not the papers' notation, because the KL reductions differ between methods and
change the effective learning rate (the reductions as written in each repository):

=========  =====================================  ================================================
name       KL reduction                           reference
=========  =====================================  ================================================
ard        mean over B * C (``nn.KLDivLoss()``)   goldblum/AdversariallyRobustDistillation
rslad      mean over B * C                        zibojia/RSLAD
iad-i/ii   sum over classes, mean over B          ZFancy/IAD
=========  =====================================  ================================================

Threat models are L-infinity in pixel units of [0, 1] inputs (``eps``, ``step``, ``steps``),
8/255, 2/255 and 10 by default as in all three codes. The inner attacks use the machinery of
:mod:`robcomp.train.adversarial`, including its one deliberate difference from the references:
BatchNorm running statistics are restored after the attack instead of absorbing its iterates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from robcomp.train.adversarial import (
    ascend,
    check_eps,
    check_steps,
    check_weight,
    inner_attack_mode,
    summed_ce,
    uniform_start,
)
from robcomp.train.distill import load_teacher
from robcomp.train.objectives import OBJECTIVES, Progress

EPS = 8 / 255
STEP = 2 / 255

# ------------------------------------------------------------------------------ the losses


def kl_rows(student: Tensor, target: Tensor) -> Tensor:
    """Per-sample ``KL(softmax(target) || softmax(student))``, summed over classes; shape (B,)."""
    log_q = F.log_softmax(student, dim=1)  # (B, C)
    p = F.softmax(target, dim=1)  # (B, C)
    return F.kl_div(log_q, p, reduction="none").sum(dim=1)


def elementwise_mean_kl(student: Tensor, target: Tensor) -> Tensor:
    """``KL(softmax(target) || softmax(student))`` summed and divided by B * C, as
    ``nn.KLDivLoss()`` (reduction ``"mean"``) computes it in the ARD and RSLAD code.

    Written out because torch warns that ``"mean"`` will come to mean ``"batchmean"``.
    """
    return kl_rows(student, target).sum() / student.numel()


def ard_loss(
    s_adv: Tensor, s_nat: Tensor, t_nat: Tensor, y: Tensor, *, tau: float, alpha: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Goldblum et al.'s ARD loss; returns (loss, kl, ce).

    ``loss = alpha * tau^2 * kl + (1 - alpha) * CE(s_nat, y)`` with
    ``kl = KL(softmax(t_nat / tau) || softmax(s_adv / tau))`` averaged over all B * C entries, as
    ``nn.KLDivLoss()`` does in the reference: per sample that is tau^2 / C times the KL.
    """
    kl = elementwise_mean_kl(s_adv / tau, t_nat / tau)
    ce = F.cross_entropy(s_nat, y)
    return alpha * tau**2 * kl + (1.0 - alpha) * ce, kl, ce


def rslad_loss(
    s_adv: Tensor, s_nat: Tensor, t_nat: Tensor, *, adv_weight: float, scale: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Zi et al.'s RSLAD outer loss; returns (loss, kl_adv, kl_nat).

    ``loss = scale * (adv_weight * kl_adv + (1 - adv_weight) * kl_nat)`` where each KL is of the
    teacher's clean soft labels (temperature 1) to the student, averaged over all B * C entries.
    The reference adds 1e-5 inside the log of the teacher's probabilities; that changes only a
    constant (the teacher's entropy), not the gradients, so the exact KL is used here.
    """
    kl_adv = elementwise_mean_kl(s_adv, t_nat)
    kl_nat = elementwise_mean_kl(s_nat, t_nat)
    return scale * (adv_weight * kl_adv + (1.0 - adv_weight) * kl_nat), kl_adv, kl_nat


def trust(t_adv: Tensor, y: Tensor, beta: float) -> Tensor:
    """IAD's per-sample trust in the teacher, ``P_T(x')[y] ** beta``; shape (B,), no gradient.

    The reference reads it with ``.item()``, so it is a constant weight, not a path for gradients.
    """
    with torch.no_grad():
        return F.softmax(t_adv, dim=1).gather(1, y[:, None]).squeeze(1).pow(beta)


def iad1_loss(
    s_adv: Tensor,
    s_nat: Tensor,
    t_nat: Tensor,
    y: Tensor,
    weight: Tensor | None,
    *,
    tau: float,
    alpha: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Zhu et al.'s IAD-I loss; returns (loss, kl, self_kl, ce).

    ``loss = alpha * tau^2 * kl + alpha * self_kl + (1 - alpha) * CE(s_nat, y)`` with
    ``kl = mean_i KL(softmax(t_nat / tau) || softmax(s_adv / tau))`` (batch mean, unlike ARD) and
    ``self_kl = mean_i (1 - weight_i) KL(softmax(s_nat) || softmax(s_adv))``, the student's own
    clean prediction as a target where the teacher is untrusted. ``s_nat`` is not detached there,
    as in the reference. ``weight=None`` (before IAD's ``begin`` epoch) drops the self term, which
    leaves ARD with a batch-mean KL, the reference's warm-up.
    """
    kl = kl_rows(s_adv / tau, t_nat / tau).mean()
    ce = F.cross_entropy(s_nat, y)
    if weight is None:
        self_kl = torch.zeros((), device=s_adv.device)
    else:
        self_kl = (kl_rows(s_adv, s_nat) * (1.0 - weight)).mean()
    return alpha * tau**2 * kl + alpha * self_kl + (1.0 - alpha) * ce, kl, self_kl, ce


def iad2_loss(
    s_adv: Tensor,
    s_nat: Tensor | None,
    t_adv: Tensor,
    st_adv: Tensor,
    y: Tensor,
    weight: Tensor | None,
    *,
    tau: float,
    alpha1: float,
    alpha2: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Zhu et al.'s IAD-II loss; returns (loss, kl, self_kl, kl_natural, ce).

    ``loss = (1 - alpha1 - alpha2) * CE(s_adv, y) + alpha1 * tau^2 * mean_i [weight_i * KL_T,i +
    (1 - weight_i) * KL_self,i] + alpha2 * tau^2 * mean_i KL_N,i`` where ``KL_T`` is the robust
    teacher's (``t_adv``) and ``KL_N`` the natural teacher's (``st_adv``) tempered soft labels on
    the adversarial point to the student's, and ``KL_self`` the student's clean prediction to its
    adversarial one (untempered, inside the tau^2 factor, as in the reference). ``weight=None``
    (before ``begin``) means full trust: no self term, ``s_nat`` unused.
    """
    kl_t = kl_rows(s_adv / tau, t_adv / tau)  # (B,)
    kl_n = kl_rows(s_adv / tau, st_adv / tau).mean()
    ce = F.cross_entropy(s_adv, y)
    if weight is None:
        distill, kl_self = kl_t.mean(), torch.zeros((), device=s_adv.device)
    else:
        if s_nat is None:
            raise ValueError("iad2_loss with trust weights needs the student's clean logits")
        self_rows = kl_rows(s_adv, s_nat)  # (B,)
        distill = (weight * kl_t + (1.0 - weight) * self_rows).mean()
        kl_self = ((1.0 - weight) * self_rows).mean()
    loss = (1.0 - alpha1 - alpha2) * ce + alpha1 * tau**2 * distill + alpha2 * tau**2 * kl_n
    return loss, kl_t.mean(), kl_self, kl_n, ce


# ------------------------------------------------------------------------------ the attacks


def ce_adversary(
    model: nn.Module, x: Tensor, y: Tensor, *, eps: float, step: float, steps: int
) -> Tensor:
    """ARD's and IAD's inner maximisation: PGD-CE on the student from a uniform start, with the
    student in train mode as in both references (BatchNorm on batch statistics; its running
    statistics are restored afterwards, see :func:`robcomp.train.adversarial.inner_attack_mode`).
    """
    with inner_attack_mode(model, "train"):
        return ascend(
            model, x, uniform_start(x, eps), summed_ce(y), eps=eps, step=step, steps=steps
        )


def kl_adversary(
    model: nn.Module, x: Tensor, t_nat: Tensor, *, eps: float, step: float, steps: int
) -> Tensor:
    """RSLAD's inner maximisation: ascend the summed KL from the teacher's clean soft labels to
    the student, in eval mode, from ``x + 0.001 N(0, 1)`` (as TRADES starts)."""
    p = F.softmax(t_nat, dim=1)  # (B, C)
    start = x + 0.001 * torch.randn_like(x)
    with inner_attack_mode(model, "eval"):
        return ascend(
            model, x, start,
            lambda logits: F.kl_div(F.log_softmax(logits, dim=1), p, reduction="sum"),
            eps=eps, step=step, steps=steps,
        )  # fmt: skip


def _teacher_logits(teacher: str, x: Tensor) -> Tensor:
    model = load_teacher(teacher)  # cached, frozen, eval mode
    with torch.no_grad():
        return model.to(x.device)(x)


def _clean_logits(model: nn.Module, x: Tensor) -> Tensor:
    """Clean logits for the loop's training accuracy where the reference loss has none: eval
    mode and no gradient, so neither the loss nor the BatchNorm statistics change."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(x)
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------- the objectives


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True, kw_only=True)
class RobustDistillation:
    """Fields shared by the robust distillation objectives.

    Attributes:
        teacher: the (adversarially trained) teacher: a robcomp checkpoint folder, loaded once per
            process and frozen, or a ``memory:`` handle of the ``distill`` compressor.
        eps: L-inf radius of the training attack on the student, in [0, 1] pixel units.
        step: size of each signed-gradient step.
        steps: number of steps.
    """

    teacher: str
    eps: float = EPS
    step: float = STEP
    steps: int = 10

    def __post_init__(self) -> None:
        _check(bool(self.teacher), "teacher must name a checkpoint folder")
        check_eps(self.eps)
        check_steps(self.step, self.steps)

    def _ce_adversary(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return ce_adversary(model, x, y, eps=self.eps, step=self.step, steps=self.steps)


def _check_tau_alpha(tau: float, alpha: float) -> None:
    _check(0 < tau < math.inf, f"tau must be a finite number > 0, got {tau}")
    check_weight("alpha", alpha)


@OBJECTIVES.register("ard")
@dataclass(frozen=True, kw_only=True)
class ARD(RobustDistillation):
    """Adversarially Robust Distillation (Goldblum et al., "Adversarially Robust Distillation",
    AAAI 2020); loss in :func:`ard_loss`.

    The student is attacked with PGD-CE in train mode (BatchNorm on batch statistics, as in the
    reference, see :func:`ce_adversary`); the teacher labels the clean input. The reference
    trains 200 epochs, SGD lr 0.1, momentum 0.9, weight decay 2e-4, batch 128, from a TRADES
    WRN-34-10 teacher. At tau = 30 the per-sample gradient is about 1/C of the cross-entropy's
    (``elementwise_mean_kl``), so short runs with SGD learn slowly; Adam is insensitive to it.

    Attributes:
        tau: distillation temperature (30 in the reference).
        alpha: weight of the KL term; ``1 - alpha`` weighs the clean cross-entropy.
    """

    tau: float = 30.0
    alpha: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_tau_alpha(self.tau, self.alpha)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        x_adv = self._ce_adversary(model, x, y)
        t_nat = _teacher_logits(self.teacher, x)
        s_adv, s_nat = model(x_adv), model(x)
        loss, kl, ce = ard_loss(s_adv, s_nat, t_nat, y, tau=self.tau, alpha=self.alpha)
        return {"loss": loss, "logits": s_nat, "kl": kl, "ce": ce}


@OBJECTIVES.register("rslad")
@dataclass(frozen=True, kw_only=True)
class RSLAD(RobustDistillation):
    """Robust Soft Label Adversarial Distillation (Zi et al., "Revisiting Adversarial Robustness
    Distillation: Robust Soft Labels Make Student Better", ICCV 2021); loss in
    :func:`rslad_loss`.

    The teacher's clean soft labels (temperature 1) replace the hard labels everywhere: the inner
    maximisation ascends the student's KL to them with the student in eval mode (restored after),
    and the outer loss weighs the adversarial and the clean KL 5/6 and 1/6. The reference trains
    300 epochs, SGD lr 0.1, momentum 0.9, weight decay 2e-4, lr x0.1 at epochs 215, 260, 285.

    Attributes:
        adv_weight: weight of the adversarial KL; ``1 - adv_weight`` weighs the clean one.
        scale: multiplies the loss; the reference uses 10 on CIFAR-100 to offset the 1/C of the
            mean over classes.
    """

    adv_weight: float = 5.0 / 6.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_weight("adv_weight", self.adv_weight)
        _check(0 < self.scale < math.inf, f"scale must be a finite number > 0, got {self.scale}")

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        t_nat = _teacher_logits(self.teacher, x)
        x_adv = kl_adversary(model, x, t_nat, eps=self.eps, step=self.step, steps=self.steps)
        s_adv, s_nat = model(x_adv), model(x)
        loss, kl_adv, kl_nat = rslad_loss(
            s_adv, s_nat, t_nat, adv_weight=self.adv_weight, scale=self.scale
        )
        return {"loss": loss, "logits": s_nat, "kl_adv": kl_adv, "kl_nat": kl_nat}


@dataclass(frozen=True, kw_only=True)
class Staged(RobustDistillation):
    """An objective that changes at epoch ``begin``; the loop tells it the epoch.

    The configuration stays frozen and hashable; the progress lives in a mutable
    :class:`Progress` outside ``__init__``, ``repr`` and comparison.

    Attributes:
        begin: first epoch (from 0, as in the reference's loop) of the IAD loss.
        beta: exponent of the trust ``P_T(x')[y] ** beta``.
        tau: distillation temperature (1 in the reference).
    """

    begin: int = 60
    beta: float = 0.1
    tau: float = 1.0
    progress: Progress = field(default_factory=Progress, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.begin >= 0, f"begin must be >= 0, got {self.begin}")
        _check(0 <= self.beta < math.inf, f"beta must be a finite number >= 0, got {self.beta}")
        _check(0 < self.tau < math.inf, f"tau must be a finite number > 0, got {self.tau}")

    def set_progress(self, epoch: int, step: int, steps_per_epoch: int, epochs: int) -> None:
        """Called by :func:`robcomp.train.fit` before each batch (epoch and step from 0)."""
        self.progress.update(epoch, step, steps_per_epoch, epochs)

    @property
    def introspecting(self) -> bool:
        """Whether the IAD loss (trust-weighted, with the self-introspection term) is on."""
        return self.progress.epoch >= self.begin


@OBJECTIVES.register("iad-i")
@dataclass(frozen=True, kw_only=True)
class IAD1(Staged):
    """IAD-I, Introspective Adversarial Distillation (Zhu et al., "Reliable Adversarial
    Distillation with Unreliable Teachers", ICLR 2022); loss in :func:`iad1_loss`.

    PGD-CE on the student as in ARD; before epoch ``begin`` the loss is ARD with a batch-mean
    KL, from ``begin`` on the student also matches its own clean prediction where the teacher is
    not trusted on the adversarial point. The epoch comes from ``set_progress``, which
    :func:`robcomp.train.fit` calls; an objective never told stays in the warm-up. The reference
    trains 200 epochs from a PGD-AT ResNet-18 teacher.

    Attributes:
        alpha: weight of the distillation terms; ``1 - alpha`` weighs the clean cross-entropy.
    """

    alpha: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_tau_alpha(self.tau, self.alpha)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        t_nat = _teacher_logits(self.teacher, x)
        x_adv = self._ce_adversary(model, x, y)
        s_adv, s_nat = model(x_adv), model(x)
        out: dict[str, Tensor] = {}
        weight = None
        if self.introspecting:
            weight = trust(_teacher_logits(self.teacher, x_adv), y, self.beta)
            out["trust"] = weight.mean()
        loss, kl, self_kl, ce = iad1_loss(
            s_adv, s_nat, t_nat, y, weight, tau=self.tau, alpha=self.alpha
        )
        return {"loss": loss, "logits": s_nat, "kl": kl, "self_kl": self_kl, "ce": ce, **out}


@OBJECTIVES.register("iad-ii")
@dataclass(frozen=True, kw_only=True)
class IAD2(Staged):
    """IAD-II (Zhu et al., ICLR 2022): IAD-I plus a naturally trained teacher and the
    adversarial cross-entropy; loss in :func:`iad2_loss`.

    Both teachers label the adversarial point; the robust teacher's KL is trust-weighted from
    epoch ``begin`` on. The reference loss never uses the clean student logits before ``begin``,
    so the logits reported for training accuracy come from a separate eval-mode pass.

    Attributes:
        natural_teacher: the standard-trained teacher (checkpoint folder or ``memory:`` handle).
        alpha1: weight of the robust teacher's (and the introspection) term.
        alpha2: weight of the natural teacher's term; ``1 - alpha1 - alpha2`` weighs the CE.
    """

    natural_teacher: str
    alpha1: float = 0.5
    alpha2: float = 0.25
    begin: int = 40

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(bool(self.natural_teacher), "natural_teacher must name a checkpoint folder")
        _check(
            self.alpha1 >= 0 and self.alpha2 >= 0 and self.alpha1 + self.alpha2 <= 1,
            f"need alpha1, alpha2 >= 0 and alpha1 + alpha2 <= 1, got {self.alpha1}, {self.alpha2}",
        )

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        x_adv = self._ce_adversary(model, x, y)
        t_adv = _teacher_logits(self.teacher, x_adv)
        st_adv = _teacher_logits(self.natural_teacher, x_adv)
        s_adv = model(x_adv)
        weight = trust(t_adv, y, self.beta)
        s_nat = model(x) if self.introspecting else None
        loss, kl, self_kl, kl_natural, ce = iad2_loss(
            s_adv, s_nat, t_adv, st_adv, y, weight if self.introspecting else None,
            tau=self.tau, alpha1=self.alpha1, alpha2=self.alpha2,
        )  # fmt: skip
        return {
            "loss": loss, "logits": _clean_logits(model, x), "kl": kl, "self_kl": self_kl,
            "kl_natural": kl_natural, "ce": ce, "trust": weight.mean(),
        }  # fmt: skip
