"""Where a grid stands: which cells are done, running (who, since when), failed or pending.

Pending cells are known without the experiment file: every run records its grid's cell ids in
the store (``grid_cells``) when it starts, so the store alone tells what is left. A store
written before that (or by hand) shows its recorded runs only.

A cell is running while its owner lives (:func:`robcomp.experiments.leases.is_live`): a
process of this machine while it exists, another machine's while it renews its lease. The
store is opened read-only.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robcomp.experiments.leases import is_live
from robcomp.experiments.store import STORE_NAME, Process, ResultStore, safe_url

STATES = ("done", "running", "failed", "pending")


@dataclass(frozen=True)
class CellStatus:
    """One cell's state; ``owner``/``since`` for a running cell, ``owner`` (the run that
    recorded it, where the store kept it), ``seconds`` and ``error`` (its first line, failed
    cells) for a finished one."""

    cell_id: str
    experiment: str
    state: str
    grid_values: dict[str, Any]
    owner: str | None = None
    since: float | None = None
    seconds: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class GridStatus:
    """Every cell of a store's grids and an estimate of the time left.

    Attributes:
        eta_seconds: the mean time of the finished cells times the cells left (pending, and
            the rest of each running one), shared among the runs now working; None before any
            cell has finished.
        workers: distinct live runs holding cells (0 once none is running).
    """

    store: str
    cells: list[CellStatus]
    eta_seconds: float | None
    mean_seconds: float | None
    workers: int

    def counts(self) -> dict[str, int]:
        found = Counter(c.state for c in self.cells)
        return {state: found[state] for state in STATES}


def resolve_store(target: str | Path) -> str | Path:
    """A store URL as given; a folder as its ``results.sqlite``; a SQLite file as itself.

    Raises:
        FileNotFoundError: a path with no store there.
    """
    if "://" in str(target):
        return str(target)
    path = Path(target)
    if path.is_dir():
        path = path / STORE_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{target}: no results store here ({STORE_NAME}); pass a run's output folder, "
            "a .sqlite file or a store URL (postgresql+psycopg://...)"
        )
    return path


def grid_status(
    target: str | Path, experiment: str | None = None, now: float | None = None
) -> GridStatus:
    """The state of every cell in the store ``target`` (a folder, file or URL), optionally
    of one experiment only."""
    store = ResultStore(resolve_store(target), read_only=True)
    now = time.time() if now is None else now
    here = Process.this()
    try:
        runs = {r.cell_id: r for r in store.runs(status=None)}
        live = {lease.cell_id: lease for lease in store.leases() if is_live(lease, now, here)}
        grid = {g.cell_id: (g.experiment, g.grid_values) for g in store.grid()}
    finally:
        store.close()
    for cid, row in runs.items():
        grid.setdefault(cid, (row.experiment, row.grid_values))
    cells = []
    for cid, (name, values) in grid.items():
        if experiment is not None and name != experiment:
            continue
        run = runs.get(cid)
        if cid in live:
            lease = live[cid]
            cells.append(CellStatus(cid, name, "running", values, lease.owner, lease.since))
        elif run is not None:
            error = (run.error or "").strip().splitlines()[0] if run.error else None
            cells.append(CellStatus(cid, name, run.status, values, owner=run.owner,
                                    seconds=run.seconds, error=error))  # fmt: skip
        else:
            cells.append(CellStatus(cid, name, "pending", values))
    return _with_eta(safe_url(store.url), cells, now)


def _with_eta(store: str, cells: list[CellStatus], now: float) -> GridStatus:
    times = [c.seconds for c in cells if c.state in ("done", "failed") and c.seconds is not None]
    workers = len({c.owner for c in cells if c.state == "running"})
    if not times:
        return GridStatus(store, cells, None, None, workers)
    mean = statistics.fmean(times)
    left = sum(mean for c in cells if c.state == "pending")
    left += sum(max(0.0, mean - (now - (c.since or now))) for c in cells if c.state == "running")
    return GridStatus(store, cells, left / max(1, workers), mean, workers)
