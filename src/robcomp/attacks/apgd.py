"""Auto-PGD (Croce & Hein 2020): PGD whose step size adapts itself, on the CE or the DLR loss.

APGD needs no step-size tuning: it starts with a step of ``2 * eps``, adds momentum, and at fixed
checkpoints halves the step of every point whose loss stopped rising, restarting that point from
the best iterate seen so far. Three registered attacks share the algorithm and differ in the loss:

=========  =====================================================================
apgd-ce    cross-entropy
apgd-dlr   Difference of Logits Ratio, invariant to shifting and scaling logits
apgd-t     targeted DLR, run once per target among the top ``n_target_classes``
=========  =====================================================================

Speed: the model's parameters are frozen by the evaluator and gradients are taken with
``torch.autograd.grad`` with respect to the input only. All per-point decisions (step halving,
best-point bookkeeping) are masked tensor operations with no host synchronisation. Points
already misclassified are dropped from the batch (after every iteration on the CPU, every few
on an accelerator, where reading the mask stalls the device), so no gradient is spent on a
broken point and the run stops once every point is broken; each drop reads the device once.
APGD-T hands each target's runs only the points no earlier target broke. What is left per
iteration besides the model's forward and backward pass is a few passes over the batch (the
step, in place, and the best-point updates), which costs less than the authors' bookkeeping.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Literal, get_args

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from robcomp.attacks.base import ATTACKS, check_eps
from robcomp.attacks.labels import settings_label
from robcomp.attacks.norms import Norm, get_norm

log = logging.getLogger(__name__)

MOMENTUM = 0.75  # alpha in the paper: weight of the new step against the previous one
INITIAL_STEP = 2.0  # eta^(0) = 2 * eps, for both the Linf and the L2 attack
# The threat models of AutoAttack's Linf/L2 attacks. (Its L1 APGD takes sparse steps and an
# L1-and-box projection, a different algorithm that is not implemented here.)
AutoAttackNorm = Literal["linf", "l2"]


def check_norm(norm: str, attack: str) -> None:
    """Raise ValueError unless ``norm`` is one the AutoAttack family supports."""
    allowed = get_args(AutoAttackNorm)
    if norm not in allowed:
        raise ValueError(f"{attack} supports the norms {', '.join(allowed)}, got {norm!r}")


# On an accelerator, dropping broken points needs a host read of a mask, which stalls the
# device queue; doing it every few steps keeps the queue full while still shrinking the batch
# soon after most points break. On the CPU the read costs nothing, so broken points are
# dropped after every step and no iteration is spent on them.
_COMPACT_EVERY = 5


def _compaction_period(device: torch.device) -> int:
    """Every how many iterations APGD drops the points it has broken, on ``device``."""
    return 1 if device.type == "cpu" else _COMPACT_EVERY


@contextmanager
def seeded_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's global generator (and ``device``'s, on CUDA) inside, restore it afterwards.

    For code we do not control that draws from the global generator: the reference attacks,
    and randomized models attacked with EOT.
    """
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def checkpoints(steps: int) -> list[tuple[int, int]]:
    """The iterations at which APGD checks its step size, with the window each check covers.

    The paper's checkpoints are ``w_j = ceil(p_j * steps)`` with ``p_0 = 0``, ``p_1 = 0.22`` and
    ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``: each window is 0.03 shorter than the
    last, but at least 0.06. As in the authors' code the fractions are turned into whole
    iterations once (first window ``int(0.22 * steps)``, shrinking by ``int(0.03 * steps)``
    down to ``int(0.06 * steps)``, each at least 1); for 100 steps that is the paper's exact
    schedule 22, 41, 57, 70, 80, 87, 93, 99.

    Args:
        steps: the number of iterations of one run.

    Returns:
        ``(w_j, w_j - w_{j-1})`` pairs: ``w_j`` counts the iterations done when check ``j`` runs.
    """
    window = max(int(0.22 * steps), 1)
    shrink = max(int(0.03 * steps), 1)
    smallest = max(int(0.06 * steps), 1)
    out: list[tuple[int, int]] = []
    done = window
    while done <= steps:
        out.append((done, window))
        window = max(window - shrink, smallest)
        done += window
    return out


def ce_loss(logits: Tensor, y: Tensor, target: Tensor) -> Tensor:
    """Per-sample cross-entropy of the true class; ``target`` is unused."""
    del target
    return F.cross_entropy(logits, y, reduction="none")


def dlr_loss(logits: Tensor, y: Tensor, target: Tensor) -> Tensor:
    """Difference of Logits Ratio: ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)``.

    Positive exactly when the point is misclassified. Dividing by the spread of the top logits
    makes the loss invariant to shifting and rescaling the logits, which defeats the gradient
    masking that saturated softmax outputs cause in the cross-entropy. ``target`` is unused.
    """
    del target
    top, top_idx = logits.topk(3, dim=1)  # (B, 3), sorted: z_pi1 >= z_pi2 >= z_pi3
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_other = torch.where(top_idx[:, 0] == y, top[:, 1], top[:, 0])  # best wrong class
    return -(z_y - z_other) / (top[:, 0] - top[:, 2] + 1e-12)


def targeted_dlr_loss(logits: Tensor, y: Tensor, target: Tensor) -> Tensor:
    """Targeted DLR: ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)`` for target class ``t``."""
    top = logits.topk(4, dim=1).values  # (B, 4)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


def _col(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a (B,) vector to broadcast over a (B, ...) tensor."""
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


@dataclass
class _RunState:
    """Per-point state of one APGD run; every tensor is indexed by the points still attacked."""

    idx: Tensor  # (B,) positions in the run's input batch
    x: Tensor  # clean inputs
    y: Tensor  # true labels
    target: Tensor  # target labels (the true labels for untargeted losses)
    lo: Tensor  # lower corner of the feasible box (Linf: eps ball meet [0, 1]; L2: unused)
    hi: Tensor  # upper corner of the feasible box
    x_adv: Tensor  # current iterate x^(k)
    x_prev: Tensor  # previous iterate x^(k-1), for the momentum term
    grad: Tensor  # gradient at x^(k)
    loss_prev: Tensor  # loss at x^(k), to count increases
    eta: Tensor  # (B, 1, ...) per-point step size
    x_best: Tensor  # highest-loss point so far (x_max in the paper), where halving restarts
    grad_best: Tensor
    loss_best: Tensor  # f_max in the paper
    found: Tensor  # (B,) bool: some iterate was misclassified
    x_found: Tensor  # the last misclassified iterate (meaningful where ``found``)
    n_increases: Tensor  # (B,) iterations since the last check whose step raised the loss
    reduced: Tensor  # (B,) bool: the step was halved at the last check
    loss_best_checked: Tensor  # loss_best at the last check

    def select(self, rows: Tensor) -> _RunState:
        """The state of the points at the integer positions ``rows`` only."""
        return _RunState(**{f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self)})


@dataclass(frozen=True, kw_only=True)
class _APGD:
    """The APGD algorithm shared by the registered attacks; subclasses choose the loss.

    Attributes:
        eps: radius of the threat model, in pixel units of [0, 1] inputs.
        norm: ``linf`` or ``l2``.
        steps: iterations per run (``N_iter`` in the paper).
        restarts: runs from independent random starts; each restart attacks only the points
            no earlier run has broken.
        rho: the step size is halved when at most a fraction ``rho`` of the steps since the
            last checkpoint increased the loss.
        eot_iter: forward/backward passes averaged per gradient (Expectation over
            Transformation), for randomized models; 1 for deterministic ones.
        seed: seeds the random starts, so the attack is deterministic.
    """

    eps: float
    norm: AutoAttackNorm = "linf"
    steps: int = 100
    restarts: int = 1
    rho: float = 0.75
    eot_iter: int = 1
    seed: int = 0

    name: ClassVar[str] = "apgd"
    min_classes: ClassVar[int] = 2
    uses_gradients: ClassVar[bool] = True
    # DLR's gradient vanishes only when the logits do not depend on the input, so an all-zero
    # gradient there signals masking; the cross-entropy's also underflows on confident points.
    check_zero_gradients: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_eps(self.eps, self.name)
        if self.steps < 1 or self.restarts < 1 or self.eot_iter < 1:
            raise ValueError("steps, restarts and eot_iter must be >= 1")
        if not 0.0 < self.rho <= 1.0:
            raise ValueError(f"rho must be in (0, 1], got {self.rho}")
        check_norm(self.norm, self.name)

    def label(self) -> str:
        """``apgd-ce100-linf``, plus every other setting not at its default (``-r5-eot20``)."""
        return settings_label(self, f"{self.name}{self.steps}-{self.norm}", ("steps", "norm"))

    def loss(self, logits: Tensor, y: Tensor, target: Tensor) -> Tensor:
        """The per-sample objective APGD maximizes, shape (B,)."""
        raise NotImplementedError

    def targets(self, logits: Tensor, y: Tensor) -> list[Tensor]:
        """One label vector per target class to attack in turn; untargeted attacks use ``y``."""
        del logits
        return [y]

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Return adversarial examples for ``model`` on ``(x, y)``.

        A broken point gets the misclassified iterate of the run that broke it; a point no run
        breaks gets its highest-loss iterate over all runs; a point the model already
        misclassifies is returned unchanged (it needs no perturbation), as in the authors' code.
        """
        if len(x) == 0:
            return x.clone()
        # Randomized models draw from the global generator: seeding it makes EOT repeatable.
        with seeded_global_rng(self.seed, x.device):
            return self._attack(model, x, y)

    def _attack(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        norm = get_norm(self.norm)
        generator = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            logits = model(x)
        if logits.shape[1] < self.min_classes:
            raise ValueError(
                f"{self.name} needs a model with at least {self.min_classes} classes, "
                f"this one has {logits.shape[1]}"
            )
        x_adv = x.clone()
        todo = logits.argmax(1) == y  # correct points not broken yet
        best_loss = torch.full((len(x),), -math.inf, device=x.device)
        first = True
        for target in self.targets(logits, y):
            for _ in range(self.restarts):
                idx = todo.nonzero().squeeze(1)
                if len(idx) == 0:
                    return x_adv
                point, found, loss = self._run(
                    model, x[idx], y[idx], target[idx], norm, generator, check_gradients=first
                )
                first = False
                # Across restarts (and targets), unbroken points keep their highest loss.
                better = found | (loss > best_loss[idx])
                x_adv[idx[better]] = point[better]
                best_loss[idx[better]] = loss[better]
                todo[idx[found]] = False
        return x_adv

    def _pass(self, model: nn.Module, x_adv: Tensor, y: Tensor, target: Tensor) -> tuple[
        Tensor, Tensor, Tensor
    ]:  # fmt: skip
        """One forward and input-gradient backward pass: loss (B,), logits, gradient."""
        with torch.enable_grad():
            logits = model(x_adv)
            loss = self.loss(logits, y, target)
        # Summed loss: each sample's gradient is independent of the batch size.
        (grad,) = torch.autograd.grad(loss.sum(), x_adv)
        return loss.detach(), logits.detach(), grad

    def _gradient(self, model: nn.Module, x_adv: Tensor, y: Tensor, target: Tensor) -> tuple[
        Tensor, Tensor, Tensor
    ]:  # fmt: skip
        """Loss (B,), logits and input gradient at ``x_adv``, averaged over ``eot_iter`` passes.

        The logits are those of the last pass, which decide misclassification as in the
        authors' code; the loss is averaged like the gradient, since it is the expectation
        that EOT maximizes.
        """
        x_adv = x_adv.detach().requires_grad_(True)
        loss, logits, grad = self._pass(model, x_adv, y, target)
        if self.eot_iter == 1:
            return loss, logits, grad
        for _ in range(self.eot_iter - 1):
            more_loss, logits, more_grad = self._pass(model, x_adv, y, target)
            loss, grad = loss + more_loss, grad + more_grad
        return loss / self.eot_iter, logits, grad / self.eot_iter

    def _evaluate(self, model: nn.Module, x_adv: Tensor, y: Tensor, target: Tensor) -> tuple[
        Tensor, Tensor
    ]:  # fmt: skip
        """Loss (B,) and logits at ``x_adv`` like :meth:`_gradient`, without the backward pass."""
        with torch.no_grad():
            logits = model(x_adv)
            loss = self.loss(logits, y, target)
            for _ in range(self.eot_iter - 1):
                logits = model(x_adv)
                loss = loss + self.loss(logits, y, target)
        return (loss / self.eot_iter if self.eot_iter > 1 else loss), logits

    def _project(self, x: Tensor, lo: Tensor, hi: Tensor, v: Tensor, norm: Norm) -> Tensor:
        """The point of the eps ball around ``x`` inside [0, 1] that APGD moves to from ``v``.

        For Linf, ``lo`` and ``hi`` are the corners of that set (unused for L2).
        """
        if self.norm == "linf":
            # Both sets are boxes, so one clamp onto their intersection is the exact projection.
            return torch.clamp(v, lo, hi)
        # Projecting onto the ball, then clipping to [0, 1], as the authors do: clipping only
        # moves coordinates towards x, so the point stays in the ball.
        return (x + norm.project(v - x, self.eps)).clamp(0.0, 1.0)

    def _run(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor,
        norm: Norm,
        generator: torch.Generator,
        check_gradients: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One APGD run (Algorithm 1 of the paper) from a random start.

        ``check_gradients`` logs a warning if the losses that should have non-zero gradients
        (DLR) have all-zero ones at the start; the caller asks once per call.

        Returns:
            ``(points, found, best_loss)``: per point the last misclassified iterate if
            ``found`` else the highest-loss iterate, and that highest loss.
        """
        eps = self.eps
        n = len(x)
        # The authors start on the sphere of radius eps, not inside the ball: a uniform (Linf)
        # or Gaussian (L2) direction rescaled to norm eps. Drawing exactly what they draw, from
        # a generator seeded as they seed the global one, reproduces all their starts.
        if self.norm == "linf":
            direction = 2.0 * torch.rand(x.shape, generator=generator, dtype=x.dtype) - 1.0
        else:
            direction = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        direction = direction.to(x.device)
        delta = direction * _col(eps / norm.measure(direction).clamp_min(1e-12), x)
        if self.norm == "linf":
            lo, hi = (x - eps).clamp_min(0.0), (x + eps).clamp_max(1.0)
        else:
            lo = hi = x  # unused by the L2 projection
        x_adv = self._project(x, lo, hi, x + delta, norm)
        loss, logits, grad = self._gradient(model, x_adv, y, target)
        if check_gradients and self.check_zero_gradients:
            self._warn_zero_gradients(grad)
        s = _RunState(
            idx=torch.arange(n, device=x.device),
            x=x,
            y=y,
            target=target,
            lo=lo,
            hi=hi,
            x_adv=x_adv,
            x_prev=x_adv,
            grad=grad,
            # The paper's first window counts f(x^(1)) > f(x^(0)); the authors' code compares
            # f(x^(1)) with 0 instead (its loss history wraps around to an unfilled row). We
            # follow the code so that our robust accuracies are exactly the official ones.
            loss_prev=torch.zeros_like(loss),
            eta=torch.full((n,) + (1,) * (x.ndim - 1), INITIAL_STEP * eps, device=x.device),
            x_best=x_adv,
            grad_best=grad,
            loss_best=loss,
            found=logits.argmax(1) != y,
            x_found=x_adv,
            n_increases=torch.zeros(n, device=x.device),
            # The authors skip condition 2 at the first check by acting as if the step had
            # just been halved.
            reduced=torch.ones(n, dtype=torch.bool, device=x.device),
            loss_best_checked=loss,
        )

        out = (
            x.clone(),
            torch.zeros(n, dtype=torch.bool, device=x.device),
            torch.full((n,), -math.inf, device=x.device),
        )
        checks = dict(checkpoints(self.steps))
        period = _compaction_period(x.device)
        # Points the random start already broke get no iteration at all.
        remaining = self._retire(s, s.found, out)
        for i in range(self.steps):
            if remaining is None:
                break
            s = remaining
            momentum = 1.0 if i == 0 else MOMENTUM  # the first step has no previous one
            with torch.no_grad():
                s.x_prev, s.x_adv = s.x_adv, self._step(s, momentum, norm)
            if i + 1 < self.steps:
                loss, logits, s.grad = self._gradient(model, s.x_adv, s.y, s.target)
            else:  # no step follows the last iterate: its loss is needed, its gradient is not
                loss, logits = self._evaluate(model, s.x_adv, s.y, s.target)
            with torch.no_grad():
                broken = logits.argmax(1) != s.y
                s.found = s.found | broken
                if period == 1:
                    # Every broken point retires below at this very iterate, so the iterate
                    # itself is each found point's misclassified one: no copy is needed.
                    s.x_found = s.x_adv
                else:
                    s.x_found = torch.where(_col(broken, x), s.x_adv, s.x_found)
                s.n_increases += loss > s.loss_prev
                s.loss_prev = loss
                improved = loss > s.loss_best
                s.x_best = torch.where(_col(improved, x), s.x_adv, s.x_best)
                s.grad_best = torch.where(_col(improved, x), s.grad, s.grad_best)
                s.loss_best = torch.where(improved, loss, s.loss_best)
                if i + 1 in checks:
                    self._check_step_size(s, checks[i + 1])
                if i + 1 == self.steps:
                    self._write_out(s, torch.arange(len(s.idx), device=x.device), *out)
                elif (i + 1) % period == 0:
                    remaining = self._retire(s, s.found, out)
        return out

    def _step(self, s: _RunState, momentum: float, norm: Norm) -> Tensor:
        """The next iterate: a projected gradient step, then the momentum mix and projection.

        ``x + m (z - x) + (1 - m) (x - x_prev)`` with ``z`` the projected gradient step: the
        float operations of the authors' update in their order (so the iterates are bitwise
        the same), done in place on fresh buffers, since allocating a new tensor for each of
        these passes over the batch was about a third of their cost. Nothing of the state is
        written in place: its tensors alias one another (``x_best`` is ``x_adv`` at the start).
        """
        z = s.eta * norm.ascent(s.grad)
        z.add_(s.x_adv)
        if self.norm == "linf":
            torch.clamp(z, s.lo, s.hi, out=z)
        else:
            z = self._project(s.x, s.lo, s.hi, z, norm)
        v = z.sub_(s.x_adv).mul_(momentum).add_(s.x_adv)
        if momentum != 1.0:  # else the previous step's weight is 0: adding 0 changes nothing
            v.add_(torch.sub(s.x_adv, s.x_prev).mul_(1.0 - momentum))
        if self.norm == "linf":
            return torch.clamp(v, s.lo, s.hi, out=v)
        return self._project(s.x, s.lo, s.hi, v, norm)

    def _retire(
        self, s: _RunState, done: Tensor, out: tuple[Tensor, Tensor, Tensor]
    ) -> _RunState | None:
        """Write out the points in the mask ``done``; the state of the others, None if none.

        A broken point stays broken (its misclassified iterate is kept), so dropping it changes
        nothing but the work: every per-point tensor of the state is compacted alike.
        """
        n_done = int(done.sum())  # the only host synchronisation in the loop
        if n_done == 0:
            return s
        # A stable sort puts the kept rows first, each group in order; its halves are integer
        # indices, so neither writing out nor compacting needs another host read (a boolean
        # mask index would read its count once per tensor indexed).
        order = torch.sort(done.to(torch.uint8), stable=True).indices
        n_keep = len(done) - n_done
        self._write_out(s, order[n_keep:], *out)
        return None if n_keep == 0 else s.select(order[:n_keep])

    def _check_step_size(self, s: _RunState, window: int) -> None:
        """Halve the step of the points whose loss stalled, and restart them from their best.

        Condition 1: at most ``rho * window`` of the last ``window`` steps raised the loss.
        Condition 2: the step was not halved at the last check and the best loss has not
        improved since. (The authors use ``<=`` in condition 1, the paper ``<``; we follow the
        code, which is what every published AutoAttack number comes from.)
        """
        stalled = s.n_increases <= window * self.rho
        stuck = ~s.reduced & (s.loss_best_checked >= s.loss_best)
        halve = stalled | stuck
        s.eta = torch.where(_col(halve, s.eta), s.eta / 2.0, s.eta)
        s.x_adv = torch.where(_col(halve, s.x_adv), s.x_best, s.x_adv)
        s.grad = torch.where(_col(halve, s.grad), s.grad_best, s.grad)
        s.reduced = halve
        s.loss_best_checked = s.loss_best
        s.n_increases = torch.zeros_like(s.n_increases)

    @staticmethod
    def _write_out(s: _RunState, rows: Tensor, points: Tensor, found: Tensor, loss: Tensor) -> None:
        """Copy the results of the points at the integer positions ``rows`` of the state into
        the run's output tensors."""
        idx, hit = s.idx[rows], s.found[rows]
        points[idx] = torch.where(_col(hit, s.x), s.x_found[rows], s.x_best[rows])
        found[idx] = hit
        loss[idx] = s.loss_best[rows]

    def _warn_zero_gradients(self, grad: Tensor) -> None:
        """Log when some input gradients are exactly zero, as the authors' checks do for DLR.

        Zero gradients usually mean gradient masking (e.g. a quantized or non-differentiable
        model), against which any gradient attack overestimates robustness.
        """
        zero = int((grad.flatten(1).abs().amax(1) == 0).sum())
        if zero:
            log.warning(
                "%s: %d of %d points have an all-zero input gradient; the model may mask "
                "gradients and the robust accuracy may be overestimated",
                self.label(),
                zero,
                len(grad),
            )


@ATTACKS.register("apgd-ce")
@dataclass(frozen=True, kw_only=True)
class APGDCE(_APGD):
    """APGD on the cross-entropy loss (Croce & Hein 2020, "Reliable evaluation of adversarial
    robustness with an ensemble of diverse parameter-free attacks", ICML).

    Attributes: see :class:`_APGD` (eps, norm, steps=100, restarts=1, rho=0.75, eot_iter=1, seed).
    """

    name: ClassVar[str] = "apgd-ce"

    def loss(self, logits: Tensor, y: Tensor, target: Tensor) -> Tensor:
        return ce_loss(logits, y, target)


@ATTACKS.register("apgd-dlr")
@dataclass(frozen=True, kw_only=True)
class APGDDLR(_APGD):
    """APGD on the Difference of Logits Ratio loss (Croce & Hein 2020, "Reliable evaluation of
    adversarial robustness with an ensemble of diverse parameter-free attacks", ICML).

    Needs at least 3 classes. Attributes: see :class:`_APGD`.
    """

    name: ClassVar[str] = "apgd-dlr"
    min_classes: ClassVar[int] = 3
    check_zero_gradients: ClassVar[bool] = True

    def loss(self, logits: Tensor, y: Tensor, target: Tensor) -> Tensor:
        return dlr_loss(logits, y, target)


@ATTACKS.register("apgd-t")
@dataclass(frozen=True, kw_only=True)
class APGDT(_APGD):
    """Targeted APGD on the targeted DLR loss (Croce & Hein 2020, "Reliable evaluation of
    adversarial robustness with an ensemble of diverse parameter-free attacks", ICML).

    The targets are the classes ranked 2nd, 3rd, ... by the clean logits; each gets
    ``restarts`` runs on the points still unbroken: a point stops at its first successful
    target, and leaves the batch within the run that breaks it. Needs at least 4 classes.

    Attributes:
        n_target_classes: how many of the top wrong classes to target (9 in AutoAttack's
            standard version). Capped at ``num_classes - 1``, where the authors' code fails.
        Others: see :class:`_APGD`.
    """

    n_target_classes: int = 9

    name: ClassVar[str] = "apgd-t"
    min_classes: ClassVar[int] = 4
    check_zero_gradients: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_target_classes < 1:
            raise ValueError(f"n_target_classes must be >= 1, got {self.n_target_classes}")

    def loss(self, logits: Tensor, y: Tensor, target: Tensor) -> Tensor:
        return targeted_dlr_loss(logits, y, target)

    def targets(self, logits: Tensor, y: Tensor) -> list[Tensor]:
        del y
        ranked = logits.argsort(dim=1, descending=True)  # (B, K): column 0 is the prediction
        count = min(self.n_target_classes, logits.shape[1] - 1)
        return [ranked[:, rank] for rank in range(1, count + 1)]
