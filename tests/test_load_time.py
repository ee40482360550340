"""Load time: every malformed experiment file is one line on stderr and exit 2, before any cell
runs and before anything is written; the file's own mistakes are found before torch loads."""

from __future__ import annotations

import subprocess
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from robcomp.cli import app
from robcomp.config import ConfigError, fields_of
from robcomp.experiments import CellConfig, load_experiment
from robcomp.experiments.driver import preflight
from robcomp.experiments.schema import CELL_SECTIONS, check_experiment

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _base(**sections: Any) -> dict[str, Any]:
    return {
        "name": "battery",
        "data": {"name": "digits", "train_limit": 200},
        "model": {"name": "tiny_mlp"},
        "train": {"epochs": 1, "lr": 0.05, "batch_size": 64},
        "evaluate": {
            "attacks": [{"name": "pgd", "eps": 0.1, "steps": 2}],
            "limit": 20,
            "diagnostics": False,
            "latency_batch_sizes": [],
        },
    } | sections


def _attack(**fields: Any) -> dict[str, Any]:
    """The base with one attack instead of its PGD."""
    base = _base()
    return base | {"evaluate": base["evaluate"] | {"attacks": [fields]}}


def _evaluate(**fields: Any) -> dict[str, Any]:
    base = _base()
    return base | {"evaluate": base["evaluate"] | fields}


def _npz(folder: Path, x: np.ndarray) -> str:
    path = folder / "d.npz"
    np.savez(path, x=x, y=np.arange(len(x), dtype=np.int64) % 3)
    return str(path)


def _series(folder: Path) -> dict[str, Any]:
    """1-D sensor-like series: 3 channels of 32 samples."""
    x = np.random.default_rng(0).random((60, 3, 32), dtype=np.float32)
    return {"name": "npz", "path": _npz(folder, x)}


def _corruptions(severities: list[Any]) -> dict[str, Any]:
    return _evaluate(
        shifts=[{"name": "corruptions", "corruptions": ["fog"], "severities": severities}]
    )


# name -> (the file: a mapping, or its text, given the test's folder; words of the message)
Case = tuple[Callable[[Path], dict[str, Any] | str], str]
BATTERY: dict[str, Case] = {
    "unknown top-level key": (lambda p: _base(trian={"epochs": 1}), "did you mean 'train'"),
    "unknown evaluate key": (lambda p: _evaluate(limt=10), "did you mean 'limit'"),
    "unknown attack option": (
        lambda p: _attack(name="pgd", eps=0.1, stpes=2),
        "did you mean 'steps'",
    ),
    "seed not an int": (lambda p: _base(seed="abc"), "expected int, got 'abc'"),
    "epochs not an int": (lambda p: _base(train={"epochs": "ten"}), "expected int, got 'ten'"),
    "attacks not a list": (lambda p: _evaluate(attacks="pgd"), "expected tuple"),
    "negative eps": (lambda p: _attack(name="pgd", eps=-0.1), "eps must be"),
    "NaN eps": (lambda p: "name: x\nevaluate: {attacks: [{name: pgd, eps: .nan}]}\n", "nan"),
    "Linf eps over the whole range": (
        lambda p: _attack(name="pgd", eps=2, steps=2),
        "covers every input",
    ),
    "L2 eps at the diameter": (  # digits are 1x8x8: sqrt(64) = 8
        lambda p: _attack(name="pgd", eps=8, norm="l2", steps=2),
        "l2 diameter 8",
    ),
    "adversarial training over the whole range": (
        lambda p: _base(train={"epochs": 1, "objective": {"name": "pgd-at", "eps": 1.5}}),
        "train.objective",
    ),
    "limit 0": (lambda p: _evaluate(limit=0), "limit must be >= 1"),
    "negative limit": (lambda p: _evaluate(limit=-5), "limit must be >= 1"),
    "severity 0": (lambda p: _corruptions([0]), "severities"),
    "severity 6": (lambda p: _corruptions([6]), "severities"),
    "severity a string": (lambda p: _corruptions(["high"]), "expected int, got 'high'"),
    "missing data file": (
        lambda p: _base(data={"name": "npz", "path": str(p / "nope.npz")}),
        "no file",
    ),
    "NaN in the npz": (
        lambda p: _base(data={"name": "npz", "path": _npz(p, np.full((60, 1, 4, 4), np.nan))}),
        "NaN",
    ),
    "YAML: unclosed flow mapping": (
        lambda p: "name: x\ndata: {name: digits\nmodel: {name: tiny_mlp}\n",
        "not valid YAML: line 3",
    ),
    "YAML: a tab": (lambda p: "name: x\ngrid:\n\tseed: [1]\n", "not valid YAML: line 3"),
    "empty file": (lambda p: "", "the file is empty"),
    "comments only": (lambda p: "# nothing yet\n\n", "the file is empty"),
    "top level a list": (lambda p: "- name: x\n", "must be a mapping"),
    "device cuda without a GPU": (lambda p: _base(device="cuda"), "no CUDA GPU"),
    "device cuda:1 without a GPU": (lambda p: _base(device="cuda:1"), "no CUDA GPU"),
    "device nonsense": (lambda p: _base(device="gpu0"), "device must be auto, cpu, cuda"),
    "device unknown type": (lambda p: _base(device="gpu"), "device must be auto, cpu, cuda"),
    "threads 0": (lambda p: _base(threads=0), "threads must be >= 1"),
    "negative threads": (lambda p: _base(threads=-2), "threads must be >= 1"),
    "corruptions on 1-D series": (
        lambda p: _corruptions([1]) | {"data": _series(p)},
        "corruptions take NCHW images",
    ),
    "corruptions on 4x4 images": (
        lambda p: (
            _corruptions([1])
            | {"data": {"name": "npz", "path": _npz(p, np.zeros((60, 1, 4, 4), np.float32))}}
        ),
        "inputs are 1x4x4",
    ),
    "grid value not a list": (lambda p: _base(grid={"seed": 3}), "non-empty list"),
}


def _write(folder: Path, content: dict[str, Any] | str) -> Path:
    path = folder / "exp.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return path


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine, as far as torch can tell, has no CUDA GPU (as on the CI machine)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_the_battery_has_the_cases_the_issue_lists() -> None:
    assert len(BATTERY) >= 25


@pytest.mark.usefixtures("no_gpu")
@pytest.mark.parametrize("case", list(BATTERY))
def test_a_malformed_file_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, case: str) -> None:
    content, words = BATTERY[case]
    path = _write(tmp_path, content(tmp_path))
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(path), "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert words in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not result.stdout.strip()  # not even the run's header: the error is the only line
    assert not out.exists()  # no folder, no store, no cells


@pytest.mark.usefixtures("no_gpu")
def test_cells_on_a_cluster_are_not_held_to_this_machines_devices() -> None:
    """A Ray cluster's nodes have their own GPUs: only cells run here must fit this machine."""
    cells = load_experiment(_base(device="cuda")).cells
    preflight(cells, "exp.yaml", devices=False)
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        preflight(cells, "exp.yaml")


def test_the_default_output_folder_is_not_created_either(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, _evaluate(limit=0))
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2 and not (tmp_path / "runs").exists(), result.output


def test_the_light_pass_knows_every_section_of_a_cell() -> None:
    """check_experiment's view of a cell must not drift from CellConfig (a new key would be
    refused as unknown before torch loads, a removed one accepted)."""
    hints = typing.get_type_hints(CellConfig)
    assert set(CELL_SECTIONS) == set(fields_of(CellConfig))
    for key, hint in CELL_SECTIONS.items():
        if key not in ("train", "finetune"):  # TrainConfig needs torch: checked as a mapping
            assert hint == hints[key], key


@pytest.mark.parametrize(
    "raw",
    [
        _base(),
        _base(grid={"compress": [{"name": "none"}, {"name": "magnitude", "sparsity": 0.5}]}),
        _evaluate(transfer={"sources": ["none"], "attack": {"name": "pgd", "eps": 0.1}}),
    ],
)
def test_the_light_pass_accepts_what_the_full_load_accepts(raw: dict[str, Any]) -> None:
    assert check_experiment(raw) == load_experiment(raw).name == "battery"


def test_shipped_configs_pass_the_light_check() -> None:
    for path in sorted((ROOT / "src/robcomp/configs").glob("*.yaml")):
        assert check_experiment(path) == load_experiment(path).name, path


def test_an_empty_file_is_not_a_default_experiment(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="the file is empty"):
        load_experiment(_write(tmp_path, ""))


def _robcomp(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``robcomp ARGS`` in a fresh interpreter, which then says whether torch was imported."""
    code = (
        "import sys\n"
        "from robcomp.cli import app\n"
        "try:\n"
        f"    app({list(args)!r}, prog_name='robcomp')\n"
        "finally:\n"
        "    print('torch imported:', 'torch' in sys.modules)\n"
    )
    environ = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"} | (env or {})
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=120
    )


@pytest.mark.parametrize(
    "content",
    [
        "name: x\ntrian: {epochs: 1}\n",
        "name: x\nevaluate: {limit: 0}\n",
        "name: x\ndata: {name: digits\n",
        "",
        "name: x\nthreads: 0\n",
    ],
)
def test_the_files_own_mistakes_are_found_before_torch_loads(tmp_path: Path, content: str) -> None:
    path = _write(tmp_path, content)
    done = _robcomp("run", str(path), "--out", str(tmp_path / "out"))
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("error: "), done.stderr
    assert "torch imported: False" in done.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_on_a_machine_without_a_gpu_is_one_line_before_any_cell(tmp_path: Path) -> None:
    path = _write(tmp_path, _base(device="cuda"))
    done = _robcomp("run", str(path), "--out", str(tmp_path / "out"))
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "no CUDA GPU" in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()
