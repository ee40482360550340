"""Unstructured magnitude pruning (Han et al. 2015), global or per layer, via torch's prune API."""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from typing import Literal

from torch import nn
from torch.nn.utils import prune

from robcomp.compress.base import COMPRESSORS, Record
from robcomp.compress.efficiency import measure, prunable_layers, select_layers
from robcomp.data.base import DataSplits


def finalize(model: nn.Module) -> nn.Module:
    """Make pruning masks permanent (weights keep their zeros, the masks go). In place."""
    for _, module in prunable_layers(model):
        if prune.is_pruned(module) and hasattr(module, "weight_mask"):
            prune.remove(module, "weight")
    return model


def check_sparsity(value: float, where: str, name: str = "sparsity") -> None:
    """Raise ValueError unless ``value`` is a fraction of weights to zero, in [0, 1)."""
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{where}.{name} must be in [0, 1), got {value}")


def record_for(
    method: str, model: nn.Module, data: DataSplits, seconds: float, **details: object
) -> Record:
    efficiency = asdict(measure(model, data.in_shape))
    return Record(method=method, seconds=seconds, details=dict(details), **efficiency)


@COMPRESSORS.register("none")
@dataclass(frozen=True, kw_only=True)
class NoCompression:
    """The uncompressed baseline: a copy of the model, measured like any compressed one."""

    def label(self) -> str:
        return "none"

    def __call__(self, model: nn.Module, data: DataSplits) -> tuple[nn.Module, Record]:
        start = time.perf_counter()
        new = copy.deepcopy(model)
        return new, record_for("none", new, data, time.perf_counter() - start)


@COMPRESSORS.register("magnitude")
@dataclass(frozen=True, kw_only=True)
class MagnitudePruning:
    """Unstructured magnitude pruning (Han et al. 2015, "Learning both Weights and Connections").

    Zeroes the smallest-|w| weights of every Conv/Linear layer: ``scope="global"`` ranks all of
    them together, ``scope="layer"`` removes the same fraction from each layer. The returned model
    carries the masks so fine-tuning keeps the zeros.

    Attributes:
        sparsity: fraction of Conv/Linear weights set to zero, in [0, 1).
        scope: ``global`` or ``layer``.
        include_first_last: also prune the first and last layers (they are small and sensitive;
            many papers keep them dense).
    """

    sparsity: float
    scope: Literal["global", "layer"] = "global"
    include_first_last: bool = True

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity, "magnitude")

    def label(self) -> str:
        return f"magnitude-{self.scope}-{self.sparsity:g}"

    def __call__(self, model: nn.Module, data: DataSplits) -> tuple[nn.Module, Record]:
        start = time.perf_counter()
        new = copy.deepcopy(model)
        layers = select_layers(prunable_layers(new), self.include_first_last)
        targets = [(m, "weight") for _, m in layers]
        if self.scope == "global":
            prune.global_unstructured(
                targets, pruning_method=prune.L1Unstructured, amount=self.sparsity
            )
        else:
            for module, name in targets:
                prune.l1_unstructured(module, name, amount=self.sparsity)
        seconds = time.perf_counter() - start
        return new, record_for(
            self.label(), new, data, seconds, sparsity=self.sparsity, layers=len(targets)
        )
