"""Experiments: grid expansion, the one pipeline a variant goes through, the cell runner,
executors and the result store."""

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
