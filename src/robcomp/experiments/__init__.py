"""Experiments: grid expansion, the one pipeline a variant goes through, the cell runner,
executors and the result store.

The names below are imported on first use, so that reading and checking an experiment file
(:mod:`robcomp.experiments.schema`) does not load torch: a mistake in the file is reported in a
fraction of a second instead of after seconds of imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from robcomp.experiments.driver import STORE_NAME, RunSummary, run_experiment
    from robcomp.experiments.executors import Executor, LocalExecutor
    from robcomp.experiments.pipeline import CellInfo, Variant, VariantResult, evaluate_variant
    from robcomp.experiments.runner import CellResult, run_cell
    from robcomp.experiments.spec import (
        Cell,
        CellConfig,
        EvaluateSpec,
        Experiment,
        ModelSpec,
        expand,
        load_experiment,
    )
    from robcomp.experiments.store import Metric, ResultStore

_WHERE = {
    "STORE_NAME": "driver",
    "RunSummary": "driver",
    "run_experiment": "driver",
    "Executor": "executors",
    "LocalExecutor": "executors",
    "CellInfo": "pipeline",
    "Variant": "pipeline",
    "VariantResult": "pipeline",
    "evaluate_variant": "pipeline",
    "CellResult": "runner",
    "run_cell": "runner",
    "Cell": "spec",
    "CellConfig": "spec",
    "EvaluateSpec": "spec",
    "Experiment": "spec",
    "ModelSpec": "spec",
    "expand": "spec",
    "load_experiment": "spec",
    "Metric": "store",
    "ResultStore": "store",
}

__all__ = [
    "STORE_NAME",
    "Cell",
    "CellConfig",
    "CellInfo",
    "CellResult",
    "EvaluateSpec",
    "Executor",
    "Experiment",
    "LocalExecutor",
    "Metric",
    "ModelSpec",
    "ResultStore",
    "RunSummary",
    "Variant",
    "VariantResult",
    "evaluate_variant",
    "expand",
    "load_experiment",
    "run_cell",
    "run_experiment",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'robcomp.experiments' has no attribute {name!r}")
    return getattr(importlib.import_module(f"robcomp.experiments.{_WHERE[name]}"), name)
