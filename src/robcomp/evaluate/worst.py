"""The per-point worst case over the attacks of one threat model, and its compact record.

The minimum of per-attack robust accuracies overstates robustness whenever two attacks break
different points: a point counts as robust only if *no* attack of its threat model broke it, as
AutoAttack reports (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks"). Threat models (norm, eps) are never mixed: a point
robust at L2 0.5 and broken at L-inf 0.1 is one fact about each threat model, not one number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from robcomp.evaluate.adversarial import AttackResult


@dataclass(frozen=True)
class ThreatModelWorstCase:
    """Points no attack of one threat model broke.

    Attributes:
        norm: the threat model's norm.
        eps: its radius.
        attacks: labels of the attacks combined, in suite order.
        robust: (n,) bool, True where the point is classified correctly and survived them all.
    """

    norm: str
    eps: float
    attacks: tuple[str, ...]
    robust: Tensor

    @property
    def robust_accuracy(self) -> float:
        # counted, not averaged in float32, so it equals the per-attack accuracies' arithmetic
        return int(self.robust.sum()) / len(self.robust) if len(self.robust) else math.nan

    @property
    def label(self) -> str:
        """The metric's attack label, e.g. ``worst-linf``; eps is the metric's own key."""
        return f"worst-{self.norm}"


def worst_case_per_threat_model(results: Sequence[AttackResult]) -> list[ThreatModelWorstCase]:
    """The per-point worst case of each (norm, eps), in the order threat models first appear.

    Unbounded attacks (``eps = inf``, minimal-norm attacks run without a budget) are left out:
    they break every point by design and bound no threat model.
    """
    groups: dict[tuple[str, float], list[AttackResult]] = {}
    for result in results:
        if math.isfinite(result.eps):
            groups.setdefault((result.norm, float(result.eps)), []).append(result)
    out = []
    for (norm, eps), members in groups.items():
        sizes = {len(r.robust) for r in members}
        if len(sizes) != 1:
            raise ValueError(
                f"attacks at {norm} eps={eps:.6g} ran on different numbers of points "
                f"{sorted(sizes)}; their per-point worst case is undefined"
            )
        robust = torch.stack([r.robust.bool().cpu() for r in members]).all(dim=0)
        out.append(ThreatModelWorstCase(norm, eps, tuple(r.attack for r in members), robust))
    return out


POINTS_FILE = "points.npz"


def save_points(path: str | Path, results: Sequence[AttackResult]) -> None:
    """Every attack's per-point verdict, one bit per point (``np.packbits``), with its label,
    norm and eps; no pickled objects, so the file is safe to load from anyone."""
    if not results:
        return
    n = {len(r.robust) for r in results}
    if len(n) != 1:
        raise ValueError(f"attacks ran on different numbers of points: {sorted(n)}")
    robust = np.stack([r.robust.bool().cpu().numpy() for r in results])
    np.savez_compressed(
        path,
        attack=np.array([r.attack for r in results]),
        norm=np.array([r.norm for r in results]),
        eps=np.array([r.eps for r in results], dtype=np.float64),
        n=np.array(n.pop()),
        robust=np.packbits(robust, axis=1),
    )


def load_points(path: str | Path) -> dict[tuple[str, float], Tensor]:
    """``{(attack label, eps): (n,) bool robust mask}`` as written by :func:`save_points`."""
    with np.load(path, allow_pickle=False) as data:
        n = int(data["n"])
        robust = np.unpackbits(data["robust"], axis=1, count=n).astype(bool)
        return {
            (str(a), float(e)): torch.from_numpy(r.copy())
            for a, e, r in zip(data["attack"], data["eps"], robust, strict=True)
        }
