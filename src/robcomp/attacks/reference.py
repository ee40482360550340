"""Running the official AutoAttack code (``pyautoattack``, fra31/auto-attack) from robcomp.

Shared by the attacks that still wrap the authors' implementation (FAB-T in
:mod:`robcomp.attacks.fab`, Square in :mod:`robcomp.attacks.square`) while their native versions
are written; the official code stays the cross-check in the tests.

The reference draws from torch's global random generator and reseeds it; each call here seeds
it from the attack's ``seed`` and restores the caller's state afterwards, so the attacks are
deterministic and leave no trace on the rest of the program.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from robcomp.attacks.norms import get_norm

# The reference spells the norms as "Linf" and "L2".
REFERENCE_NORM = {"linf": "Linf", "l2": "L2"}


@contextmanager
def parameters_frozen(model: nn.Module) -> Iterator[None]:
    """Turn off parameter gradients inside, restoring each flag afterwards.

    The evaluator already freezes them; FAB calls ``.backward()``, which would otherwise
    accumulate ``.grad`` into the caller's model when an attack is used on its own.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def reference(module: str, name: str, attack: str) -> Any:
    """``pyautoattack.<module>.<name>``, imported on first use with an actionable error."""
    try:
        imported = importlib.import_module(f"pyautoattack.{module}")
    except ImportError as err:
        raise ImportError(
            f"the {attack!r} attack runs the official AutoAttack code, which is not installed "
            f"({err}); install it with: pip install 'pyautoattack==0.2.0'"
        ) from err
    return getattr(imported, name)


def into_threat_model(x: Tensor, x_adv: Tensor, eps: float, norm: str) -> Tensor:
    """Project the reference's output back into the eps ball and [0, 1].

    The reference clips in float32 (Square's Linf step clamps to ``x + eps``, whose distance
    to ``x`` rounds up to ``eps + 2e-8`` on some pixels), so its outputs can leave the ball by
    float rounding. Projecting is the identity on valid points and bounds the violation by the
    rounding of ``x + delta`` itself, which the evaluator's tolerance is for.
    """
    delta = get_norm(norm).project(x_adv.to(x.dtype) - x, eps)
    return (x + delta).clamp(0.0, 1.0)


def num_classes(model: nn.Module, x: Tensor) -> int:
    with torch.no_grad():
        return int(model(x[:1]).shape[1])
