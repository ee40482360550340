"""One pipeline: the runner, robcomp.api and `robcomp evaluate` evaluate a variant through
robcomp.experiments.pipeline, and whatever a compressor returns goes through it."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import robcomp
from robcomp.compress import COMPRESSORS
from robcomp.data.base import DataSplits, Split
from robcomp.experiments import STORE_NAME, ResultStore, load_experiment, run_experiment
from robcomp.experiments.pipeline import CellInfo
from robcomp.experiments.runner import CellResult, run_cell
from robcomp.models import create
from test_contracts_compress import FAST  # every compressor, quick on a tiny model

SRC = Path(robcomp.__file__).parent
PGD2 = "pgd:eps=0.1,steps=2"


def _tiny_data(n: int = 48, classes: int = 4) -> DataSplits:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 8, 8, generator=g)
    y = torch.arange(n) % classes
    split = Split(x, y)
    names = tuple(str(c) for c in range(classes))
    return DataSplits("tiny", split, split, split, classes, names, (0.5,), (0.25,))


def _tiny_model(data: DataSplits) -> torch.nn.Module:
    torch.manual_seed(0)
    return create("tiny_cnn", data.num_classes, data.in_shape, mean=data.mean, std=data.std)


def _robust(rows: list[dict[str, Any]]) -> list[float]:
    return [r["value"] for r in rows if r["metric"] == "robust_accuracy"]


def test_every_compressor_has_fast_settings() -> None:
    assert set(FAST) == set(COMPRESSORS.names()), "add the new compressor to FAST"


@pytest.mark.parametrize("name", sorted(FAST))
def test_every_compressors_output_goes_through_evaluate_model(name: str) -> None:
    """What compress_model returns is a model evaluate_model takes, attacks included (the int8
    model crashed in safetensors: its packed weights cannot be saved to count bytes)."""
    data = _tiny_data()
    model = _tiny_model(data)
    compressed, _ = robcomp.compress_model(model, {"name": name, **FAST[name]}, data=data)
    rows = robcomp.evaluate_model(
        compressed, data, attacks=[PGD2], limit=16, as_frame=False, latency_batch_sizes=[1]
    )
    robust = _robust(rows)
    assert len(robust) == 1 and 0.0 <= robust[0] <= 1.0
    assert next(r["value"] for r in rows if r["metric"] == "size_bytes") > 0
    assert all(not math.isnan(r["value"]) for r in rows if r["metric"] == "clean_accuracy")


def test_an_int8_model_evaluated_again_keeps_its_int8_cost() -> None:
    data = _tiny_data()
    model = _tiny_model(data)
    q, record = robcomp.compress_model(model, {"name": "int8", **FAST["int8"]}, data=data)
    rows = robcomp.evaluate_model(q, data, attacks=[PGD2], limit=16, as_frame=False)
    values = {r["metric"]: r["value"] for r in rows if not r["attack"]}
    assert values["bits"] == 8 and values["macs"] == record.macs > 0
    assert values["compression_rate"] == 0.0  # the int8 model against itself
    # The gradient attack went the gradient-free way (BPDA through the twin, transfer, Square).
    assert any(r["metric"].startswith("route_accuracy") for r in rows)


def _imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every name ``path`` takes from ``robcomp.experiments``: ``from
    robcomp.experiments... import name``, and ``alias.name`` on a module of it imported as
    ``alias``."""
    tree = ast.parse(path.read_text())
    found, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
            "robcomp.experiments"
        ):
            found += [(node.module or "", alias.name) for alias in node.names]
            aliases |= {a.asname or a.name: f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            aliases |= {
                a.asname or a.name: a.name
                for a in node.names
                if a.name.startswith("robcomp.experiments")
            }
    found += [
        (aliases[node.value.id], node.attr)
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in aliases
    ]
    return found


def test_nothing_outside_experiments_imports_its_private_names() -> None:
    outside = [p for p in SRC.rglob("*.py") if SRC / "experiments" not in p.parents]
    assert outside, "no source files found"
    private = [
        f"{p.relative_to(SRC)}: {module}.{name}"
        for p in outside
        for module, name in _imports(p)
        if name.startswith("_") or any(part.startswith("_") for part in module.split("."))
    ]
    assert not private, f"private names of experiments/ imported from outside: {private}"


def test_the_api_and_the_cli_reach_the_pipeline_not_the_runners_helpers() -> None:
    for file in ("api.py", "cli.py"):
        modules = {module for module, _ in _imports(SRC / file)}
        assert "robcomp.experiments.pipeline" in modules, file


def test_a_cells_info_is_a_typed_record_with_the_stores_keys(tmp_path: Path) -> None:
    """The cell's info is a CellInfo; history.json and the store hold its JSON, with the keys
    the report reads."""
    raw = {
        "name": "typed-info",
        "data": {"name": "digits"},
        "model": {"name": "tiny_mlp", "options": {"hidden": 8}},
        "train": {"epochs": 1, "batch_size": 128},
        "compress": {"name": "magnitude", "sparsity": 0.5},
        "evaluate": {"attacks": [{"name": "pgd", "eps": 0.1, "steps": 2}], "limit": 16,
                     "diagnostics": False, "latency_batch_sizes": []},
    }  # fmt: skip
    cell = load_experiment(raw).cells[0]
    result = run_cell(cell, tmp_path)
    assert result.error is None, result.error
    assert isinstance(result.info, CellInfo)
    keys = {
        "data", "device", "compressor", "record", "baseline", "finetune", "diagnostics",
        "masking", "gradient_free", "worst_case", "shifts", "telemetry", "environment",
    }  # fmt: skip
    history = json.loads((tmp_path / "cells" / cell.cell_id / "history.json").read_text())
    assert set(history) == set(result.info_json()) == keys
    assert history["compressor"] == result.info.compressor == "magnitude-global-0.5"
    summary = run_experiment(load_experiment(raw), tmp_path / "run")
    stored = ResultStore(tmp_path / "run" / STORE_NAME).runs()[0].info
    assert summary.ran == 1 and set(stored) == keys and stored["record"]["method"]


class _InOrder:
    """An executor of its own (not LocalExecutor) that runs cells in this process, one at a
    time, and says so."""

    one_at_a_time = True
    on_this_machine = True

    def __init__(self) -> None:
        self.calls: list[int] = []

    def map(self, fn: Any, cells: Any, workdir: Path) -> Any:
        self.calls.append(len(cells))
        for cell in cells:
            yield fn(cell, workdir)


def test_the_driver_asks_the_executor_how_it_runs_cells(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from robcomp.experiments import driver

    def instant(cell: Any, workdir: Path) -> CellResult:
        return CellResult(cell.cell_id, "tiny", {}, cell.grid_values)

    monkeypatch.setattr(driver, "run_cell", instant)
    raw = {
        "name": "order",
        "data": {"name": "digits"},
        "model": {"name": "tiny_mlp", "options": {"hidden": 8}},
        "grid": {"compress": [{"name": "magnitude", "sparsity": s} for s in (0.1, 0.2, 0.3)]},
    }
    executor = _InOrder()
    summary = run_experiment(load_experiment(raw), tmp_path, executor=executor)
    # claimed and run one cell at a time, as the local executor's are
    assert summary.ran == 3 and executor.calls == [1, 1, 1]


def test_evaluate_says_its_defaults_and_takes_shifts(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from robcomp.cli import app

    runner = CliRunner()
    help_text = runner.invoke(app, ["evaluate", "--help"], terminal_width=200).output
    assert "pgd:eps=0.1" in help_text and "1000" in help_text and "--shift" in help_text
    out = tmp_path / "model"
    args = ["--data", "digits", "--model", "tiny_mlp", "--epochs", "1", "--out", str(out)]
    assert runner.invoke(app, ["train", *args]).exit_code == 0
    result = runner.invoke(
        app,
        ["evaluate", str(out), "--attack", PGD2, "--shift", "corruptions:severities=[1]",
         "--limit", "30"],
        terminal_width=200,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "30 attacked" in result.output and "pgd2-linf" in result.output
    assert "shifted test splits" in result.output and "gaussian_noise" in result.output
    result = runner.invoke(app, ["evaluate", str(out), "--shift", "no-such-shift"])
    assert result.exit_code == 2 and "no-such-shift" in result.output
