"""Threads per cell: one for tiny models, never more than the free cores, the load recorded
next to every latency figure."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from robcomp.cli import app
from robcomp.experiments import STORE_NAME, ResultStore, load_experiment, run_experiment
from robcomp.experiments import threads as threads_module
from robcomp.experiments.threads import SMALL_MODEL_MACS, choose_threads, free_cores
from robcomp.report.tables import leaderboard_rows


@pytest.fixture(autouse=True)
def _fresh_free_cores() -> Iterator[None]:
    free_cores.cache_clear()
    yield
    free_cores.cache_clear()


def _machine(monkeypatch: pytest.MonkeyPatch, cores: int, load: float) -> None:
    monkeypatch.setattr(threads_module, "cores", lambda: cores)
    monkeypatch.setattr(threads_module, "load_1min", lambda: load)


def test_tiny_models_get_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    _machine(monkeypatch, cores=8, load=0.0)
    assert choose_threads(None, SMALL_MODEL_MACS - 1) == 1
    assert choose_threads(None, SMALL_MODEL_MACS) == 8


def test_never_more_threads_than_free_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    _machine(monkeypatch, cores=2, load=2.1)  # two busy single-threaded jobs on 2 cores
    assert free_cores() == 1 and choose_threads(None, 10**9) == 1
    free_cores.cache_clear()
    _machine(monkeypatch, cores=8, load=3.0)
    assert choose_threads(None, 10**9) == 5


def test_an_explicit_setting_wins_but_never_exceeds_the_cores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _machine(monkeypatch, cores=4, load=0.0)
    assert choose_threads(3, 10) == 3  # the user's choice, even for a tiny model
    assert choose_threads(16, 10) == 4
    with pytest.raises(ValueError, match="threads must be >= 1"):
        choose_threads(0, 10)


def _tiny(**overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "threads",
        "data": {"name": "digits", "train_limit": 100},
        "model": {"name": "tiny_mlp"},
        "train": {"epochs": 1},
        "evaluate": {
            "attacks": [{"name": "fgsm", "eps": 0.1}],
            "limit": 20,
            "diagnostics": False,
            "latency_batch_sizes": [1],
            "latency_repeats": 2,
        },
    }
    raw.update(overrides)
    return raw


def test_a_cell_records_its_threads_and_the_load_next_to_latency(tmp_path: Path) -> None:
    before = torch.get_num_threads()
    summary = run_experiment(load_experiment(_tiny()), tmp_path)
    assert summary.failed == []
    assert torch.get_num_threads() == before  # the caller's setting is restored
    (run,) = ResultStore(tmp_path / STORE_NAME).runs()
    values = {m.name: m.value for m in run.metrics if m.attack == ""}
    assert values["threads"] == 1  # tiny_mlp: 2.4 k MACs per image
    assert values["load_1min"] >= 0 and "latency_ms_b1" in values
    # a measurement of the machine, like a time: never compared between runs of one cell
    assert all(m.is_timing for m in run.metrics if m.name in ("load_1min", "threads"))
    rows = leaderboard_rows(ResultStore(tmp_path / STORE_NAME))
    assert rows[0]["load_1min"] == values["load_1min"]


@pytest.mark.slow
def test_threads_and_device_are_operational_and_set_from_the_command_line(tmp_path: Path) -> None:
    ids = {load_experiment(_tiny(threads=t)).cells[0].cell_id for t in (None, 1, 2)}
    assert len(ids) == 1  # how fast a result is computed is not which result it is
    result = CliRunner().invoke(
        app,
        ["run", str(_write(tmp_path, _tiny())), "--out", str(tmp_path / "out"),
         "--threads", "2", "--device", "cpu"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (run,) = ResultStore(tmp_path / "out" / STORE_NAME).runs()
    assert {m.name: m.value for m in run.metrics}["threads"] == min(2, threads_module.cores())
    assert "load" in result.output  # shown where latency is shown


def _write(tmp_path: Path, raw: dict[str, Any]) -> Path:
    import yaml

    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path
