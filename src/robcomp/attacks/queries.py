"""Forward-only model queries for the attacks that need outputs but no gradient.

Square queries the model thousands of times per point and FAB checks each iterate; both only
need logits. :func:`query_fn` is the one place that decides how such a query runs, so a faster
execution path (issue: AutoAttack at 3x) changes every forward-only query at once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def query_fn(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """A function computing ``model``'s logits without building an autograd graph."""

    def query(x: Tensor) -> Tensor:
        with torch.no_grad():
            return model(x)

    return query
