"""Shifts in the evaluation suite: stored per (shift, severity), cached once per grid, summarised
against the dense baseline, never applied to training data; old stores migrate."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from robcomp.config import ConfigError
from robcomp.data.base import DataSplits, Split
from robcomp.data.shifts import SHIFTS, ShiftContext, ShiftedSplit
from robcomp.experiments import STORE_NAME, Metric, ResultStore, load_experiment, run_experiment
from robcomp.experiments.cache import compressed_key


@dataclass(frozen=True, kw_only=True)
class Darken:
    """Scales the test images by 1 - severity/5 (severity 5 is black), counting its calls."""

    severities: tuple[int, ...] = (1, 3)
    calls: ClassVar[list[int]] = []  # lengths of the test splits it was asked to shift

    def label(self) -> str:
        return "darken"

    def shifted(self, data: DataSplits, context: ShiftContext) -> Sequence[ShiftedSplit]:
        Darken.calls.append(len(data.test))
        x, y = data.test.tensors()
        return [
            ShiftedSplit(f"dark{s}", s, Split(x * (1 - s / 5), y), family="digital")
            for s in self.severities
        ]

    def summary(
        self, model: Mapping[tuple[str, int], float], baseline: Mapping[tuple[str, int], float],
        clean: tuple[float, float],
    ) -> dict[str, float]:  # fmt: skip
        return {"mean_dark_accuracy": sum(model.values()) / len(model)}


@pytest.fixture(autouse=True)
def darken() -> Iterator[None]:
    Darken.calls.clear()
    with SHIFTS.temporarily("test-darken", Darken):
        yield


def _experiment(**evaluate: Any) -> dict[str, Any]:
    return {
        "name": "shifted",
        "data": {"name": "digits", "train_limit": 300},
        "model": {"name": "tiny_mlp"},
        "train": {"epochs": 2, "lr": 0.05, "batch_size": 64},
        "compress": {"name": "magnitude", "sparsity": 0.0},
        "evaluate": {
            "attacks": [{"name": "fgsm", "eps": 0.1}], "limit": 30, "diagnostics": False,
            "latency_batch_sizes": [], "shifts": [{"name": "test-darken"}], **evaluate,
        },
        "grid": {"compress.sparsity": [0.0, 0.5]},
    }  # fmt: skip


def _by_key(metrics: list[Metric]) -> dict[tuple[str, str, int], float | None]:
    return {(m.name, m.shift, m.severity): m.value for m in metrics if not m.attack}


def test_each_shifted_split_is_scored_and_stored_with_its_severity(tmp_path: Path) -> None:
    summary = run_experiment(load_experiment(_experiment(shift_limit=100)), tmp_path)
    assert summary.ran == 2 and not summary.failed
    runs = ResultStore(tmp_path / STORE_NAME).runs()
    for run in runs:
        values = _by_key(run.metrics)
        dark1, dark3 = (
            values[("clean_accuracy", "dark1", 1)],
            values[("clean_accuracy", "dark3", 3)],
        )
        assert dark1 is not None and dark3 is not None
        assert values[("mean_dark_accuracy", "darken", 0)] == pytest.approx((dark1 + dark3) / 2)
        assert values[("clean_accuracy", "", 0)] is not None  # the unshifted score is kept
        assert ("val_accuracy", "", 0) in values
        rows = run.info["shifts"]["darken"]
        assert [r["n"] for r in rows] == [100, 100]  # shift_limit test points were shifted
    assert Darken.calls == [100]  # two cells, one baseline: the data was shifted once


def test_shifts_score_the_test_split_only(tmp_path: Path) -> None:
    run_experiment(load_experiment(_experiment()), tmp_path)
    (run, *_) = ResultStore(tmp_path / STORE_NAME).runs()
    # Training saw the unshifted data: the baseline's clean accuracy is the same as without
    # the shift (same cell config otherwise, same seed).
    plain = _experiment()
    del plain["evaluate"]["shifts"]
    run_experiment(load_experiment(plain), tmp_path / "plain")
    (other, *_) = ResultStore(tmp_path / "plain" / STORE_NAME).runs()
    assert run.info["baseline"]["test_accuracy"] == other.info["baseline"]["test_accuracy"]
    assert Darken.calls == [449]  # the whole test split, once


def test_attack_shifted_attacks_each_shifted_split(tmp_path: Path) -> None:
    run_experiment(load_experiment(_experiment(attack_shifted=True)), tmp_path)
    (run, *_) = ResultStore(tmp_path / STORE_NAME).runs()
    robust = {(m.shift, m.severity): m.value for m in run.metrics if m.name == "robust_accuracy"}
    assert set(robust) == {("", 0), ("dark1", 1), ("dark3", 3)}
    clean = _by_key(run.metrics)
    for (shift, severity), value in robust.items():
        assert value is not None and value <= clean[("clean_accuracy", shift, severity)] + 1e-9


def test_a_suite_without_shifts_keeps_its_cell_ids() -> None:
    plain = _experiment()
    del plain["evaluate"]["shifts"]
    shifted = load_experiment(_experiment()).cells[0].config
    unshifted = load_experiment(plain).cells[0].config
    assert "shifts" not in unshifted.canonical()["evaluate"]
    assert shifted.cell_id() != unshifted.cell_id()


def test_unknown_shifts_and_bad_fields_fail_when_the_file_is_loaded() -> None:
    with pytest.raises(ConfigError, match="unknown shift 'fogg'"):
        load_experiment(_experiment(shifts=[{"name": "fogg"}]))
    with pytest.raises(ConfigError, match="severites"):
        load_experiment(_experiment(shifts=[{"name": "test-darken", "severites": [1]}]))
    with pytest.raises(ConfigError, match="shift_limit"):
        load_experiment(_experiment(shift_limit=0))


def test_the_store_refuses_two_values_for_one_shifted_split(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "s.sqlite")
    twice = [Metric("clean_accuracy", 0.5, shift="fog", severity=3)] * 2
    with pytest.raises(ValueError, match="on fog"):
        store.record(
            cell_id="c", experiment="e", config={}, grid_values={}, metrics=twice, info={},
            seconds=1,
        )  # fmt: skip
    assert store.runs(None) == []


def test_shifted_arrays_are_the_same_tensors_for_every_cell(tmp_path: Path) -> None:
    run_experiment(load_experiment(_experiment()), tmp_path)
    files = sorted((tmp_path / "cache").glob("shift-*.safetensors"))
    assert len(files) == 1

    tensors = load_file(str(files[0]))
    assert torch.equal(tensors["y0"], tensors["y1"])  # both severities shift the same points


# --- the registered shifts, end to end through the runner --------------------------------------


def _registered(data: dict[str, Any], model: str, **evaluate: Any) -> dict[str, Any]:
    return {
        "name": "registered-shifts",
        "data": data,
        "model": {"name": model},
        "train": {"epochs": 3, "lr": 0.05, "batch_size": 64},
        "compress": {"name": "none"},
        "evaluate": {"limit": 60, "diagnostics": False, "latency_batch_sizes": [], **evaluate},
    }


def test_corruptions_through_the_runner_normalise_mce_by_the_dense_baseline(
    tmp_path: Path,
) -> None:
    shift = {"name": "corruptions", "corruptions": ["gaussian_noise", "contrast"],
             "severities": [1, 5]}  # fmt: skip
    raw = _registered({"name": "digits", "train_limit": 400}, "tiny_mlp", shifts=[shift])
    raw["grid"] = {"compress": [{"name": "none"}, {"name": "magnitude", "sparsity": 0.95}]}
    summary = run_experiment(load_experiment(raw), tmp_path)
    assert summary.ran == 2 and not summary.failed
    by_method = {r.config["compress"]["name"]: _by_key(r.metrics) for r in
                 ResultStore(tmp_path / STORE_NAME).runs()}  # fmt: skip
    dense, pruned = by_method["none"], by_method["magnitude"]
    # The dense cell is its own baseline: its corruption errors normalise to exactly 1.
    label = "corruptions[gaussian_noise+contrast]-cifar"  # the shift's label keys its summary
    assert dense[("mce", label, 0)] == pytest.approx(1.0)
    assert dense[("relative_mce", label, 0)] == pytest.approx(1.0)
    for values in (dense, pruned):
        mild = values[("clean_accuracy", "gaussian_noise", 1)]
        harsh = values[("clean_accuracy", "gaussian_noise", 5)]
        assert mild is not None and harsh is not None and harsh < mild
    pruned_mce = pruned[("mce", label, 0)]
    assert pruned_mce is not None and pruned_mce != pytest.approx(1.0)


def test_on_manifold_attack_and_fixed_sets_through_the_runner(tmp_path: Path) -> None:
    raw = _registered(
        {"name": "gaussians", "n": 2000}, "tiny_mlp",
        attacks=[{"name": "on-manifold", "eps": 0.3, "step_size": 0.03, "steps": 10}],
        shifts=[{"name": "manifold-sets", "step_size": 0.03, "steps": 10}],
    )  # fmt: skip
    summary = run_experiment(load_experiment(raw), tmp_path)
    assert summary.ran == 1 and not summary.failed, summary.failed
    (run,) = ResultStore(tmp_path / STORE_NAME).runs()
    robust = [m for m in run.metrics if m.name == "robust_accuracy"]
    assert len(robust) == 1 and robust[0].attack.startswith("on-manifold")
    clean = _by_key(run.metrics)[("clean_accuracy", "", 0)]
    assert robust[0].value is not None and clean is not None and robust[0].value <= clean
    values = _by_key(run.metrics)
    # Both fixed sets were built against this very (dense) model: it misclassifies all of them.
    assert values[("clean_accuracy", "adv-off", 0)] == 0.0
    assert values[("clean_accuracy", "adv-on", 0)] in (0.0, None)  # None: no example kept
    assert any(name == "combined_accuracy" for name, _, _ in values)
    examples = np.load(tmp_path / "cells" / run.cell_id / "manifold_examples.npz")
    assert examples["x"].shape == examples["x_adv"].shape and examples["x"].shape[1:] == (1, 4, 4)
    assert (examples["y_adv"] != examples["y"]).all()  # each one fooled the model
    assert not np.array_equal(examples["x"], examples["x_adv"])


def test_a_vae_cell_records_its_reconstruction_accuracy(tmp_path: Path) -> None:
    """On data without a known generator the cell's ``vae`` section builds the VAE; the
    manifold-sets summary records how the dense model does on its reconstructions, how many
    of them it gets wrong (kept out of adv-on), and the model's own accuracy there."""
    raw = _registered(
        {"name": "digits", "train_limit": 300}, "tiny_mlp",
        shifts=[{"name": "manifold-sets", "eps": 0.5, "step_size": 0.1, "steps": 5}],
    )  # fmt: skip
    raw["vae"] = {"latent_dim": 4, "epochs": 2, "classifier_epochs": 2}
    raw["grid"] = {"compress": [{"name": "none"}, {"name": "magnitude", "sparsity": 0.9}]}
    experiment = load_experiment(raw)
    assert experiment.cells[0].config.vae_spec().latent_dim == 4
    summary = run_experiment(experiment, tmp_path)
    assert summary.ran == 2 and not summary.failed, summary.failed
    runs = {r.config["compress"]["name"]: _by_key(r.metrics)
            for r in ResultStore(tmp_path / STORE_NAME).runs()}  # fmt: skip
    assert sorted(p.parent.name[:4] for p in tmp_path.rglob("vae.safetensors")) == ["vae-"]
    for values in runs.values():
        dense_recon = values[("vae_recon_accuracy", "manifold-sets", 0)]
        errors = values[("adv_on_recon_errors", "manifold-sets", 0)]
        assert 0.0 < dense_recon <= 1.0 and errors == round(errors) and errors >= 0
        assert (
            values[("recon_accuracy", "manifold-sets", 0)] == values[("clean_accuracy", "recon", 0)]
        )
        assert values[("adv_on_points", "manifold-sets", 0)] >= 0
    # every cell of one baseline reports the same dense reconstruction accuracy
    assert (runs["none"][("vae_recon_accuracy", "manifold-sets", 0)]
            == runs["magnitude"][("vae_recon_accuracy", "manifold-sets", 0)])  # fmt: skip
    assert (runs["none"][("recon_accuracy", "manifold-sets", 0)]
            == runs["none"][("vae_recon_accuracy", "manifold-sets", 0)])  # fmt: skip


def test_a_cell_attacked_on_the_manifold_without_the_test_sets_records_reconstruction(
    tmp_path: Path,
) -> None:
    raw = _registered(
        {"name": "digits", "train_limit": 300}, "tiny_mlp",
        attacks=[{"name": "on-manifold", "eps": 0.5, "step_size": 0.1, "steps": 3}],
    )  # fmt: skip
    raw["vae"] = {"latent_dim": 4, "epochs": 2, "classifier_epochs": 2}
    summary = run_experiment(load_experiment(raw), tmp_path)
    assert summary.ran == 1 and not summary.failed, summary.failed
    (run,) = ResultStore(tmp_path / STORE_NAME).runs()
    values = _by_key(run.metrics)
    dense, ours = values[("vae_recon_accuracy", "", 0)], values[("recon_accuracy", "", 0)]
    assert dense is not None and 0.0 < dense <= 1.0 and dense == ours  # the dense cell itself


def test_the_vae_section_is_part_of_the_identity_only_where_a_vae_is_used() -> None:
    shifts = [{"name": "manifold-sets"}]
    digits = _registered({"name": "digits"}, "tiny_mlp", shifts=shifts)
    simulation = _registered({"name": "gaussians", "n": 2000}, "tiny_mlp", shifts=shifts)
    plain = _registered({"name": "digits"}, "tiny_mlp")
    ids = {}
    for name, raw in (("digits", digits), ("simulation", simulation), ("plain", plain)):
        for latent in (4, 8):
            cfg = load_experiment({**raw, "vae": {"latent_dim": latent}}).cells[0].config
            ids[name, latent] = cfg.cell_id()
        canonical = cfg.canonical()
        assert ("vae" in canonical) == (name == "digits")
    assert canonical_vae(digits) == {**canonical_vae(digits), "latent_dim": 32}  # the default
    assert ids["digits", 4] != ids["digits", 8]
    assert ids["simulation", 4] == ids["simulation", 8]  # its own generator: no VAE
    assert ids["plain", 4] == ids["plain", 8]
    # the test sets' definition changed with the same fields: a revision keeps old cells apart
    shift = load_experiment(simulation).cells[0].config.canonical()["evaluate"]["shifts"][0]
    assert shift["revision"] == 2
    with pytest.raises(ConfigError, match="latent_dim"):  # checked where no VAE is used, too
        load_experiment({**plain, "vae": {"latent_dim": 0}})
    # MC-AT(on) fine-tuning draws from the VAE: the compressed model is keyed by it; the
    # baseline, trained with plain cross-entropy, is shared
    on = {"name": "mc-at-on", "eta": 0.3}
    compress = {"name": "proximal-l0", "sparsity": 0.5, "objective": on}
    cells = [
        load_experiment({**plain, "compress": compress, "vae": {"latent_dim": k}}).cells[0].config
        for k in (4, 8)
    ]
    assert cells[0].baseline_key() == cells[1].baseline_key()
    assert compressed_key(cells[0]) != compressed_key(cells[1])
    trained = [
        load_experiment({**plain, "train": {**plain["train"], "objective": on},
                         "vae": {"latent_dim": k}}).cells[0].config
        for k in (4, 8)
    ]  # fmt: skip
    assert trained[0].baseline_key() != trained[1].baseline_key()


def canonical_vae(raw: dict[str, Any]) -> dict[str, Any]:
    vae: dict[str, Any] = load_experiment(raw).cells[0].config.canonical()["vae"]
    return vae
