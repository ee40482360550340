"""Evaluation: clean accuracy, attacks under threat-model checks, efficiency measures."""

from robcomp.evaluate.adversarial import (
    AttackOutcome,
    AttackResult,
    ThreatModelViolation,
    attack_batch,
    attack_mode,
    check_latent_threat_model,
    check_threat_model,
    evaluate_attack,
)
from robcomp.evaluate.clean import accuracy, predict
from robcomp.evaluate.manifold import ManifoldSets, manifold_for
from robcomp.evaluate.shifts import SHIFTS

__all__ = [
    "SHIFTS",
    "AttackOutcome",
    "AttackResult",
    "ManifoldSets",
    "ThreatModelViolation",
    "accuracy",
    "attack_batch",
    "attack_mode",
    "check_latent_threat_model",
    "check_threat_model",
    "evaluate_attack",
    "manifold_for",
    "predict",
]
