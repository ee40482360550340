"""Every invalid value is found when the experiment is loaded, before any cell runs, and every
mistake a user can fix (bad data, a corrupt checkpoint, a wrong output folder) is one line."""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from robcomp.attacks import ATTACKS
from robcomp.attacks.base import LIBRARIES
from robcomp.cli import app
from robcomp.compress import COMPRESSORS
from robcomp.config import ConfigError
from robcomp.data import DATASETS
from robcomp.evaluate import SHIFTS
from robcomp.experiments import load_experiment
from robcomp.experiments.store import RunRow
from robcomp.models import MODELS
from robcomp.train import OBJECTIVES

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]

# One invalid setting per registered component: (required fields, the bad field, its value).
# Each of these was accepted by an earlier version, or is a value no run can use.
BAD: dict[str, dict[str, tuple[dict[str, Any], str, Any]]] = {
    "attack": {
        "apgd-ce": ({}, "eps", ".inf"),
        "apgd-dlr": ({}, "eps", -0.1),
        "apgd-t": ({}, "eps", ".inf"),
        "autoattack": ({}, "eps", ".inf"),
        "cw": ({}, "stepsize", 0.0),
        "ddn": ({}, "gamma", 1.5),
        "deepfool": ({}, "candidates", 1),
        "ead": ({}, "regularization", -1.0),
        "fab-t": ({}, "beta", 0.0),
        "fgsm": ({}, "eps", -1),
        "fmn": ({}, "max_stepsize", 0.0),
        "pgd": ({}, "step_size", -0.01),
        "salt-and-pepper": ({}, "steps", 0),
        "square": ({}, "eps", ".inf"),
        "on-manifold": ({}, "step_size", -0.01),
    },
    "compressor": {
        "admm": ({"sparsity": 0.5}, "rho_growth", ".inf"),
        "binary": ({}, "batch_size", 0),
        "distill": ({"student": "tiny_mlp"}, "tau", ".inf"),
        "gradual": ({"sparsity": 0.5}, "steps", 0),
        "hydra": ({}, "sparsity", 1.5),
        "int8": ({}, "calibration_batches", 0),
        "l1-filter": ({}, "ratio", 1.5),
        "lowbit": ({}, "calibration_batches", 0),
        "magnitude": ({}, "sparsity", -0.5),
        "none": ({}, "sparsity", 0.5),
        "proximal-l0": ({}, "sparsity", 1.0),
        "random": ({}, "sparsity", 2.0),
    },
    "objective": {
        "ard": ({"teacher": "t"}, "tau", ".inf"),
        "ce": ({}, "label_smoothing", -0.1),
        "fast-at": ({}, "eps", -1.0),
        "fgsm-at": ({}, "alpha", 2.0),
        "iad-i": ({"teacher": "t"}, "beta", ".inf"),
        "iad-ii": ({"teacher": "t", "natural_teacher": "t"}, "tau", ".inf"),
        "kd": ({"teacher": "t"}, "tau", ".inf"),
        "mixed": ({}, "steps", 0),
        "pgd-at": ({}, "steps", 0),
        "rslad": ({"teacher": "t"}, "scale", ".inf"),
        "trades": ({}, "beta", -1.0),
        "mc-at-on": ({}, "eta", -1.0),
        "mc-at-off": ({}, "steps", 0),
        "mc-at-dual": ({}, "on_steps", 0),
        "mc-trades": ({}, "beta", -1.0),
    },
    "dataset": {
        "cifar10": ({}, "train_limit", 0),
        "cifar100": ({}, "val_fraction", 1.0),
        "digits": ({}, "test_fraction", 0.0),
        "fashion-mnist": ({}, "test_limit", -5),
        "gaussians": ({}, "n", 0),
        "mnist": ({}, "val_fraction", -0.1),
        "npz": ({"path": "x.npz"}, "num_classes", 1),
        "svhn": ({}, "train_limit", 0),
        "usps": ({}, "train_limit", 0),
        "mnist-m": ({}, "test_fraction", 0.0),
        "domain": ({"source": "digits"}, "split_seed", -1),
        "imagefolder": ({"root": "x", "source": "a"}, "size", 0),
        "basicmotions": ({}, "val_fraction", 1.0),
        "uci-har": ({}, "train_limit", 0),
    },
    "shift": {
        "corruptions": ({}, "severities", [6]),
        "domains": ({}, "targets", "usps"),
        "manifold-sets": ({}, "eps", -0.3),
    },
}
REGISTRIES = {
    "attack": ATTACKS,
    "compressor": COMPRESSORS,
    "objective": OBJECTIVES,
    "dataset": DATASETS,
    "model": MODELS,
    "shift": SHIFTS,
}
CASES = [(kind, name) for kind, names in BAD.items() for name in names] + [
    ("model", name) for name in MODELS.names()
]


def _base(**sections: Any) -> dict[str, Any]:
    return {
        "name": "v",
        "data": {"name": "digits", "train_limit": 200},
        "model": {"name": "tiny_mlp"},
        "train": {"epochs": 1, "lr": 0.05, "batch_size": 64},
        "compress": {"name": "none"},
        "evaluate": {
            "attacks": [{"name": "pgd", "eps": 0.1, "steps": 2}],
            "limit": 20,
            "diagnostics": False,
            "latency_batch_sizes": [],
        },
    } | sections


def _with_bad(kind: str, name: str) -> tuple[dict[str, Any], str]:
    if kind == "model":
        return _base(model={"name": name, "options": {"no_such_option": 1}}), "no_such_option"
    required, field, value = BAD[kind][name]
    spec = {"name": name, **required, field: yaml.safe_load(str(value))}
    if kind == "attack":
        evaluate = _base()["evaluate"] | {"attacks": [{"eps": 0.1} | spec]}
        return _base(evaluate=evaluate), field
    if kind == "compressor":
        return _base(compress=spec), field
    if kind == "objective":
        return _base(train=_base()["train"] | {"objective": spec}), field
    if kind == "shift":
        return _base(evaluate=_base()["evaluate"] | {"shifts": [spec]}), field
    return _base(data=spec), field


@pytest.mark.parametrize("kind", list(REGISTRIES))
def test_every_registered_component_has_a_bad_value_case(kind: str) -> None:
    covered = {name for k, name in CASES if k == kind}
    assert covered == set(REGISTRIES[kind].names()), "add the new component to BAD"


@pytest.mark.parametrize(("kind", "name"), CASES)
def test_bad_values_fail_when_the_file_is_loaded(kind: str, name: str) -> None:
    raw, field = _with_bad(kind, name)
    with pytest.raises(ConfigError, match=field) as info:
        load_experiment(raw)
    assert "<experiment>" in str(info.value)  # names the file (here: an in-memory mapping)


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("evaluate.limit", 0, "limit must be >= 1"),
        ("evaluate.limit", -5, "limit must be >= 1"),
        ("evaluate.attacks", [{"name": "fgsm", "eps": "8/0"}], "divides by zero"),
        ("evaluate.attacks", [{"name": "pgd", "eps": float("nan")}], "got nan"),
        ("evaluate.batch_size", 0, "batch_size must be >= 1"),
        ("train.lr", float("inf"), "lr must be a finite number"),
        ("train.momentum", -0.5, "momentum must be"),
    ],
)
def test_run_settings_fail_when_the_file_is_loaded(key: str, value: Any, words: str) -> None:
    section, field = key.split(".")
    raw = _base()
    raw[section] = raw[section] | {field: value}
    with pytest.raises(ConfigError, match=words):
        load_experiment(raw)


def test_attack_libraries_are_in_the_base_install() -> None:
    """The quickstart runs DDN (Foolbox); `pip install -e .` alone must give its library."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert set(LIBRARIES.values()) <= set(project["dependencies"])
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q -e . " in ci and "quickstart --quick" in ci


def test_a_missing_attack_library_fails_at_load_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "foolbox", None)  # as if not installed
    # ddn wraps Foolbox (square and fab-t are native and need no library).
    raw = _base(evaluate=_base()["evaluate"] | {"attacks": [{"name": "ddn"}]})
    with pytest.raises(ConfigError, match=r"needs foolbox.*pip install 'foolbox=="):
        load_experiment(raw)
    result = runner.invoke(app, ["quickstart", "--quick", "--out", "unused"])
    assert result.exit_code == 2, result.output
    assert _one_line(result.output) and "attacks[" in result.output
    assert not Path("unused").exists()
    from robcomp.models import create, save_checkpoint

    spec = {"name": "tiny_mlp", "num_classes": 10, "in_shape": [1, 8, 8], "options": {}}
    folder = save_checkpoint(create("tiny_mlp", 10, (1, 8, 8)), tmp_path / "ckpt", spec)
    result = runner.invoke(app, ["evaluate", str(folder), "--data", "digits", "--attack", "ddn"])
    assert result.exit_code == 2 and _one_line(result.output), result.output
    assert "needs foolbox" in result.output


def _one_line(output: str) -> bool:
    """One ``error:`` line, and nothing else but the run's header (``NAME: N cells -> OUT``)."""
    lines = [line for line in output.splitlines() if line.strip() and " cells -> " not in line]
    return len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in output


def _run(tmp_path: Path, raw: dict[str, Any], *extra: str, name: str = "exp.yaml") -> Any:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return runner.invoke(app, ["run", str(path), "--out", str(tmp_path / "out"), *extra])


def _npz(tmp_path: Path, name: str = "d.npz", **arrays: Any) -> str:
    rng = np.random.default_rng(0)
    default = {
        "x": rng.random((60, 1, 4, 4), dtype=np.float32),
        "y": np.arange(60, dtype=np.int64) % 3,
    }
    path = tmp_path / name
    np.savez(path, **(default | arrays))
    return str(path)


DATA_PROBLEMS = {
    "missing npz": (lambda p: {"path": str(p / "nope.npz")}, "no file"),
    "wrong x_key": (lambda p: {"path": _npz(p), "x_key": "images"}, "no array 'images'"),
    "float labels": (
        lambda p: {"path": _npz(p, y=np.zeros(60, dtype=np.float32))},
        "labels 'y' are float32",
    ),
    "labels out of range": (
        lambda p: {"path": _npz(p), "num_classes": 2},
        r"range over \[0, 2\] but must lie in \[0, 1\]",
    ),
    "empty npz": (
        lambda p: {"path": _npz(p, x=np.zeros((0, 4), np.float32), y=np.zeros(0, np.int64))},
        "at least one",
    ),
    "a .npy path": (
        lambda p: (np.save(p / "x.npy", np.zeros((4, 4))), {"path": str(p / "x.npy")})[1],
        r"\.npy file",
    ),
    "NaN pixels": (
        lambda p: {"path": _npz(p, x=np.full((60, 1, 4, 4), np.nan, np.float32))},
        "NaN",
    ),
    "not an npz": (
        lambda p: ((p / "bad.npz").write_text("hello"), {"path": str(p / "bad.npz")})[1],
        "not a readable .npz",
    ),
}


@pytest.mark.parametrize("problem", list(DATA_PROBLEMS))
def test_data_problems_are_one_line_before_any_cell(tmp_path: Path, problem: str) -> None:
    options, words = DATA_PROBLEMS[problem]
    raw = _base(data={"name": "npz", **options(tmp_path)})
    result = _run(tmp_path, raw)
    assert result.exit_code == 2, result.output
    assert _one_line(result.output), result.output
    assert __import__("re").search(words, result.output), result.output
    assert not (tmp_path / "out" / "results.sqlite").exists()  # no cell ran


@pytest.mark.parametrize(
    ("model", "words"),
    [
        ({"name": "small_cnn"}, "needs at least 1 channel and 16x16 pixels"),  # digits are 8x8
        ({"name": "tiny_mlp", "options": {"hidden": -1}}, "negative dimension"),
    ],
)
def test_models_that_cannot_be_built_fail_before_any_cell(
    tmp_path: Path, model: dict[str, Any], words: str
) -> None:
    result = _run(tmp_path, _base(model=model))
    assert result.exit_code == 2 and _one_line(result.output), result.output
    assert words in result.output
    assert not (tmp_path / "out" / "results.sqlite").exists()


def test_missing_mnist_is_one_line(tmp_path: Path) -> None:
    raw = _base(data={"name": "mnist", "root": str(tmp_path)})
    result = _run(tmp_path, raw)
    assert result.exit_code == 2 and _one_line(result.output), result.output
    assert "download: true" in result.output


def test_brackets_in_messages_survive(tmp_path: Path) -> None:
    """rich must not read "[attacks]" in a message as markup (it ate a pip hint once)."""
    result = _run(tmp_path, _base(trian={}), name="exp[attacks].yaml")
    assert result.exit_code == 2 and "exp[attacks].yaml" in result.output, result.output


def test_corrupt_checkpoint_files_are_named_in_one_line(tmp_path: Path) -> None:
    from robcomp.models import create, save_checkpoint

    model = create("tiny_mlp", 10, (1, 8, 8))
    spec = {"name": "tiny_mlp", "num_classes": 10, "in_shape": [1, 8, 8], "options": {}}
    folder = save_checkpoint(model, tmp_path / "ckpt", spec)
    args = ["evaluate", str(folder), "--data", "digits", "--limit", "5"]
    (folder / "model.safetensors").write_bytes(b"not safetensors at all")
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and _one_line(result.output), result.output
    assert "model.safetensors" in result.output
    (folder / "spec.json").write_text("{ not json")
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and _one_line(result.output), result.output
    assert "spec.json" in result.output


def test_ctrl_c_says_how_to_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import robcomp.experiments

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(robcomp.experiments, "run_experiment", interrupted)
    result = _run(tmp_path, _base())
    assert result.exit_code == 130
    assert "interrupted; rerun the same command to resume" in result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_another_experiment_into_the_same_out_needs_append(tmp_path: Path) -> None:
    first = _run(tmp_path, _base(name="first"))
    assert first.exit_code == 0, first.output
    again = _run(tmp_path, _base(name="first"))
    assert again.exit_code == 0 and "ran 0 cells, skipped 1" in again.output
    other = _run(tmp_path, _base(name="second"))
    assert other.exit_code == 2 and _one_line(other.output), other.output
    assert "'first'" in other.output and "--append" in other.output
    appended = _run(tmp_path, _base(name="second"), "--append")
    assert appended.exit_code == 0, appended.output
    rows = json.loads((tmp_path / "out" / "report" / "leaderboard.json").read_text())
    assert len(rows) == 2


def test_training_curves_are_labelled_by_every_varying_axis() -> None:
    from robcomp.report.plots import _training_curves

    def run(seed: int, sparsity: float) -> RunRow:
        epochs = [{"epoch": 1, "loss": 1.0 + seed}]
        return RunRow(
            cell_id=f"c{seed}{sparsity}", experiment="e", status="done",
            config={"train": {"objective": {"name": "ce"}}, "model": {"name": "tiny_mlp"}},
            grid_values={"seed": seed, "compress.sparsity": sparsity},
            info={"baseline": {"history": {"epochs": epochs}}, "compressor": f"m-{sparsity}",
                  "finetune": {"epochs": epochs}},
            error=None, seconds=1.0, metrics=[],
        )  # fmt: skip

    curves = _training_curves([run(0, 0.5), run(1, 0.5), run(0, 0.9), run(1, 0.9)])
    assert "train tiny_mlp (ce) [seed=0]" in curves and "train tiny_mlp (ce) [seed=1]" in curves
    assert len([c for c in curves if c.startswith("train")]) == 2  # one per distinct baseline
    assert len([c for c in curves if c.startswith("fine-tune")]) == 4  # one per cell
    assert "fine-tune m-0.9 [seed=1] (ce)" in curves


@pytest.mark.slow
def test_quick_quickstart(tmp_path: Path) -> None:
    out = tmp_path / "qs"
    result = runner.invoke(app, ["quickstart", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "report" / "leaderboard.json").read_text())
    assert {r["compress"] for r in rows} == {"none", "magnitude-global-0.8", "int8"}
    assert all("square20-linf@0.1" in r and "ddn5-l2@0.5" in r for r in rows)
    assert (out / "report" / "robustness_vs_compression.png").stat().st_size > 10_000
