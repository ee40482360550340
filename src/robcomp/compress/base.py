"""The Compressor protocol, its Record, and the compressor registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from torch import nn

from robcomp.compress.efficiency import Efficiency
from robcomp.data.base import DataSplits
from robcomp.registry import Registry

COMPRESSORS: Registry[Any] = Registry("compressor")


@dataclass(frozen=True, kw_only=True)
class Record(Efficiency):
    """What a compressor did (method, seconds, details) and what the result costs (its
    :class:`~robcomp.compress.efficiency.Efficiency` fields)."""

    method: str
    seconds: float
    details: dict[str, Any]


class Compressor(Protocol):
    """``compressor(model, data) -> (new_model, record)``; the input model is never modified.

    A compressor may leave reparametrizations (such as pruning masks) on the returned model so
    that fine-tuning keeps the compression; :func:`robcomp.compress.finalize` makes them
    permanent.

    A compressor whose result is not the input's architecture with some channels removed (a
    distilled student) may define ``skeleton(model, data) -> nn.Module``, an untrained model of
    the structure it returns: the experiment runner loads cached weights into it instead of
    compressing again.

    A compressor that handles only some models may define ``check(model, data) -> None``,
    raising a ValueError that names what it supports when it cannot compress ``model`` on
    ``data``. The experiment runner calls it before any cell runs, on the model built on the
    meta device (shapes, no weights), so such a combination is refused when the file loads
    rather than failing after training.

    A compressor that calibrates or trains on ``data.train`` says so with a true
    ``uses_training_data`` attribute (see :func:`uses_training_data`).
    """

    def __call__(self, model: nn.Module, data: DataSplits) -> tuple[nn.Module, Record]: ...

    def label(self) -> str: ...


def uses_training_data(compressor: Any) -> bool:
    """Whether ``compressor`` calibrates or trains on the training split (its declared
    ``uses_training_data``; False when it declares nothing), so data without one can be
    refused before anything runs."""
    return bool(getattr(compressor, "uses_training_data", False))
