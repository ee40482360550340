"""FAB-T: the targeted Fast Adaptive Boundary attack (Croce & Hein 2020), native and batched.

The projections onto a hyperplane within the box [0, 1] (Linf and L2) are module functions so
the tests can compare them with the authors' ``fab_projections`` directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from robcomp.attacks.apgd import AutoAttackNorm, _compaction_period, check_norm
from robcomp.attacks.base import ATTACKS, check_eps, check_positive
from robcomp.attacks.labels import settings_label
from robcomp.attacks.norms import get_norm
from robcomp.attacks.queries import query_fn

# Below this magnitude the authors treat a gradient coordinate of the L2 hyperplane as zero:
# it neither moves nor enters the projection (a step along it would be unbounded).
_L2_ZERO_WEIGHT = 1e-8
# Floor of the two projection lengths before alpha = |d1| / (|d1| + |d2|), as the authors use:
# a point already on the hyperplane would otherwise divide 0 by 0.
_MIN_STEP_NORM = 1e-8
# The random restarts start at half the eps radius from the clean point, as the authors' do.
_RESTART_RADIUS = 0.5


def _capped_level(weight: Tensor, cap: Tensor, c: Tensor) -> Tensor:
    """Per row, the ``mu >= 0`` with ``sum_i weight_i * min(mu, cap_i) = c``.

    Both box projections reduce to this: every coordinate moves at a rate ``weight_i`` until
    it reaches the box at ``mu = cap_i``. The left side grows piecewise linearly in ``mu``, so
    after sorting the caps its value at each cap is a cumulative sum, the number of caps
    reached before ``c`` is a count, and ``mu`` solves one linear equation; no search.

    Args:
        weight: (N, D) non-negative rates.
        cap: (N, D) non-negative levels at which each coordinate stops.
        c: (N,) non-negative targets.

    Returns:
        (N,) levels; ``inf`` where even every coordinate at its cap falls short of ``c``.
    """
    cap_sorted, order = cap.sort(dim=1)
    weight_sorted = weight.gather(1, order)
    below = torch.cumsum(weight_sorted * cap_sorted, dim=1)  # sum_{j <= k} w_j cap_j
    # sum_{j > k} w_j, summed from the end: 1 - cumsum would cancel to noise near the end.
    above = weight_sorted.flip(1).cumsum(1).flip(1) - weight_sorted
    value_at_cap = below + cap_sorted * above
    capped = (value_at_cap < c[:, None]).sum(1)  # coordinates at their cap at the solution
    last = (capped - 1).clamp_min(0)[:, None]
    some = capped > 0
    fixed = torch.where(some, below.gather(1, last).squeeze(1), torch.zeros_like(c))
    free = torch.where(some, above.gather(1, last).squeeze(1), weight.sum(1))
    level = (c - fixed) / free
    return torch.where(capped == cap.shape[1], torch.full_like(c, math.inf), level)


def _oriented(w: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """Flip each row's hyperplane so that ``w . t - b = c >= 0``: the step lowers ``w . z``."""
    sign = torch.where(c >= 0, 1.0, -1.0).to(w.dtype)
    return w * sign[:, None], c * sign


def project_linf(t: Tensor, w: Tensor, c: Tensor) -> Tensor:
    """Smallest Linf step from ``t`` onto the hyperplane ``w . z = b`` within the box [0, 1].

    The Linf projection of the FAB paper (Croce & Hein 2020, Sec. 3.1): every coordinate with
    ``w_i != 0`` moves by the same amount ``mu`` against the sign of ``w_i``, except those
    that reach 0 or 1 first; ``mu`` is the smallest level that reaches the hyperplane. When the
    box does not meet the hyperplane, every such coordinate goes to the corner of the box
    closest to it (as in the authors' code).

    Args:
        t: (N, D) points in [0, 1].
        w: (N, D) normals of the hyperplanes.
        c: (N,) signed offsets ``w . t - b`` of the points from their hyperplanes.

    Returns:
        (N, D) steps ``d`` with ``t + d`` on the hyperplane (or the closest corner).
    """
    w, c = _oriented(w, c)
    moves_up = w < 0  # lowering w . z raises these coordinates, up to 1
    room = torch.where(moves_up, 1.0 - t, t)  # how far each coordinate can move
    mu = _capped_level(w.abs(), room, c)
    step = torch.minimum(mu[:, None], room)
    return torch.where(w == 0, 0.0, torch.where(moves_up, step, -step))


def project_l2(t: Tensor, w: Tensor, c: Tensor) -> Tensor:
    """Smallest L2 step from ``t`` onto the hyperplane ``w . z = b`` within the box [0, 1].

    The L2 projection of the FAB paper (Croce & Hein 2020, Sec. 3.1): by the KKT conditions the
    step is ``d_i = -mu w_i`` clipped to the box, i.e. coordinate ``i`` moves at rate
    ``w_i^2`` (in ``w . d``) until ``mu`` reaches its cap ``t_i / w_i`` (or
    ``(t_i - 1) / w_i``). When the box does not meet the hyperplane, every coordinate goes to
    its bound (as in the authors' code). Coordinates with ``|w_i| < 1e-8`` do not move.

    Args / Returns: as :func:`project_linf`.
    """
    w, c = _oriented(w, c)
    used = w.abs() >= _L2_ZERO_WEIGHT
    safe_w = torch.where(used, w, 1.0)
    cap = torch.where(w > 0, t / safe_w, (t - 1.0) / safe_w)
    cap = torch.where(used, cap.clamp_min(0.0), 0.0)
    mu = _capped_level(torch.where(used, w * w, 0.0), cap, c)
    return torch.where(used, -w * torch.minimum(mu[:, None], cap), 0.0)


_PROJECTIONS = {"linf": project_linf, "l2": project_l2}


@dataclass
class _Run:
    """The points of one FAB run still attacked; every tensor is indexed alike, inputs flat."""

    idx: Tensor  # (B,) positions in the run's input batch
    x0: Tensor  # (B, D) clean points
    y: Tensor  # (B,) true labels
    target: Tensor  # (B,) target labels
    x1: Tensor  # (B, D) current iterate
    best: Tensor  # (B, D) closest adversarial iterate so far (meaningful where best_norm < inf)
    best_norm: Tensor  # (B,) its distance to x0, inf if none yet

    def select(self, keep: Tensor) -> _Run:
        return _Run(**{k: v[keep] for k, v in vars(self).items()})


@ATTACKS.register("fab-t")
@dataclass(frozen=True, kw_only=True)
class FABT:
    """Targeted Fast Adaptive Boundary attack (Croce & Hein 2020, "Minimally distorted
    adversarial examples with a fast adaptive boundary attack", ICML; authors' code
    fra31/fab-attack), as run by AutoAttack (Croce & Hein 2020, "Reliable evaluation of
    adversarial robustness with an ensemble of diverse parameter-free attacks", ICML;
    fra31/auto-attack): for each target (the classes ranked 2nd, 3rd, ... by the clean logits,
    on the points no earlier target broke), FAB linearises the boundary between the target and
    the true class at its iterate, projects the iterate and the clean point onto that
    hyperplane within [0, 1], steps to a mix of the two (the clean point's weight is
    ``min(|d1| / (|d1| + |d2|), alpha_max)``) overshooting by ``eta``, and after each success
    keeps the adversarial point if it is the closest so far and steps back towards the clean
    point by ``beta``; a point counts as broken only if its adversarial lies within eps.
    AutoAttack's standard version runs 100 steps, 1 restart (from the clean point, so it is
    deterministic) and 9 targets. Native and batched: same algorithm as the authors' code, but
    gradients are taken for the input only (never for the model's parameters), the box
    projections are closed-form and batched, and a point leaves the batch as soon as it has an
    adversarial within eps (its verdict is fixed), so its returned perturbation is the first
    one found within eps, not minimised further as the authors' code would.

    Per iteration FAB needs the logits of the new iterate (is it adversarial?) and the
    gradient at the point it continues from; after a success that point is the backward step,
    not the iterate, and most of FAB's iterates are adversarial (it moves onto the boundary,
    overshooting, and steps back), so the check stays a separate forward-only pass
    (through :func:`robcomp.attacks.queries.query_fn`), as in the authors' code: fusing it into
    the next gradient pass would change the algorithm. Later restarts start at distance
    ``eps / 2`` from the clean point, drawn as the authors draw it (Linf: a uniform point of
    the cube ``[-1, 1]^D`` rescaled to Linf norm ``eps / 2``; L2: a standard Gaussian rescaled
    to L2 norm ``eps / 2``; then clipped to [0, 1]), from the attack's own generator seeded by
    ``seed``, not from torch's global one. On the CPU broken points leave the batch after
    every iteration; on an accelerator every few iterations, where reading the mask stalls
    the device (points broken in between keep iterating, which changes no verdict).

    Attributes:
        eps: radius of the threat model, in pixel units of [0, 1] inputs (FAB also uses it for
            its random restarts).
        norm: ``linf`` or ``l2``.
        steps: iterations per target and restart (100 in AutoAttack).
        restarts: runs per target; runs after the first start from a random point.
        n_target_classes: how many top wrong classes to target (9 in AutoAttack), capped at
            ``num_classes - 1``.
        alpha_max: largest weight of the step towards the clean point (0.1, paper's alpha_max).
        eta: overshooting factor of each step (1.05).
        beta: backward step towards the clean point after a success (0.9).
        seed: seeds the random restarts, so the attack is deterministic.
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

    uses_gradients: ClassVar[bool] = True
    # 2: native (retires decided points, its own generator); 1 ran the official code. Results
    # stored under revision 1 are not reused.
    revision: ClassVar[int] = 2

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
        """Return adversarial examples for ``model`` on ``(x, y)``.

        A broken point gets an adversarial point within eps; every other point (unbroken, or
        already misclassified, which needs no perturbation) is returned unchanged.
        """
        if len(x) == 0:
            return x.clone()
        query = query_fn(model)
        logits = query(x)
        if logits.shape[1] < 2:
            raise ValueError(
                f"fab-t needs a model with at least 2 classes, this one has {logits.shape[1]}"
            )
        # Ranked as the authors rank them (ascending sort, counted from the end), so that
        # ties between logits pick the same targets.
        ranked = logits.sort(dim=1)[1]
        count = min(self.n_target_classes, logits.shape[1] - 1)
        generator = torch.Generator().manual_seed(self.seed)
        x_adv = x.clone()
        todo = logits.argmax(1) == y  # correct points not broken yet
        for rank in range(2, count + 2):
            for restart in range(self.restarts):
                idx = todo.nonzero().squeeze(1)
                if len(idx) == 0:
                    return x_adv
                start = self._random_start(x[idx], generator) if restart > 0 else x[idx]
                found, point = self._run(model, x[idx], y[idx], ranked[idx, -rank], start)
                x_adv[idx[found]] = point[found]
                todo[idx[found]] = False
        return x_adv

    def _random_start(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """A point at distance ``eps / 2`` from ``x`` in a random direction, clipped to [0, 1]."""
        if self.norm == "linf":
            direction = 2.0 * torch.rand(x.shape, generator=generator, dtype=x.dtype) - 1.0
        else:
            direction = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        direction = direction.to(x.device)
        length = get_norm(self.norm).measure(direction).clamp_min(1e-12)
        scale = (_RESTART_RADIUS * self.eps / length).reshape((-1,) + (1,) * (x.ndim - 1))
        return (x + scale * direction).clamp(0.0, 1.0)

    def _linearise(self, model: nn.Module, run: _Run, shape: tuple[int, ...]) -> tuple[
        Tensor, Tensor
    ]:  # fmt: skip
        """``f_target - f_y`` at the iterates (B,) and its gradient (B, D), for the input only."""
        x1 = run.x1.reshape((-1, *shape)).detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(x1)
            rows = torch.arange(len(x1), device=x1.device)
            gap = logits[rows, run.target] - logits[rows, run.y]
        (grad,) = torch.autograd.grad(gap.sum(), x1)
        return gap.detach(), grad.reshape(len(x1), -1)

    def _step(self, run: _Run, gap: Tensor, grad: Tensor) -> Tensor:
        """The next iterate: the biased, overshooting projection onto the linearised boundary.

        The hyperplane ``{z : gap + grad . (z - x1) = 0}`` is where the linearised
        ``f_target - f_y`` vanishes; ``gap`` is the iterate's signed offset from it and
        ``offset_x0`` the clean point's.
        """
        project = _PROJECTIONS[self.norm]
        norm = get_norm(self.norm)
        offset_x0 = gap + (grad * (run.x0 - run.x1)).sum(1)
        steps = project(
            torch.cat((run.x1, run.x0)), torch.cat((grad, grad)), torch.cat((gap, offset_x0))
        )
        d1, d2 = steps.chunk(2)
        lengths = norm.measure(steps).clamp_min(_MIN_STEP_NORM)
        a1, a2 = lengths.chunk(2)
        alpha = (a1 / (a1 + a2)).clamp(0.0, self.alpha_max)[:, None]
        moved = (run.x1 + self.eta * d1) * (1.0 - alpha) + (run.x0 + self.eta * d2) * alpha
        return moved.clamp(0.0, 1.0)

    def _run(
        self, model: nn.Module, x: Tensor, y: Tensor, target: Tensor, start: Tensor
    ) -> tuple[Tensor, Tensor]:
        """One FAB run towards ``target`` from ``start``.

        Returns:
            ``(found, points)``: (B,) whether an adversarial within eps was found, and (B, ...)
            that adversarial where found (the clean point elsewhere).
        """
        n, shape = len(x), tuple(x.shape[1:])
        norm = get_norm(self.norm)
        query = query_fn(model)
        x0 = x.reshape(n, -1)
        run = _Run(
            idx=torch.arange(n, device=x.device),
            x0=x0,
            y=y,
            target=target,
            x1=start.reshape(n, -1).clone(),
            best=x0.clone(),
            best_norm=torch.full((n,), math.inf, dtype=x.dtype, device=x.device),
        )
        found = torch.zeros(n, dtype=torch.bool, device=x.device)
        points = x0.clone()
        period = _compaction_period(x.device)
        gap, grad = self._linearise(model, run, shape)
        for i in range(self.steps):
            with torch.no_grad():
                run.x1 = self._step(run, gap, grad)
                adversarial = query(run.x1.reshape((-1, *shape))).argmax(1) != run.y
                distance = norm.measure(run.x1 - run.x0)
                closer = adversarial & (distance < run.best_norm)
                run.best = torch.where(closer[:, None], run.x1, run.best)
                run.best_norm = torch.where(closer, distance, run.best_norm)
                back = run.x0 + self.beta * (run.x1 - run.x0)
                run.x1 = torch.where(adversarial[:, None], back, run.x1)
            if i + 1 == self.steps:
                break
            if (i + 1) % period == 0:
                remaining = self._retire(run, found, points)
                if remaining is None:
                    return found, points.reshape(x.shape)
                run = remaining
            gap, grad = self._linearise(model, run, shape)
        self._retire(run, found, points)
        return found, points.reshape(x.shape)

    def _broken(self, run: _Run) -> Tensor:
        """(B,) whether each point has an adversarial within eps: its verdict is final."""
        return run.best_norm <= self.eps

    def _retire(self, run: _Run, found: Tensor, points: Tensor) -> _Run | None:
        """Write out the broken points; the run of the others, None if none is left."""
        broken = self._broken(run)
        n_broken = int(broken.sum())  # the loop's only host synchronisation
        if n_broken == 0:
            return run
        found[run.idx[broken]] = True
        points[run.idx[broken]] = run.best[broken]
        return None if n_broken == len(broken) else run.select(~broken)
