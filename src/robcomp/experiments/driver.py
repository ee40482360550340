"""Driving an experiment: skip what is done, run the rest, store each result as it arrives."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from robcomp import data as datasets
from robcomp.config import ConfigError, canonical_json
from robcomp.data import DataError, DatasetNotFound, DataSplits
from robcomp.experiments.executors import Executor, LocalExecutor
from robcomp.experiments.runner import CellResult, run_cell
from robcomp.experiments.spec import Cell, Experiment, ModelSpec
from robcomp.experiments.store import ResultStore
from robcomp.models import MODELS, builds_from_files, checkpoint_trust, create, factory_for
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
    experiment: Experiment,
    out_dir: str | Path,
    executor: Executor | None = None,
    *,
    append: bool = False,
) -> RunSummary:
    """Run every cell of ``experiment`` not already done in ``out_dir``.

    Each finished cell is committed to ``out_dir/results.sqlite`` before the next is awaited, so
    an interrupted run loses at most the cells in flight. Every dataset the remaining cells use
    is loaded and checked once before any cell runs.

    Args:
        append: allow ``out_dir`` to hold results of another experiment (another ``name``);
            without it that is refused, since their leaderboards would merge.

    Raises:
        ConfigError: ``out_dir`` holds another experiment and ``append`` is False.
        DataError, DatasetNotFound: a dataset is missing or unusable (nothing has run).
    """
    out = Path(out_dir)
    done: set[str] = set()
    if (out / STORE_NAME).is_file():
        earlier = ResultStore(out / STORE_NAME)
        _check_same_experiment(earlier, experiment.name, out, append)
        done = earlier.done_ids()
    todo = [c for c in experiment.cells if c.cell_id not in done]
    preflight(todo, experiment.source)
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiment.yaml").write_text(yaml.safe_dump(experiment.raw, sort_keys=False))
    store = ResultStore(out / STORE_NAME)
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


def _check_same_experiment(store: ResultStore, name: str, out: Path, append: bool) -> None:
    others = sorted({run.experiment for run in store.runs(status=None)} - {name})
    if others and not append:
        raise ConfigError(
            f"{out} holds results of experiment {others[0]!r}, and this is {name!r}: their "
            "leaderboards would merge. Use another --out, or --append to add to it"
        )


def preflight(cells: Sequence[Cell], where: str) -> None:
    """Load and check each distinct dataset of ``cells`` once, so a missing file, a wrong key
    or NaN pixels are one message before any cell runs instead of one failure per cell; then
    build each distinct registered model for its data on the meta device (no memory, no
    compute), so a bad option value or an input shape the model cannot take fails here too.
    A model that reads checkpoints while it builds (an ensemble) is built for real, once: that
    is also the check that its files exist, load and are trusted."""
    loaded: dict[str, DataSplits] = {}
    built: set[str] = set()
    for cell in cells:
        cfg = cell.config
        key = canonical_json(cfg.data)
        if key not in loaded:
            try:
                loaded[key] = datasets.get(cfg.data, seed=cfg.seed)
            except (DataError, DatasetNotFound) as err:
                raise type(err)(f"{where}: data: {err}") from None
        model_key = canonical_json([cfg.model, key, cfg.trust_code])
        if model_key not in built:
            built.add(model_key)
            with checkpoint_trust(cfg.trust_code):  # as run_cell will load its checkpoints
                _check_model(cfg.model, loaded[key], where)


def _check_model(spec: ModelSpec, data: DataSplits, where: str) -> None:
    # A module:callable is the user's own code, which may not run on the meta device.
    if spec.name not in MODELS:
        return
    channels = data.in_shape[0]
    device = "cpu" if builds_from_files(factory_for(spec.name)) else "meta"
    try:
        with torch.device(device):
            create(
                spec.name, data.num_classes, data.in_shape,
                mean=spec.mean or (0.0,) * channels, std=spec.std or (1.0,) * channels,
                **spec.options,
            )  # fmt: skip
    except (ValueError, TypeError, RuntimeError, FileNotFoundError) as err:
        raise ConfigError(f"{where}: model {spec.name!r} on {data.summary()}: {err}") from None
