"""Datasets (registry). Every dataset yields float32 inputs in [0, 1] and int64 labels."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from robcomp.config import build_component
from robcomp.data import (  # noqa: F401  (registers the datasets)
    builtin,
    domains,
    imagefolder,
    sensors,
    vision,
)
from robcomp.data.base import (
    DataError,
    Dataset,
    DatasetNotFound,
    DataSplits,
    Split,
    check_splits,
    data_root,
    hold_out,
    require_training_split,
)
from robcomp.data.registry import DATASETS


def get(spec: Mapping[str, Any] | str, seed: int = 0, where: str = "data") -> DataSplits:
    """Load the dataset described by ``{"name": ..., **options}`` with splits seeded by ``seed``."""
    dataset = build_component(DATASETS, spec, where)
    name = spec if isinstance(spec, str) else str(spec["name"])
    splits = dataclasses.replace(dataset.load(seed), name=name)
    test_only = getattr(dataset, "split", None) == "test"  # a file declared a test set
    check_splits(splits, _describe(dataset, name), test_only=test_only)
    return splits


def _describe(dataset: Dataset, name: str) -> str:
    """How error messages name a dataset: its file when it has one."""
    path = getattr(dataset, "path", None)
    return f"{name} dataset {path}" if path else f"{name} dataset"


__all__ = [
    "DATASETS",
    "DataError",
    "DataSplits",
    "Dataset",
    "DatasetNotFound",
    "Split",
    "check_splits",
    "data_root",
    "get",
    "hold_out",
    "require_training_split",
]
