"""The dataset registry (its own module so dataset files can import it without cycles)."""

from __future__ import annotations

from typing import Any

from robcomp.registry import Registry

DATASETS: Registry[Any] = Registry("dataset")
