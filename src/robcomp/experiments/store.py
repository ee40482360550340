"""The results store: runs, metrics and leases behind a URL, written one cell at a time.

A store is a SQLAlchemy URL: ``sqlite:///path/results.sqlite`` (the default, one file beside
the run) or ``postgresql+psycopg://user@host/db`` (a server a team shares). Both hold one
schema, versioned in ``schema_version`` and migrated in place when a store is opened.

A cell's metrics and its ``done`` status are written in one transaction, so a run killed at any
moment leaves each cell either complete or absent, and a rerun skips exactly the complete ones.

Several processes may work on one store: before a cell runs, its runner *claims* it, a lease
with an owner and an expiry taken in one statement (an upsert that succeeds only when the cell
is free, its lease expired, or already the caller's). Two runs of one grid therefore split its
cells, and a cell whose owner died is taken again once its lease expires (at once when the
owner was a process of this machine that is gone: :mod:`robcomp.experiments.leases`).

What differs between SQLite and PostgreSQL (the engine's options, upserts, how a block of
writes is sent, the schema lock, reshaping a table) is one :class:`Dialect` object, picked
once when the store is opened. A store opened with ``read_only=True`` (reports, status) never
creates, migrates or writes: it reads an older schema as it is, a missing column as its
default.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Connection, Engine

STORE_NAME = "results.sqlite"
SCHEMA_VERSION = 6
# Clean accuracy on the points the attacks ran on (the test split's first ``evaluate.limit``),
# beside ``clean_accuracy`` on the whole split: robust accuracy is read against it.
ATTACKED_CLEAN_ACCURACY = "attacked_clean_accuracy"
CLAIM_BATCH = 200  # cells claimed by one statement

meta = sa.MetaData()
runs_table = sa.Table(
    "runs", meta,
    sa.Column("cell_id", sa.Text, primary_key=True),
    sa.Column("experiment", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),  # 'done' or 'failed'
    sa.Column("config", sa.Text, nullable=False),  # canonical JSON of the resolved config
    sa.Column("grid_values", sa.Text, nullable=False),  # JSON: the grid keys and values
    sa.Column("info", sa.Text, nullable=False),  # JSON: history, compression record, notes
    sa.Column("error", sa.Text),
    sa.Column("seconds", sa.Double),
    sa.Column("finished", sa.Double),
    sa.Column("owner", sa.Text),  # host:pid:run of the run that recorded it (version 5)
    sa.Column("workdir", sa.Text),  # that run's output folder, on its host (version 5)
)  # fmt: skip
metrics_table = sa.Table(
    "metrics", meta,
    sa.Column("cell_id", sa.Text, sa.ForeignKey("runs.cell_id"), primary_key=True),
    sa.Column("name", sa.Text, primary_key=True),  # clean_accuracy, robust_accuracy, params
    sa.Column("attack", sa.Text, primary_key=True, server_default=""),  # '' when attack-free
    sa.Column("eps", sa.Double, primary_key=True, server_default="0"),
    sa.Column("value", sa.Double),
    sa.Column("shift", sa.Text, primary_key=True, server_default=""),  # '' for the test split
    sa.Column("severity", sa.Integer, primary_key=True, server_default="0"),
    # the model the adversarial examples were crafted on (transfer attacks); '' for the cell's own
    sa.Column("source", sa.Text, primary_key=True, server_default=""),
    sa.Column("n", sa.Integer),  # points the value was measured on, where it was recorded
    # the attack's norm (version 6); '' when attack-free
    sa.Column("norm", sa.Text, nullable=False, server_default=""),
)  # fmt: skip
leases_table = sa.Table(
    "leases", meta,
    sa.Column("cell_id", sa.Text, primary_key=True),
    sa.Column("owner", sa.Text, nullable=False),  # host:pid:uuid of the claiming run
    sa.Column("state", sa.Text, nullable=False),  # 'running' or 'done'
    sa.Column("since", sa.Double, nullable=False),
    sa.Column("expires", sa.Double, nullable=False),
    # the owner's process (version 5): a dead one on this machine is taken back at once
    sa.Column("host", sa.Text),
    sa.Column("boot", sa.Text),  # boot id and pid namespace: which pids the pid is among
    sa.Column("pid", sa.Integer),
)  # fmt: skip
grid_table = sa.Table(
    "grid_cells", meta,
    sa.Column("cell_id", sa.Text, primary_key=True),
    sa.Column("experiment", sa.Text, nullable=False),
    sa.Column("grid_values", sa.Text, nullable=False),
    sa.Column("added", sa.Double, nullable=False),
)  # fmt: skip
version_table = sa.Table("schema_version", meta, sa.Column("version", sa.Integer, nullable=False))


@dataclass(frozen=True)
class Metric:
    """One number of a cell, keyed by (name, attack, eps, shift, severity, source).

    Attributes:
        attack, eps: the attack label and budget, ``""`` and 0 for attack-free metrics.
        shift, severity: the shifted split it was measured on (a corruption, a target domain,
            an on-manifold test set) and its severity (0 when the shift has none); ``""`` and 0
            for the cell's own test split.
        source: the model a transfer attack crafted the examples on (another cell's id, or
            ``checkpoint:<folder>``); ``""`` when the cell's own model was attacked.
        n: how many points the value was measured on (None where it was not recorded); not
            part of the key.
        norm: the threat model's norm of an attack metric (``linf``, ``l2``), ``""`` for
            attack-free metrics and in stores older than schema 5; not part of the key.
    """

    name: str
    value: float | None
    attack: str = ""
    eps: float = 0.0
    shift: str = ""
    severity: int = 0
    source: str = ""
    n: int | None = None
    norm: str = ""

    @property
    def key(self) -> tuple[str, str, float, str, int, str]:
        return (self.name, self.attack, self.eps, self.shift, self.severity, self.source)

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
    owner: str | None = None  # host:pid:run of the run that recorded it (None before version 5)
    workdir: str | None = None  # that run's output folder (its cells/<id>/ files), on its host


@dataclass(frozen=True)
class Process:
    """A process as a lease records it: its host, its boot (the kernel's boot id and the pid
    namespace, which together say which processes a pid can name) and its pid."""

    host: str
    boot: str
    pid: int

    @classmethod
    def this(cls) -> Process:
        return cls(socket.gethostname(), _boot(), os.getpid())


def _boot() -> str:
    """This machine's boot id and this process's pid namespace; ``""`` where unknown (not
    Linux), so no lease is taken back for a dead pid there, only on expiry."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
    return f"{boot}/{namespace}"


@dataclass(frozen=True)
class LeaseRow:
    """A cell's claim: who runs it (``state == "running"``) until ``expires``, or ``done``;
    ``host``/``boot``/``pid`` name the owner's process (None on leases before version 5)."""

    cell_id: str
    owner: str
    state: str
    since: float
    expires: float
    host: str | None = None
    boot: str | None = None
    pid: int | None = None

    @property
    def process(self) -> Process | None:
        if self.host is None or self.boot is None or self.pid is None:
            return None
        return Process(self.host, self.boot, self.pid)


@dataclass(frozen=True)
class GridCell:
    """A cell some run of ``experiment`` set out to run (recorded when the run starts)."""

    cell_id: str
    experiment: str
    grid_values: dict[str, Any]


def _finite(value: float | None) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def store_url(target: str | Path) -> str:
    """The SQLAlchemy URL of a store given as a URL or as the path of a SQLite file.

    Raises:
        ValueError: a URL of another database than SQLite or PostgreSQL.
    """
    text = str(target)
    if "://" not in text:
        return f"sqlite:///{Path(text).expanduser().resolve()}"
    url = sa.make_url(text)
    backend = url.get_backend_name()
    if backend not in DIALECTS:
        raise ValueError(
            f"store {safe_url(text)!r}: unsupported database {backend!r}; use one of "
            "sqlite:///PATH or postgresql+psycopg://USER@HOST/DB"
        )
    if url.drivername == "postgresql":  # SQLAlchemy before 2.1 would pick psycopg2, not ours
        return url.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    return text


def safe_url(url: str | URL) -> str:
    """The URL without its password, for messages and tables."""
    return sa.make_url(url).render_as_string(hide_password=True)


class ResultStore:
    """Runs, metrics and leases of experiments in a SQLite file or a PostgreSQL database.

    Args:
        target: a SQLAlchemy URL (``sqlite:///...``, ``postgresql+psycopg://...``) or the path
            of a SQLite file (created with its folder when absent).
        read_only: only read: nothing is created, migrated or written (the database refuses
            writes). An older schema is read as it is, its missing columns as their defaults.

    Raises:
        FileNotFoundError: ``read_only`` and there is no store at ``target``.
        ValueError: the store's schema is newer than this robcomp's.
    """

    def __init__(self, target: str | Path, *, read_only: bool = False) -> None:
        self.url = store_url(target)
        self.read_only = read_only
        self.dialect = dialect_of(self.url)
        self.backend = self.dialect.name
        self.path = self.dialect.path(self.url)
        if self.path is not None and read_only and not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no results store here")
        if self.path is not None and not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.engine = self.dialect.engine(self.url, read_only=read_only)
        self._writes = _Writes(self.dialect, self.engine.dialect)
        with self._transaction() as conn:
            if read_only:
                self._columns = _check_readable(conn, safe_url(self.url))
            else:
                _migrate(conn, self.dialect)
                self._columns = {t.name: set(t.c.keys()) for t in meta.sorted_tables}

    def __repr__(self) -> str:
        return f"ResultStore({safe_url(self.url)!r})"

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """One transaction (SQLite: BEGIN IMMEDIATE unless read-only, so it never fails to
        upgrade a read lock into a write lock); the driver's own error is raised, as before
        SQLAlchemy."""
        try:
            with self.engine.begin() as conn:
                yield conn
        except sa.exc.DBAPIError as err:
            if isinstance(err.orig, Exception):
                raise err.orig from err
            raise
        except sa.exc.StatementError as err:  # a value SQLAlchemy could not convert to bind
            dbapi = self.engine.dialect.dbapi
            if dbapi is None:
                raise
            raise dbapi.InterfaceError(f"{err.orig}: {err.statement}") from err

    @contextmanager
    def _cursor(self, *, reads: bool) -> Iterator[Any]:
        """A DBAPI cursor in one transaction, for the writes of a run (register the grid, then
        claim and record every cell), which take :class:`_Writes`' SQL compiled once.

        Per cell, SQLAlchemy's execution machinery and PostgreSQL's round trips cost more than
        the statements (bench/scale_store.py), so these go to the pooled driver connection
        directly, in the dialect's way (:meth:`Dialect.cursor`).
        """
        pooled = self.engine.raw_connection()
        try:
            with self.dialect.cursor(pooled.driver_connection, reads=reads) as cursor:
                yield cursor
        finally:
            pooled.close()  # back to the pool

    def _read(self, table: sa.Table, *names: str) -> list[Any]:
        """``table``'s columns ``names`` for a select; one this store lacks (an older schema
        opened read-only) as its default, so every read sees the current shape."""
        have = self._columns.get(table.name, set())
        return [table.c[n] if n in have else _absent(table.c[n]) for n in names]

    def _metric_columns(self) -> list[Any]:
        """The metrics' ``cell_id`` and :data:`METRIC_FIELDS` for a select; a store before
        version 6 opened read-only reads as the migration would have left it
        (:func:`_typed_metric_fields`)."""
        columns = self._read(metrics_table, "cell_id", *METRIC_FIELDS)
        if "norm" in self._columns.get("metrics", set()):
            return columns
        typed = _typed_metric_fields(metrics_table.c)
        return [typed[c.name].label(c.name) if c.name in typed else c for c in columns]

    def close(self) -> None:
        """Close the store's pooled connections."""
        self.engine.dispose()

    def experiments(self) -> set[str]:
        """The names of the experiments with runs (done or failed) in this store."""
        with self._transaction() as conn:
            return set(conn.scalars(sa.select(runs_table.c.experiment).distinct()))

    def done_ids(self) -> set[str]:
        with self._transaction() as conn:
            query = sa.select(runs_table.c.cell_id).where(runs_table.c.status == "done")
            return set(conn.scalars(query))

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
        owner: str | None = None,
        workdir: str | None = None,
    ) -> None:
        """Write one cell atomically (replacing any earlier failed attempt) and settle its
        lease in the same transaction: a done cell is never claimed again, a failed one is
        free for the next run. ``owner`` (the run, ``host:pid:run``) and ``workdir`` (its
        output folder, which holds ``cells/<cell_id>/``) are kept with the cell.

        Two attack or shift metrics with one key are refused: the second would silently
        replace the first, e.g. a weaker attack's robust accuracy a stronger one's.
        """
        metrics = list(metrics)
        _check_unique(cell_id, metrics)
        status = "failed" if error else "done"
        now = time.time()
        row = {
            "cell_id": cell_id, "experiment": experiment, "status": status,
            "config": json.dumps(config, sort_keys=True),
            "grid_values": json.dumps(grid_values, sort_keys=True),
            "info": json.dumps(info, sort_keys=True, default=str),
            "error": error, "seconds": seconds, "finished": now, "owner": owner,
            "workdir": workdir,
        }  # fmt: skip
        w = self._writes
        with self._cursor(reads=False) as cursor:
            cursor.execute(w.forget_metrics.sql, w.forget_metrics.bind(cell_id=cell_id))
            cursor.execute(w.upsert_run.sql, w.upsert_run.bind(**row))
            if metrics:
                cursor.executemany(
                    w.insert_metric.sql,
                    [
                        w.insert_metric.bind(
                            cell_id=cell_id, name=m.name, attack=m.attack, eps=m.eps,
                            value=_finite(m.value), shift=m.shift, severity=m.severity,
                            source=m.source, n=m.n, norm=m.norm,
                        )
                        for m in metrics
                    ],
                )  # fmt: skip
            if error:
                cursor.execute(w.free_lease.sql, w.free_lease.bind(cell_id=cell_id))
            else:
                settle = w.settle_lease.bind(
                    cell_id=cell_id,
                    owner="",
                    state="done",
                    since=now,
                    expires=math.inf,
                    host=None,
                    boot=None,
                    pid=None,
                )
                cursor.execute(w.settle_lease.sql, settle)

    def add_metrics(self, cell_id: str, metrics: Iterable[Metric]) -> None:
        """Add metrics to a recorded cell in one transaction, replacing those with the same key
        and leaving its other metrics as they are: results computed after the cell, from
        several cells' models (a transfer attack's accuracy on this cell's model).

        Raises:
            ValueError: two metrics share a key, or ``cell_id`` is not a recorded cell.
        """
        metrics = list(metrics)
        _check_unique(cell_id, metrics)
        if not metrics:
            return
        m = metrics_table.c
        with self._transaction() as conn:
            if (
                conn.scalar(sa.select(runs_table.c.cell_id).where(runs_table.c.cell_id == cell_id))
                is None
            ):
                raise ValueError(f"cell {cell_id} is not in the store: record it first")
            for metric in metrics:
                conn.execute(
                    metrics_table.delete().where(
                        (m.cell_id == cell_id) & (m.name == metric.name)
                        & (m.attack == metric.attack) & (m.eps == metric.eps)
                        & (m.shift == metric.shift) & (m.severity == metric.severity)
                        & (m.source == metric.source)
                    )
                )  # fmt: skip
                conn.execute(
                    metrics_table.insert().values(
                        cell_id=cell_id, name=metric.name, attack=metric.attack, eps=metric.eps,
                        value=_finite(metric.value), shift=metric.shift,
                        severity=metric.severity, source=metric.source, n=metric.n,
                        norm=metric.norm,
                    )
                )  # fmt: skip

    def metrics_named(self, name: str) -> dict[str, list[Metric]]:
        """Every stored metric called ``name``, per cell id (cheaper than :meth:`runs` when
        only one kind of result is needed, e.g. to tell which transfer entries are done)."""
        columns = self._metric_columns()
        named = next(c for c in columns if c.name == "name")  # as read (older stores: typed)
        out: dict[str, list[Metric]] = {}
        with self._transaction() as conn:
            for cid, *fields in conn.execute(sa.select(*columns).where(named == name)):
                out.setdefault(cid, []).append(Metric(*fields))
        return out

    def runs(self, status: str | None = "done") -> list[RunRow]:
        """All runs (of one status, or all with ``None``) with their metrics, oldest first."""
        r = runs_table.c
        names = ("cell_id", "experiment", "status", "config", "grid_values", "info", "error",
                 "seconds", "owner", "workdir")  # fmt: skip
        query = sa.select(*self._read(runs_table, *names)).order_by(r.finished)
        if status:
            query = query.where(r.status == status)
        metrics: dict[str, list[Metric]] = {}
        with self._transaction() as conn:
            rows = conn.execute(query).all()
            columns = self._metric_columns()
            for cid, *fields in conn.execute(sa.select(*columns)):
                metrics.setdefault(cid, []).append(Metric(*fields))
        return [
            RunRow(
                cell_id=row.cell_id,
                experiment=row.experiment,
                status=row.status,
                config=json.loads(row.config),
                grid_values=json.loads(row.grid_values),
                info=json.loads(row.info),
                error=row.error,
                seconds=row.seconds,
                metrics=metrics.get(row.cell_id, []),
                owner=row.owner,
                workdir=row.workdir,
            )
            for row in rows
        ]

    # Leases ---------------------------------------------------------------------------------

    def claim(
        self, cell_id: str, owner: str, seconds: float, process: Process | None = None
    ) -> bool:
        """Take ``cell_id`` for ``owner`` (whose process is ``process``, when known) for
        ``seconds``, in one statement.

        Succeeds when nobody holds it, when its lease expired (its owner died or hung), or when
        ``owner`` already holds it (which renews it); never once the cell is done.
        """
        return bool(self.claim_many([cell_id], owner, seconds, process))

    def claim_many(
        self,
        cell_ids: Sequence[str],
        owner: str,
        seconds: float,
        process: Process | None = None,
    ) -> list[str]:
        """Take each of ``cell_ids`` as :meth:`claim` does, in one statement per
        :data:`CLAIM_BATCH` cells; the ones ``owner`` now holds, in the order given."""
        now = time.time()
        lease = {"owner": owner, "state": "running", "since": now, "expires": now + seconds,
                 "host": process and process.host, "boot": process and process.boot,
                 "pid": process and process.pid}  # fmt: skip
        taken: set[str] = set()
        for start in range(0, len(cell_ids), CLAIM_BATCH):
            batch = list(dict.fromkeys(cell_ids[start : start + CLAIM_BATCH]))
            claim = self._writes.claim_leases(len(batch))
            cells = {f"cell_id_{i}": cell_id for i, cell_id in enumerate(batch)}
            with self._cursor(reads=True) as cursor:
                cursor.execute(claim.sql, claim.bind(**cells, **lease, now=now))
                taken.update(row[0] for row in cursor.fetchall())
        return [cell_id for cell_id in cell_ids if cell_id in taken]

    def renew(self, owner: str, seconds: float) -> int:
        """Push back the expiry of every cell ``owner`` is running; how many were renewed."""
        lease = leases_table.c
        with self._transaction() as conn:
            result = conn.execute(
                leases_table.update()
                .where((lease.owner == owner) & (lease.state == "running"))
                .values(expires=time.time() + seconds)
            )
            return int(result.rowcount)

    def release(self, owner: str, cell_ids: Iterable[str] | None = None) -> None:
        """Give up ``owner``'s running leases (all, or those of ``cell_ids``), e.g. when a run
        is interrupted, so the next run need not wait for them to expire."""
        lease = leases_table.c
        mine = (lease.owner == owner) & (lease.state == "running")
        if cell_ids is not None:
            mine = mine & lease.cell_id.in_(list(cell_ids))
        with self._transaction() as conn:
            conn.execute(leases_table.delete().where(mine))

    def take_back(self, leases: Iterable[LeaseRow]) -> int:
        """Free ``leases`` whose owners are known dead, each only while that owner still holds
        it (another run may have taken it meanwhile); how many were freed."""
        lease, freed = leases_table.c, 0
        with self._transaction() as conn:
            for row in leases:
                held = (lease.cell_id == row.cell_id) & (lease.owner == row.owner)
                result = conn.execute(
                    leases_table.delete().where(held & (lease.state == "running"))
                )
                freed += int(result.rowcount)
        return freed

    def leases(self, host: str | None = None) -> list[LeaseRow]:
        """Every lease, running or done (only the running ones of ``host``'s processes when
        given)."""
        if leases_table.name not in self._columns:
            return []  # a store from before leases, opened read-only
        query = sa.select(*self._read(leases_table, *(f.name for f in fields(LeaseRow))))
        if host is not None:
            query = query.where((leases_table.c.host == host) & (leases_table.c.state == "running"))
        with self._transaction() as conn:
            rows = conn.execute(query).all()
        return [LeaseRow(*row) for row in rows]

    # The grid -------------------------------------------------------------------------------

    def register_cells(self, experiment: str, cells: Iterable[tuple[str, dict[str, Any]]]) -> None:
        """Remember the cells a run of ``experiment`` sets out to run (``(cell_id,
        grid_values)``), so ``robcomp status`` can tell pending cells without the file."""
        now = time.time()
        register = self._writes.register_cell
        rows = [
            register.bind(cell_id=cid, experiment=experiment, added=now,
                          grid_values=json.dumps(values, sort_keys=True, default=str))
            for cid, values in cells
        ]  # fmt: skip
        if not rows:
            return
        with self._cursor(reads=False) as cursor:
            cursor.executemany(register.sql, rows)

    def grid(self) -> list[GridCell]:
        """The cells runs set out to run, in the order they were registered."""
        g = grid_table.c
        if grid_table.name not in self._columns:
            return []  # a store from before the grid was recorded, opened read-only
        with self._transaction() as conn:
            query = sa.select(g.cell_id, g.experiment, g.grid_values).order_by(g.added)
            rows = conn.execute(query).all()
        return [GridCell(row[0], row[1], json.loads(row[2])) for row in rows]


class _Compiled:
    """A statement compiled once for a dialect, run on the DBAPI cursor with :meth:`bind`.
    Every value is a named bind parameter the caller gives (no defaults, no literals)."""

    def __init__(self, statement: Any, dialect: sa.Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        self.sql = str(compiled)
        self._order = compiled.positiontup  # None for named styles such as psycopg's

    def bind(self, **values: Any) -> Any:
        """The parameters in the driver's style (named, or positional in statement order)."""
        return values if self._order is None else tuple(values[name] for name in self._order)


def _bound(names: Iterable[str]) -> dict[str, Any]:
    """A bind parameter named after each of ``names`` (columns), for ``.values(...)``."""
    return {name: sa.bindparam(name) for name in names}


LEASE_FIELDS = ("owner", "state", "since", "expires", "host", "boot", "pid")  # claim, settle
METRIC_FIELDS = ("name", "value", "attack", "eps", "shift", "severity", "source", "n", "norm")


class _Writes:
    """The statements a run writes (its grid once, then a claim and a record per cell),
    compiled once per store: compiling or caching them anew for every cell cost more than
    running them."""

    def __init__(self, store: Dialect, dialect: sa.Dialect) -> None:
        insert = store.insert
        run = insert(runs_table).values(_bound(runs_table.c.keys()))
        self.upsert_run = _Compiled(
            run.on_conflict_do_update(  # replaces an earlier failed attempt
                index_elements=[runs_table.c.cell_id],
                set_={c.name: run.excluded[c.name] for c in runs_table.c if c.name != "cell_id"},
            ),
            dialect,
        )
        metric = metrics_table.c
        self.forget_metrics = _Compiled(
            metrics_table.delete().where(metric.cell_id == sa.bindparam("cell_id")), dialect
        )
        self.insert_metric = _Compiled(
            metrics_table.insert().values(_bound(metrics_table.c.keys())),
            dialect,
        )
        lease = leases_table.c
        self.free_lease = _Compiled(
            leases_table.delete().where(lease.cell_id == sa.bindparam("cell_id")), dialect
        )
        values = _bound(LEASE_FIELDS)
        # Settling a done cell always succeeds, whoever held it.
        upsert = insert(leases_table).values(cell_id=sa.bindparam("cell_id"), **values)
        self.settle_lease = _Compiled(
            upsert.on_conflict_do_update(index_elements=[lease.cell_id], set_=values), dialect
        )
        self.register_cell = _Compiled(
            insert(grid_table).values(_bound(grid_table.c.keys())).on_conflict_do_nothing(),
            dialect,
        )
        self._insert = insert
        self._dialect = dialect
        self._claims: dict[int, _Compiled] = {}

    def claim_leases(self, cells: int) -> _Compiled:
        """Claim ``cells`` cells (parameters ``cell_id_0``, ...): the ones taken are
        returned. A claim succeeds when nobody holds the cell, its lease expired, or the
        caller holds it; never once it is done."""
        if cells not in self._claims:
            self._claims[cells] = _Compiled(self._claim_statement(cells), self._dialect)
        return self._claims[cells]

    def _claim_statement(self, cells: int) -> Any:
        lease = leases_table.c
        running = _bound(LEASE_FIELDS)
        rows = [{"cell_id": sa.bindparam(f"cell_id_{i}"), **running} for i in range(cells)]
        upsert = self._insert(leases_table).values(rows)
        free = (lease.state != sa.literal_column("'done'")) & (
            (lease.expires < sa.bindparam("now")) | (lease.owner == sa.bindparam("owner"))
        )
        return upsert.on_conflict_do_update(
            index_elements=[lease.cell_id],
            set_={name: upsert.excluded[name] for name in running},
            where=free,
        ).returning(lease.cell_id)


def _check_unique(cell_id: str, metrics: list[Metric]) -> None:
    seen: set[tuple[str, str, float, str, int, str]] = set()
    for m in metrics:
        if (m.attack or m.shift or m.source) and m.key in seen:
            where = f" on {m.shift} (severity {m.severity})" if m.shift else ""
            raise ValueError(
                f"cell {cell_id}: two values of {m.name} for attack {m.attack!r} at "
                f"eps={m.eps:.6g}{where}; give the attacks (or shifts) distinct labels"
            )
        seen.add(m.key)


class Dialect:
    """What one database does its own way, picked once per store (:func:`dialect_of`)."""

    name: ClassVar[str]

    def insert(self, table: sa.Table) -> Any:
        """An INSERT into ``table`` that takes ON CONFLICT clauses (upserts)."""
        raise NotImplementedError

    def path(self, url: str) -> Path | None:
        """The local file the store lives in, if any."""
        return None

    def engine(self, url: str, *, read_only: bool) -> Engine:
        raise NotImplementedError

    def cursor(self, driver: Any, *, reads: bool) -> AbstractContextManager[Any]:
        """A DBAPI cursor on the driver connection ``driver`` for a block of writes, run in
        one transaction (``reads``: the block is one statement whose rows are read)."""
        raise NotImplementedError

    def lock_schema(self, conn: Connection) -> None:
        """Serialise schema changes of processes opening one store at once."""

    def reshape(self, conn: Connection, table: sa.Table, old: sa.engine.Inspector) -> None:
        """Bring an existing ``table`` to its declared columns and primary key, keeping its
        rows (a column it lacked takes its server default, or NULL)."""
        raise NotImplementedError


class SQLite(Dialect):
    """A file: WAL mode, BEGIN IMMEDIATE transactions, tables rebuilt to change a key."""

    name = "sqlite"

    def insert(self, table: sa.Table) -> Any:
        return sqlite.insert(table)

    def path(self, url: str) -> Path | None:
        database = sa.make_url(url).database
        return Path(database) if database else None

    def engine(self, url: str, *, read_only: bool) -> Engine:
        if read_only:
            return _sqlite_reader(self.path(url))
        engine = sa.create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Autocommit at the driver level, so the BEGIN below is the only one emitted.
            dbapi_conn.isolation_level = None
            cursor = dbapi_conn.cursor()
            _wal(cursor)
            cursor.execute("PRAGMA foreign_keys=ON")
            # WAL with NORMAL sync: a commit is atomic and survives a crash of the process;
            # only a power cut may lose the last few cells, which a rerun repeats. Saves an
            # fsync a cell.
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        @sa.event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine

    @contextmanager
    def cursor(self, driver: Any, *, reads: bool) -> Iterator[sqlite3.Cursor]:
        """BEGIN IMMEDIATE ... COMMIT (the driver is in autocommit mode)."""
        cursor = driver.cursor()
        cursor.execute("BEGIN IMMEDIATE")
        try:
            yield cursor
            cursor.execute("COMMIT")
        except BaseException:
            if driver.in_transaction:
                cursor.execute("ROLLBACK")
            raise

    def reshape(self, conn: Connection, table: sa.Table, old: sa.engine.Inspector) -> None:
        have = {c["name"] for c in old.get_columns(table.name)}
        missing = [c for c in table.c if c.name not in have]
        if _same_key(table, old) and all(not c.primary_key for c in missing):
            for column in missing:  # SQLite adds a column in place, never a key column
                _add_column(conn, table, column)
            return
        # A new key: rebuild the table and copy the rows over, in this transaction.
        before = f"{table.name}_before_v{SCHEMA_VERSION}"
        conn.exec_driver_sql(f"ALTER TABLE {table.name} RENAME TO {before}")
        conn.execute(sa.schema.CreateTable(table))
        kept = ", ".join(c.name for c in table.c if c.name in have)
        conn.exec_driver_sql(f"INSERT INTO {table.name} ({kept}) SELECT {kept} FROM {before}")
        conn.exec_driver_sql(f"DROP TABLE {before}")


class PostgreSQL(Dialect):
    """A server: psycopg, pipelined writes, an advisory lock for the schema, columns and keys
    changed in place."""

    name = "postgresql"

    def insert(self, table: sa.Table) -> Any:
        return postgresql.insert(table)

    SCHEMA_LOCK = 7200612  # pg_advisory_xact_lock's key for robcomp's schema changes

    def engine(self, url: str, *, read_only: bool) -> Engine:
        # Recycled hourly rather than pinged before each use: a ping is a round trip per cell.
        # Commits return before the server flushes its log: a crash of the database server
        # may lose the last cells' writes (never half of one), which a rerun repeats, as
        # SQLite's synchronous=NORMAL may on a power cut. Set once per connection.
        options = "-c synchronous_commit=off"
        if read_only:  # the server itself refuses writes on these connections
            options += " -c default_transaction_read_only=on"
        return sa.create_engine(url, pool_recycle=3600, connect_args={"options": options})

    @contextmanager
    def cursor(self, driver: Any, *, reads: bool) -> Iterator[Any]:
        """Autocommit for one statement that ``reads`` (atomic on its own), else BEGIN, the
        block's statements and COMMIT in one pipeline (psycopg's pipeline mode: one round
        trip; an error skips the rest and the transaction is rolled back)."""
        driver.autocommit = True
        try:
            cursor = driver.cursor()
            if reads:
                yield cursor
                return
            with driver.pipeline():
                cursor.execute("BEGIN")
                yield cursor
                cursor.execute("COMMIT")
        except BaseException:
            driver.rollback()  # a half-sent or failed transaction; nothing when none is open
            raise
        finally:
            driver.autocommit = False

    def lock_schema(self, conn: Connection) -> None:
        conn.execute(sa.text(f"SELECT pg_advisory_xact_lock({self.SCHEMA_LOCK})"))

    def reshape(self, conn: Connection, table: sa.Table, old: sa.engine.Inspector) -> None:
        have = {c["name"] for c in old.get_columns(table.name)}
        for column in table.c:
            if column.name not in have:
                _add_column(conn, table, column)
        if not _same_key(table, old):
            name = old.get_pk_constraint(table.name)["name"]
            keys = ", ".join(c.name for c in table.primary_key)
            conn.exec_driver_sql(f"ALTER TABLE {table.name} DROP CONSTRAINT {name}")
            conn.exec_driver_sql(f"ALTER TABLE {table.name} ADD PRIMARY KEY ({keys})")


DIALECTS: dict[str, Dialect] = {d.name: d for d in (SQLite(), PostgreSQL())}


def dialect_of(url: str) -> Dialect:
    """The :class:`Dialect` of a store URL (see :func:`store_url`)."""
    return DIALECTS[sa.make_url(url).get_backend_name()]


def _same_key(table: sa.Table, old: sa.engine.Inspector) -> bool:
    key = old.get_pk_constraint(table.name)["constrained_columns"]
    return set(key) == {c.name for c in table.primary_key}


def _add_column(conn: Connection, table: sa.Table, column: sa.Column[Any]) -> None:
    spec = sa.schema.CreateColumn(column).compile(dialect=conn.dialect)
    conn.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {spec}")


def _sqlite_reader(path: Path | None) -> Engine:
    """An engine that only reads the SQLite file ``path`` (``mode=ro``: SQLite refuses
    writes, and a missing file is an error, not a new store).

    Reading a WAL file takes its shared-memory index (``-shm``) beside it, which SQLite
    creates when absent; in a folder nobody may write, no run can be writing the store, so
    it is read as immutable instead.
    """
    if path is None:
        raise FileNotFoundError("an in-memory SQLite store has nothing to read")
    uri = f"file:{quote(str(path))}?mode=ro"
    try:
        with sqlite3.connect(uri, uri=True) as probe:
            probe.execute("SELECT count(*) FROM sqlite_master").fetchall()
        probe.close()
    except sqlite3.OperationalError:
        uri = f"file:{quote(str(path))}?immutable=1"

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(uri, uri=True, timeout=60, check_same_thread=False)
        conn.isolation_level = None  # the BEGIN below is the only one emitted
        return conn

    engine = sa.create_engine("sqlite://", creator=connect)

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN")  # one snapshot for a transaction's reads

    return engine


def _wal(cursor: Any, patience: float = 60.0) -> None:
    """Switch the file to WAL mode. Switching needs the file to itself and SQLite does not
    wait for it (no busy timeout): two runs opening a new store at once would see "database is
    locked", so retry while another connection creates the schema."""
    deadline = time.monotonic() + patience
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _version(conn: Connection) -> int:
    """The stored schema version; stores older than the version table are told by shape."""
    names = set(sa.inspect(conn).get_table_names())
    if "schema_version" in names:
        return int(conn.scalar(sa.select(version_table.c.version)) or 0)
    if "metrics" not in names:
        return 0
    columns = {c["name"] for c in sa.inspect(conn).get_columns("metrics")}
    return 2 if "shift" in columns else 1


def _too_new(version: int) -> ValueError:
    return ValueError(
        f"the store has schema version {version}; this robcomp knows up to "
        f"{SCHEMA_VERSION}: upgrade robcomp"
    )


def _migrate(conn: Connection, dialect: Dialect) -> None:
    """Bring the schema to :data:`SCHEMA_VERSION` in ``conn``'s transaction, under the
    dialect's schema lock (so two processes opening a new store do not both create it): every
    existing table is reshaped to its declared columns and key (:meth:`Dialect.reshape`), the
    missing tables are created, and data a version needs is filled in."""
    dialect.lock_schema(conn)
    version = _version(conn)
    if version == SCHEMA_VERSION:
        return
    if version > SCHEMA_VERSION:
        raise _too_new(version)
    old = sa.inspect(conn)
    existing = set(old.get_table_names())
    for table in meta.sorted_tables:
        if table.name in existing:
            dialect.reshape(conn, table, old)
    meta.create_all(conn)  # tables of later versions (leases, grid_cells, schema_version)
    if 0 < version < 3:  # cells done before leases existed are never claimed again
        finished = sa.func.coalesce(runs_table.c.finished, 0.0)
        done = sa.select(
            runs_table.c.cell_id, sa.literal(""), sa.literal("done"), finished, sa.literal(math.inf)
        )
        done = done.where(runs_table.c.status == "done")
        columns = ["cell_id", "owner", "state", "since", "expires"]
        conn.execute(leases_table.insert().from_select(columns, done))
    if 0 < version < 6:
        m = metrics_table.c
        conn.execute(metrics_table.update().values(_typed_metric_fields(m)))
    conn.execute(version_table.delete())
    conn.execute(version_table.insert().values(version=SCHEMA_VERSION))


def _typed_metric_fields(m: Any) -> dict[str, Any]:
    """Version 6's fields of an older store's metric: a gradient-masking check, stored as
    ``flag:<check>`` until then, is named by its check (the report tells checks by the cell's
    ``info["diagnostics"]``), and a worst case's norm is its attack label's (``worst-<norm>``);
    other metrics have no recorded norm."""
    flag = sa.func.substr(m.name, 1, 5) == "flag:"
    worst = (m.name == "worst_robust_accuracy") & (sa.func.substr(m.attack, 1, 6) == "worst-")
    return {
        "name": sa.case((flag, sa.func.substr(m.name, 6)), else_=m.name),
        "norm": sa.case((worst, sa.func.substr(m.attack, 7)), else_=""),
    }


def _check_readable(conn: Connection, where: str) -> dict[str, set[str]]:
    """The columns of each table of a store opened read-only, after checking it is a store
    this robcomp can read."""
    version = _version(conn)
    if version == 0:
        raise FileNotFoundError(f"{where}: no results store here (no runs recorded)")
    if version > SCHEMA_VERSION:
        raise _too_new(version)
    inspector = sa.inspect(conn)
    known = {t.name for t in meta.sorted_tables}
    return {
        name: {c["name"] for c in inspector.get_columns(name)}
        for name in inspector.get_table_names()
        if name in known
    }


def _absent(column: sa.Column[Any]) -> Any:
    """What a column an older schema lacks reads as: its server default, else NULL."""
    default = column.server_default
    if default is None:
        return sa.null().label(column.name)
    value = column.type.python_type(getattr(default, "arg", ""))
    return sa.literal(value, column.type).label(column.name)
