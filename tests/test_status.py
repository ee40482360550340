"""`robcomp status`: the state of every cell of a store's grid and the time left."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from robcomp.cli import app
from robcomp.experiments import STORE_NAME, Metric, ResultStore
from robcomp.experiments.leases import Leases
from robcomp.experiments.status import grid_status
from robcomp.experiments.store import Process


def _store(folder: Path) -> ResultStore:
    """Four cells: one done (10 s), one failed (30 s), one running, one pending."""
    store = ResultStore(folder / STORE_NAME)
    store.register_cells("exp", [(f"cell{i}", {"compress.sparsity": i / 4}) for i in range(4)])
    for cid, seconds, error in (("cell0", 10.0, None), ("cell1", 30.0, "ValueError: boom\n  at x")):
        store.record(
            cell_id=cid, experiment="exp", config={}, grid_values={}, info={},
            metrics=[Metric("clean_accuracy", 0.9)], seconds=seconds, error=error,
        )  # fmt: skip
    assert store.claim("cell2", "node7:42:abcd", 600)
    return store


def test_status_sorts_cells_into_their_states_with_an_eta(tmp_path: Path) -> None:
    _store(tmp_path)
    state = grid_status(tmp_path, now=time.time())
    assert state.counts() == {"done": 1, "running": 1, "failed": 1, "pending": 1}
    by_id = {c.cell_id: c for c in state.cells}
    assert by_id["cell1"].error == "ValueError: boom"  # the first line only
    assert by_id["cell2"].owner == "node7:42:abcd" and by_id["cell2"].since is not None
    assert by_id["cell3"].grid_values == {"compress.sparsity": 0.75}
    # mean 20 s: the pending cell's 20 s and the rest of the running one's (just started), on
    # one run
    assert state.mean_seconds == 20.0 and state.workers == 1
    assert state.eta_seconds == pytest.approx(40.0, abs=1.0)


def test_an_expired_lease_shows_the_cell_as_pending(tmp_path: Path) -> None:
    _store(tmp_path)
    later = time.time() + 3600  # the owner stopped renewing an hour ago
    assert grid_status(tmp_path, now=later).counts()["pending"] == 2


def test_the_cli_prints_the_table_and_counts_by_folder_or_url(tmp_path: Path) -> None:
    _store(tmp_path)
    runner = CliRunner()
    for target in (str(tmp_path), f"sqlite:///{tmp_path / STORE_NAME}"):
        result = runner.invoke(app, ["status", target], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        assert "1 done, 1 running, 1 failed, 1 pending" in result.output
        # 40 s less the seconds the running cell has run since it was claimed (above)
        assert re.search(r"about 0m (3[0-9]|40)s left \(20\.0 s a cell", result.output)
        assert "node7:42:abcd" in result.output and "ValueError: boom" in result.output
        assert "at x" not in result.output


def test_status_of_an_empty_folder_says_what_to_pass(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["status", str(tmp_path)])
    assert result.exit_code == 2
    assert "no results store here" in result.output


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_finished_grid_has_no_live_run_and_no_time_left(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / STORE_NAME)
    store.register_cells("exp", [("cell0", {"compress.sparsity": 0.5})])
    with Leases(store, owner="host:1:run") as leases:
        assert leases.claim("cell0")
        store.record(
            cell_id="cell0", experiment="exp", config={}, grid_values={}, info={},
            metrics=[], seconds=3.0, owner=leases.owner, workdir=str(tmp_path),
        )  # fmt: skip
    state = grid_status(tmp_path)
    assert state.workers == 0 and state.counts()["done"] == 1
    (cell,) = state.cells
    assert cell.owner == "host:1:run"  # who ran it, kept after it is done
    result = CliRunner().invoke(app, ["status", str(tmp_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "1 done, 0 running, 0 failed, 0 pending; 0 live run(s)" in result.output
    assert "left" not in result.output and "host:1:run" in result.output


def test_a_killed_run_on_this_machine_is_not_counted_live(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / STORE_NAME)
    store.register_cells("exp", [("cell0", {}), ("cell1", {})])
    here = Process.this()
    # killed a second ago: its lease has two minutes left, but its process is gone
    assert store.claim("cell0", "host:2:killed", 120, Process(here.host, here.boot, _dead_pid()))
    assert store.claim("cell1", "other:3:run", 120, Process("other", "boot", 3))  # remote
    state = grid_status(tmp_path)
    states = {c.cell_id: c.state for c in state.cells}
    assert states == {"cell0": "pending", "cell1": "running"} and state.workers == 1


def test_grid_values_are_whole_when_stdout_is_not_a_terminal(tmp_path: Path) -> None:
    long = "torchvision:resnet18-with-a-rather-long-option-string-that-will-not-fit-in-sixty"
    store = ResultStore(tmp_path / STORE_NAME)
    store.register_cells("exp", [("cell0", {"model.name": long})])
    result = CliRunner().invoke(app, ["status", str(tmp_path)], env={"COLUMNS": "60"})
    assert result.exit_code == 0, result.output
    assert f"model.name={long}" in result.output and "…" not in result.output
