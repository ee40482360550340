"""Cell identity by content, operational fields left out, and the compressed-model cache."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from robcomp.compress import COMPRESSORS
from robcomp.config import build_component
from robcomp.data.base import DataSplits
from robcomp.experiments import STORE_NAME, ResultStore, load_experiment, run_experiment
from robcomp.experiments import runner as runner_module
from robcomp.experiments.cache import compressed_model
from robcomp.experiments.spec import CellConfig, resolve
from robcomp.models import Classifier, create, save_checkpoint


def _cell_id(raw: dict[str, Any]) -> str:
    return resolve(raw, "test").cell_id()


def _save_mlp(folder: Path, seed: int) -> None:
    torch.manual_seed(seed)
    spec = {"name": "tiny_mlp", "num_classes": 10, "in_shape": [1, 8, 8]}
    save_checkpoint(create("tiny_mlp", 10, (1, 8, 8)), folder, spec)


def test_a_teacher_rewritten_in_place_gives_new_ids(tmp_path: Path) -> None:
    teacher = tmp_path / "teacher"
    _save_mlp(teacher, seed=0)
    raw = {"train": {"objective": {"name": "kd", "teacher": str(teacher)}}}
    before = _cell_id(raw)
    assert _cell_id(raw) == before
    _save_mlp(teacher, seed=1)  # retrained, same folder
    assert _cell_id(raw) != before
    # By content, not by path: the same checkpoint elsewhere is the same cell.
    copy = tmp_path / "elsewhere"
    _save_mlp(copy, seed=1)
    assert _cell_id({"train": {"objective": {"name": "kd", "teacher": str(copy)}}}) == _cell_id(raw)


def test_weights_and_ensemble_members_are_hashed_by_content(tmp_path: Path) -> None:
    weights = tmp_path / "w.safetensors"
    net = create("tiny_mlp", 10, (1, 8, 8))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    raw = {"model": {"name": "tiny_mlp", "weights": str(weights)}}
    first = _cell_id(raw)
    save_file({k: v.contiguous() + 1 for k, v in net.state_dict().items()}, str(weights))
    assert _cell_id(raw) != first

    member = tmp_path / "member"
    _save_mlp(member, seed=0)
    ensemble = {"model": {"name": "ensemble", "options": {"members": [{"weights": str(member)}]}}}
    before = _cell_id(ensemble)
    _save_mlp(member, seed=1)
    assert _cell_id(ensemble) != before


def test_operational_fields_leave_the_id_unchanged() -> None:
    base = {"data": {"name": "mnist"}, "evaluate": {"latency_repeats": 20}}
    same = [
        {"data": {"name": "mnist", "root": "/somewhere/else"}},
        {"data": {"name": "mnist", "download": True}},
        {"data": {"name": "mnist"}, "evaluate": {"latency_repeats": 3}},
        {"data": {"name": "mnist"}, "trust_code": True},
    ]
    assert {_cell_id(raw) for raw in same} == {_cell_id(base)}
    assert _cell_id({"data": {"name": "mnist", "train_limit": 100}}) != _cell_id(base)
    assert _cell_id({"data": {"name": "mnist"}, "evaluate": {"limit": 7}}) != _cell_id(base)


def _grid(attacks: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": "cache",
        "data": {"name": "digits", "train_limit": 300},
        "model": {"name": "tiny_cnn"},
        "train": {"epochs": 2, "lr": 0.05, "batch_size": 64},
        "finetune": {"epochs": 1, "lr": 0.01, "batch_size": 64},
        "evaluate": {"attacks": attacks, "limit": 50, "latency_batch_sizes": []},
        "grid": {"compress": [{"name": "magnitude", "sparsity": 0.5},
                              {"name": "l1-filter", "ratio": 0.5}]},
    }  # fmt: skip


@pytest.mark.slow
def test_adding_an_attack_reruns_only_the_evaluation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fgsm = {"name": "fgsm", "eps": 0.1}
    first = run_experiment(load_experiment(_grid([fgsm])), tmp_path)
    assert first.failed == [] and first.ran == 2

    def must_not_run(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("compressed or fine-tuned again")

    monkeypatch.setattr(runner_module, "compress_and_finetune", must_not_run)
    monkeypatch.setattr(runner_module, "fit", must_not_run)
    second = run_experiment(load_experiment(_grid([fgsm, {"name": "pgd", "eps": 0.1}])), tmp_path)
    assert second.failed == [] and second.ran == 2  # new cells, evaluated from the cache
    runs = ResultStore(tmp_path / STORE_NAME).runs()
    # The cached model gives the first run's numbers, bit for bit.
    by_method: dict[str, list[dict[tuple[str, str], Any]]] = {}
    for run in runs:
        values = {(m.name, m.attack): m.value for m in run.metrics if not m.is_timing}
        by_method.setdefault(run.info["compressor"], []).append(values)
    for old, new in by_method.values():
        shared = old.keys() & new.keys()
        assert ("robust_accuracy", "fgsm-linf") in shared
        assert {k: old[k] for k in shared} == {k: new[k] for k in shared}


def _cfg(compress: dict[str, Any], finetune: dict[str, Any] | None = None) -> CellConfig:
    return resolve({"compress": compress, "finetune": finetune}, "test")


@pytest.mark.parametrize(
    "compress",
    [
        {"name": "magnitude", "sparsity": 0.5},
        {"name": "l1-filter", "ratio": 0.5},  # channels removed: layers resized on reload
        {"name": "distill", "student": "tiny_mlp", "train": {"epochs": 1, "batch_size": 64}},
    ],
    ids=lambda c: c["name"],
)
def test_a_reloaded_compressed_model_gives_identical_outputs(
    compress: dict[str, Any], tmp_path: Path, digits: DataSplits, trained_cnn: Classifier
) -> None:
    cfg = _cfg(compress)
    compressor = build_component(COMPRESSORS, compress, "compress")
    model, record, _ = compressed_model(
        cfg, compressor, trained_cnn, digits, tmp_path,
        produce=lambda: runner_module.compress_and_finetune(cfg, compressor, trained_cnn, digits),
    )  # fmt: skip

    def fail() -> Any:
        raise AssertionError("not cached")

    again, record_again, _ = compressed_model(
        cfg, compressor, trained_cnn, digits, tmp_path, produce=fail
    )
    assert again is not model and record_again == record
    x, _ = digits.test.tensors()
    with torch.no_grad():
        assert torch.equal(again.eval()(x), model.eval()(x))


def test_models_that_cannot_be_rebuilt_are_not_cached_and_the_log_says_why(
    tmp_path: Path, digits: DataSplits, trained_cnn: Classifier, caplog: pytest.LogCaptureFixture
) -> None:
    compress = {"name": "lowbit", "bits": 4}  # quantizer wrappers: not the baseline's structure
    cfg = _cfg(compress)
    compressor = build_component(COMPRESSORS, compress, "compress")
    calls: list[int] = []

    def produce() -> Any:
        calls.append(1)
        return runner_module.compress_and_finetune(cfg, compressor, trained_cnn, digits)

    with caplog.at_level(logging.INFO, logger="robcomp.experiments.cache"):
        for _ in range(2):
            compressed_model(cfg, compressor, trained_cnn, digits, tmp_path, produce=produce)
    assert len(calls) == 2
    assert "not cached" in caplog.text
    assert not any((tmp_path / d.name / "complete").exists() for d in tmp_path.iterdir())
