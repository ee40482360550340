"""Robust accuracy as a function of eps, from one minimal-norm attack run.

A minimal-norm attack (DDN, FMN, C&W, ...) gives every point the size of the smallest
perturbation that breaks it. Robust accuracy at *any* eps is then the fraction of points whose
minimal norm exceeds eps, so one run replaces a PGD run per eps, and the mean minimal norm is the
"average perturbation" metric of the 2025 compression-robustness benchmark.

Conventions: a point the model already misclassifies has minimal norm 0 (broken at every eps);
a point the attack never breaks has minimal norm ``inf`` (robust at every eps).

A minimal-norm attack run on a small budget stops short of the boundary: FMN (Pintor et al.
2021, Algorithm 1) shrinks its radius by at most a factor ``1 - gamma_k`` per adversarial step,
with ``gamma_k`` cosine-annealed from 0.05 to 0.001, so a point whose first adversarial iterate
lands far past the boundary ends its run still deep inside the adversarial region. So
:func:`minimal_norms` first pulls every adversarial example back towards its clean point along
the path that clips the perturbation to a shrinking ball (the same path FMN's and Foolbox's
boundary search uses for a starting point, ``mid_points``), by a binary search that only ever
accepts points the model misclassifies. Every norm it reports is the norm of an adversarial
example it checked, so the curve stays an upper bound on robust accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

from robcomp.attacks.norms import get_norm
from robcomp.evaluate.adversarial import attack_mode, check_threat_model


class MinimalNormAttack(Protocol):
    """An attack that can return unbounded minimal adversarial examples."""

    norm: str

    def label(self) -> str: ...

    def minimal(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor: ...


def minimal_norms(
    model: nn.Module,
    attack: MinimalNormAttack,
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int | None = None,
    boundary_search_steps: int = 10,
) -> Tensor:
    """Per-sample minimal adversarial perturbation norm, in the attack's norm, shape (B,).

    0 for points already misclassified, ``inf`` for points the attack never breaks. The attack
    runs in :func:`~robcomp.evaluate.attack_mode`, and its output is checked to be a valid input
    (shape, dtype, finite, inside [0, 1]). ``batch_size`` splits large inputs; note that some
    attacks (C&W, EAD) stop early on the *batch* loss, so batching can change their results.

    Args:
        model: the classifier.
        attack: any attack with a ``minimal`` method and a ``norm``.
        x: inputs in [0, 1].
        y: labels.
        batch_size: rows per attack call (default: all at once).
        boundary_search_steps: binary-search steps of :func:`shrink_to_boundary` applied to the
            attack's output (one forward pass each, over the broken points); 0 turns it off.
    """
    if boundary_search_steps < 0:
        raise ValueError(f"boundary_search_steps must be >= 0, got {boundary_search_steps}")
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
    step = batch_size or max(len(x), 1)
    norm = get_norm(attack.norm)
    parts: list[Tensor] = []
    with attack_mode(model):
        for start in range(0, len(x), step):
            xb, yb = x[start : start + step], y[start : start + step]
            x_min = attack.minimal(model, xb, yb)
            check_threat_model(xb, x_min, math.inf, attack.norm, where=f"{attack.label()} minimal")
            with torch.no_grad():
                correct = model(xb).argmax(dim=1) == yb
                broken = model(x_min).argmax(dim=1) != yb
            # Only rows already seen adversarial are shrunk, and only to points seen adversarial.
            x_min = _shrink(
                model, xb, yb, x_min, correct & broken, attack.norm, boundary_search_steps
            )
            lengths = norm.measure((x_min - xb).detach())
            inf = torch.full_like(lengths, math.inf)
            parts.append(torch.where(correct, torch.where(broken, lengths, inf), 0.0))
    return torch.cat(parts) if parts else torch.empty(0)


def shrink_to_boundary(
    model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor, norm: str, steps: int
) -> Tensor:
    """Move each adversarial ``x_adv`` closer to ``x`` while the model still misclassifies it.

    The candidate at radius ``r`` clips the perturbation to the ``r`` ball (L∞: clamps each
    coordinate; L1, L2: rescales), so it lies between ``x`` and ``x_adv``. A per-row binary search
    over ``r`` in ``[0, ||x_adv - x||]`` keeps the smallest radius whose candidate is adversarial.
    Rows that are not adversarial (or whose clean point is misclassified already) are returned
    unchanged; every returned row is ``x_adv`` or a point the model was seen to misclassify.

    Args:
        model: the classifier, in eval mode.
        x: clean inputs in [0, 1].
        y: labels.
        x_adv: the attack's output, same shape as ``x``.
        norm: ``linf``, ``l2`` or ``l1``.
        steps: binary-search steps (one forward pass over the adversarial rows each).

    Returns:
        The shrunk examples, same shape and dtype as ``x_adv``.
    """
    with torch.no_grad():
        broken = (model(x).argmax(dim=1) == y) & (model(x_adv).argmax(dim=1) != y)
    return _shrink(model, x, y, x_adv, broken, norm, steps)


def _shrink(
    model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor, broken: Tensor, norm: str, steps: int
) -> Tensor:
    """:func:`shrink_to_boundary` on the rows ``broken`` marks (already checked adversarial)."""
    result = x_adv.detach().clone()
    index = broken.nonzero().squeeze(1)
    if steps == 0 or len(index) == 0:
        return result
    x0, y0, delta = x[index], y[index], x_adv[index].detach() - x[index]
    hi = get_norm(norm).measure(delta)  # radius of the smallest adversarial candidate so far
    lo = torch.zeros_like(hi)
    best = x_adv[index].detach().clone()
    with torch.no_grad():
        for _ in range(steps):
            mid = (lo + hi) / 2
            candidate = (x0 + _clip_per_row(delta, mid, norm)).clamp(0.0, 1.0)
            adversarial = model(candidate).argmax(dim=1) != y0
            best[adversarial] = candidate[adversarial]
            hi = torch.where(adversarial, mid, hi)
            lo = torch.where(adversarial, lo, mid)
        # Checked again all together: a row whose label flips back in this batch (float
        # rounding differs between batch compositions) keeps the attack's own example.
        kept = model(best).argmax(dim=1) != y0
    result[index[kept]] = best[kept]
    return result


def _clip_per_row(delta: Tensor, radius: Tensor, norm: str) -> Tensor:
    """``delta`` clipped to a ball of radius ``radius[i]`` per row, as the attacks' ``eps`` clip."""
    shape = (-1,) + (1,) * (delta.ndim - 1)
    if norm == "linf":
        bound = radius.reshape(shape)
        return torch.maximum(torch.minimum(delta, bound), -bound)
    lengths = get_norm(norm).measure(delta).clamp_min(1e-12)
    return delta * (radius / lengths).clamp(max=1.0).reshape(shape)


def robust_curve(norms: Tensor, eps_values: Sequence[float]) -> list[float]:
    """Robust accuracy at each eps: the fraction of points whose minimal norm exceeds eps.

    Misclassified points (norm 0) count as broken at every eps >= 0; a point whose minimal norm
    equals eps is broken at that eps.
    """
    if len(norms) == 0:
        raise ValueError("robust_curve needs at least one point")
    return [float((norms > eps).float().mean()) for eps in eps_values]


def average_minimal_perturbation(norms: Tensor) -> float:
    """Mean minimal norm over the originally correct points the attack broke (nan if none)."""
    broken = torch.isfinite(norms) & (norms > 0)
    return float(norms[broken].mean()) if bool(broken.any()) else math.nan
