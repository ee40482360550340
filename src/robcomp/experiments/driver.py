"""Driving an experiment: skip what is done, run the rest, store each result as it arrives."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import yaml

from robcomp.experiments.executors import Executor, LocalExecutor
from robcomp.experiments.runner import CellResult, run_cell
from robcomp.experiments.spec import Experiment
from robcomp.experiments.store import ResultStore
from robcomp.progress import track

log = logging.getLogger(__name__)
STORE_NAME = "results.sqlite"


@dataclass(frozen=True)
class RunSummary:
    out_dir: Path
    total: int
    skipped: int
    ran: int
    failed: list[CellResult]


def run_experiment(
    experiment: Experiment, out_dir: str | Path, executor: Executor | None = None
) -> RunSummary:
    """Run every cell of ``experiment`` not already done in ``out_dir``.

    Each finished cell is committed to ``out_dir/results.sqlite`` before the next is awaited, so
    an interrupted run loses at most the cells in flight.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiment.yaml").write_text(yaml.safe_dump(experiment.raw, sort_keys=False))
    store = ResultStore(out / STORE_NAME)
    done = store.done_ids()
    todo = [c for c in experiment.cells if c.cell_id not in done]
    skipped = len(experiment.cells) - len(todo)
    if skipped:
        log.info(
            "%d of %d cells already done; running %d", skipped, len(experiment.cells), len(todo)
        )
    failed: list[CellResult] = []
    with track(f"{experiment.name}: cells", len(todo), transient=False) as advance:
        for result in (executor or LocalExecutor()).map(run_cell, todo, out):
            store.record(
                cell_id=result.cell_id,
                experiment=result.experiment,
                config=result.config,
                grid_values=result.grid_values,
                metrics=result.metrics,
                info=result.info,
                seconds=result.seconds,
                error=result.error,
            )
            if result.error:
                failed.append(result)
            advance(1, status=f"{result.cell_id} {'FAILED' if result.error else 'done'}")
    return RunSummary(out, len(experiment.cells), skipped, len(todo), failed)
