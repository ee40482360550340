"""Devices: a cell's data moves in one place, models follow it, probes are made where the model
is, and a model that runs on the CPU only (int8) is evaluated there."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from robcomp.compress.efficiency import count_macs
from robcomp.compress.latency import latency
from robcomp.data.base import DataSplits
from robcomp.data.transforms import random_crop
from robcomp.experiments import STORE_NAME, ResultStore, load_experiment, run_experiment
from robcomp.models import create, model_device, resolve_device

CUDA = torch.cuda.is_available()


def _experiment(**overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "devices",
        "data": {"name": "digits", "train_limit": 200},
        "model": {"name": "tiny_cnn"},
        "train": {"epochs": 1, "batch_size": 64, "augment": "crop_flip"},
        "evaluate": {
            "attacks": [{"name": "pgd", "eps": 0.1, "steps": 3, "restarts": 2}],
            "limit": 40,
            "black_box_queries": 20,
            "diagnostics_points": 40,
            "latency_batch_sizes": [1],
            "latency_repeats": 2,
        },
        "grid": {"compress": [{"name": "none"}, {"name": "int8", "calibration_batches": 1}]},
    }
    raw.update(overrides)
    return raw


def test_auto_is_cuda_when_present(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


def test_device_is_checked_when_the_file_is_loaded_and_leaves_the_cell_id_alone() -> None:
    from robcomp.config import ConfigError

    with pytest.raises(ConfigError, match="device must be auto, cpu, cuda"):
        load_experiment({"name": "x", "device": "gpu0"})
    ids = {load_experiment({"name": "x", "device": d}).cells[0].cell_id for d in ("auto", "cpu")}
    assert len(ids) == 1  # operational: where a result is computed is not what it is


def test_data_moves_as_a_whole(digits: DataSplits) -> None:
    moved = digits.to("meta")
    assert moved.device == torch.device("meta")
    assert {s.x.device.type for s in (moved.train, moved.val, moved.test)} == {"meta"}
    assert {s.y.device.type for s in (moved.train, moved.val, moved.test)} == {"meta"}
    assert moved.train.x.dtype == digits.train.x.dtype  # uint8 stays compact
    assert digits.test.to("cpu") is digits.test  # no copy when already there
    assert (moved.mean, moved.std) == (digits.mean, digits.std)


def test_probes_are_created_on_the_models_device() -> None:
    model = create("tiny_cnn", 10, (1, 8, 8)).to("meta")
    assert model_device(model).type == "meta"
    # a CPU probe would raise "Tensor on device cpu is not on the expected device meta"
    assert latency(model, (1, 8, 8), batch_size=2, warmup=0, repeats=1).median_ms >= 0
    assert count_macs(model, (1, 8, 8)) == count_macs(create("tiny_cnn", 10, (1, 8, 8)), (1, 8, 8))


def test_crops_are_drawn_on_the_cpu_and_made_on_the_inputs_device() -> None:
    x = torch.rand(4, 1, 8, 8)
    cropped = random_crop(x.to("meta"), torch.Generator().manual_seed(0))
    assert cropped.device.type == "meta" and cropped.shape == x.shape


@pytest.mark.slow
def test_a_cell_moves_its_data_once_and_evaluates_int8_on_the_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    moves: list[torch.device] = []
    original = DataSplits.to

    def spy(self: DataSplits, device: torch.device | str) -> DataSplits:
        moves.append(torch.device(device))
        return original(self, device)

    monkeypatch.setattr(DataSplits, "to", spy)
    summary = run_experiment(load_experiment(_experiment(device="cpu")), tmp_path)
    assert summary.failed == []
    # per cell: once to the configured device, once to the evaluated model's (a no-op here)
    assert moves == [torch.device("cpu")] * 4
    for run in ResultStore(tmp_path / STORE_NAME).runs():
        assert run.info["device"] == "cpu"


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_a_grid_runs_on_the_gpu(tmp_path: Path) -> None:
    """PGD restarts, augmentation, BPDA on int8 (CPU-only kernels) and every probe, on CUDA."""
    summary = run_experiment(load_experiment(_experiment(device="cuda")), tmp_path / "gpu")
    assert summary.failed == []
    cells = sorted((tmp_path / "gpu" / "cells").glob("*/history.json"))
    devices = {json.loads(p.read_text())["device"] for p in cells}
    assert devices == {"cuda:0", "cpu"}  # the fp32 model on the GPU, int8 on the CPU


def test_train_and_evaluate_take_a_device(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from robcomp.cli import app

    runner = CliRunner()
    out = tmp_path / "m"
    args = ["train", "--data", "digits", "--model", "tiny_mlp", "--epochs", "1", "--out", str(out)]
    result = runner.invoke(app, [*args, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["evaluate", str(out), "--limit", "20", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["evaluate", str(out), "--device", "gpu0"])
    assert result.exit_code == 2 and "device must be auto, cpu, cuda" in result.output
