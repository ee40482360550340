"""Datasets (registry). Every dataset yields float32 inputs in [0, 1] and int64 labels."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from robcomp.config import build_component
from robcomp.data import builtin, vision  # noqa: F401  (registers the datasets)
from robcomp.data.base import Dataset, DatasetNotFound, DataSplits, Split, data_root
from robcomp.data.registry import DATASETS


def get(spec: Mapping[str, Any] | str, seed: int = 0, where: str = "data") -> DataSplits:
    """Load the dataset described by ``{"name": ..., **options}`` with splits seeded by ``seed``."""
    dataset = build_component(DATASETS, spec, where)
    name = spec if isinstance(spec, str) else str(spec["name"])
    return dataclasses.replace(dataset.load(seed), name=name)


__all__ = ["DATASETS", "DataSplits", "Dataset", "DatasetNotFound", "Split", "data_root", "get"]
