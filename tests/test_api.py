"""The one-call API: robcomp.evaluate_model and robcomp.compress_model, on digits."""

from __future__ import annotations

import importlib
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import robcomp
from robcomp.api import COLUMNS, autoattack_breakdown, parse_spec
from robcomp.attacks import PGD
from robcomp.attacks.cascade import Cascade
from robcomp.compress import count_params
from robcomp.data.base import DataSplits
from robcomp.evaluate import accuracy, evaluate_attack
from robcomp.experiments import STORE_NAME, ResultStore, load_experiment, run_experiment
from robcomp.models import Classifier

PGD_SPEC = {"name": "pgd", "eps": 0.1, "steps": 3}


def _values(rows: list[dict[str, Any]], variant: str) -> dict[tuple[str, str], float]:
    return {(r["metric"], r["attack"]): r["value"] for r in rows if r["variant"] == variant}


def test_the_numbers_are_the_ones_robcomp_run_stores(
    trained_cnn: Classifier, digits: DataSplits, tmp_path: Path
) -> None:
    weights = tmp_path / "cnn.safetensors"
    state = {k: v.contiguous() for k, v in trained_cnn.state_dict().items()}
    save_file(state, str(weights))
    experiment = {
        "name": "api-vs-run",
        "data": {"name": "digits"},
        "model": {"name": "tiny_cnn", "weights": str(weights), "mean": list(digits.mean),
                  "std": list(digits.std)},
        "train": {"epochs": 0},
        "evaluate": {"attacks": [PGD_SPEC], "limit": 40, "diagnostics": False,
                     "latency_batch_sizes": []},
        "grid": {"compress": [{"name": "none"}, {"name": "magnitude", "sparsity": 0.5}]},
    }  # fmt: skip
    summary = run_experiment(load_experiment(experiment), tmp_path / "out")
    assert summary.ran == 2 and not summary.failed
    stored = {
        run.info["compressor"]: {(m.name, m.attack): m.value for m in run.metrics}
        for run in ResultStore(tmp_path / "out" / STORE_NAME).runs()
    }

    rows = robcomp.evaluate_model(
        trained_cnn, "digits", attacks=[PGD_SPEC], compress=["magnitude:sparsity=0.5"],
        limit=40, as_frame=False,
    )  # fmt: skip
    assert {r["variant"] for r in rows} == {"none", "magnitude-global-0.5"} == set(stored)
    for variant, theirs in stored.items():
        ours = _values(rows, variant)
        for key in [("clean_accuracy", ""), ("robust_accuracy", "pgd3-linf"),
                    ("nonzero_params", ""), ("size_bytes", ""),
                    ("worst_robust_accuracy", "worst-linf")]:  # fmt: skip
            assert ours[key] == pytest.approx(theirs[key]), (variant, key)
    pruned = _values(rows, "magnitude-global-0.5")
    assert pruned[("nonzero_params", "")] < _values(rows, "none")[("nonzero_params", "")]


def test_a_table_for_pandas_and_tensors_as_a_test_set(
    trained_cnn: Classifier, digits: DataSplits
) -> None:
    pd = pytest.importorskip("pandas")
    x, y = digits.test.head(120).tensors()
    # The bare network with the statistics it was trained with, and an attack object: the
    # same numbers as the wrapped model with the attack's spec.
    frame = robcomp.evaluate_model(
        trained_cnn.net, (x, y), attacks=[PGD(eps=0.1, steps=3)],
        mean=digits.mean, std=digits.std,
    )  # fmt: skip
    assert isinstance(frame, pd.DataFrame)
    assert tuple(frame.columns) == COLUMNS
    clean = frame[(frame["metric"] == "clean_accuracy") & (frame["shift"] == "")].value.item()
    assert clean == pytest.approx(accuracy(trained_cnn, digits.test.head(120)))
    robust = frame[frame.metric == "robust_accuracy"]
    assert robust.attack.item() == "pgd3-linf" and robust.eps.item() == pytest.approx(0.1)
    assert robust.norm.item() == "linf" and robust.n.item() == 120  # typed, with its points
    spec_rows = robcomp.evaluate_model(
        trained_cnn, (x, y), attacks=["pgd:eps=0.1,steps=3"], as_frame=False
    )
    assert _values(spec_rows, "none")[("robust_accuracy", "pgd3-linf")] == robust.value.item()


def test_compress_model_returns_a_new_model_and_its_record(
    trained_cnn: Classifier, digits: DataSplits
) -> None:
    before = {k: v.clone() for k, v in trained_cnn.state_dict().items()}
    pruned, record = robcomp.compress_model(trained_cnn, "l1-filter", ratio=0.5, data=digits)
    assert pruned is not trained_cnn
    assert record.params == count_params(pruned) < count_params(trained_cnn)
    assert record.method.startswith("l1-filter")
    assert all(torch.equal(v, trained_cnn.state_dict()[k]) for k, v in before.items())
    assert accuracy(pruned, digits.test) > 0.3  # still a classifier, not noise
    # The package of compressors is still the package: the function has its own name.
    assert isinstance(importlib.import_module("robcomp.compress"), types.ModuleType)
    assert isinstance(robcomp.compress, types.ModuleType)
    assert callable(robcomp.compress_model) and callable(robcomp.evaluate_model)


def test_compress_model_refuses_fields_for_a_compressor_object(trained_cnn: Classifier) -> None:
    from robcomp.compress import MagnitudePruning

    with pytest.raises(ValueError, match="sparsity"):
        robcomp.compress_model(
            trained_cnn, MagnitudePruning(sparsity=0.5), sparsity=0.9, data="digits"
        )


def test_autoattack_breakdown_accounts_for_every_stage(
    trained_cnn: Classifier, digits: DataSplits
) -> None:
    split = digits.test.head(100)
    cascade = Cascade(eps=0.1, version="custom", attacks=("fgsm", "pgd"))
    result, stages = autoattack_breakdown(trained_cnn, cascade, split)
    assert [s.attack for s in stages] == ["fgsm", "pgd"]
    correct = round(result.clean_accuracy * result.n)
    assert correct - sum(s.broke for s in stages) == round(result.robust_accuracy * result.n)
    assert stages[-1].robust_accuracy == pytest.approx(result.robust_accuracy)
    # The first stage is FGSM on every correct point: the same as FGSM on its own.
    fgsm_alone = evaluate_attack(trained_cnn, cascade.members()[0][1], split)
    assert stages[0].robust_accuracy == pytest.approx(fgsm_alone.robust_accuracy)
    assert stages[0].broke > 0 and all(s.seconds >= 0 for s in stages)


def test_specs_in_the_cli_syntax_may_hold_lists() -> None:
    spec = parse_spec("autoattack:eps=0.03,version=custom,attacks=[apgd-ce,apgd-t]")
    assert spec == {
        "name": "autoattack", "eps": 0.03, "version": "custom", "attacks": ["apgd-ce", "apgd-t"]
    }  # fmt: skip
    assert parse_spec("npz:path=a.npz,split=test") == {
        "name": "npz", "path": "a.npz", "split": "test"
    }  # fmt: skip
