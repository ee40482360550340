"""Evaluation: clean accuracy, attacks under threat-model checks, efficiency measures."""

from robcomp.evaluate.adversarial import (
    AttackOutcome,
    AttackResult,
    ThreatModelViolation,
    attack_batch,
    attack_mode,
    check_threat_model,
    evaluate_attack,
)
from robcomp.evaluate.clean import accuracy, predict

__all__ = [
    "AttackOutcome",
    "AttackResult",
    "ThreatModelViolation",
    "accuracy",
    "attack_batch",
    "attack_mode",
    "check_threat_model",
    "evaluate_attack",
    "predict",
]
