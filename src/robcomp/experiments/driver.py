"""Driving an experiment: skip what is done, run the rest, store each result as it arrives."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn

from robcomp import data as datasets
from robcomp.attacks import Attack
from robcomp.compress import COMPRESSORS, uses_training_data
from robcomp.config import ConfigError, build_component, canonical_json, to_dict
from robcomp.data import DataError, DatasetNotFound, DataSplits, require_training_split
from robcomp.evaluate import SHIFTS
from robcomp.experiments.executors import CACHE, Executor, LocalExecutor
from robcomp.experiments.leases import LEASE_SECONDS, Leases
from robcomp.experiments.runner import CellResult, run_cell
from robcomp.experiments.spec import Cell, CellConfig, Experiment, ModelSpec
from robcomp.experiments.store import STORE_NAME, ResultStore
from robcomp.experiments.transfer import TransferSummary, run_transfer
from robcomp.models import MODELS, checkpoint_trust, create_to_check
from robcomp.progress import track
from robcomp.train.loop import training_threat

log = logging.getLogger(__name__)
# A run claims cells in batches covering about this much work (one at a time for longer
# cells): each claim is a database statement, a few milliseconds on a busy machine, which
# would be a tenth of a 35-ms cell; a batch of a second's work delays a concurrent run little.
CLAIM_AHEAD_SECONDS = 1.0
CLAIM_AHEAD_MAX = 16


@dataclass(frozen=True)
class RunSummary:
    out_dir: Path
    total: int
    skipped: int
    ran: int
    failed: list[CellResult]
    elsewhere: list[str] = field(default_factory=list)  # cells another run held (or finished)
    transfer: TransferSummary | None = None  # the evaluate.transfer step, when the file has one
    # cells of elsewhere not done when this run ended: live runs still hold them (or failed)
    unfinished: list[str] = field(default_factory=list)


def run_experiment(
    experiment: Experiment,
    out_dir: str | Path,
    executor: Executor | None = None,
    *,
    append: bool = False,
    store: str | Path | None = None,
    lease_seconds: float = LEASE_SECONDS,
    started: Callable[[], None] | None = None,
) -> RunSummary:
    """Run every cell of ``experiment`` not already done in ``out_dir``.

    Each finished cell is committed to the store before the next is awaited, so
    an interrupted run loses at most the cells in flight. Every dataset the remaining cells use
    is loaded and checked once before any cell runs.

    Args:
        append: allow ``out_dir`` to hold results of another experiment (another ``name``);
            without it that is refused, since their leaderboards would merge.
        store: the results store, a URL or a SQLite path (default: the experiment file's
            ``store``, else ``out_dir/results.sqlite``). Each cell is claimed there before it
            runs, so several runs on one store split the grid; cells another live run holds
            are left to it (``RunSummary.elsewhere``); when this run has finished its own, it
            tries them again (their owners may have died meanwhile), and the ones still not
            done are ``RunSummary.unfinished``.
        started: called once the checks before any cell have passed and before anything is
            written (the CLI prints its header then, so a refused file prints only its error).
        lease_seconds: how long a claim lasts unless renewed (renewed every third of it while
            this run lives); a crashed run's cells are taken again after this long, or at
            once when it was a process of this machine (:mod:`robcomp.experiments.leases`).

    Raises:
        ConfigError: ``out_dir`` holds another experiment and ``append`` is False.
        DataError, DatasetNotFound: a dataset is missing or unusable (nothing has run).
    """
    out = Path(out_dir)
    target = store or experiment.store or out / STORE_NAME
    done: set[str] = set()
    results: ResultStore | None = None
    if "://" in str(target) or Path(target).is_file():
        results = ResultStore(target)
        _check_same_experiment(results, experiment.name, out, append)
        done = results.done_ids()
    todo = [c for c in experiment.cells if c.cell_id not in done]
    # Cells on a cluster run on its nodes' devices, which this machine cannot see.
    local = executor is None or executor.on_this_machine
    crafted = experiment.transfer.attacks if experiment.transfer is not None else ()
    preflight(todo, experiment.source, devices=local, transfer=crafted)
    if started is not None:
        started()
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiment.yaml").write_text(yaml.safe_dump(experiment.raw, sort_keys=False))
    results = results or ResultStore(target)
    results.register_cells(experiment.name, [(c.cell_id, c.grid_values) for c in experiment.cells])
    skipped = len(experiment.cells) - len(todo)
    if skipped:
        log.info(
            "%d of %d cells already done; running %d", skipped, len(experiment.cells), len(todo)
        )
    failed: list[CellResult] = []
    elsewhere: list[str] = []
    workdir = str(out.resolve())
    with (
        Leases(results, lease_seconds) as leases,
        track(f"{experiment.name}: cells", len(todo), transient=False) as advance,
    ):
        pending = todo
        while pending:  # again for cells held elsewhere, while that frees some
            held: list[str] = []
            for result in _claimed(executor or LocalExecutor(), pending, out, leases, held):
                results.record(
                    cell_id=result.cell_id,
                    experiment=result.experiment,
                    config=result.config,
                    grid_values=result.grid_values,
                    metrics=result.metrics,
                    info=result.info_json(),
                    seconds=result.seconds,
                    error=result.error,
                    owner=leases.owner,
                    workdir=workdir,
                )
                if result.error:
                    failed.append(result)
                advance(1, status=f"{result.cell_id} {'FAILED' if result.error else 'done'}")
            progressed = len(held) < len(pending)
            still_held = set(held)
            elsewhere, pending = held, [c for c in pending if c.cell_id in still_held]
            if not progressed:
                break
    ran = len(todo) - len(elsewhere)
    finished = results.done_ids() if elsewhere else set()
    unfinished = [cid for cid in elsewhere if cid not in finished]
    transfer = None
    if experiment.transfer is not None:
        # After every cell: sources and targets are all finished models (module docstring of
        # robcomp.experiments.transfer); the cells' shared artifacts hold them.
        cache = getattr(executor, "artifacts", None) or out / CACHE
        transfer = run_transfer(experiment, results, Path(cache))
    return RunSummary(
        out, len(experiment.cells), skipped, ran, failed, elsewhere, transfer, unfinished
    )


def _claimed(
    executor: Executor, todo: Sequence[Cell], out: Path, leases: Leases, elsewhere: list[str]
) -> Iterator[CellResult]:
    """Results of the cells of ``todo`` this run could claim; the others go to ``elsewhere``.

    In this process cells are claimed a few at a time just before they run (one at a time for
    cells of a second or more, enough for about a second of work for shorter ones, so the
    claim is not paid per tiny cell), so concurrent runs interleave; an executor running
    cells in parallel gets all the cells claimed at once (its leases are renewed together
    while it works through them).
    """
    if executor.one_at_a_time:
        pending, ahead = list(todo), 1
        while pending:
            batch, pending = pending[:ahead], pending[ahead:]
            mine = set(leases.claim_many([cell.cell_id for cell in batch]))
            for cell in batch:
                if cell.cell_id not in mine:
                    elsewhere.append(cell.cell_id)
                    continue
                start = time.perf_counter()
                yield from executor.map(run_cell, [cell], out)
                ahead = _claims_ahead(time.perf_counter() - start)
        return
    mine = set(leases.claim_many([cell.cell_id for cell in todo]))
    elsewhere += [cell.cell_id for cell in todo if cell.cell_id not in mine]
    yield from executor.map(run_cell, [cell for cell in todo if cell.cell_id in mine], out)


def _claims_ahead(cell_seconds: float) -> int:
    """How many cells to claim at once after a cell took ``cell_seconds``: about
    :data:`CLAIM_AHEAD_SECONDS` of work, between 1 and :data:`CLAIM_AHEAD_MAX`."""
    return max(1, min(CLAIM_AHEAD_MAX, int(CLAIM_AHEAD_SECONDS / max(cell_seconds, 1e-3))))


def _check_same_experiment(store: ResultStore, name: str, out: Path, append: bool) -> None:
    others = sorted(store.experiments() - {name})
    if others and not append:
        raise ConfigError(
            f"{out} holds results of experiment {others[0]!r}, and this is {name!r}: their "
            "leaderboards would merge. Use another --out, or --append to add to it"
        )


def preflight(
    cells: Sequence[Cell],
    where: str,
    *,
    devices: bool = True,
    transfer: Sequence[Attack] = (),
) -> None:
    """Load and check each distinct dataset of ``cells`` once, so a missing file, a wrong key
    or NaN pixels are one message before any cell runs instead of one failure per cell; then
    build each distinct registered model for its data on the meta device (no memory, no
    compute), so a bad option value or an input shape the model cannot take fails here too,
    and ask each compressor whether it can compress that model (its optional ``check``), so a
    combination it does not support is refused here rather than after training.
    A model that reads checkpoints while it builds (an ensemble) is built for real, once: that
    is also the check that its files exist, load and are trusted.

    With the data loaded it also refuses, in one line each: a shift that cannot apply to it (its
    optional ``check(data)``: corruptions on 1-D series), and an attack or adversarial training
    objective (or a ``transfer`` attack) whose eps ball covers every input, which would report
    0 % whatever the model. With ``devices`` (cells run on this machine) a device this machine
    does not have (``cuda`` without a GPU) is refused too.
    """
    loaded: dict[str, DataSplits] = {}
    built: dict[str, nn.Module | None] = {}
    checked: set[str] = set()
    for cell in cells:
        cfg = cell.config
        if devices:
            _check_device(cfg.device, where)
        key = canonical_json(cfg.data)
        if key not in loaded:
            try:
                loaded[key] = datasets.get(cfg.data, seed=cfg.seed)
            except (DataError, DatasetNotFound) as err:
                raise type(err)(f"{where}: data: {err}") from None
        model_key = canonical_json([cfg.model, key, cfg.trust_code])
        if model_key not in built:
            with checkpoint_trust(cfg.trust_code):  # as run_cell will load its checkpoints
                built[model_key] = _check_model(cfg.model, loaded[key], where)
        compress_key = canonical_json([model_key, cfg.compress])
        if compress_key not in checked:
            checked.add(compress_key)
            _check_compressor(cfg, built[model_key], loaded[key], where)
        # Not canonical_json: an unbounded attack's eps is inf, which strict JSON refuses.
        suite_key = json.dumps(to_dict([key, cfg.evaluate, cfg.train, cfg.finetune]))
        if suite_key not in checked:
            checked.add(suite_key)
            _check_shifts(cfg, loaded[key], where)
            _check_threats(cfg, loaded[key], transfer, where)


def _check_model(spec: ModelSpec, data: DataSplits, where: str) -> nn.Module | None:
    """The model built for ``data`` (on the meta device unless it reads files), or None for
    a ``module:callable``: the user's own code, which may not run on the meta device."""
    if spec.name not in MODELS:
        return None
    try:
        return create_to_check(
            spec.name, data.num_classes, data.in_shape,
            mean=spec.mean or None, std=spec.std or None, **spec.options,
        )  # fmt: skip
    except (ValueError, TypeError, RuntimeError, FileNotFoundError) as err:
        raise ConfigError(f"{where}: model {spec.name!r} on {data.summary()}: {err}") from None


def _check_compressor(
    cfg: CellConfig, model: nn.Module | None, data: DataSplits, where: str
) -> None:
    """Refuse, in one line, a compressor that says it cannot compress ``model`` on ``data``."""
    compressor = build_component(COMPRESSORS, cfg.compress, f"{where}: compress")
    users = [f"compress {compressor.label()!r}"] if uses_training_data(compressor) else []
    if cfg.train.epochs > 0:
        users.append("training the model (train.epochs > 0)")
    if users:  # a test set only (split: test) cannot calibrate or train anything
        try:
            require_training_split(data, " and ".join(users))
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
    check = getattr(compressor, "check", None)
    if model is None or check is None:
        return
    try:
        check(model, data)
    except ValueError as err:
        name = cfg.compress.get("name")
        raise ConfigError(
            f"{where}: compress {name!r} cannot compress model {cfg.model.name!r} on "
            f"{data.summary()}: {err}"
        ) from None


def _check_device(device: str, where: str) -> None:
    """Refuse a CUDA or MPS device this machine lacks, which would fail every cell."""
    if device == "auto":
        return
    target = torch.device(device)
    if target.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = " (and this torch is a CPU-only build)" if torch.version.cuda is None else ""
            raise ConfigError(
                f"{where}: device {device!r}: torch finds no CUDA GPU on this machine{build}; "
                "use device: auto (the GPU when there is one) or cpu"
            )
        if target.index is not None and target.index >= count:
            raise ConfigError(
                f"{where}: device {device!r}: this machine has {count} CUDA GPU(s), "
                f"cuda:0 to cuda:{count - 1}"
            )
    if target.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{where}: device {device!r}: MPS is not available on this machine")


def _check_shifts(cfg: CellConfig, data: DataSplits, where: str) -> None:
    """Refuse a shift that says (its optional ``check``) it cannot shift ``data``."""
    for i, spec in enumerate(cfg.evaluate.shifts):
        shift = build_component(SHIFTS, spec, f"{where}: evaluate.shifts[{i}]")
        check = getattr(shift, "check", None)
        if check is None:
            continue
        try:
            check(data)
        except ValueError as err:
            raise ConfigError(
                f"{where}: evaluate.shifts[{i}]: shift {spec.get('name')!r} cannot apply to "
                f"{data.summary()}: {err}"
            ) from None


# Inputs are in [0, 1]^d (robcomp.data checks it), whose diameter under each norm is this.
_DIAMETER = {"linf": lambda d: 1.0, "l2": math.sqrt, "l1": float}


def _check_threats(
    cfg: CellConfig, data: DataSplits, transfer: Sequence[Attack], where: str
) -> None:
    """Refuse an eps ball that holds all of [0, 1]^d: every input can be moved onto a point of
    another class, so robust accuracy is 0 % whatever the model, and training against it is
    training on noise. An unbounded attack (``eps: inf``, minimal-norm) is meant that way."""
    dim = math.prod(data.in_shape)
    attacks = [("evaluate.attacks", a) for a in cfg.evaluate.build_attacks(f"{where}: evaluate")]
    attacks += [("evaluate.transfer.attack", a) for a in transfer]
    # (On-manifold attacks' norms are in latent space, with no diameter here: never refused.)
    threats = [(f"{section}: {a.label()}", float(a.eps), str(a.norm)) for section, a in attacks]
    for section, train in (("train", cfg.train), ("finetune", cfg.finetune)):
        threat = training_threat(train.build_objective()) if train is not None else None
        if threat is not None:
            threats.append((f"{section}.objective", *threat))
    for what, eps, norm in threats:
        diameter = _DIAMETER[norm](dim) if norm in _DIAMETER else math.inf
        if math.isfinite(eps) and eps >= diameter:
            raise ConfigError(
                f"{where}: {what}: eps {eps:.4g} in {norm} covers every input of "
                f"{data.summary()} ([0, 1]^{dim} has {norm} diameter {diameter:.4g}), so any "
                "point can be moved anywhere and robust accuracy is 0 %; use a smaller eps"
            )
