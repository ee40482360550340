"""The results store behind a URL (SQLite and a real PostgreSQL 15) and the leases that let
several runs share one grid: every test runs on both backends; PostgreSQL ones skip, with the
reason, where the server cannot be started here."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import pwd
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from robcomp.config import ConfigError
from robcomp.experiments import Metric, ResultStore, load_experiment, run_experiment
from robcomp.experiments.leases import Leases
from robcomp.experiments.store import (
    SCHEMA_VERSION,
    Process,
    leases_table,
    metrics_table,
    runs_table,
    safe_url,
    store_url,
)

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _as_postgres(*args: str) -> list[str]:
    """Run as the postgres user (initdb refuses root)."""
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else list(args)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL 15 cluster on a unix socket in a temp dir; yields the socket dir."""
    if not (PG_BIN / "initdb").is_file():
        pytest.skip(f"PostgreSQL 15 is not installed ({PG_BIN / 'initdb'} is absent)")
    if os.geteuid() != 0 and pwd.getpwuid(os.geteuid()).pw_name != "postgres":
        pytest.skip("PostgreSQL tests need root (to run initdb as postgres) or the postgres user")
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install '.[postgres]')")
    root = Path(tempfile.mkdtemp(prefix="robcomp-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        for path in (root, sock):
            shutil.chown(path, "postgres", "postgres")
    quiet = {"check": True, "capture_output": True}
    subprocess.run(_as_postgres(str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust"), **quiet)
    ctl = str(PG_BIN / "pg_ctl")
    options = f"-k {sock} -h '' -c fsync=off"  # a test cluster: speed over durability
    start = [ctl, "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"]
    subprocess.run(_as_postgres(*start), **quiet)
    try:
        yield str(sock)
    finally:
        subprocess.run(_as_postgres(ctl, "-D", str(data), "-m", "immediate", "stop"), **quiet)
        shutil.rmtree(root, ignore_errors=True)


def _new_database(sock: str) -> str:
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(host=sock, user="postgres", dbname="postgres", autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    return f"postgresql+psycopg://postgres@/{name}?host={sock}"


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty store of each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'results.sqlite'}"
    return _new_database(request.getfixturevalue("postgres_server"))


def _record(store: ResultStore, cell_id: str, error: str | None = None, **kw: Any) -> None:
    store.record(
        cell_id=cell_id, experiment="e", config={"a": 1}, grid_values={"g": cell_id},
        metrics=kw.get("metrics", [Metric("clean_accuracy", 0.5)]), info={}, seconds=2.0,
        error=error,
    )  # fmt: skip


def test_round_trip_keeps_values_and_stores_nan_as_missing(url: str) -> None:
    store = ResultStore(url)
    metrics = [
        Metric("clean_accuracy", 0.91),
        Metric("robust_accuracy", 0.42, attack="pgd", eps=0.1),
        Metric("median_norm", math.inf, attack="ddn", eps=math.inf),
        Metric("score", math.nan),
        Metric("clean_accuracy", 0.7, shift="fog", severity=3),
    ]
    _record(store, "c1", metrics=metrics)
    (run,) = ResultStore(url).runs()  # a second handle sees the committed cell
    got = {m.key: m.value for m in run.metrics}
    assert got[("clean_accuracy", "", 0.0, "", 0, "")] == 0.91
    assert got[("robust_accuracy", "pgd", 0.1, "", 0, "")] == 0.42
    assert got[("median_norm", "ddn", math.inf, "", 0, "")] == math.inf
    assert got[("score", "", 0.0, "", 0, "")] is None
    assert got[("clean_accuracy", "", 0.0, "fog", 3, "")] == 0.7
    assert (run.config, run.grid_values, run.status) == ({"a": 1}, {"g": "c1"}, "done")
    assert store.done_ids() == {"c1"}


def test_a_bad_value_writes_nothing_of_the_cell(url: str) -> None:
    import psycopg

    store = ResultStore(url)
    bad = [Metric("ok", 1.0), Metric("boom", object())]  # type: ignore[arg-type]
    with pytest.raises((sqlite3.Error, psycopg.Error)):
        _record(store, "c1", metrics=bad)
    assert store.runs(None) == [] and store.leases() == []


def test_a_lease_is_exclusive_until_it_expires_or_the_cell_ends(url: str) -> None:
    store = ResultStore(url)
    assert store.claim("c1", "alice", 60)
    assert not store.claim("c1", "bob", 60)  # alice holds it
    assert store.claim("c1", "alice", 60)  # renewing one's own lease
    _record(store, "c1", error="RuntimeError: broke")
    assert store.claim("c1", "bob", 60)  # a failed cell is free again
    _record(store, "c1")
    assert not store.claim("c1", "bob", 60) and not store.claim("c1", "carol", 60)  # done
    assert [(x.cell_id, x.state) for x in store.leases()] == [("c1", "done")]


def test_claiming_many_takes_what_a_single_claim_would_in_one_statement(url: str) -> None:
    store = ResultStore(url)
    assert store.claim("held", "bob", 60)
    _record(store, "done")
    with store.engine.begin() as conn:  # a run that died holding "stale"
        conn.execute(
            leases_table.insert().values(
                cell_id="stale", owner="gone:1:dead", state="running", since=1.0, expires=2.0
            )
        )
    asked = ["a", "held", "done", "stale", "b", "a"]
    assert store.claim_many(asked, "alice", 60) == ["a", "stale", "b", "a"]  # in the order asked
    owners = {lease.cell_id: (lease.owner, lease.state) for lease in store.leases()}
    assert owners == {
        "a": ("alice", "running"), "b": ("alice", "running"), "stale": ("alice", "running"),
        "held": ("bob", "running"), "done": ("", "done"),
    }  # fmt: skip
    assert store.claim_many([], "alice", 60) == []
    many = [f"c{i}" for i in range(450)]  # more than one statement's batch
    assert store.claim_many(many, "carol", 60) == many
    assert not store.claim("c449", "dave", 60)


def test_a_failing_statement_leaves_nothing_and_the_store_usable(url: str) -> None:
    import psycopg

    store = ResultStore(url)
    twice = [Metric("clean_accuracy", 0.5), Metric("clean_accuracy", 0.6)]  # one key, no attack
    with pytest.raises((sqlite3.IntegrityError, psycopg.IntegrityError)):
        _record(store, "c1", metrics=twice)  # refused by the database, mid-transaction
    assert store.runs(None) == [] and store.leases() == []
    assert store.claim("c1", "alice", 60)  # the connection went back to the pool clean
    _record(store, "c1")
    assert store.done_ids() == {"c1"}


def test_a_dead_owners_lease_expires_and_the_cell_is_taken(url: str) -> None:
    store = ResultStore(url)
    with store.engine.begin() as conn:  # a run that died 10 minutes into its cell
        conn.execute(
            leases_table.insert().values(
                cell_id="c1", owner="gone:123:dead", state="running",
                since=time.time() - 600, expires=time.time() - 1,
            )
        )  # fmt: skip
    assert store.claim("c1", "alive", 60)
    (lease,) = store.leases()
    assert lease.owner == "alive" and lease.expires > time.time() + 50


def test_the_heartbeat_renews_and_exit_releases(url: str) -> None:
    store = ResultStore(url)
    with Leases(store, seconds=2.0, owner="me") as leases:
        assert leases.claim("c1")
        time.sleep(3.0)  # longer than the lease: only the heartbeat keeps it (renewing every
        # 0.67 s leaves room for a thread delayed on a busy machine)
        assert not store.claim("c1", "other", 60)
    assert store.leases() == []  # released when the run ended
    assert store.claim("c1", "other", 60)


def tiny_grid(n: int = 4) -> dict[str, Any]:
    return {
        "name": "leases",
        "data": {"name": "digits", "train_limit": 200},
        "model": {"name": "tiny_mlp"},
        "train": {"epochs": 1, "lr": 0.05, "batch_size": 64},
        "compress": {"name": "magnitude", "sparsity": 0.0},
        "evaluate": {"attacks": [], "diagnostics": False, "latency_batch_sizes": []},
        "grid": {"compress.sparsity": [round(0.15 * i, 2) for i in range(n)]},
    }


def test_a_live_lease_is_left_to_its_owner_and_an_expired_one_is_run(url: str, tmp_path: Path):
    experiment = load_experiment(tiny_grid(3))
    held, stale = experiment.cells[0].cell_id, experiment.cells[1].cell_id
    store = ResultStore(url)
    assert store.claim(held, "busy:1:live", 600)
    with store.engine.begin() as conn:
        conn.execute(leases_table.update().where(leases_table.c.cell_id == held).values(since=1.0))
        conn.execute(
            leases_table.insert().values(
                cell_id=stale, owner="gone:2:dead", state="running", since=1.0, expires=2.0
            )
        )
    summary = run_experiment(experiment, tmp_path / "out", store=url)
    assert (summary.ran, summary.elsewhere) == (2, [held])
    assert ResultStore(url).done_ids() == {c.cell_id for c in experiment.cells[1:]}


def _run_in_child(url: str, out: str, barrier: Any, results: Any) -> None:
    # Cells long enough (fine-tuning each) that the other run's start-up, slower on a busy
    # machine, cannot let one run finish the whole grid before the other claims a cell.
    raw = tiny_grid(6) | {"finetune": {"epochs": 150, "lr": 0.01, "batch_size": 32}}
    experiment = load_experiment(raw)
    barrier.wait(timeout=120)  # start together, so both runs work on the grid at once
    summary = run_experiment(experiment, out, store=url, append=True)
    results.put((summary.ran, summary.skipped, len(summary.elsewhere)))


@pytest.mark.slow
def test_two_runs_on_one_store_split_the_grid(url: str, tmp_path: Path) -> None:
    context = mp.get_context("spawn")  # a fresh interpreter each, as two `robcomp run`s
    barrier, results = context.Barrier(2), context.Queue()
    children = [
        context.Process(target=_run_in_child, args=(url, str(tmp_path / d), barrier, results))
        for d in ("a", "b")
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=240)
        assert child.exitcode == 0
    ran = [results.get(timeout=5) for _ in children]
    store = ResultStore(url)
    assert len(store.done_ids()) == 6
    assert sum(r[0] for r in ran) == 6  # every cell ran exactly once
    assert all(r[0] >= 1 for r in ran), ran  # and each run took some


def test_an_old_sqlite_store_migrates_to_the_current_schema(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:  # version 1: before shifts, leases and versions
        conn.executescript(
            """
            CREATE TABLE runs (cell_id TEXT PRIMARY KEY, experiment TEXT NOT NULL,
                status TEXT NOT NULL, config TEXT NOT NULL, grid_values TEXT NOT NULL,
                info TEXT NOT NULL, error TEXT, seconds REAL, finished REAL);
            CREATE TABLE metrics (cell_id TEXT NOT NULL REFERENCES runs(cell_id),
                name TEXT NOT NULL, attack TEXT NOT NULL DEFAULT '',
                eps REAL NOT NULL DEFAULT 0, value REAL,
                PRIMARY KEY (cell_id, name, attack, eps));
            INSERT INTO runs VALUES ('c1', 'e', 'done', '{}', '{}', '{}', NULL, 1.0, 1.0);
            INSERT INTO runs VALUES ('c2', 'e', 'failed', '{}', '{}', '{}', 'x', 1.0, 2.0);
            INSERT INTO metrics VALUES ('c1', 'clean_accuracy', '', 0, 0.9);
            """
        )
    store = ResultStore(path)
    with store.engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT version FROM schema_version")) == SCHEMA_VERSION
    assert [(m.name, m.value, m.shift) for m in store.runs()[0].metrics] == [
        ("clean_accuracy", 0.9, "")
    ]
    assert not store.claim("c1", "me", 60)  # done before leases existed: never run again
    assert store.claim("c2", "me", 60)  # the failed one is free
    ResultStore(path)  # opening a current store again changes nothing
    assert len(store.runs(None)) == 2


# Version 3 as SQLAlchemy created it (sa.Double: DOUBLE PRECISION on PostgreSQL)
V3_SCHEMA = (
    "CREATE TABLE runs (cell_id TEXT PRIMARY KEY, experiment TEXT NOT NULL, status TEXT NOT "
    "NULL, config TEXT NOT NULL, grid_values TEXT NOT NULL, info TEXT NOT NULL, error TEXT, "
    "seconds DOUBLE PRECISION, finished DOUBLE PRECISION)",
    "CREATE TABLE metrics (cell_id TEXT NOT NULL REFERENCES runs(cell_id), name TEXT NOT NULL, "
    "attack TEXT NOT NULL DEFAULT '', eps DOUBLE PRECISION NOT NULL DEFAULT 0, "
    "value DOUBLE PRECISION, shift TEXT NOT "
    "NULL DEFAULT '', severity INTEGER NOT NULL DEFAULT 0, "
    "PRIMARY KEY (cell_id, name, attack, eps, shift, severity))",
    "CREATE TABLE schema_version (version INTEGER NOT NULL)",
    "INSERT INTO schema_version VALUES (3)",
    "INSERT INTO runs VALUES ('c1', 'e', 'done', '{}', '{}', '{}', NULL, 1.0, 1.0)",
    "INSERT INTO metrics VALUES ('c1', 'robust_accuracy', 'pgd', 0.1, 0.4, '', 0)",
)


def test_a_version_3_store_gains_the_transfer_source_in_its_metric_key(url: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:  # version 3: before transfer attacks had a source column
        for statement in V3_SCHEMA:
            conn.exec_driver_sql(statement)
    engine.dispose()
    store = ResultStore(url)
    with store.engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT version FROM schema_version")) == SCHEMA_VERSION
    assert store.runs()[0].metrics == [Metric("robust_accuracy", 0.4, "pgd", 0.1)]
    # one attack from two sources is two entries, added beside the cell's own result
    two = [
        Metric("transfer_accuracy", v, "pgd", 0.1, source=s, n=8)
        for v, s in ((0.5, "a"), (0.6, "b"))
    ]
    store.add_metrics("c1", two)
    assert sorted(store.runs()[0].metrics, key=lambda m: m.value or 0)[1:] == two
    store.add_metrics("c1", [Metric("transfer_accuracy", 0.7, "pgd", 0.1, source="a", n=8)])
    assert {m.source: m.value for m in store.metrics_named("transfer_accuracy")["c1"]} == {
        "a": 0.7,
        "b": 0.6,
    }
    with pytest.raises(ValueError, match="not in the store"):
        store.add_metrics("nope", two)


# Version 4: metrics with a source and n, no norm; masking checks named flag:<check>
V4_METRICS = (
    "CREATE TABLE metrics (cell_id TEXT NOT NULL REFERENCES runs(cell_id), name TEXT NOT NULL, "
    "attack TEXT NOT NULL DEFAULT '', eps DOUBLE PRECISION NOT NULL DEFAULT 0, "
    "value DOUBLE PRECISION, shift TEXT NOT NULL DEFAULT '', severity INTEGER NOT NULL "
    "DEFAULT 0, source TEXT NOT NULL DEFAULT '', n INTEGER, "
    "PRIMARY KEY (cell_id, name, attack, eps, shift, severity, source))",
    "INSERT INTO metrics VALUES ('c1', 'robust_accuracy', 'pgd10-linf', 0.1, 0.4, '', 0, '', 200)",
    "INSERT INTO metrics VALUES ('c1', 'worst_robust_accuracy', 'worst-l2', 0.5, 0.3, '', 0, "
    "'', NULL)",
    "INSERT INTO metrics VALUES ('c1', 'flag:zero_gradients', '', 0, 1.0, '', 0, '', NULL)",
)


def test_a_version_4_store_gains_the_norm_and_names_checks_plainly(url: str) -> None:
    runs, _, version, _, run, _ = V3_SCHEMA  # the same runs table and row, a version 4
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        for statement in (runs, version, "INSERT INTO schema_version VALUES (4)", run, *V4_METRICS):
            conn.exec_driver_sql(statement)
    engine.dispose()
    typed = [
        Metric("robust_accuracy", 0.4, "pgd10-linf", 0.1, n=200),  # its norm was not stored
        Metric("worst_robust_accuracy", 0.3, "worst-l2", 0.5, norm="l2"),
        Metric("zero_gradients", 1.0),
    ]
    # a report reads it as it is (read-only), as the migration will leave it
    reader = ResultStore(url, read_only=True)
    assert sorted(reader.runs()[0].metrics, key=lambda m: m.name) == typed
    assert reader.metrics_named("zero_gradients") == {"c1": [typed[2]]}
    reader.close()
    store = ResultStore(url)
    with store.engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT version FROM schema_version")) == SCHEMA_VERSION
    assert sorted(store.runs()[0].metrics, key=lambda m: m.name) == typed
    store.add_metrics("c1", [Metric("robust_accuracy", 0.2, "pgd", 0.1, n=8, norm="linf")])
    assert Metric("robust_accuracy", 0.2, "pgd", 0.1, n=8, norm="linf") in store.runs()[0].metrics


def test_store_in_the_experiment_file_keeps_cell_ids_and_is_used(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'team.sqlite'}"
    plain = load_experiment(tiny_grid(1))
    with_store = load_experiment({**tiny_grid(1), "store": url})
    assert [c.cell_id for c in with_store.cells] == [c.cell_id for c in plain.cells]
    assert with_store.store == url
    run_experiment(with_store, tmp_path / "out")
    assert ResultStore(url).done_ids() == {plain.cells[0].cell_id}
    assert not (tmp_path / "out" / "results.sqlite").exists()
    with pytest.raises(ConfigError, match="store must be a URL"):
        load_experiment({**tiny_grid(1), "store": 3})


def test_unsupported_urls_name_the_allowed_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'mysql'.*sqlite:///PATH or postgresql\+psycopg"):
        ResultStore("mysql://me:secret@host/db")
    assert store_url(tmp_path / "x.sqlite") == f"sqlite:///{tmp_path / 'x.sqlite'}"


# --- leases of dead processes, runs that end before the grid, read-only opens ---------------


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_dead_process_of_this_machine_loses_its_cells_at_once(url: str) -> None:
    store = ResultStore(url)
    here = Process.this()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        dead = Process(here.host, here.boot, _dead_pid())
        alive = Process(here.host, here.boot, sleeper.pid)
        elsewhere = Process("another-host", here.boot, _dead_pid())  # not ours to judge
        for cell_id, process in (("dead", dead), ("alive", alive), ("remote", elsewhere)):
            assert store.claim(cell_id, f"run-{cell_id}", 600, process)
        with Leases(store, owner="me") as leases:
            assert leases.claim_many(["dead", "alive", "remote"]) == ["dead"]
        sleeper.kill()
        sleeper.wait()
        with Leases(store, owner="me-again") as leases:
            assert leases.claim_many(["alive", "remote"]) == ["alive"]  # remote: by expiry
    finally:
        sleeper.kill()


def test_a_lease_records_its_owners_process_and_a_done_cell_its_run(url: str) -> None:
    store = ResultStore(url)
    with Leases(store, owner="host:1:run") as leases:
        assert leases.claim("c1")
        (lease,) = store.leases()
        assert lease.process == Process.this()
        store.record(
            cell_id="c1", experiment="e", config={}, grid_values={}, metrics=[], info={},
            seconds=1.0, owner=leases.owner, workdir="/somewhere/out",
        )  # fmt: skip
    (run,) = ResultStore(url, read_only=True).runs()
    assert (run.owner, run.workdir) == ("host:1:run", "/somewhere/out")


def _write_experiment(folder: Path, raw: dict[str, Any]) -> Path:
    import yaml

    path = folder / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "robcomp.cli", *args]


@pytest.mark.slow
def _running_leases(path: Path) -> list[str]:
    """The cells leased as running in the SQLite store at ``path``; none while the run that
    writes it is still creating it (no file, no schema yet, or its schema write holding the
    lock), which a poll racing that run sees under load."""
    from sqlalchemy.exc import OperationalError

    try:
        leases = ResultStore(path, read_only=True).leases()
    except (FileNotFoundError, OperationalError):
        return []
    return [lease.cell_id for lease in leases if lease.state == "running"]


def test_a_rerun_right_after_kill_9_finishes_the_grid(tmp_path: Path) -> None:
    # cells of a second or so (fine-tuning), so the kill lands mid-cell
    raw = tiny_grid(3) | {"finetune": {"epochs": 20, "lr": 0.01, "batch_size": 32}}
    file, out = _write_experiment(tmp_path, raw), tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen(_cli("run", str(file), "--out", str(out)), env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and run.poll() is None:
            if _running_leases(out / "results.sqlite"):
                break
            time.sleep(0.1)
        assert run.poll() is None, "the run ended before it could be killed mid-cell"
    finally:
        run.kill()  # SIGKILL: no release of its leases
        run.wait()
    store = ResultStore(out / "results.sqlite", read_only=True)
    held = [lease.cell_id for lease in store.leases() if lease.state == "running"]
    assert held and held[0] not in store.done_ids()  # killed mid-cell: its lease remains
    # at once, as `robcomp run` again (in this process: the driver is what decides)
    experiment = load_experiment(raw)
    summary = run_experiment(experiment, out)
    assert (summary.elsewhere, summary.unfinished) == ([], [])
    assert ResultStore(out / "results.sqlite").done_ids() == {c.cell_id for c in experiment.cells}


def test_a_run_ending_while_a_live_run_holds_a_cell_names_it_and_exits_non_zero(
    url: str, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from robcomp.cli import UNFINISHED_EXIT, app

    raw = tiny_grid(2)
    file = _write_experiment(tmp_path, raw)
    held = load_experiment(raw).cells[1].cell_id
    assert ResultStore(url).claim(held, "busy:7:live", 600)  # another machine's run, renewing
    args = ["run", str(file), "--out", str(tmp_path / "out"), "--store", url]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == UNFINISHED_EXIT, result.output
    assert held in result.output and "other live runs hold them" in result.output
    # the hint names the store's URL, where the other run's cells are (not this run's folder)
    assert f"robcomp status {safe_url(url)}" in result.output
    assert ResultStore(url).done_ids() == {load_experiment(raw).cells[0].cell_id}


def test_status_reads_a_postgresql_url_as_given(postgres_server: str, tmp_path: Path) -> None:
    from robcomp.experiments.status import grid_status

    url = _new_database(postgres_server)
    store = ResultStore(url)
    store.register_cells("e", [("c1", {"g": 1})])
    _record(store, "c1")
    plain = url.replace("postgresql+psycopg://", "postgresql://")  # as psql users write it
    state = grid_status(plain)
    assert state.counts()["done"] == 1 and state.workers == 0


def test_a_read_only_open_reads_an_old_store_as_it_is_and_changes_nothing(
    url: str, tmp_path: Path
) -> None:
    from robcomp.config import to_dict
    from robcomp.report import write_report

    config = json.dumps(to_dict(load_experiment(tiny_grid(1)).cells[0].config))
    engine = sa.create_engine(url)
    with engine.begin() as conn:  # version 3, as an older robcomp left it
        for statement in V3_SCHEMA:
            conn.exec_driver_sql(statement.replace("'e', 'done', '{}'", f"'e', 'done', '{config}'"))
    engine.dispose()
    path = sa.make_url(url).database if url.startswith("sqlite") else None
    before = Path(path).read_bytes() if path else b""
    stamp = Path(path).stat().st_mtime_ns if path else 0
    store = ResultStore(url, read_only=True)
    (run,) = store.runs()
    assert run.metrics == [Metric("robust_accuracy", 0.4, "pgd", 0.1)]  # source '' and n None
    assert (run.owner, run.workdir) == (None, None) and store.grid() == []
    with pytest.raises(Exception, match=r"(?i)read.?only"):  # the database refuses writes
        _record(store, "c2")
    files = write_report(url, tmp_path / "report", html=True)
    assert [row["cell_id"] for row in json.loads(files.json.read_text())] == ["c1"]
    with engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT version FROM schema_version")) == 3  # not migrated
        assert "leases" not in sa.inspect(conn).get_table_names()
    engine.dispose()
    if path:
        assert Path(path).read_bytes() == before and Path(path).stat().st_mtime_ns == stamp


def test_a_read_only_open_creates_nothing(tmp_path: Path) -> None:
    from robcomp.report import write_report

    with pytest.raises(FileNotFoundError, match="no results store"):
        write_report(tmp_path / "none" / "results.sqlite", tmp_path / "report")
    assert not (tmp_path / "none").exists() and not (tmp_path / "report").exists()


def test_a_new_column_reaches_an_old_table_with_its_rows(url: str) -> None:
    """The schema is reshaped from the declared tables: an older store's tables gain the
    columns (and keys) they lack, their rows kept, and reads return the current shape."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        for statement in V3_SCHEMA:
            conn.exec_driver_sql(statement)
        conn.exec_driver_sql(
            "CREATE TABLE leases (cell_id TEXT PRIMARY KEY, owner TEXT NOT NULL, "
            "state TEXT NOT NULL, since DOUBLE PRECISION NOT NULL, "
            "expires DOUBLE PRECISION NOT NULL)"
        )
        conn.exec_driver_sql("INSERT INTO leases VALUES ('c1', '', 'done', 1.0, 'Infinity')")
    engine.dispose()
    store = ResultStore(url)
    with store.engine.connect() as conn:
        inspector = sa.inspect(conn)
        for table in (runs_table, metrics_table, leases_table):
            assert {c["name"] for c in inspector.get_columns(table.name)} == set(table.c.keys())
            key = inspector.get_pk_constraint(table.name)["constrained_columns"]
            assert set(key) == {c.name for c in table.primary_key}
    assert [(x.cell_id, x.state, x.process) for x in store.leases()] == [("c1", "done", None)]
    assert store.runs()[0].metrics == [Metric("robust_accuracy", 0.4, "pgd", 0.1)]
    assert not store.claim("c1", "me", 60)  # still done
