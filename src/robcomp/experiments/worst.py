"""A cell's per-point worst case: stored metrics, the record in ``history.json``, ``points.npz``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from robcomp.evaluate.adversarial import AttackResult
from robcomp.evaluate.worst import POINTS_FILE, save_points, worst_case_per_threat_model
from robcomp.experiments.store import Metric

WORST = "worst_robust_accuracy"


def record_worst_case(
    results: Sequence[AttackResult], folder: Path
) -> tuple[list[Metric], dict[str, Any] | None]:
    """Write every attack's per-point verdict to ``folder/points.npz`` and return one
    ``worst_robust_accuracy`` metric per threat model (attack label ``worst-<norm>``, its eps)
    with a summary for ``history.json``. The primary threat model, which orders the
    leaderboard, is the first bounded one of the suite."""
    save_points(folder / POINTS_FILE, results)
    worst = worst_case_per_threat_model(results)
    if not worst:
        return [], None
    metrics = [
        Metric(WORST, w.robust_accuracy, w.label, w.eps, norm=w.norm, n=len(w.robust))
        for w in worst
    ]
    info = {
        "primary": {"norm": worst[0].norm, "eps": worst[0].eps},
        "threat_models": [
            {
                "norm": w.norm,
                "eps": w.eps,
                "attacks": list(w.attacks),
                "robust_accuracy": w.robust_accuracy,
            }
            for w in worst
        ],
        "points": POINTS_FILE,
    }
    return metrics, info
