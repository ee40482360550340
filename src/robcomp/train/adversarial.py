"""Adversarial training objectives: PGD-AT, FGSM-AT, Fast-AT, TRADES and Marshall's mixed loss.

Each objective crafts its training examples with the model itself (the inner maximisation) and
returns the outer loss. What they share:

* **Model mode during the inner attack** (``attack_mode``). ``"train"`` runs the attack with
  BatchNorm on batch statistics and dropout active, as the reference code of Madry et al.
  (MadryLab/cifar10_challenge: one TF graph built with ``mode='train'``) and of Wong et al.
  (locuslab/fast_adversarial: ``model.train()`` throughout) does; ``"eval"`` uses running
  statistics, as TRADES (yaodongyu/TRADES) does. Either way the model's mode is restored
  afterwards, parameter gradients are switched off while attacking (the attack differentiates
  with respect to the input only, so nothing accumulates in ``.grad``), and every buffer
  (BatchNorm running statistics) is restored, so the running statistics see only the batches
  the model is trained on. The references let the attack's forward passes update them; that is
  the one deliberate difference.
* **Randomness** (random starts, TRADES' Gaussian start) comes from torch's global generator,
  which :func:`robcomp.train.fit` seeds: every batch gets fresh noise, and a run is reproducible.
* ``eps`` and step sizes are in pixel units of [0, 1] inputs (normalisation lives in the model).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from robcomp.attacks.base import ATTACKS, Attack
from robcomp.attacks.norms import get_norm
from robcomp.attacks.pgd import ascend, summed_ce
from robcomp.config import build_component
from robcomp.evaluate.adversarial import check_threat_model
from robcomp.train.objectives import OBJECTIVES, Progress

AttackMode = Literal["train", "eval"]


# --- shared machinery ---------------------------------------------------------------------------


@contextmanager
def inner_attack_mode(model: nn.Module, mode: AttackMode) -> Iterator[nn.Module]:
    """Put ``model`` in ``mode`` with frozen parameters; restore mode, flags and buffers after.

    Buffers are restored because a train-mode forward pass updates BatchNorm's running
    statistics: without this, every attack iterate would leak into the statistics used at test
    time.
    """
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    saved = [(b, b.detach().clone()) for b in model.buffers()] if mode == "train" else []
    model.train(mode == "train")
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def uniform_start(x: Tensor, eps: float, norm: str = "linf") -> Tensor:
    """``x`` plus a uniform draw from the eps ball, from torch's global generator."""
    return x + get_norm(norm).random_start(x, eps, torch.default_generator)


def check_eps(eps: float, norm: str = "linf") -> None:
    """Raise ValueError unless ``eps`` is a usable radius for ``norm`` on [0, 1] inputs."""
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive number (pixel units of [0, 1]), got {eps}")
    if norm == "linf" and eps > 1:
        raise ValueError(f"eps={eps} exceeds 1, the whole [0, 1] pixel range; write 8/255, not 8")


def check_steps(step: float, steps: int) -> None:
    """Raise ValueError unless the step size is positive and there is at least one step."""
    if not (math.isfinite(step) and step > 0):
        raise ValueError(f"step must be positive, got {step}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")


def check_weight(name: str, value: float) -> None:
    """Raise ValueError unless the loss weight ``name`` is in [0, 1]."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def accuracy_of(logits: Tensor, y: Tensor) -> Tensor:
    """Fraction of the batch classified correctly, as a 0-d tensor the loop can log."""
    return (logits.detach().argmax(1) == y).float().mean()


def weighted_ce(
    model: nn.Module, x: Tensor, x_adv: Tensor | None, y: Tensor, natural_weight: float
) -> dict[str, Tensor]:
    """``w * CE(f(x), y) + (1 - w) * CE(f(x_adv), y)``; a term with weight 0 is not computed,
    so ``w = 1`` is plain cross-entropy exactly and ``w = 0`` costs no clean forward pass."""
    out: dict[str, Tensor] = {}
    loss = torch.zeros((), device=x.device)
    if natural_weight > 0:
        logits = model(x)
        out["logits"] = logits
        out["natural_loss"] = F.cross_entropy(logits, y)
        loss = loss + natural_weight * out["natural_loss"]
    if x_adv is not None and natural_weight < 1:
        adv_logits = model(x_adv)
        out["adv_loss"] = F.cross_entropy(adv_logits, y)
        out["adv_accuracy"] = accuracy_of(adv_logits, y)
        loss = loss + (1.0 - natural_weight) * out["adv_loss"]
    out["loss"] = loss
    return out


# --- PGD-AT -------------------------------------------------------------------------------------


@OBJECTIVES.register("pgd-at")
@dataclass(frozen=True, kw_only=True)
class PGDAT:
    """PGD adversarial training (Madry et al. 2018, "Towards Deep Learning Models Resistant to
    Adversarial Attacks"): cross-entropy on PGD examples only, the natural loss is not trained.

    Defaults are MadryLab/cifar10_challenge's: eps 8/255, step 2/255, 10 steps, random start.
    The attack runs in train mode by default, as in that code (see the module docstring).

    Attributes:
        eps: radius of the threat model.
        step: PGD step size.
        steps: PGD iterations.
        norm: ``linf`` or ``l2``.
        random_start: start from a uniform point of the eps ball (Madry et al.).
        attack: instead of the built-in PGD, any registered attack ``{"name": ..., **fields}``
            (e.g. ``{"name": "apgd-ce", "eps": 8/255}``); then eps/step/steps/norm/random_start
            must stay at their defaults. An attack with a ``seed`` field is re-seeded on every
            batch from torch's global generator, so its random starts vary between batches.
        attack_mode: model mode while attacking, ``train`` or ``eval``.
    """

    eps: float = 8 / 255
    step: float = 2 / 255
    steps: int = 10
    norm: Literal["linf", "l2"] = "linf"
    random_start: bool = True
    attack: dict[str, Any] | None = None
    attack_mode: AttackMode = "train"
    _attack: Attack | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_eps(self.eps, self.norm)
        check_steps(self.step, self.steps)
        if self.attack is not None:
            self._check_no_builtin_fields()
            built = build_component(ATTACKS, self.attack, "pgd-at.attack")
            object.__setattr__(self, "_attack", built)

    def _check_no_builtin_fields(self) -> None:
        builtin = ("eps", "step", "steps", "norm", "random_start")
        changed = [
            f.name for f in dataclasses.fields(self)
            if f.name in builtin and getattr(self, f.name) != f.default
        ]  # fmt: skip
        if changed:
            raise ValueError(
                f"pgd-at: {', '.join(changed)} configure the built-in PGD, which `attack` "
                "replaces; set them inside `attack` instead"
            )

    def adversarial_examples(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """The training inputs: PGD (or the configured attack) on ``model``."""
        with inner_attack_mode(model, self.attack_mode):
            if self._attack is not None:
                return _run_attack(self._attack, model, x, y)
            start = uniform_start(x, self.eps, self.norm) if self.random_start else x
            return ascend(
                model, x, start, summed_ce(y),
                eps=self.eps, step=self.step, steps=self.steps, norm=self.norm,
            )  # fmt: skip

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        x_adv = self.adversarial_examples(model, x, y)
        adv_logits = model(x_adv)
        loss = F.cross_entropy(adv_logits, y)
        # No clean forward pass (it would cost one more pass and move BatchNorm statistics):
        # the loop's train_accuracy is absent, adv_accuracy is logged instead.
        return {"loss": loss, "adv_accuracy": accuracy_of(adv_logits, y)}


def _run_attack(attack: Attack, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Run a registered attack for training, with a fresh seed per batch, checking its output."""
    names: set[str] = set()
    if dataclasses.is_dataclass(attack):
        names = {f.name for f in dataclasses.fields(attack)}
    if "seed" in names:
        # A fixed seed would give every batch the same random start; draw one per batch from
        # the global generator, which fit seeds, so the run stays reproducible.
        seed = int(torch.randint(0, 2**31 - 1, (1,)))
        attack = dataclasses.replace(attack, seed=seed)  # type: ignore[type-var]
    x_adv = attack(model, x, y).detach()
    check_threat_model(x, x_adv, attack.eps, attack.norm, where=f"pgd-at {attack.label()}")
    return x_adv


# --- FGSM-AT ------------------------------------------------------------------------------------


@OBJECTIVES.register("fgsm-at")
@dataclass(frozen=True, kw_only=True)
class FGSMAT:
    """FGSM adversarial training (Goodfellow et al. 2015, "Explaining and Harnessing Adversarial
    Examples") as Kwon & Lee (2021, Sec. 3.3.1) write it:
    ``alpha * CE(f(x), y) + (1 - alpha) * CE(f(x'), y)`` with ``x' = clip(x + eps sign(grad))``.

    Kwon & Lee note alpha is "generally set to 0.5". ``alpha = 1`` is plain cross-entropy
    (no attack is run); ``alpha = 0`` trains on FGSM examples only. The clean and adversarial
    batches go through the model separately (BatchNorm normalises each with its own statistics).

    Attributes:
        eps: L-inf radius and FGSM step.
        alpha: weight of the clean term, in [0, 1].
        attack_mode: model mode while attacking, ``train`` or ``eval``.
    """

    eps: float = 8 / 255
    alpha: float = 0.5
    attack_mode: AttackMode = "train"

    def __post_init__(self) -> None:
        check_eps(self.eps)
        check_weight("alpha", self.alpha)

    def adversarial_examples(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        with inner_attack_mode(model, self.attack_mode):
            return ascend(model, x, x, summed_ce(y), eps=self.eps, step=self.eps, steps=1)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        x_adv = self.adversarial_examples(model, x, y) if self.alpha < 1 else None
        return weighted_ce(model, x, x_adv, y, self.alpha)


# --- Fast-AT (FGSM-RS) --------------------------------------------------------------------------


@OBJECTIVES.register("fast-at")
@dataclass(frozen=True, kw_only=True)
class FastAT:
    """Fast adversarial training, FGSM with a random start (Wong, Rice & Kolter 2020, "Fast is
    better than free: Revisiting adversarial training"; locuslab/fast_adversarial).

    ``delta ~ U(-eps, eps)`` clipped so ``x + delta`` is in [0, 1]; one signed-gradient step of
    size ``step`` (1.25 eps by default, the paper's 10/255 at eps 8/255); projection onto the eps
    ball and [0, 1]; cross-entropy on ``x + delta``. Pair it with ``schedule: cyclic`` and, to
    guard against catastrophic overfitting, the loop's ``early_stop`` (see TrainConfig).

    Attributes:
        eps: L-inf radius.
        step: FGSM step size; ``None`` means ``1.25 * eps``.
        attack_mode: model mode while attacking (the reference trains in train mode throughout).
    """

    eps: float = 8 / 255
    step: float | None = None
    attack_mode: AttackMode = "train"

    def __post_init__(self) -> None:
        check_eps(self.eps)
        check_steps(self.step_size, 1)

    @property
    def step_size(self) -> float:
        return self.step if self.step is not None else 1.25 * self.eps

    def adversarial_examples(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        with inner_attack_mode(model, self.attack_mode):
            return ascend(
                model, x, uniform_start(x, self.eps), summed_ce(y),
                eps=self.eps, step=self.step_size, steps=1,
            )  # fmt: skip

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        adv_logits = model(self.adversarial_examples(model, x, y))
        loss = F.cross_entropy(adv_logits, y)
        return {"loss": loss, "adv_accuracy": accuracy_of(adv_logits, y)}


# --- TRADES -------------------------------------------------------------------------------------


@OBJECTIVES.register("trades")
@dataclass(frozen=True, kw_only=True)
class TRADES:
    """TRADES (Zhang et al. 2019, "Theoretically Principled Trade-off between Robustness and
    Accuracy"; yaodongyu/TRADES ``trades.py``).

    Inner: from ``x + 0.001 N(0, 1)``, ``steps`` signed steps maximising
    ``sum_i KL(softmax(f(x_i)) || softmax(f(x'_i)))`` with the model in eval mode.
    Outer: ``CE(f(x), y) + beta * sum_i KL(softmax(f(x_i)) || softmax(f(x'_i))) / B``, the KL
    target not detached, as in the reference. Larger ``beta`` trades clean accuracy for
    robustness. Logs ``natural_loss`` and ``robust_loss`` (the KL term before ``beta``).

    The reference computes ``f(x)`` twice in the outer loss; here one forward pass serves both
    terms (identical values for models without dropout, and one BatchNorm update per step).

    Attributes:
        eps: L-inf radius (0.031 in the reference, about 8/255).
        step: step size of the inner maximisation.
        steps: its iterations.
        beta: weight of the robust (KL) term, >= 0.
        attack_mode: model mode while attacking (``eval`` in the reference).
    """

    eps: float = 0.031
    step: float = 0.007
    steps: int = 10
    beta: float = 6.0
    attack_mode: AttackMode = "eval"

    def __post_init__(self) -> None:
        check_eps(self.eps)
        check_steps(self.step, self.steps)
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"beta must be >= 0, got {self.beta}")

    def adversarial_examples(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        with inner_attack_mode(model, self.attack_mode):
            with torch.no_grad():
                p_clean = F.softmax(model(x), dim=1)  # (B, classes), the fixed KL target

            def kl_sum(logits: Tensor) -> Tensor:
                return F.kl_div(F.log_softmax(logits, dim=1), p_clean, reduction="sum")

            start = x + 0.001 * torch.randn_like(x)
            return ascend(model, x, start, kl_sum, eps=self.eps, step=self.step, steps=self.steps)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        x_adv = self.adversarial_examples(model, x, y)
        logits = model(x)
        natural = F.cross_entropy(logits, y)
        log_q = F.log_softmax(model(x_adv), dim=1)
        robust = F.kl_div(log_q, F.softmax(logits, dim=1), reduction="sum") / len(x)
        return {
            "loss": natural + self.beta * robust,
            "logits": logits,
            "natural_loss": natural,
            "robust_loss": robust,
        }


# --- Marshall's mixed loss with eps and steps schedules -----------------------------------------


@OBJECTIVES.register("mixed")
@dataclass(frozen=True, kw_only=True)
class MixedAT:
    """The loss of Marshall (2020, "Robust Convolutional Neural Networks with Resource
    Constraints", MSc thesis, Sec. 3.1 and 4): ``w * CE(f(x), y) + (1 - w) * CE(f(x'), y)``
    with L-inf PGD examples ``x'`` and ``w = 0.1`` ("90% adversarial loss to 10% natural loss
    generalized best"), under the thesis's adversarial-strength schedules.

    Schedules, over the training progress ``p`` in [0, 1) that :func:`robcomp.train.fit`
    reports through :meth:`set_progress` (updated every batch):

    * eps is raised in ``stages`` equal steps, once every 1/stages of training ("eps updated
      every t/3 iterations"): ``eps_p = eps * (k + 1) / stages`` in stage ``k``, reaching the
      final ``eps`` in the last stage. ``stages = 1`` keeps eps constant.
    * the PGD step count "is updated every iteration, resetting to some minimal value whenever
      eps is incremented": within a stage it climbs linearly from ``min_steps`` to ``steps``,
      each value holding for an equal share of the stage. ``ramp_steps = False`` keeps it at
      ``steps``.

    The thesis gives neither the number of stages beyond "t/3", nor the minimal step count,
    nor the PGD step size; the choices here are ``stages = 3``, ``min_steps = 1`` and, unless
    ``step`` is set, Madry's rule ``2.5 * eps_p / steps_p``, so every iterate can reach the
    boundary of the current ball. Used outside :func:`fit` (no progress reported), the
    objective attacks at the final eps and steps.

    Attributes:
        eps: the final L-inf radius (the thesis trains at 0.03 and 0.1).
        steps: the largest PGD step count (the thesis uses 7, 14, 21).
        min_steps: the step count each eps stage starts from.
        step: fixed PGD step size; ``None`` for ``2.5 * eps_p / steps_p``.
        natural_weight: weight of the clean term, in [0, 1].
        stages: number of eps stages.
        ramp_steps: ramp the step count within each stage.
        random_start: start PGD from a uniform point of the current ball.
        attack_mode: model mode while attacking, ``train`` or ``eval``.
    """

    eps: float = 8 / 255
    steps: int = 7
    min_steps: int = 1
    step: float | None = None
    natural_weight: float = 0.1
    stages: int = 3
    ramp_steps: bool = True
    random_start: bool = True
    attack_mode: AttackMode = "train"
    progress: Progress = field(default_factory=Progress, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_eps(self.eps)
        check_steps(self.step if self.step is not None else 1.0, self.steps)
        check_weight("natural_weight", self.natural_weight)
        if self.stages < 1:
            raise ValueError(f"stages must be >= 1, got {self.stages}")
        if not 1 <= self.min_steps <= self.steps:
            raise ValueError(f"min_steps must be in [1, steps={self.steps}], got {self.min_steps}")

    def set_progress(self, epoch: int, step: int, steps_per_epoch: int, epochs: int) -> None:
        """Called by :func:`fit` before every batch; drives the schedules."""
        self.progress.update(epoch, step, steps_per_epoch, epochs)

    def schedule(self, fraction: float | None) -> tuple[float, int]:
        """``(eps, steps)`` at training progress ``fraction`` in [0, 1]; ``None``: the final."""
        if fraction is None:
            return self.eps, self.steps
        position = min(max(fraction, 0.0), 1.0) * self.stages
        stage = min(int(position), self.stages - 1)
        eps = self.eps * (stage + 1) / self.stages
        if not self.ramp_steps:
            return eps, self.steps
        within = min(position - stage, 1.0)  # progress inside the stage, in [0, 1]
        span = self.steps - self.min_steps + 1  # number of distinct step counts
        return eps, min(self.min_steps + int(within * span), self.steps)

    def adversarial_examples(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        eps, steps = self.schedule(self.progress.fraction)
        step = self.step if self.step is not None else 2.5 * eps / steps
        start = uniform_start(x, eps) if self.random_start else x
        with inner_attack_mode(model, self.attack_mode):
            return ascend(model, x, start, summed_ce(y), eps=eps, step=step, steps=steps)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        x_adv = self.adversarial_examples(model, x, y) if self.natural_weight < 1 else None
        out = weighted_ce(model, x, x_adv, y, self.natural_weight)
        eps, steps = self.schedule(self.progress.fraction)
        out["attack_eps"] = torch.tensor(eps)
        out["attack_steps"] = torch.tensor(float(steps))
        return out
