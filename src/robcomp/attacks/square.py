"""Square Attack (Andriushchenko et al. 2020), native and batched, as AutoAttack runs it.

The attack is a random search: every iteration proposes, for each point still unbroken, a new
perturbation that differs from its best one on a square window, queries the model once and keeps
the proposal if it lowers the margin. The proposals of all points of a batch are built at once
(per-point windows, no loop over points) and the model sees only the proposals worth a query:
broken points leave the batch, and a proposal equal to its point's current best is counted as a
rejected query without running the model. Such no-ops are common for Linf on few-channel images:
an accepted square sets a block of pixels to one corner of the ball, and a later square inside
that block whose drawn signs agree changes nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from robcomp.attacks.apgd import AutoAttackNorm, check_norm
from robcomp.attacks.base import ATTACKS, check_eps
from robcomp.attacks.labels import settings_label
from robcomp.attacks.queries import query_fn

log = logging.getLogger(__name__)

Query = Callable[[Tensor], Tensor]
# Builds the proposals of some points (their positions in the batch; None: all points).
Proposals = Callable[[Tensor | None], Tensor]

# The authors' schedule of p (fra31/auto-attack ``p_selection`` without ``resc_schedule``):
# p_init is halved after the iterations listed here, down to p_init / 512 after 8000.
_P_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
# The L2 initialisation tiles the image with a grid of 5 x 5 windows of side H // 5.
_L2_GRID = 5
# Reading which points broke stalls an accelerator's queue; there the batch is compacted every
# few iterations (broken points in between are frozen by the acceptance mask, so nothing
# changes but the wasted rows). On the CPU the read is free and happens every iteration.
_COMPACT_EVERY = 5


def _compaction_period(device: torch.device) -> int:
    """Every how many iterations the points broken so far leave the batch, on ``device``."""
    return 1 if device.type == "cpu" else _COMPACT_EVERY


def p_schedule(p_init: float, iteration: int) -> float:
    """The fraction of pixels a square covers at ``iteration`` (counted from 0)."""
    halvings = sum(iteration > last for last in _P_HALVINGS)
    return p_init / 2**halvings


def square_side(p: float, shape: tuple[int, int, int], norm: str) -> int:
    """The side ``s`` of the square windows for the fraction ``p`` on (C, H, W) images.

    ``s = round(sqrt(p * H * W))``, at least 1 (Linf) or 3 and odd (L2, whose window holds two
    opposite halves of a centred pattern), at most ``min(H, W)``. Evaluated as the authors'
    code does (``p * n_features / c``, Python's round-half-to-even) so ties round alike.
    """
    c, h, w = shape
    s = round(math.sqrt(p * (c * h * w) / c))
    if norm == "linf":
        s = max(s, 1)
    else:
        s = max(s, 3)
        s += 1 - s % 2
    return min(s, h, w)


def _nested_squares(rows: int, cols: int) -> Tensor:
    """A ``rows x cols`` pattern of nested squares around the centre, with unit L2 norm.

    The pixel at Chebyshev distance ``d`` from the centre ``(rows // 2, cols // 2)`` sums
    ``1 / (k + 1)^2`` over the squares ``k = d .. K`` that contain it (``K`` the largest):
    the paper's L2 update, a peak in the middle falling off towards the border.
    """
    if rows == 0:
        return torch.zeros(0, cols, dtype=torch.float64)
    i = torch.arange(rows)[:, None]
    j = torch.arange(cols)[None, :]
    distance = torch.maximum((i - rows // 2).abs(), (j - cols // 2).abs())
    ring = 1.0 / (torch.arange(max(rows // 2, cols // 2) + 1, dtype=torch.float64) + 1) ** 2
    tail = ring.flip(0).cumsum(0).flip(0)  # tail[d] = sum_{k >= d} ring[k]
    pattern = tail[distance]
    return pattern / pattern.norm()


@cache
def eta(s: int) -> Tensor:
    """The L2 update window of side ``s``: a positive upper half and a negative lower half
    of nested squares, with unit L2 norm (float64, on the CPU; transposed at random by the
    attack)."""
    window = torch.cat([_nested_squares(s // 2, s), -_nested_squares(s - s // 2, s)])
    return window / window.norm()


@cache
def _eta_on(s: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """:func:`eta` on ``device``, copied there once per run size rather than per iteration."""
    return eta(s).to(device=device, dtype=dtype)


def _column(v: Tensor) -> Tensor:
    """A (B,) vector shaped (B, 1, 1, 1), to broadcast over images."""
    return v.reshape(-1, 1, 1, 1)


def _margin(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``z_y - max_{k != y} z_k`` per point, and whether the prediction (argmax, as the
    evaluator takes it, which on ties may differ from topk's order) is not ``y``."""
    top, top_idx = logits.topk(2, dim=1)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_other = torch.where(top_idx[:, 0] == y, top[:, 1], top[:, 0])
    return z_y - z_other, logits.argmax(1) != y


def _corners(b: int, s: int, size: int, generator: torch.Generator) -> Tensor:
    """(b,) top-left offsets along an axis of length ``size``, uniform on 0 .. size - s - 1
    (0 if s = size), the range of the authors' ``random_int(0, size - s)``."""
    return torch.randint(0, max(size - s, 1), (b,), generator=generator, device=generator.device)


def _window_indices(rows: Tensor, cols: Tensor, s: int, w: int) -> Tensor:
    """(B, s*s) flat pixel indices (row * W + column) of the s x s windows at ``(rows, cols)``."""
    steps = torch.arange(s, device=rows.device)
    offsets = (steps[:, None] * w + steps[None, :]).flatten()
    return (rows * w + cols)[:, None] + offsets[None]


def _rows_of(x: Tensor) -> Proposals:
    """Proposals already built as full images ``x``."""
    return lambda points: x if points is None else x[points]


def _window(rows: Tensor, cols: Tensor, s: int, h: int, w: int) -> Tensor:
    """(B, 1, H, W) masks of the s x s windows with top-left corners ``(rows, cols)``."""
    device = rows.device
    # (i - r) mod H < s  <=>  r <= i < r + s, for 0 <= r <= H - s.
    in_rows = (torch.arange(h, device=device) - rows[:, None]).remainder(h) < s
    in_cols = (torch.arange(w, device=device) - cols[:, None]).remainder(w) < s
    return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]


@dataclass
class _Points:
    """The unbroken points of one run; every tensor is indexed by the points still attacked."""

    idx: Tensor  # (B,) positions in the run's input batch
    x: Tensor  # clean inputs
    y: Tensor
    lo: Tensor | None  # Linf: lowest value of each pixel, max(x - eps, 0); None for L2
    hi: Tensor | None  # Linf: highest value, min(x + eps, 1)
    x_best: Tensor  # lowest-margin proposal so far
    margin: Tensor  # its margin; the point is broken once it is <= 0
    wrong: Tensor  # its prediction is not y (differs from margin <= 0 only on exact ties)
    queries: Tensor  # (B,) queries spent, as the authors' code counts them

    def select(self, keep: Tensor) -> _Points:
        """The points where ``keep`` (a (B,) bool mask or index tensor) holds."""
        picked: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            picked[f.name] = None if value is None else value[keep]
        return _Points(**picked)


@dataclass(frozen=True)
class SquareResult:
    """What one call of :meth:`Square.run` found.

    Attributes:
        x_adv: per point the first misclassified proposal, or the clean input if the point
            was already misclassified or stayed robust (as the authors' code returns).
        broken: (N,) bool, the points Square misclassified (not the already misclassified).
        queries: (N,) queries each point spent over all restarts, counted as the authors'
            code counts them (the initial perturbation and one per iteration while unbroken).
        skipped: how many of those queries were proposals equal to the point's best so far,
            rejected without running the model.
    """

    x_adv: Tensor
    broken: Tensor
    queries: Tensor
    skipped: int


@ATTACKS.register("square")
@dataclass(frozen=True, kw_only=True)
class Square:
    """Square Attack (Andriushchenko, Croce, Flammarion & Hein 2020, "Square Attack: a
    query-efficient black-box adversarial attack via random search", ECCV), as run by AutoAttack:
    a score-based black-box attack, a random search over perturbations at the boundary of the
    eps ball that changes one square window at a time and keeps a change when it lowers the
    margin ``z_y - max_{k != y} z_k``. It uses no gradients, so it is the member of the ensemble
    that gradient masking cannot fool. Native and batched, with the sampling distributions of
    the authors' code (fra31/auto-attack) drawn from its own seeded generator, one draw per
    point; broken points leave the batch and proposals equal to a point's best are not sent to
    the model. Inputs must be images (N, C, H, W).

    The algorithm, with AutoAttack's settings (margin loss, untargeted, ``p_init`` 0.8, 5000
    queries, 1 restart, the square-size schedule not rescaled to the budget):

    - Linf starts from vertical stripes: every column of every channel moves by ``+eps`` or
      ``-eps`` (clipped to [0, 1]). Each iteration picks a square of side ``s`` and, per channel,
      a sign, and sets the whole square of that channel to ``x + sign * eps`` (clipped), so
      every pixel stays at a corner of the eps ball meet [0, 1].
    - L2 starts from a grid of 5 x 5 windows of side ``H // 5``, each holding the pattern
      ``eta`` (a positive and a negative half of nested squares, transposed at random) with a
      random sign per channel, scaled to norm eps. Each iteration picks two windows of side
      ``s``: it moves the mass of the second into the first, adds a fresh ``eta`` to the first
      with the size the budget left over allows, and rescales the whole perturbation to norm
      eps before clipping to [0, 1].
    - ``s = round(sqrt(p * H * W))`` (at least 1 for Linf, at least 3 and odd for L2, at most
      ``min(H, W)``), with ``p = p_init`` for the first 11 iterations, halved after
      iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000.
    - A proposal replaces the point's best if its margin is lower (which includes every
      misclassified proposal, as the best margin of an unbroken point is positive); a point
      stops at its first misclassified proposal. Restarts run on the points still robust.

    Differences from the authors' code (fra31/auto-attack ``square.py``, which
    ``pyautoattack`` ships): the random draws come from a ``torch.Generator`` seeded by
    ``seed``, not from the global generator, so the random stream differs while every
    distribution is the same; and each point draws its own square positions, per-channel signs
    and ``eta`` orientations, as in the paper, where the authors' code shares one position and
    one orientation across the batch (the distribution of each point's run is the same). As in
    the authors' code a window's top-left corner is uniform on ``0 .. H - s - 1`` (``0`` if
    ``s = H``): the paper's range ends at ``H - s``, but robcomp's Square is AutoAttack's stage
    and its verdicts are compared with the official run, so it keeps the official distribution
    (whose squares never reach the last row and column after the start). The L2 start clips
    grid windows to the image where the authors' code fails on such sizes. Outputs are not
    projected afterwards, so each is the very point the model judged: Linf pixels are the
    rounded ``max(x - eps, 0)`` or ``min(x + eps, 1)`` (projecting them again gives the same
    floats; the rounding of ``x + eps`` can put them ~2e-8 past eps), L2 ones ``x + delta``
    clipped to [0, 1] with ``||delta|| = eps`` up to float32 rounding (~1e-7 relative). Both
    are far inside the evaluator's tolerance, and a projection could not remove them for
    certain, as it ends with the same rounded addition.

    Speed, without changing a decision: a point leaves the batch as soon as it is broken (every
    iteration on the CPU, every few on an accelerator, where reading the mask stalls the
    device); on the CPU, a proposal equal to its point's best would return the same margin and
    be rejected, so it counts as a query without running the model; the proposals of all points
    are built at once (a Linf step reads and writes only the squares) and queried through
    :func:`robcomp.attacks.queries.query_fn`. :meth:`run` reports the queries each point spent
    and how many were skipped.

    Attributes:
        eps: radius of the threat model, in pixel units of [0, 1] inputs.
        norm: ``linf`` or ``l2``.
        queries: iterations per point and restart after the initial perturbation (5000 in
            AutoAttack, whose code counts them so; each is at most one model query).
        p_init: initial fraction of pixels a square covers (0.8 in AutoAttack).
        restarts: independent runs on the points still unbroken.
        seed: seeds the attack's own random generator, so the attack is deterministic.
    """

    eps: float
    norm: AutoAttackNorm = "linf"
    queries: int = 5000
    p_init: float = 0.8
    restarts: int = 1
    seed: int = 0

    uses_gradients: ClassVar[bool] = False  # score-based: queries the model's outputs only
    # 2: native (its own generator, per-point squares); 1 ran the official code. Same fields,
    # other random draws: results stored under revision 1 are not reused.
    revision: ClassVar[int] = 2
    # Switch for the tests: the same run must come out with and without the no-op skip.
    _skip_noops: ClassVar[bool] = True

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
        return self.run(model, x, y).x_adv

    def check_inputs(self, x: Tensor) -> None:
        """Raise ValueError unless Square can attack inputs shaped like ``x`` (the cascade
        calls it before its first stage, so a bad input fails before minutes of APGD)."""
        if x.ndim != 4:
            raise ValueError(
                f"square attacks images (N, C, H, W); got inputs of shape {tuple(x.shape)}"
            )
        if self.norm == "l2" and min(x.shape[2:]) < _L2_GRID:
            raise ValueError(
                f"square's L2 start tiles the image with a {_L2_GRID} x {_L2_GRID} grid; "
                f"images must be at least {_L2_GRID} x {_L2_GRID}, got {tuple(x.shape[2:])}"
            )

    def run(self, model: nn.Module, x: Tensor, y: Tensor) -> SquareResult:
        """Attack the images ``x`` with labels ``y``; see :class:`SquareResult`."""
        self.check_inputs(x)
        query = query_fn(model)
        n = len(x)
        x_adv = x.clone()
        broken = torch.zeros(n, dtype=torch.bool, device=x.device)
        queries = torch.zeros(n, dtype=torch.long, device=x.device)
        if n == 0:
            return SquareResult(x_adv, broken, queries, 0)
        generator = torch.Generator(device=x.device)
        generator.manual_seed(self.seed)
        # Only the points the model classifies correctly are attacked, as in the authors' code.
        robust = query(x).argmax(1) == y
        skipped = 0
        for _ in range(self.restarts):
            todo = (robust & ~broken).nonzero().squeeze(1)
            if len(todo) == 0:
                break
            x_best, wrong, spent, run_skipped = self._single_run(query, x[todo], y[todo], generator)
            queries[todo] += spent
            skipped += run_skipped
            x_adv[todo[wrong]] = x_best[wrong]
            broken[todo[wrong]] = True
        log.debug("square: %d queries, %d no-op proposals skipped", int(queries.sum()), skipped)
        return SquareResult(x_adv, broken, queries, skipped)

    # --- one run ------------------------------------------------------------------------------

    def _single_run(
        self, query: Query, x: Tensor, y: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, Tensor, Tensor, int]:
        """One run from a fresh random start: per point its best proposal, whether that is
        misclassified, the queries spent, and the number of no-op proposals skipped."""
        pts = self._start(query, x, y, generator)
        x_best, wrong, spent = pts.x_best.clone(), pts.wrong.clone(), pts.queries.clone()
        period = _compaction_period(x.device)
        # Skipping needs the host to know which proposals changed, every iteration: free on
        # the CPU, a stall of the queue on an accelerator.
        skip = x.device.type == "cpu" and self._skip_noops
        skipped = 0
        _, c, h, w = x.shape
        shape = (c, h, w)
        for iteration in range(self.queries):
            if iteration % period == 0:
                live = pts.margin > 0
                if not bool(live.all()):
                    done = pts.select(~live)
                    x_best[done.idx], wrong[done.idx], spent[done.idx] = (
                        done.x_best,
                        done.wrong,
                        done.queries,
                    )
                    pts = pts.select(live)
                    if len(pts.idx) == 0:
                        break
            s = square_side(p_schedule(self.p_init, iteration), shape, self.norm)
            if self.norm == "linf":
                proposals, changed = self._linf_proposal(pts, s, generator)
            else:
                x_new = self._l2_proposal(pts, s, generator)
                proposals, changed = _rows_of(x_new), (x_new != pts.x_best).flatten(1).any(1)
            skipped += self._step(query, pts, proposals, changed if skip else None)
        x_best[pts.idx], wrong[pts.idx], spent[pts.idx] = pts.x_best, pts.wrong, pts.queries
        return x_best, wrong, spent, skipped

    def _start(self, query: Query, x: Tensor, y: Tensor, generator: torch.Generator) -> _Points:
        """The initial perturbation of every point, queried once."""
        lo = hi = None
        if self.norm == "linf":
            lo, hi = (x - self.eps).clamp(0.0, 1.0), (x + self.eps).clamp(0.0, 1.0)
            n, c, _, w = x.shape
            up = torch.rand(n, c, 1, w, generator=generator, device=x.device) < 0.5
            x_best = torch.where(up, hi, lo)
        else:
            x_best = self._l2_start(x, generator)
        margin, wrong = _margin(query(x_best), y)
        queries = torch.ones(len(x), dtype=torch.long, device=x.device)
        idx = torch.arange(len(x), device=x.device)
        return _Points(idx, x, y, lo, hi, x_best, margin, wrong, queries)

    def _step(
        self, query: Query, pts: _Points, proposals: Proposals, changed: Tensor | None
    ) -> int:
        """Query the proposals and keep the better ones; returns the no-ops skipped.

        ``proposals(rows)`` builds the proposals of the points ``rows`` (all if None).
        ``changed`` (on the CPU) marks the proposals that differ from their point's best; the
        others would return the best margin and fail the strict comparison, so they are
        counted as queries and rejected without running the model.
        """
        live = pts.margin > 0  # all True on the CPU, where broken points have left
        pts.queries += live
        if changed is None:  # no host read: masked updates of every point
            x_new = proposals(None)
            margin, wrong = _margin(query(x_new), pts.y)
            better = (margin < pts.margin) & live
            pts.x_best = torch.where(_column(better), x_new, pts.x_best)
            pts.margin = torch.where(better, margin, pts.margin)
            pts.wrong = torch.where(better, wrong, pts.wrong)
            return 0
        rows = (changed & live).nonzero().squeeze(1)
        if len(rows) > 0:
            x_new = proposals(rows)
            margin, wrong = _margin(query(x_new), pts.y[rows])
            better = margin < pts.margin[rows]
            kept = rows[better]
            pts.x_best[kept] = x_new[better]
            pts.margin[kept] = margin[better]
            pts.wrong[kept] = wrong[better]
        return len(pts.idx) - len(rows)

    # --- proposals ----------------------------------------------------------------------------

    def _linf_proposal(
        self, pts: _Points, s: int, generator: torch.Generator
    ) -> tuple[Proposals, Tensor]:
        """Per point, its best with one s x s square set to ``x +- eps`` (a sign per channel),
        and whether that changes it. Only the squares are read and compared, so the cost of a
        step shrinks with the squares; full images are built for the points queried only."""
        assert pts.lo is not None and pts.hi is not None
        b, c, h, w = pts.x.shape
        rows, cols = _corners(b, s, h, generator), _corners(b, s, w, generator)
        up = torch.rand(b, c, 1, generator=generator, device=pts.x.device) < 0.5
        square = _window_indices(rows, cols, s, w)[:, None].expand(b, c, s * s)
        best = pts.x_best.reshape(b, c, h * w)
        old = best.gather(2, square)
        hi = pts.hi.reshape(b, c, h * w).gather(2, square)
        new = torch.where(up, hi, pts.lo.reshape(b, c, h * w).gather(2, square))

        def proposals(points: Tensor | None) -> Tensor:
            if points is None:
                return best.scatter(2, square, new).view(b, c, h, w)
            scattered = best[points].scatter(2, square[points], new[points])
            return scattered.view(len(points), c, h, w)

        return proposals, (new != old).flatten(1).any(1)

    def _etas(self, b: int, c: int, s: int, generator: torch.Generator, like: Tensor) -> Tensor:
        """(b, c, s, s): per point ``eta(s)``, transposed with probability 1/2, times a random
        sign per channel."""
        pattern = _eta_on(s, like.device, like.dtype)
        flip = torch.rand(b, 1, 1, generator=generator, device=like.device) < 0.5
        oriented = torch.where(flip, pattern.T, pattern)[:, None]
        sign = torch.rand(b, c, 1, 1, generator=generator, device=like.device) < 0.5
        return torch.where(sign, oriented, -oriented)

    def _l2_start(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """A grid of ``eta`` windows of side H // 5 (as many as fit from a centred offset),
        with random signs and orientations, scaled to norm eps and clipped to [0, 1]."""
        n, c, h, w = x.shape
        s = h // _L2_GRID
        offset = (h - s * _L2_GRID) // 2  # the authors' code centres the grid along H only
        delta = torch.zeros_like(x)
        for top in range(offset, h, s)[: h // s]:
            for left in range(offset, w, s)[: w // s]:
                rows, cols = min(s, h - top), min(s, w - left)
                window = self._etas(n, c, s, generator, x)
                delta[:, :, top : top + rows, left : left + cols] += window[:, :, :rows, :cols]
        return self._scaled(x, delta)

    def _scaled(self, x: Tensor, delta: Tensor) -> Tensor:
        """``x + delta`` with delta rescaled to L2 norm eps, clipped to [0, 1]."""
        norm = delta.flatten(1).norm(dim=1)
        return (x + delta * _column(self.eps / (norm + 1e-12))).clamp(0.0, 1.0)

    def _l2_proposal(self, pts: _Points, s: int, generator: torch.Generator) -> Tensor:
        """Per point: zero a second window, put the first window's mass plus a fresh ``eta``
        into the first, with the norm the budget allows, and rescale to norm eps."""
        b, c, h, w = pts.x.shape
        delta = pts.x_best - pts.x
        rows, cols = _corners(b, s, h, generator), _corners(b, s, w, generator)
        rows2, cols2 = _corners(b, s, h, generator), _corners(b, s, w, generator)
        # Flat pixel indices of the first window, (B, C, s*s), to gather and scatter its values.
        first = _window_indices(rows, cols, s, w)[:, None].expand(b, c, s * s)
        flat = delta.flatten(2)
        old = flat.gather(2, first)
        old_norm = old.norm(dim=2, keepdim=True)  # (B, C, 1)
        second = _window(rows2, cols2, s, h, w)
        both = _window(rows, cols, s, h, w) | second
        both_norm = (delta * both).flatten(2).norm(dim=2, keepdim=True)  # (B, C, 1)
        image_norm = delta.flatten(1).norm(dim=1)[:, None, None]  # (B, 1, 1)
        new = self._etas(b, c, s, generator, delta).flatten(2) + old / (old_norm + 1e-12)
        # The window may hold what the two windows held, plus an equal share per channel of
        # what the budget has left.
        room = ((self.eps**2 - image_norm**2).clamp_min(0.0) / c + both_norm**2).sqrt()
        new = new / (new.norm(dim=2, keepdim=True) + 1e-12) * room
        moved = delta.masked_fill(second, 0.0).flatten(2).scatter(2, first, new)
        return self._scaled(pts.x, moved.view_as(delta))
