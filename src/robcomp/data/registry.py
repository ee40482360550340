"""The dataset registry (its own module so dataset files can import it without cycles)."""

from __future__ import annotations

from robcomp.data.base import Dataset
from robcomp.registry import Registry

# Dataset classes (frozen dataclasses whose fields are the options).
DATASETS: Registry[type[Dataset]] = Registry("dataset")
