"""The results store: one SQLite file of runs and metrics, written one cell at a time.

A cell's metrics and its ``done`` status are written in one transaction, so a run killed at any
moment leaves each cell either complete or absent, and a rerun skips exactly the complete ones.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    cell_id     TEXT PRIMARY KEY,
    experiment  TEXT NOT NULL,
    status      TEXT NOT NULL,          -- 'done' or 'failed'
    config      TEXT NOT NULL,          -- canonical JSON of the resolved cell config
    grid_values TEXT NOT NULL,          -- JSON: the grid keys and values of this cell
    info        TEXT NOT NULL,          -- JSON: history, compression record, notes
    error       TEXT,
    seconds     REAL,
    finished    REAL
);
CREATE TABLE IF NOT EXISTS metrics (
    cell_id  TEXT NOT NULL REFERENCES runs(cell_id),
    name     TEXT NOT NULL,             -- e.g. clean_accuracy, robust_accuracy, params
    attack   TEXT NOT NULL DEFAULT '',  -- attack label, '' for attack-free metrics
    eps      REAL NOT NULL DEFAULT 0,
    value    REAL,
    shift    TEXT NOT NULL DEFAULT '',  -- the shifted split ('fog', 'usps'), '' for the test split
    severity INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (cell_id, name, attack, eps, shift, severity)
);
"""

# Stores written before metrics had a shift: the table is rebuilt with the new key, every row
# kept (on the unshifted test split), in one transaction.
MIGRATE_SHIFT = """
ALTER TABLE metrics RENAME TO metrics_before_shift;
CREATE TABLE metrics (
    cell_id  TEXT NOT NULL REFERENCES runs(cell_id),
    name     TEXT NOT NULL,
    attack   TEXT NOT NULL DEFAULT '',
    eps      REAL NOT NULL DEFAULT 0,
    value    REAL,
    shift    TEXT NOT NULL DEFAULT '',
    severity INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (cell_id, name, attack, eps, shift, severity)
);
INSERT INTO metrics (cell_id, name, attack, eps, value)
    SELECT cell_id, name, attack, eps, value FROM metrics_before_shift;
DROP TABLE metrics_before_shift;
"""


@dataclass(frozen=True)
class Metric:
    """One number of a cell, keyed by (name, attack, eps, shift, severity).

    Attributes:
        attack, eps: the attack label and budget, ``""`` and 0 for attack-free metrics.
        shift, severity: the shifted split it was measured on (a corruption, a target domain,
            an on-manifold test set) and its severity (0 when the shift has none); ``""`` and 0
            for the cell's own test split.
    """

    name: str
    value: float | None
    attack: str = ""
    eps: float = 0.0
    shift: str = ""
    severity: int = 0

    @property
    def key(self) -> tuple[str, str, float, str, int]:
        return (self.name, self.attack, self.eps, self.shift, self.severity)

    @property
    def is_timing(self) -> bool:
        """Measurements of the machine (times, threads, load), which differ between runs of
        the same cell."""
        return self.name.startswith(("attack_seconds", "latency_ms_", "threads", "load_1min"))


@dataclass(frozen=True)
class RunRow:
    cell_id: str
    experiment: str
    status: str
    config: dict[str, Any]
    grid_values: dict[str, Any]
    info: dict[str, Any]
    error: str | None
    seconds: float | None
    metrics: list[Metric]


def _finite(value: float | None) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


class ResultStore:
    """Runs and metrics of experiments in one SQLite file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            columns = {r[1] for r in conn.execute("PRAGMA table_info(metrics)")}
            if columns and "shift" not in columns:
                conn.executescript(f"BEGIN; {MIGRATE_SHIFT} COMMIT;")
            conn.executescript(SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=60)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA foreign_keys=ON")
            yield conn
        finally:
            conn.close()

    def done_ids(self) -> set[str]:
        with self._connect() as conn:
            return {r[0] for r in conn.execute("SELECT cell_id FROM runs WHERE status='done'")}

    def record(
        self,
        *,
        cell_id: str,
        experiment: str,
        config: dict[str, Any],
        grid_values: dict[str, Any],
        metrics: Iterable[Metric],
        info: dict[str, Any],
        seconds: float,
        error: str | None = None,
    ) -> None:
        """Write one cell atomically (replacing any earlier failed attempt).

        Two attack or shift metrics with one key are refused: the second would silently
        replace the first, e.g. a weaker attack's robust accuracy a stronger one's.
        """
        metrics = list(metrics)
        seen: set[tuple[str, str, float, str, int]] = set()
        for m in metrics:
            if (m.attack or m.shift) and m.key in seen:
                where = f" on {m.shift} (severity {m.severity})" if m.shift else ""
                raise ValueError(
                    f"cell {cell_id}: two values of {m.name} for attack {m.attack!r} at "
                    f"eps={m.eps:.6g}{where}; give the attacks (or shifts) distinct labels"
                )
            seen.add(m.key)
        status = "failed" if error else "done"
        with self._connect() as conn, conn:  # the inner `conn` is the transaction
            conn.execute("DELETE FROM metrics WHERE cell_id = ?", (cell_id,))
            conn.execute(
                "INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    cell_id, experiment, status,
                    json.dumps(config, sort_keys=True), json.dumps(grid_values, sort_keys=True),
                    json.dumps(info, sort_keys=True, default=str), error, seconds, time.time(),
                ),
            )  # fmt: skip
            conn.executemany(
                "INSERT OR REPLACE INTO metrics (cell_id, name, attack, eps, value, shift, "
                "severity) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (cell_id, m.name, m.attack, m.eps, _finite(m.value), m.shift, m.severity)
                    for m in metrics
                ],
            )

    def runs(self, status: str | None = "done") -> list[RunRow]:
        """All runs (of one status, or all with ``None``) with their metrics, oldest first."""
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT cell_id, experiment, status, config, grid_values, info, error, seconds "
                "FROM runs" + (" WHERE status = ?" if status else "") + " ORDER BY finished",
                (status,) if status else (),
            ).fetchall()
            metrics: dict[str, list[Metric]] = {}
            query = "SELECT cell_id, name, attack, eps, value, shift, severity FROM metrics"
            for cid, name, attack, eps, value, shift, severity in conn.execute(query):
                metrics.setdefault(cid, []).append(
                    Metric(name, value, attack, eps, shift, severity)
                )
        return [
            RunRow(
                cell_id=r[0],
                experiment=r[1],
                status=r[2],
                config=json.loads(r[3]),
                grid_values=json.loads(r[4]),
                info=json.loads(r[5]),
                error=r[6],
                seconds=r[7],
                metrics=metrics.get(r[0], []),
            )
            for r in rows
        ]
