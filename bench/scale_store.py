"""What share of a run does the results store take? ``python bench/scale_store.py``.

Runs one grid of 200 minimal real cells (a tiny MLP trained one epoch on 200 digits, clean
accuracy only; one seed per cell) through ``run_experiment`` with the local executor, once on a
SQLite file and once on a PostgreSQL 15 started for the bench (a cluster in a temp dir, unix
socket, fsync on as on a real server). Every call into the store (opening it, registering the
grid, claiming each cell, recording it, the lease heartbeat and release) is timed by wrapping
``ResultStore``'s methods; the share is that time over the run's wall time.

Writes into bench/results/scale.json (read, merged, written: other benches add their keys):
``store_fraction_sqlite``, ``store_fraction_postgres`` (goal < 0.05) and under ``store`` the
seconds of each run. PostgreSQL is skipped (and said so) when it cannot be started here.

Options: ``--cells N`` (default 200).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from robcomp.experiments import load_experiment, run_experiment
from robcomp.experiments.store import ResultStore

RESULTS = Path(__file__).parent / "results" / "scale.json"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
TIMED = (
    "__init__",
    "experiments",
    "register_cells",
    "done_ids",
    "claim_many",
    "record",
    "renew",
    "release",
)


def grid(cells: int) -> dict[str, Any]:
    return {
        "name": "scale-store",
        "data": {"name": "digits", "train_limit": 200},
        "model": {"name": "tiny_mlp"},
        "train": {"epochs": 1, "lr": 0.05, "batch_size": 64},
        "compress": {"name": "none"},
        "evaluate": {"attacks": [], "diagnostics": False, "latency_batch_sizes": []},
        "threads": 1,
        "grid": {"seed": list(range(cells))},
    }


@contextmanager
def store_timer() -> Iterator[dict[str, float]]:
    """Accumulate the seconds spent in each ResultStore method while inside."""
    spent: dict[str, float] = dict.fromkeys(TIMED, 0.0)
    originals = {name: getattr(ResultStore, name) for name in TIMED}

    def timed(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start

        return wrapper

    for name, method in originals.items():
        setattr(ResultStore, name, timed(name, method))
    try:
        yield spent
    finally:
        for name, method in originals.items():
            setattr(ResultStore, name, method)


def measure(url_for: Callable[[Path], str], cells: int) -> dict[str, Any]:
    experiment = load_experiment(grid(cells))
    with tempfile.TemporaryDirectory() as tmp, store_timer() as spent:
        start = time.perf_counter()
        summary = run_experiment(experiment, Path(tmp) / "out", store=url_for(Path(tmp)))
        total = time.perf_counter() - start
    if summary.failed or summary.ran != cells:
        raise RuntimeError(f"bench grid: ran {summary.ran}, failed {len(summary.failed)}")
    store = sum(spent.values())
    return {
        "fraction": round(store / total, 4),
        "run_seconds": round(total, 2),
        "store_seconds": round(store, 3),
        "per_cell_ms": round(1000 * store / cells, 2),
        "by_method_s": {k: round(v, 3) for k, v in spent.items() if v},
    }


def _as_postgres(*args: str) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else list(args)


@contextmanager
def postgres() -> Iterator[str | None]:
    """A throwaway PostgreSQL 15 cluster; yields its socket folder (None: cannot start)."""
    if not (PG_BIN / "initdb").is_file():
        print(f"postgres skipped: {PG_BIN / 'initdb'} is absent", file=sys.stderr)
        yield None
        return
    root = Path(tempfile.mkdtemp(prefix="robcomp-pg-bench-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        for path in (root, sock):
            shutil.chown(path, "postgres", "postgres")
    ctl = str(PG_BIN / "pg_ctl")
    quiet = {"check": True, "capture_output": True}
    try:
        subprocess.run(
            _as_postgres(str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust"), **quiet
        )
        start = [ctl, "-D", str(data), "-o", f"-k {sock} -h ''", "-l", str(root / "log"), "-w"]
        subprocess.run(_as_postgres(*start, "start"), **quiet)
        yield str(sock)
        subprocess.run(_as_postgres(ctl, "-D", str(data), "-m", "fast", "stop"), **quiet)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def new_database(sock: str, name: str) -> str:
    """The URL of a new, empty database on the bench's server (each run starts empty)."""
    import psycopg

    name = "bench_" + "".join(c if c.isalnum() else "_" for c in name.lower())
    with psycopg.connect(host=sock, user="postgres", dbname="postgres", autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    return f"postgresql+psycopg://postgres@/{name}?host={sock}"


def merge(keys: dict[str, Any]) -> None:
    """Add ``keys`` to the results file, keeping what other benches wrote there."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    current = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    RESULTS.write_text(json.dumps({**current, **keys}, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=200)
    args = parser.parse_args()
    runs = {"sqlite": measure(lambda tmp: f"sqlite:///{tmp / 'results.sqlite'}", args.cells)}
    print(f"sqlite: {runs['sqlite']}", file=sys.stderr)
    with postgres() as sock:
        if sock is not None:
            runs["postgres"] = measure(lambda tmp: new_database(sock, tmp.name), args.cells)
            print(f"postgres: {runs['postgres']}", file=sys.stderr)
    keys: dict[str, Any] = {f"store_fraction_{k}": v["fraction"] for k, v in runs.items()}
    keys["store"] = {
        "cells": args.cells,
        "goal": {"store_fraction": "< 0.05"},
        "load_1min": round(os.getloadavg()[0], 2),
        **runs,
    }
    merge(keys)
    print(json.dumps({k: v for k, v in keys.items() if k != "store"}, indent=2))


if __name__ == "__main__":
    main()
