"""Training: one loop (:func:`fit`) and pluggable objectives."""

from robcomp.train import (  # noqa: F401  (register objectives)
    adversarial,
    distill,
    manifold,
    robust_distill,
)
from robcomp.train.loop import Callback, History, TrainConfig, fit, lr_factor
from robcomp.train.objectives import OBJECTIVES, CrossEntropy, Objective

__all__ = [
    "OBJECTIVES",
    "Callback",
    "CrossEntropy",
    "History",
    "Objective",
    "TrainConfig",
    "fit",
    "lr_factor",
]
