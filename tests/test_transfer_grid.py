"""evaluate.transfer: Marshall's Algorithm 3 across the cells of an experiment, stored per
(source, attack, eps), drawn as a heatmap, resumable, with checkpoints as sources."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from robcomp.attacks import PGD
from robcomp.cli import app
from robcomp.config import ConfigError
from robcomp.data.base import Split
from robcomp.evaluate.adversarial import ThreatModelViolation
from robcomp.evaluate.transfer import TransferExamples, craft_examples
from robcomp.experiments import STORE_NAME, Metric, ResultStore, load_experiment, run_experiment
from robcomp.experiments import transfer as transfer_module
from robcomp.experiments.executors import LocalExecutor
from robcomp.experiments.transfer import FOLDER, TRANSFER_METRIC
from robcomp.models import create, save_checkpoint
from robcomp.report import write_report

PGD_SPEC = {"name": "pgd", "eps": 0.05, "steps": 5}
LIMIT = 48


def grid(transfer: dict[str, Any] | None = None) -> dict[str, Any]:
    """Three cells on digits (two architectures, two pruned), one epoch each."""
    evaluate: dict[str, Any] = {
        "attacks": [PGD_SPEC], "limit": LIMIT, "batch_size": 32,
        "diagnostics": False, "latency_batch_sizes": [],
    }  # fmt: skip
    if transfer is not None:
        evaluate["transfer"] = transfer
    return {
        "name": "transfer",
        "data": {"name": "digits"},
        "model": {"name": "tiny_cnn"},
        "train": {"epochs": 1, "lr": 0.1, "batch_size": 32},
        "evaluate": evaluate,
        "grid": {
            "model.name,compress": [
                ["tiny_cnn", {"name": "none"}],
                ["tiny_cnn", {"name": "magnitude", "sparsity": 0.5}],
                ["tiny_mlp", {"name": "magnitude", "sparsity": 0.3}],
            ]
        },
    }


@dataclass
class Ran:
    out: Path
    cells: list[str]
    source: str  # the "none" cell's id


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> Ran:
    out = tmp_path_factory.mktemp("transfer") / "run"
    experiment = load_experiment(grid({"sources": ["none"], "attack": PGD_SPEC}))
    summary = run_experiment(experiment, out)
    assert not summary.failed and summary.transfer is not None
    assert (summary.transfer.stored, summary.transfer.failed) == (3, [])
    source = next(c.cell_id for c in experiment.cells if c.config.compress["name"] == "none")
    return Ran(out, [c.cell_id for c in experiment.cells], source)


def _transfer(store: ResultStore) -> dict[str, Metric]:
    return {cid: ms[0] for cid, ms in store.metrics_named(TRANSFER_METRIC).items()}


@pytest.mark.slow
def test_the_matrix_is_stored_per_target_and_its_diagonal_is_white_box(ran: Ran) -> None:
    store = ResultStore(ran.out / STORE_NAME)
    stored = _transfer(store)
    assert set(stored) == set(ran.cells)  # one entry per target cell, the source included
    for m in stored.values():
        assert (m.source, m.attack, m.eps, m.n) == (ran.source, "pgd5-linf", 0.05, LIMIT)
        assert m.value is not None and 0.0 <= m.value <= 1.0
    # the source scored on its own examples is its white-box robust accuracy under the same
    # attack on the same points, which the cell measured itself
    own = next(r for r in store.runs() if r.cell_id == ran.source)
    robust = next(m.value for m in own.metrics if m.name == "robust_accuracy")
    assert stored[ran.source].value == robust
    clean = next(m.value for m in own.metrics if m.name == "clean_accuracy")
    assert robust is not None and clean is not None and robust < clean  # a real attack
    # the cells' own metrics are untouched by the step that added the transfer ones
    assert all(any(m.name == "robust_accuracy" for m in r.metrics) for r in store.runs())


@pytest.mark.slow
def test_the_report_draws_the_heatmap_and_writes_the_csv(ran: Ran, tmp_path: Path) -> None:
    files = write_report(ran.out / STORE_NAME, tmp_path / "report", html=True)
    assert files.transfer is not None and files.transfer.is_file()
    rows = files.transfer.read_text().splitlines()
    assert len(rows) == 1 + 3 and "source" in rows[0] and "accuracy" in rows[0]
    heatmap = tmp_path / "report" / "transfer_heatmap.png"
    assert heatmap in files.figures and heatmap.stat().st_size > 0
    assert files.html is not None and "transfer heatmap" in files.html.read_text()


@pytest.mark.slow
def test_a_rerun_recomputes_nothing_and_a_lost_entry_reuses_the_cached_examples(
    ran: Ran, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_craft(*args: Any, **kwargs: Any) -> TransferExamples:
        raise AssertionError("examples crafted again")

    monkeypatch.setattr(transfer_module, "craft_examples", no_craft)
    experiment = load_experiment(grid({"sources": ["none"], "attack": PGD_SPEC}))
    summary = run_experiment(experiment, ran.out)
    assert summary.ran == 0 and summary.transfer is not None
    assert (summary.transfer.stored, summary.transfer.skipped) == (0, 3)

    store = ResultStore(ran.out / STORE_NAME)
    before = _transfer(store)
    lost = ran.cells[-1]
    with store.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM metrics WHERE cell_id = :c AND name = :n"),
                     {"c": lost, "n": TRANSFER_METRIC})  # fmt: skip
    summary = run_experiment(experiment, ran.out)
    assert summary.transfer is not None
    assert (summary.transfer.stored, summary.transfer.skipped, summary.transfer.failed) == (
        1,
        2,
        [],
    )
    assert _transfer(store)[lost].value == before[lost].value


@pytest.mark.slow
def test_crafted_examples_stay_in_the_eps_ball_and_a_tampered_file_is_refused(
    ran: Ran, tmp_path: Path
) -> None:
    files = sorted((ran.out / "cache" / FOLDER).glob("*.safetensors"))
    assert len(files) == 1  # one source, one attack, one set of points
    stored = load_file(str(files[0]))
    assert len(stored["x"]) == LIMIT and not torch.equal(stored["x_adv"], stored["x"])
    assert float((stored["x_adv"] - stored["x"]).abs().max()) <= 0.05 + 1e-6
    assert float(stored["x_adv"].min()) >= 0.0 and float(stored["x_adv"].max()) <= 1.0
    moved = (stored["x"] + 0.2 * torch.sign(stored["x_adv"] - stored["x"] + 1e-3)).clamp(0, 1)
    with pytest.raises(ThreatModelViolation, match="exceeds eps"):
        TransferExamples(stored["x"], moved, stored["y"]).check(PGD(eps=0.05, steps=5))

    # a copy of the run whose cached examples left the ball: scoring them is refused
    copy = tmp_path / "copy"
    experiment = load_experiment(grid({"sources": ["none"], "attack": PGD_SPEC}))
    for path in ran.out.rglob("*"):
        if path.is_file():
            (copy / path.relative_to(ran.out)).parent.mkdir(parents=True, exist_ok=True)
            (copy / path.relative_to(ran.out)).write_bytes(path.read_bytes())
    save_file({**stored, "x_adv": moved}, str(copy / files[0].relative_to(ran.out)))
    store = ResultStore(copy / STORE_NAME)
    with store.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM metrics WHERE name = :n"), {"n": TRANSFER_METRIC})
    summary = run_experiment(experiment, copy)
    assert summary.transfer is not None and summary.transfer.stored == 0
    assert len(summary.transfer.failed) == 3 and "exceeds eps" in summary.transfer.failed[0]


def test_craft_examples_attacks_the_points_the_source_gets_right() -> None:
    torch.manual_seed(0)
    model = create("tiny_mlp", 10, (1, 8, 8), mean=(0.5,), std=(0.5,)).eval()
    x, y = torch.rand(20, 1, 8, 8), torch.randint(0, 10, (20,))
    examples = craft_examples(model, PGD(eps=0.1, steps=3), Split(x, y), batch_size=8)
    wrong = model(x).argmax(1) != y
    assert torch.equal(examples.x_adv[wrong], x[wrong])  # already adversarial: unperturbed
    assert float((examples.x_adv - x).abs().max()) <= 0.1 + 1e-6


@pytest.mark.slow
def test_a_checkpoint_is_a_source(ran: Ran, tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = create("tiny_mlp", 10, (1, 8, 8), mean=(0.0,), std=(1.0,))
    folder = save_checkpoint(model, tmp_path / "teacher", {
        "name": "tiny_mlp", "num_classes": 10, "in_shape": [1, 8, 8],
        "mean": [0.0], "std": [1.0], "options": {},
    })  # fmt: skip
    raw = grid({"sources": [str(folder)], "attack": PGD_SPEC})
    summary = run_experiment(load_experiment(raw), ran.out)  # the cells are done
    assert summary.ran == 0 and summary.transfer is not None
    assert (summary.transfer.stored, summary.transfer.failed) == (3, [])
    stored = ResultStore(ran.out / STORE_NAME).metrics_named(TRANSFER_METRIC)
    sources = {m.source for ms in stored.values() for m in ms}
    assert any(s.startswith(f"checkpoint:{folder}@") for s in sources)
    assert ran.source in sources  # the cell source's entries are kept beside

    # a checkpoint naming code to import needs the user's trust, at load time
    spec = json.loads((folder / "spec.json").read_text())
    (folder / "spec.json").write_text(json.dumps({**spec, "name": "mymodels:net"}))
    with pytest.raises(ConfigError, match="trust_code"):
        load_experiment(raw)


def test_an_unknown_source_is_refused_when_the_file_loads(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown source 'nonee'.*none.*magnitude-global-0\.5"):
        load_experiment(grid({"sources": ["nonee"], "attack": PGD_SPEC}))
    with pytest.raises(ConfigError, match="on-manifold"):
        attack = {"name": "on-manifold", "eps": 0.5}
        load_experiment(grid({"sources": ["none"], "attack": attack}))
    bad = {**grid(), "grid": {**grid()["grid"], "evaluate.transfer.limit": [1, 2]}}
    with pytest.raises(ConfigError, match="cannot vary over the grid"):
        load_experiment(bad)
    # the CLI: one line, exit 2, before anything runs
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(grid({"sources": ["nonee"], "attack": PGD_SPEC})))
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "unknown source 'nonee'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_sources_by_cell_id_prefix_and_ambiguity() -> None:
    experiment = load_experiment(grid())
    cell = experiment.cells[1]
    prefixed = load_experiment(grid({"sources": [cell.cell_id[:7]], "attack": PGD_SPEC}))
    assert prefixed.transfer is not None and prefixed.transfer.sources[0].cell == cell
    # evaluate.transfer is no part of any cell: adding it reruns nothing
    assert [c.cell_id for c in prefixed.cells] == [c.cell_id for c in experiment.cells]
    twice = grid({"sources": ["none"], "attack": PGD_SPEC})
    twice["grid"]["model.name,compress"][2] = ["tiny_mlp", {"name": "none"}]
    with pytest.raises(ConfigError, match="names 2 cells"):
        load_experiment(twice)


def _two_cells() -> dict[str, Any]:
    raw = grid({"sources": ["none"], "attack": PGD_SPEC})
    raw["model"] = {"name": "tiny_mlp"}
    raw["grid"] = {"compress": [{"name": "none"}, {"name": "magnitude", "sparsity": 0.5}]}
    return raw


def test_the_transfer_step_reads_the_models_from_the_executors_artifacts(tmp_path: Path) -> None:
    # cells on a cluster keep their models on the shared --artifacts path, not OUT/cache
    shared = tmp_path / "shared"
    summary = run_experiment(
        load_experiment(_two_cells()), tmp_path / "out", LocalExecutor(artifacts=shared)
    )
    assert summary.transfer is not None
    assert (summary.transfer.stored, summary.transfer.failed) == (2, [])
    assert len(list((shared / FOLDER).glob("*.safetensors"))) == 1
    assert not (tmp_path / "out" / "cache").exists()


@pytest.mark.slow
def test_cells_on_ray_workers_then_the_matrix_in_the_driver(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    from robcomp.experiments.executors import RayExecutor

    # a Ray of its own, even when a parallel test's cluster is up
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        experiment = load_experiment(_two_cells())
        summary = run_experiment(experiment, tmp_path / "out", RayExecutor())
    finally:
        ray.shutdown()
    assert summary.failed == [] and summary.transfer is not None
    assert (summary.transfer.stored, summary.transfer.failed) == (2, [])
    stored = ResultStore(tmp_path / "out" / STORE_NAME).metrics_named(TRANSFER_METRIC)
    assert set(stored) == {c.cell_id for c in experiment.cells}
