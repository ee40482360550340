"""Checkpoints never run code: a spec.json may name registered models only, unless trusted.

Every test plants a spec naming ``os:system`` with a command that would create a file, and
checks both the refusal and that the file was never created.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from robcomp.cli import app
from robcomp.compress import COMPRESSORS
from robcomp.config import build_component
from robcomp.data.base import DataSplits
from robcomp.experiments import STORE_NAME, ResultStore, load_experiment, run_experiment
from robcomp.models import (
    UntrustedCodeError,
    checkpoint_trust,
    create,
    load_checkpoint,
    save_checkpoint,
)
from robcomp.models.checkpoint import SPEC
from robcomp.train import OBJECTIVES

TRUSTED_CALLABLE = "robcomp.models.small:tiny_mlp"  # importable, harmless


def _spec(name: str, **options: Any) -> dict[str, Any]:
    return {"name": name, "num_classes": 10, "in_shape": [1, 8, 8], "options": options}


def _checkpoint(folder: Path, spec: dict[str, Any]) -> Path:
    """A genuine tiny_mlp checkpoint whose spec.json is then replaced by ``spec``."""
    save_checkpoint(create("tiny_mlp", 10, (1, 8, 8)), folder, _spec("tiny_mlp"))
    (folder / SPEC).write_text(json.dumps(spec))
    return folder


@pytest.fixture
def evil(tmp_path: Path) -> tuple[Path, Path]:
    """(checkpoint folder whose spec runs `touch PWNED`, the file that would prove it ran)."""
    proof = tmp_path / "PWNED"
    folder = _checkpoint(tmp_path / "evil", _spec("os:system", command=f"touch {proof}"))
    return folder, proof


@pytest.fixture
def evil_ensemble(tmp_path: Path) -> tuple[Path, Path]:
    """A registered model (ensemble) whose member, inside the spec's options, is os:system."""
    proof = tmp_path / "PWNED-member"
    member = {"name": "os:system", "options": {"command": f"touch {proof}"}}
    folder = _checkpoint(tmp_path / "evil-ensemble", _spec("ensemble", members=[member]))
    return folder, proof


def test_a_spec_naming_a_callable_is_refused_and_nothing_runs(evil: tuple[Path, Path]) -> None:
    folder, proof = evil
    with pytest.raises(UntrustedCodeError, match=r"spec\.json.*os:system.*--trust-code"):
        load_checkpoint(folder)
    assert not proof.exists()


def test_a_callable_nested_in_a_registered_models_options_is_refused(
    evil_ensemble: tuple[Path, Path],
) -> None:
    folder, proof = evil_ensemble
    with pytest.raises(UntrustedCodeError, match="os:system"):
        load_checkpoint(folder)
    assert not proof.exists()


def test_trust_is_explicit_and_never_widened_by_nesting(tmp_path: Path) -> None:
    folder = _checkpoint(tmp_path / "own", _spec(TRUSTED_CALLABLE))
    with pytest.raises(UntrustedCodeError):
        load_checkpoint(folder, trust_code={"other:callable"})
    assert load_checkpoint(folder, trust_code=True)[1]["name"] == TRUSTED_CALLABLE
    assert load_checkpoint(folder, trust_code={TRUSTED_CALLABLE})[1]["name"] == TRUSTED_CALLABLE
    with checkpoint_trust(True):
        load_checkpoint(folder)  # the user's --trust-code / trust_code: true
    # A checkpoint loaded while building an untrusted one (an ensemble member) is untrusted too.
    outer = _checkpoint(tmp_path / "outer", _spec("ensemble", members=[{"weights": str(folder)}]))
    with checkpoint_trust(True), pytest.raises(UntrustedCodeError):
        load_checkpoint(outer, trust_code=False)


def test_evaluate_cli_refuses_with_one_line(evil: tuple[Path, Path]) -> None:
    folder, proof = evil
    result = CliRunner().invoke(app, ["evaluate", str(folder), "--data", "digits"])
    assert result.exit_code == 2, result.output
    assert "os:system" in result.output and "--trust-code" in result.output
    assert "Traceback" not in result.output
    assert not proof.exists()


def test_teacher_of_a_distillation_objective_is_refused(
    evil: tuple[Path, Path], digits: DataSplits
) -> None:
    folder, proof = evil
    x, y = digits.test.head(4).tensors()
    for name in ("kd", "ard"):
        objective = build_component(OBJECTIVES, {"name": name, "teacher": str(folder)}, name)
        with pytest.raises(UntrustedCodeError, match="os:system"):
            objective(create("tiny_mlp", 10, (1, 8, 8)), x, y)
    assert not proof.exists()


def test_ensemble_member_is_refused(evil: tuple[Path, Path]) -> None:
    folder, proof = evil
    with pytest.raises(UntrustedCodeError, match="os:system"):
        create("ensemble", 10, (1, 8, 8), members=[{"weights": str(folder)}])
    assert not proof.exists()


def test_pretrained_student_is_refused(
    evil: tuple[Path, Path], digits: DataSplits, trained_cnn: torch.nn.Module
) -> None:
    folder, proof = evil
    spec = {"name": "distill", "student": "tiny_mlp", "pretrained_student": str(folder),
            "train": {"epochs": 1}}  # fmt: skip
    compressor = build_component(COMPRESSORS, spec, "compress")
    with pytest.raises(UntrustedCodeError, match="os:system"):
        compressor(trained_cnn, digits)
    assert not proof.exists()


def _cell(teacher: Path, **extra: Any) -> dict[str, Any]:
    return {
        "name": "trust",
        "data": {"name": "digits", "train_limit": 200},
        "model": {"name": "tiny_mlp"},
        "train": {"epochs": 1, "batch_size": 64,
                  "objective": {"name": "kd", "teacher": str(teacher)}},
        "evaluate": {"attacks": [{"name": "fgsm", "eps": 0.1}], "limit": 20, "diagnostics": False,
                     "latency_batch_sizes": []},
        **extra,
    }  # fmt: skip


def test_experiment_cells_refuse_unless_the_file_trusts_code(
    evil: tuple[Path, Path], tmp_path: Path
) -> None:
    folder, proof = evil
    summary = run_experiment(load_experiment(_cell(folder)), tmp_path / "out")
    assert len(summary.failed) == 1 and "UntrustedCodeError" in (summary.failed[0].error or "")
    assert not proof.exists()
    # A trusted callable runs once the experiment file says so (its code, its decision).
    own = _checkpoint(tmp_path / "own", _spec(TRUSTED_CALLABLE))
    refused = run_experiment(load_experiment(_cell(own)), tmp_path / "out2")
    assert len(refused.failed) == 1
    trusted = run_experiment(load_experiment(_cell(own, trust_code=True)), tmp_path / "out3")
    assert trusted.failed == []


def test_a_cached_baseline_of_the_users_own_callable_reloads(tmp_path: Path) -> None:
    raw = {
        "name": "own-callable",
        "data": {"name": "digits", "train_limit": 200},
        "model": {"name": TRUSTED_CALLABLE},
        "train": {"epochs": 1, "batch_size": 64},
        "evaluate": {"attacks": [{"name": "fgsm", "eps": 0.1}], "limit": 20, "diagnostics": False,
                     "latency_batch_sizes": []},
        # The second cell reloads the cached baseline.
        "grid": {"compress": [{"name": "none"}, {"name": "magnitude", "sparsity": 0.5}]},
    }  # fmt: skip
    summary = run_experiment(load_experiment(raw), tmp_path)
    assert summary.failed == [] and summary.ran == 2
    assert len(ResultStore(tmp_path / STORE_NAME).runs("done")) == 2
    # The cache trusts only the callables the cell's own config names, not a swapped spec.
    (baseline,) = (tmp_path / "cache").glob("baseline-*")
    spec = json.loads((baseline / SPEC).read_text())
    proof = tmp_path / "PWNED"
    swapped = {**spec, "name": "os:system", "options": {"command": f"touch {proof}"}}
    (baseline / SPEC).write_text(json.dumps(swapped))
    raw["evaluate"]["limit"] = 10  # new cells, same baseline
    again = run_experiment(load_experiment(raw), tmp_path)
    assert len(again.failed) == 2 and not proof.exists()


def test_an_untrusted_ensemble_member_is_refused_before_any_cell_runs(tmp_path: Path) -> None:
    own = _checkpoint(tmp_path / "own", _spec(TRUSTED_CALLABLE))
    raw = {
        "name": "trusted-ensemble",
        "data": {"name": "digits", "train_limit": 200},
        "model": {"name": "ensemble", "options": {"members": [{"weights": str(own)}]}},
        "train": {"epochs": 0},
        "evaluate": {"attacks": [{"name": "fgsm", "eps": 0.1}], "limit": 20, "diagnostics": False,
                     "latency_batch_sizes": []},
    }  # fmt: skip
    with pytest.raises(ValueError, match=TRUSTED_CALLABLE):
        run_experiment(load_experiment(raw), tmp_path / "refused")
    assert not (tmp_path / "refused" / "cells").exists()


def test_ensembles_of_checkpoints_run_when_their_members_may_load(tmp_path: Path) -> None:
    registered = tmp_path / "registered"
    save_checkpoint(create("tiny_mlp", 10, (1, 8, 8)), registered, _spec("tiny_mlp"))
    own = _checkpoint(tmp_path / "own", _spec(TRUSTED_CALLABLE))
    members = [{"weights": str(registered)}, {"weights": str(own)}]
    raw = {
        "name": "ensemble-of-checkpoints",
        "data": {"name": "digits", "train_limit": 200},
        "model": {"name": "ensemble", "options": {"members": members}},
        "train": {"epochs": 0},
        "trust_code": True,
        "evaluate": {"attacks": [{"name": "fgsm", "eps": 0.1}], "limit": 20, "diagnostics": False,
                     "latency_batch_sizes": []},
    }  # fmt: skip
    summary = run_experiment(load_experiment(raw), tmp_path / "out")
    assert summary.ran == 1 and not summary.failed
    store = ResultStore(tmp_path / "out" / STORE_NAME)
    (run,) = store.runs("done")
    clean = [m.value for m in run.metrics if m.name == "clean_accuracy"]
    assert len(clean) == 1 and 0.0 <= clean[0] <= 1.0


def test_run_cli_trusts_code_only_with_the_flag(tmp_path: Path) -> None:
    own = _checkpoint(tmp_path / "own", _spec(TRUSTED_CALLABLE))
    raw = _cell(own)  # a distillation teacher, loaded when training starts
    exp = tmp_path / "exp.yaml"
    exp.write_text(json.dumps(raw))  # JSON is YAML
    refused = CliRunner().invoke(app, ["run", str(exp), "--out", str(tmp_path / "a")])
    assert refused.exit_code != 0 and "--trust-code" in refused.output
    trusted = CliRunner().invoke(
        app, ["run", str(exp), "--out", str(tmp_path / "b"), "--trust-code"]
    )
    assert trusted.exit_code == 0, trusted.output
