"""Experiment files: grid expansion and hashing, the store, caching, and resume after a kill."""

from __future__ import annotations

import itertools
import json
import math
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console
from torch import nn

from robcomp.compress import COMPRESSORS, Record
from robcomp.config import ConfigError
from robcomp.data.base import DataSplits
from robcomp.experiments import (
    STORE_NAME,
    Metric,
    ResultStore,
    expand,
    load_experiment,
    run_experiment,
)
from robcomp.experiments import pipeline as pipeline_module
from robcomp.experiments import runner as runner_module
from robcomp.experiments.runner import CellResult
from robcomp.report import write_report
from robcomp.report.tables import leaderboard_rows, leaderboard_table


def tiny_experiment(**grid: list[Any]) -> dict[str, Any]:
    return {
        "name": "tiny",
        "data": {"name": "digits", "train_limit": 300},
        "model": {"name": "tiny_mlp"},
        "train": {"epochs": 2, "lr": 0.05, "batch_size": 64},
        "compress": {"name": "magnitude", "sparsity": 0.0},
        "finetune": {"epochs": 1, "lr": 0.01, "batch_size": 64},
        "evaluate": {"attacks": [{"name": "fgsm", "eps": 0.1}], "limit": 50},
        "grid": grid or {"compress.sparsity": [0.0, 0.5, 0.9]},
    }


# --- grid expansion and hashing (property tests) ---------------------------------------------

grids = st.dictionaries(
    st.sampled_from(["a", "b.c", "b.d", "e.f.g"]),
    st.lists(st.integers(-3, 3), min_size=1, max_size=3, unique=True),
    max_size=3,
)


@given(grids)
def test_expand_gives_the_product(grid: dict[str, list[int]]) -> None:
    base = {"a": 0, "b": {"c": 0, "d": 0}, "e": {"f": {"g": 0}}, "keep": 1}
    cells = expand(base, grid)
    assert len(cells) == max(1, len(list(itertools.product(*grid.values()))))
    seen = {json.dumps(c, sort_keys=True) for c in cells}
    assert len(seen) == len(cells)  # all combinations are distinct
    for cell in cells:
        assert cell["keep"] == 1
    assert base == {"a": 0, "b": {"c": 0, "d": 0}, "e": {"f": {"g": 0}}, "keep": 1}


@given(st.lists(st.sampled_from([0.0, 0.25, 0.5, 0.75]), min_size=1, max_size=4, unique=True))
def test_cell_ids_are_stable_and_distinct(sparsities: list[float]) -> None:
    a = load_experiment(tiny_experiment(**{"compress.sparsity": sparsities}))
    b = load_experiment(tiny_experiment(**{"compress.sparsity": list(reversed(sparsities))}))
    ids_a = [c.cell_id for c in a.cells]
    assert len(set(ids_a)) == len(sparsities)
    assert set(ids_a) == {c.cell_id for c in b.cells}  # order of the grid does not matter
    # every cell shares one baseline: only compression differs
    assert len({c.config.baseline_key() for c in a.cells}) == 1


def test_hash_ignores_key_order_but_not_values() -> None:
    raw = tiny_experiment()
    shuffled = dict(reversed(list(raw.items())))
    assert [c.cell_id for c in load_experiment(raw).cells] == [
        c.cell_id for c in load_experiment(shuffled).cells
    ]
    changed = load_experiment(raw, ["train.epochs=3"])
    assert not {c.cell_id for c in changed.cells} & {c.cell_id for c in load_experiment(raw).cells}


def test_bad_grid_and_bad_keys_are_reported_with_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    raw = tiny_experiment()
    raw["train"]["epocs"] = 3
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(
        ConfigError, match=r"exp.yaml.*train: unknown key 'epocs'.*did you mean 'epochs'"
    ):
        load_experiment(path)
    raw = tiny_experiment(**{"compress.sparsity": [0.5, 1.5]})
    with pytest.raises(ConfigError, match=r"cell compress.sparsity=1.5.*sparsity must be in"):
        load_experiment(raw)
    with pytest.raises(ConfigError, match="non-empty list"):
        load_experiment(tiny_experiment(**{"compress.sparsity": []}))
    raw = tiny_experiment()
    raw["evaluate"]["attacks"] = [{"name": "pgd", "eps": 0.1, "norm": "l7"}]
    with pytest.raises(ConfigError, match=r"evaluate.attacks\[0\].norm: expected one of"):
        load_experiment(raw)
    raw = tiny_experiment()
    raw["model"]["name"] = "resnet200"
    with pytest.raises(ConfigError, match="unknown model 'resnet200'"):
        load_experiment(raw)


# --- running, storing, caching, resuming -----------------------------------------------------


def test_run_stores_results_and_saves_resolved_configs(tmp_path: Path) -> None:
    experiment = load_experiment(tiny_experiment())
    summary = run_experiment(experiment, tmp_path)
    assert (summary.total, summary.ran, summary.skipped, summary.failed) == (3, 3, 0, [])
    runs = ResultStore(tmp_path / STORE_NAME).runs()
    assert len(runs) == 3
    for run in runs:
        names = {(m.name, m.attack) for m in run.metrics}
        assert {("clean_accuracy", ""), ("robust_accuracy", "fgsm-linf"), ("params", "")} <= names
        assert ("zero_gradients", "") in names and ("unbounded_attack", "") in names
        assert run.info["masking"] == "no sign of gradient masking"
        saved = yaml.safe_load((tmp_path / "cells" / run.cell_id / "config.yaml").read_text())
        assert saved == run.config and saved["train"]["epochs"] == 2
    assert (tmp_path / "experiment.yaml").is_file()
    rates = sorted(m.value for r in runs for m in r.metrics if m.name == "compression_rate")
    assert rates[0] == 0.0 and rates[-1] > 0.85


def test_baseline_is_trained_once_and_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real_fit = runner_module.fit

    def counting_fit(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("description", "train"))
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(runner_module, "fit", counting_fit)  # trains the baseline
    monkeypatch.setattr(pipeline_module, "fit", counting_fit)  # fine-tunes the variants
    run_experiment(load_experiment(tiny_experiment()), tmp_path)
    assert calls.count("train baseline") == 1 and calls.count("fine-tune") == 3
    assert len(list((tmp_path / "cache").glob("baseline-*"))) == 1


def test_resume_after_a_kill_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    experiment = load_experiment(tiny_experiment())
    real_run_cell = runner_module.run_cell
    started: list[str] = []

    def killed_on_third(cell: Any, workdir: Path) -> Any:
        started.append(cell.cell_id)
        if len(started) == 3:
            raise KeyboardInterrupt  # the user pressed Ctrl-C (or the machine went away)
        return real_run_cell(cell, workdir)

    from robcomp.experiments import driver

    monkeypatch.setattr(driver, "run_cell", killed_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(experiment, tmp_path)
    store = ResultStore(tmp_path / STORE_NAME)
    assert store.done_ids() == set(started[:2])
    assert [lease.cell_id for lease in store.leases() if lease.state == "running"] == []
    before = {r.cell_id: r.metrics for r in store.runs()}

    monkeypatch.setattr(driver, "run_cell", real_run_cell)
    summary = run_experiment(experiment, tmp_path)
    assert (summary.skipped, summary.ran) == (2, 1)
    after = {r.cell_id: r.metrics for r in store.runs()}
    assert set(after) == {c.cell_id for c in experiment.cells}
    assert all(after[k] == v for k, v in before.items())  # finished cells untouched


def test_short_cells_are_claimed_in_batches_long_ones_one_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from robcomp.experiments import driver
    from robcomp.experiments.leases import Leases

    experiment = load_experiment(
        tiny_experiment(**{"compress.sparsity": [0.1 * i for i in range(6)]})
    )
    batches: list[int] = []
    claim_many = Leases.claim_many

    def spy(self: Leases, cell_ids: Any) -> list[str]:
        batches.append(len(cell_ids))
        return claim_many(self, cell_ids)

    def instant(cell: Any, workdir: Path) -> CellResult:  # a cell of no time at all
        return CellResult(cell.cell_id, "tiny", {}, cell.grid_values)

    monkeypatch.setattr(Leases, "claim_many", spy)
    monkeypatch.setattr(driver, "run_cell", instant)
    summary = run_experiment(experiment, tmp_path / "short")
    assert summary.ran == 6 and batches == [1, 5]  # the first alone, then the rest at once
    assert driver._claims_ahead(0.001) == driver.CLAIM_AHEAD_MAX
    assert driver._claims_ahead(0.25) == 4  # about a second of work
    assert driver._claims_ahead(1.5) == driver._claims_ahead(600.0) == 1


def test_results_are_deterministic(tmp_path: Path) -> None:
    raw = tiny_experiment(**{"compress.sparsity": [0.5]})
    run_experiment(load_experiment(raw), tmp_path / "a")
    run_experiment(load_experiment(raw), tmp_path / "b")
    a, b = (ResultStore(tmp_path / d / STORE_NAME).runs()[0].metrics for d in "ab")

    def values(metrics: list[Metric]) -> dict[tuple[str, str, float], float | None]:
        return {(m.name, m.attack, m.eps): m.value for m in metrics if not m.is_timing}

    assert values(a) == values(b)


@dataclass(frozen=True)
class BrokenCompressor:
    """Valid when the file is loaded, fails when its cell runs (as a real bug would)."""

    def label(self) -> str:
        return "broken"

    def __call__(self, model: nn.Module, data: DataSplits) -> tuple[nn.Module, Record]:
        raise RuntimeError("compression broke on purpose")


def test_a_failing_cell_is_recorded_and_retried(tmp_path: Path) -> None:
    raw = tiny_experiment(**{"compress.name": ["none", "test-broken"]})
    raw["compress"] = {"name": "none"}
    with COMPRESSORS.temporarily("test-broken", BrokenCompressor):
        summary = run_experiment(load_experiment(raw), tmp_path)
        assert len(summary.failed) == 1
        assert "broke on purpose" in (summary.failed[0].error or "")
        store = ResultStore(tmp_path / STORE_NAME)
        assert len(store.runs("done")) == 1 and len(store.runs("failed")) == 1
        again = run_experiment(load_experiment(raw), tmp_path)
    assert (again.skipped, again.ran) == (1, 1)  # the failed cell is tried again


def test_store_writes_are_atomic(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "s.sqlite")
    bad = [Metric("ok", 1.0), Metric("ok", 2.0, "x"), Metric("boom", object())]  # type: ignore[arg-type]
    with pytest.raises(sqlite3.Error):
        store.record(
            cell_id="c1", experiment="e", config={}, grid_values={}, metrics=bad, info={}, seconds=1
        )
    assert store.runs(None) == []  # nothing half-written


def test_eps_lists_and_presets_expand_to_attacks() -> None:
    raw = tiny_experiment()
    raw["evaluate"] = {
        "preset": "digits-light",
        "attacks": [
            {"name": "pgd", "eps": [0.05, "8/255"], "steps": 3},
            {"name": "fgsm", "eps": 0.2},
        ],
    }
    spec = load_experiment(raw).cells[0].config.evaluate
    attacks = spec.build_attacks()
    assert len(attacks) == 3 + 2 + 1
    assert [a.eps for a in attacks[3:5]] == [0.05, pytest.approx(8 / 255)]
    raw["evaluate"]["preset"] = "digits-medium"
    with pytest.raises(ConfigError, match="unknown preset 'digits-medium'"):
        load_experiment(raw)


@pytest.mark.slow
def test_quantized_cells_report_their_own_size_and_int8_is_attacked_without_gradients(
    tmp_path: Path,
) -> None:
    raw = tiny_experiment(
        compress=[{"name": "int8", "compile": False, "calibration_batches": 2}, {"name": "lowbit"}]
    )
    raw["model"] = {"name": "tiny_cnn"}
    raw["evaluate"] = {
        "attacks": [{"name": "pgd", "eps": 0.1, "steps": 5}],
        "limit": 60,
        "black_box_queries": 100,
        "latency_batch_sizes": [1, 8],
        "latency_repeats": 3,
        "diagnostics_points": 60,
    }
    summary = run_experiment(load_experiment(raw), tmp_path)
    assert summary.failed == []
    runs = {r.info["compressor"]: r for r in ResultStore(tmp_path / STORE_NAME).runs()}
    int8, lowbit = runs["int8"], runs["lowbit-w4"]

    def value(run: Any, name: str, attack: str = "") -> float:
        return next(m.value for m in run.metrics if (m.name, m.attack) == (name, attack))

    # sizes come from the compressors' records, not from the float tensors in memory
    assert value(int8, "bits") == 8 and value(int8, "size_ratio") < 0.35
    assert value(lowbit, "bits") == 4 and value(lowbit, "size_ratio") < 0.2
    for run in runs.values():
        assert value(run, "latency_ms_b1") > 0 and value(run, "latency_ms_b8") > 0
    # int8: never fine-tuned; robust accuracy is the worst case over BPDA, transfer, Square
    assert "skipped" in int8.info["finetune"] and isinstance(lowbit.info["finetune"], dict)
    (routes,) = [
        r for r in int8.info["gradient_free"] if (r["attack"], r["eps"]) == ("pgd5-linf", 0.1)
    ]
    assert set(routes["per_route"]) == {"bpda", "transfer", "black-box"}
    robust = value(int8, "robust_accuracy", "pgd5-linf")
    assert robust == routes["robust_accuracy"] <= min(routes["per_route"].values())
    assert value(int8, "twin_agreement_clean") >= 0.95
    assert value(int8, "twin_agreement_adv") >= 0.9
    assert lowbit.info["gradient_free"] is None  # fake quantization has STE gradients


def test_telemetry_is_stored_and_drawn(tmp_path: Path) -> None:
    raw = tiny_experiment(**{"compress.sparsity": [0.0, 0.5]})
    raw["compress"] = {"name": "magnitude", "sparsity": 0.0, "scope": "layer"}
    raw["evaluate"]["diagnostics"] = False
    run_experiment(load_experiment(raw), tmp_path)
    runs = {r.config["compress"]["sparsity"]: r for r in ResultStore(tmp_path / STORE_NAME).runs()}
    dense, half = runs[0.0].info["telemetry"], runs[0.5].info["telemetry"]
    assert set(half["kept_per_layer"]) == {"net.fc1", "net.fc2"}
    assert all(abs(v - 0.5) < 0.01 for v in half["kept_per_layer"].values())
    assert all(v == 1.0 for v in dense["kept_per_layer"].values())
    weights = sum(half["dense"]["counts"]) + half["dense"]["zeros"]
    assert abs(half["compressed"]["zeros"] / weights - 0.5) < 0.01
    assert half["dense"] == dense["dense"] and half["bins"] == dense["bins"]  # one baseline
    files = write_report(tmp_path / STORE_NAME, tmp_path / "report")
    names = {f.name for f in files.figures}
    assert names == {"training_curves.png", "weights.png", "kept_per_layer.png"}
    assert all(f.stat().st_size > 10_000 for f in files.figures)


def test_zipped_grid_axis_sets_keys_together() -> None:
    raw = tiny_experiment()
    raw["grid"] = {
        "compress,finetune": [
            [{"name": "magnitude", "sparsity": 0.5}, {"epochs": 2, "lr": 0.01}],
            [{"name": "none"}, None],
        ],
        "seed": [0, 1],
    }
    cells = load_experiment(raw).cells
    assert len(cells) == 4
    pruned = [c for c in cells if c.config.compress["name"] == "magnitude"]
    dense = [c for c in cells if c.config.compress["name"] == "none"]
    assert all(c.config.finetune is not None and c.config.finetune.epochs == 2 for c in pruned)
    assert all(c.config.finetune is None for c in dense)
    assert pruned[0].grid_values["compress,finetune"][0]["sparsity"] == 0.5
    raw["grid"] = {"compress,finetune": [[{"name": "none"}]]}
    with pytest.raises(ConfigError, match="list of 2 values"):
        load_experiment(raw)


def _rendered(rows: list[dict[str, Any]]) -> str:
    console = Console(record=True, width=200)
    console.print(leaderboard_table(rows))
    return console.export_text()


def test_leaderboard_tells_rows_apart_by_their_finetuning() -> None:
    row = {"data": "digits", "model": "kwon_lenet", "compress": "magnitude-global-0.9"}
    natural = {**row, "finetune": "ce x16", "clean_accuracy": 0.98, "pgd20-linf@0.1": 0.69}
    robust = {**row, "finetune": "pgd-at x16", "clean_accuracy": 0.98, "pgd20-linf@0.1": 0.76}
    text = _rendered([robust, natural])
    assert "finetune" in text and "pgd-at x16" in text and "ce x16" in text
    # without fine-tuning anywhere the column, and its caption entry, stay out of the way
    text = _rendered([{**natural, "finetune": "-"}, {**row, "compress": "none", "finetune": "-"}])
    assert "finetune" not in text


def test_leaderboard_shows_component_grid_values_compactly() -> None:
    row = {"data": "digits", "model": "tiny_cnn", "compress": "none", "clean_accuracy": 0.9}
    trades = {"name": "trades", "eps": 0.1, "beta": 6.0}
    rows = [
        {**row, "grid:train.objective": trades},
        {**row, "grid:train.objective": {"name": "ce"}},
    ]
    text = _rendered(rows)
    assert "trades eps=0.1 beta=6.0" in text and "{" not in text


def test_cell_id_hashes_the_components_with_their_defaults_filled_in() -> None:
    def cell_id(compress: dict[str, Any], attacks: list[dict[str, Any]]) -> str:
        raw = tiny_experiment()
        raw["compress"], raw["evaluate"]["attacks"], raw["grid"] = compress, attacks, {}
        return load_experiment(raw).cells[0].cell_id

    pgd = [{"name": "pgd", "eps": 0.1}]
    implicit = cell_id({"name": "magnitude", "sparsity": 0.5}, pgd)
    # spelling out a default is the same cell; changing it is another
    assert implicit == cell_id({"name": "magnitude", "sparsity": 0.5, "scope": "global"}, pgd)
    assert implicit != cell_id({"name": "magnitude", "sparsity": 0.5, "scope": "layer"}, pgd)
    assert implicit == cell_id({"name": "magnitude", "sparsity": 0.5}, [{**pgd[0], "steps": 10}])
    # same fields, another method: never the same cell
    assert implicit != cell_id({"name": "random", "sparsity": 0.5}, pgd)
    # minimal-norm attacks default to eps=inf, which JSON cannot hold: still hashable
    assert cell_id({"name": "none"}, [{"name": "ddn"}]) != cell_id({"name": "none"}, pgd)


def test_unbounded_minimal_norm_attack_reports_the_average_minimal_perturbation(
    tmp_path: Path,
) -> None:
    raw = tiny_experiment()
    raw["grid"] = {}
    raw["evaluate"] = {
        "attacks": [{"name": "fgsm", "eps": 0.1}, {"name": "ddn", "eps": math.inf, "steps": 20}],
        "limit": 30,
        "diagnostics": False,
    }
    run_experiment(load_experiment(raw), tmp_path)
    (row,) = leaderboard_rows(ResultStore(tmp_path / STORE_NAME))
    assert row["ddn20-l2@inf"] < 0.1  # unbounded: (almost) every point is broken
    assert 0.0 < row["min_norm:ddn20-l2"] < 8.0  # 8 = the L2 diameter of [0, 1]^64
    assert row["worst_robust_accuracy"] == row["fgsm-linf@0.1"]  # the unbounded one is no bound
    text = _rendered([row])
    assert "avg min" in text and f"{row['min_norm:ddn20-l2']:.3g}" in text


def test_plot_lines_follow_the_rate_and_split_on_everything_else() -> None:
    from robcomp.report.plots import _group_key

    def row(sparsity: float, objective: str, finetune: str = "-") -> dict[str, Any]:
        return {
            "model": "tiny_cnn",
            "compress": f"proximal-l0-{sparsity:g}",
            "finetune": finetune,
            "grid:compress.sparsity": sparsity,
            "grid:compress.objective": {"name": objective},
        }

    assert _group_key(row(0.5, "ce")) == _group_key(row(0.9, "ce"))  # one line along the rate
    assert _group_key(row(0.5, "ce")) != _group_key(row(0.5, "trades"))
    assert _group_key(row(0.5, "ce")) != _group_key(row(0.5, "ce", finetune="pgd-at x16"))
