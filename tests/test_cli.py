"""The command line: every command has --help, works end to end, and reports user errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from robcomp.cli import app

runner = CliRunner()
COMMANDS = ["quickstart", "run", "train", "evaluate", "report", "list"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


@pytest.mark.slow
@pytest.mark.parametrize("module", ["robcomp", "robcomp.cli"])
def test_python_dash_m_runs_the_command(module: str) -> None:
    """`python -m robcomp.cli run ...` used to import the module and exit 0 having done nothing."""
    done = subprocess.run(
        [sys.executable, "-m", module, "list", "models"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "kwon_lenet" in done.stdout


def test_list_shows_registries() -> None:
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0
    for word in ("datasets", "digits", "resnet20", "pgd", "magnitude", "ce", "cifar-heavy"):
        assert word in result.output
    assert runner.invoke(app, ["list", "attacks"]).output.count("pgd") >= 1
    bad = runner.invoke(app, ["list", "atacks"])
    assert bad.exit_code == 2 and "unknown kind" in bad.output


def test_train_then_evaluate(tmp_path: Path) -> None:
    out = tmp_path / "model"
    args = ["--data", "digits", "--model", "tiny_cnn", "--epochs", "3", "--out", str(out)]
    result = runner.invoke(app, ["train", *args, "--set", "train.lr=0.05"])
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output
    for name in ("model.safetensors", "spec.json", "config.yaml", "history.json"):
        assert (out / name).is_file()
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["lr"] == 0.05
    assert len(json.loads((out / "history.json").read_text())["epochs"]) == 3
    result = runner.invoke(
        app, ["evaluate", str(out), "--attack", "pgd:eps=0.1,steps=5", "--attack", "fgsm:eps=8/255"]
    )
    assert result.exit_code == 0, result.output
    assert "pgd5-linf" in result.output and "fgsm-linf" in result.output


def test_user_errors_exit_2_with_a_message(tmp_path: Path) -> None:
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump({"name": "x", "train": {"epocs": 1}}))
    result = runner.invoke(app, ["run", str(exp), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "unknown key 'epocs'" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["run", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "no such experiment file" in result.output
    assert "robust-pruning" in result.output  # it lists the shipped configs to choose from
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "no results here" in result.output
    result = runner.invoke(app, ["train", "--data", "mnist", "--set", "data.root=" + str(tmp_path)])
    assert result.exit_code == 2 and "download: true" in result.output


@pytest.mark.slow
def test_run_resume_and_report(tmp_path: Path) -> None:
    exp = tmp_path / "exp.yaml"
    exp.write_text(
        yaml.safe_dump(
            {
                "name": "cli-test",
                "data": {"name": "digits", "train_limit": 300},
                "model": {"name": "tiny_mlp"},
                "train": {"epochs": 2, "lr": 0.05, "batch_size": 64},
                "compress": {"name": "magnitude", "sparsity": 0.0},
                "evaluate": {"attacks": [{"name": "pgd", "eps": 0.1, "steps": 3}], "limit": 40},
                "grid": {"compress.sparsity": [0.0, 0.8]},
            }
        )
    )
    out = tmp_path / "out"
    first = runner.invoke(app, ["run", str(exp), "--out", str(out)])
    assert first.exit_code == 0, first.output
    assert "ran 2 cells" in first.output
    second = runner.invoke(app, ["run", str(exp), "--out", str(out)])
    assert "ran 0 cells, skipped 2" in second.output
    third = runner.invoke(app, ["run", str(exp), "--out", str(out), "--set", "train.epochs=3"])
    assert "ran 2 cells, skipped 0" in third.output  # a changed config is a new cell
    report = runner.invoke(app, ["report", str(out)])
    assert report.exit_code == 0 and "leaderboard" in report.output
    with (out / "report" / "leaderboard.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and "pgd3-linf@0.1" in rows[0]
    assert (out / "report" / "robustness_vs_compression.png").stat().st_size > 10_000


@pytest.mark.slow
def test_quickstart_shows_a_real_effect(tmp_path: Path) -> None:
    out = tmp_path / "qs"
    result = runner.invoke(app, ["quickstart", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = {r["compress"]: r for r in json.loads((out / "report" / "leaderboard.json").read_text())}
    assert set(rows) == {
        "none", "magnitude-global-0.5", "magnitude-global-0.8", "magnitude-global-0.9",
        "l1-filter-0.5", "distill-tiny_mlp", "int8",
    }  # fmt: skip
    dense, sparse = rows["none"], rows["magnitude-global-0.9"]
    assert dense["clean_accuracy"] > 0.9
    attacks = ("pgd10-linf@0.05", "apgd-ce20-linf@0.05", "square1000-linf@0.05", "ddn50-l2@0.5")
    for column in attacks[:3]:
        # robust accuracy changes with sparsity: 90% pruning costs robustness here
        assert sparse[column] < dense[column] - 0.1, (column, sparse[column], dense[column])
    for row in rows.values():
        assert all(0.0 <= row[c] <= row["clean_accuracy"] for c in attacks)
        assert row["masking_flags"] == "none", row["masking"]
        assert row["latency_ms_b1"] > 0 and row["macs"] > 0 and row["size_bytes"] > 0
    # the compressed models really are smaller, each in its own way
    assert rows["l1-filter-0.5"]["macs"] < 0.5 * dense["macs"]
    assert rows["distill-tiny_mlp"]["params"] < 0.6 * dense["params"]
    assert rows["int8"]["size_bytes"] < 0.35 * dense["size_bytes"]
    (routes,) = [
        r for r in rows["int8"]["gradient_free"] if (r["attack"], r["eps"]) == ("pgd10-linf", 0.05)
    ]
    assert set(routes["per_route"]) == {"bpda", "transfer", "black-box"}
    for header in ("via", "masking?", "ms b1", "MACs"):
        assert header in result.output
    assert (out / "report" / "robustness_vs_compression.png").is_file()


def test_shipped_configs_validate_and_run_by_name(tmp_path: Path) -> None:
    from robcomp.cli import _experiment_file, shipped_configs
    from robcomp.experiments import load_experiment

    configs = shipped_configs()
    assert {"quickstart", "robust-pruning", "robust-distillation", "robust-training"} <= set(
        configs
    )
    for name, path in configs.items():
        experiment = load_experiment(path)  # every cell validated: names, keys, types
        assert experiment.name == name and experiment.cells
    assert _experiment_file(Path("robust-pruning")) == configs["robust-pruning"]
    result = runner.invoke(app, ["run", "no-such-config", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "shipped:" in result.output
