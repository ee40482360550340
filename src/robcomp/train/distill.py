"""Knowledge distillation: the ``kd`` objective and its teachers (the ``distill`` compressor
that uses them is :mod:`robcomp.compress.distill`).

The objective names its teacher by a checkpoint folder (a string), so it stays a plain,
hashable, YAML-writable config like every other objective; the teacher is loaded once per
process and cached. The compressor receives its teacher as a live model, which carries no
architecture spec that a checkpoint could be rebuilt from. Rather than round-trip it through
disk, it registers a frozen copy in the same cache under an in-process handle
(``memory:<id>``, see :func:`registered_teacher`) and passes that handle as the objective's
``teacher``; the handle is dropped when training ends.
"""

from __future__ import annotations

import copy
import math
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from robcomp.models import load_checkpoint
from robcomp.models.checkpoint import WEIGHTS
from robcomp.train.objectives import OBJECTIVES

MEMORY = "memory:"

_TEACHERS: dict[str, nn.Module] = {}
_LOCK = threading.Lock()


def _frozen(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _cache_key(teacher: str) -> str:
    if teacher.startswith(MEMORY):
        return teacher
    folder = Path(teacher).expanduser().resolve()
    weights = folder / WEIGHTS
    # The modification time is part of the key, so a checkpoint rewritten in place is reloaded.
    stamp = weights.stat().st_mtime_ns if weights.is_file() else 0
    return f"{folder}@{stamp}"


def load_teacher(teacher: str) -> nn.Module:
    """The teacher named by a checkpoint folder (or a ``memory:`` handle), loaded once, frozen."""
    key = _cache_key(teacher)
    with _LOCK:
        if key not in _TEACHERS:
            if teacher.startswith(MEMORY):
                raise KeyError(
                    f"teacher {teacher!r} is an in-process handle that is no longer registered; "
                    "objectives outside the distill compressor need a checkpoint folder"
                )
            model, _ = load_checkpoint(teacher)
            _TEACHERS[key] = _frozen(model)
        return _TEACHERS[key]


@contextmanager
def registered_teacher(model: nn.Module) -> Iterator[str]:
    """Register a frozen copy of ``model`` as a teacher; yields its ``memory:`` handle."""
    handle = f"{MEMORY}{uuid.uuid4().hex}"
    with _LOCK:
        _TEACHERS[handle] = _frozen(copy.deepcopy(model))
    try:
        yield handle
    finally:
        with _LOCK:
            _TEACHERS.pop(handle, None)


def distillation_loss(
    student: Tensor, teacher: Tensor, y: Tensor, tau: float, alpha: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Hinton et al.'s loss as Shen et al. write it (Eq. 5); returns (loss, kd, ce).

    ``kd = KL(softmax(t / tau) || softmax(s / tau))`` averaged over the batch, ``ce`` the
    cross-entropy of the student with the labels, and
    ``loss = alpha * tau^2 * kd + (1 - alpha) * ce``. Shen et al. write the soft term as the
    cross-entropy ``-sum p log q``; it differs from the KL by the teacher's entropy, a constant,
    so the gradients are the same. The tau^2 keeps the soft-target gradients at the scale of the
    hard ones when tau changes (Hinton et al. 2015, Sec. 2).
    """
    log_q = F.log_softmax(student / tau, dim=1)  # (B, classes)
    p = F.softmax(teacher / tau, dim=1)  # (B, classes)
    kd = F.kl_div(log_q, p, reduction="batchmean")
    ce = F.cross_entropy(student, y)
    return alpha * tau**2 * kd + (1.0 - alpha) * ce, kd, ce


def _check_tau_alpha(tau: float, alpha: float) -> None:
    if not 0 < tau < math.inf:
        raise ValueError(f"tau must be a finite number > 0, got {tau}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


@OBJECTIVES.register("kd")
@dataclass(frozen=True, kw_only=True)
class KnowledgeDistillation:
    """Vanilla knowledge distillation (Hinton et al. 2015, "Distilling the Knowledge in a Neural
    Network"), as used by Shen et al. (2024); see :func:`distillation_loss`.

    The teacher runs in eval mode without gradients. Shen et al. use tau = 10, alpha = 0.2 on
    Office-31; the defaults here (4, 0.9) are the common CIFAR setting.

    Attributes:
        teacher: a robcomp checkpoint folder (``model.safetensors`` + ``spec.json``), loaded once
            per process; or a ``memory:`` handle from :func:`registered_teacher`.
        tau: softmax temperature.
        alpha: weight of the soft-target term.
    """

    teacher: str
    tau: float = 4.0
    alpha: float = 0.9

    def __post_init__(self) -> None:
        if not self.teacher:
            raise ValueError("teacher must name a checkpoint folder")
        _check_tau_alpha(self.tau, self.alpha)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        teacher = load_teacher(self.teacher)
        with torch.no_grad():
            t_logits = teacher.to(x.device)(x)
        logits = model(x)
        loss, kd, ce = distillation_loss(logits, t_logits, y, self.tau, self.alpha)
        return {"loss": loss, "logits": logits, "kd": kd, "ce": ce}
