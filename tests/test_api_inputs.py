"""The API takes what the CLI takes (model names, data specs, .npz paths, tensors), keeps
calibration off the scored points, and refuses test-only data for training with a ConfigError."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import robcomp
from robcomp import api
from robcomp import data as datasets
from robcomp.compress import quantize
from robcomp.config import ConfigError, parse_data_spec
from robcomp.data.base import DataSplits, Split, hold_out
from robcomp.evaluate import accuracy
from robcomp.models import Classifier


def _clean(rows: list[dict[str, Any]], variant: str = "none") -> float:
    return next(
        r["value"] for r in rows
        if r["variant"] == variant and r["metric"] == "clean_accuracy" and not r["shift"]
    )  # fmt: skip


@pytest.fixture
def test_file(digits: DataSplits, tmp_path: Path) -> Path:
    """Digits' test split as a foreign test file; image i is marked (i + 1) / (n + 1) in its
    top-left pixel (0 in every digits image), so a point can be found again."""
    x, y = digits.test.tensors()
    x = x.clone()
    x[:, 0, 0, 0] = (torch.arange(len(x)) + 1) / (len(x) + 1)
    path = tmp_path / "test.npz"
    np.savez(path, x=x.numpy(), y=y.numpy())
    return path


def _index(x: torch.Tensor, n: int) -> set[int]:
    """The file indices of the marked images among ``x`` (an unmarked input, such as the
    zeros that count MACs, has none)."""
    marks = torch.round(x[:, 0, 0, 0].cpu() * (n + 1)).long() - 1
    return {int(i) for i in marks if 0 <= i < n}


# --- model and data in the CLI's forms -------------------------------------------------------


@pytest.mark.parametrize(
    "text, spec",
    [
        ("mnist", "mnist"),
        ("npz:path=a.npz,split=test", {"name": "npz", "path": "a.npz", "split": "test"}),
        ("{name: npz, path: a.npz}", {"name": "npz", "path": "a.npz"}),
        ("data/test.npz", {"name": "npz", "path": "data/test.npz"}),
        (Path("data/test.npz"), {"name": "npz", "path": "data/test.npz"}),
    ],
)
def test_data_specs_parse_as_the_cli_parses_them(text: Any, spec: Any) -> None:
    assert parse_data_spec(text) == spec


def test_a_path_that_is_no_npz_file_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"\.npz file"):
        parse_data_spec(Path("data/test.csv"))


def test_data_as_a_cli_spec_a_path_a_dict_or_tensors(
    trained_cnn: Classifier, test_file: Path
) -> None:
    forms: list[Any] = [
        f"npz:path={test_file},split=test",
        {"name": "npz", "path": str(test_file), "split": "test"},
        f"{{name: npz, path: {test_file}, split: test}}",
    ]
    with np.load(test_file) as arrays:
        x, y = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"])
    forms += [(x, y), {"x": x, "y": y}]
    expected = accuracy(trained_cnn, Split(x, y))
    for form in forms:
        rows = robcomp.evaluate_model(trained_cnn, form, as_frame=False)
        assert _clean(rows) == pytest.approx(expected), form
    # A bare path is npz:path=PATH with the npz defaults (a seeded 20 % scored), str or Path.
    auto = datasets.get({"name": "npz", "path": str(test_file)})
    assert len(auto.test) < len(x)
    for form in (str(test_file), test_file):
        rows = robcomp.evaluate_model(trained_cnn, form, as_frame=False)
        assert _clean(rows) == pytest.approx(accuracy(trained_cnn, auto.test)), form


def test_a_model_name_with_weights_is_built_for_the_data(
    trained_cnn: Classifier, digits: DataSplits, tmp_path: Path
) -> None:
    weights = tmp_path / "cnn.safetensors"
    save_file({k: v.contiguous() for k, v in trained_cnn.state_dict().items()}, str(weights))
    rows = robcomp.evaluate_model(
        "tiny_cnn", "digits", weights=weights, mean=digits.mean, std=digits.std,
        as_frame=False,
    )  # fmt: skip
    assert _clean(rows) == pytest.approx(accuracy(trained_cnn, digits.test))
    pruned, record = robcomp.compress_model(
        "tiny_cnn", "magnitude", sparsity=0.5, data="digits", weights=weights,
        mean=digits.mean, std=digits.std,
    )  # fmt: skip
    assert record.nonzero_params < record.params
    assert accuracy(pruned, digits.test) > 0.5  # the trained weights, not an initialisation


def test_a_model_name_without_weights_is_a_seeded_initialisation(digits: DataSplits) -> None:
    first, _ = robcomp.compress_model("tiny_cnn", "none", data="digits", seed=3)
    again, _ = robcomp.compress_model("tiny_cnn", "none", data="digits", seed=3)
    assert isinstance(first, Classifier)
    x = digits.test.head(8).tensors()[0]
    assert first(x).shape == (8, digits.num_classes)
    assert torch.equal(first(x), again(x))


def test_a_module_callable_name_is_built_like_a_registered_one(digits: DataSplits) -> None:
    net, record = robcomp.compress_model(
        "robcomp.models.small:tiny_mlp", "none", data="digits", seed=1
    )
    registered, _ = robcomp.compress_model("tiny_mlp", "none", data="digits", seed=1)
    assert record.params == sum(p.numel() for p in registered.parameters())
    x = digits.test.head(8).tensors()[0]
    assert torch.equal(net(x), registered(x))  # the same factory, the same seeded weights


def test_weights_for_a_module_are_refused(trained_cnn: Classifier) -> None:
    with pytest.raises(ConfigError, match="weights"):
        robcomp.evaluate_model(trained_cnn, "digits", weights="w.safetensors")


# --- calibration never sees a scored point ---------------------------------------------------


@pytest.fixture
def calibrated(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Every batch int8 calibrates on, as the quantizer draws it."""
    seen: list[torch.Tensor] = []
    original = quantize._calibration

    def recording(*args: Any, **kwargs: Any) -> Iterator[torch.Tensor]:
        for x in original(*args, **kwargs):
            seen.append(x.clone())
            yield x

    monkeypatch.setattr(quantize, "_calibration", recording)
    return seen


def _scored(model: torch.nn.Module) -> tuple[list[torch.Tensor], Any]:
    """The inputs ``model`` sees from outside (real tensors only: torch.export traces it with
    fake ones when int8 copies it)."""
    inputs: list[torch.Tensor] = []

    def hook(_: Any, args: tuple[torch.Tensor, ...]) -> None:
        if not torch.compiler.is_compiling() and type(args[0]) is torch.Tensor:
            inputs.append(args[0].detach().clone())

    return inputs, model.register_forward_pre_hook(hook)


@pytest.mark.slow
@pytest.mark.parametrize("split, holdout", [("split=test", 200), ("split=auto", None)])
def test_int8_calibrates_on_points_it_never_scores(
    trained_cnn: Classifier,
    test_file: Path,
    calibrated: list[torch.Tensor],
    split: str,
    holdout: int | None,
) -> None:
    pytest.importorskip("torchao")
    with np.load(test_file) as arrays:
        n = len(arrays["y"])
    scored, handle = _scored(trained_cnn)
    try:
        rows = robcomp.evaluate_model(
            trained_cnn, f"npz:path={test_file},{split}", compress=["int8:compile=false"],
            holdout=holdout, as_frame=False,
        )  # fmt: skip
    finally:
        handle.remove()
    calibration = _index(torch.cat(calibrated), n)
    scored_points = _index(torch.cat(scored), n)
    assert calibration and scored_points
    assert not calibration & scored_points
    if holdout is not None:  # the held-out points are the whole of what is not scored
        assert len(calibration) <= holdout and len(scored_points) == n - holdout
    assert not np.isnan(_clean(rows, "int8"))


def test_hold_out_moves_random_test_points_to_train(digits: DataSplits) -> None:
    test_only = DataSplits(
        name="t", train=digits.test.take(slice(0, 0)), val=digits.test.take(slice(0, 0)),
        test=digits.test, num_classes=10, classes=digits.classes, mean=(0.0,), std=(1.0,),
    )  # fmt: skip
    held = hold_out(test_only, 100, seed=0)
    assert (len(held.train), len(held.test)) == (100, len(digits.test) - 100)
    both = torch.cat([held.train.x, held.test.x]).flatten(1)
    assert (
        torch.unique(both, dim=0).shape[0] == torch.unique(digits.test.x.flatten(1), dim=0).shape[0]
    )
    with pytest.raises(ConfigError, match="only for test-only data"):
        hold_out(digits, 100)
    with pytest.raises(ConfigError, match="between 1 and"):
        hold_out(test_only, len(digits.test))


# --- test-only data for something that trains -----------------------------------------------


@pytest.mark.parametrize(
    "method, fields",
    [
        ("l1-filter", {"ratio": 0.5, "finetune": {"epochs": 1}}),
        ("int8", {}),
        ("distill", {"student": "tiny_cnn"}),
        ("lowbit", {"bits": 4, "act_bits": 8}),
    ],
)
def test_test_only_data_for_training_names_the_missing_split(
    trained_cnn: Classifier, digits: DataSplits, method: str, fields: dict[str, Any]
) -> None:
    x, y = digits.test.head(100).tensors()
    with pytest.raises(ConfigError, match=r"no training split.*give data with one"):
        robcomp.compress_model(trained_cnn, method, data=(x, y), **fields)


def test_compressors_that_read_no_data_take_a_test_set(
    trained_cnn: Classifier, digits: DataSplits
) -> None:
    x, y = digits.test.head(100).tensors()
    untrained_student = {"student": "tiny_cnn", "train": {"epochs": 0}}
    for method, fields in [
        ("lowbit", {"bits": 4}), ("l1-filter", {"ratio": 0.5}), ("distill", untrained_student)
    ]:  # fmt: skip
        _, record = robcomp.compress_model(trained_cnn, method, data=(x, y), **fields)
        assert record.params > 0, method


def test_evaluate_model_refuses_before_scoring_and_names_holdout(
    trained_cnn: Classifier, test_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*_: Any, **__: Any) -> None:
        raise AssertionError("scored before refusing")

    monkeypatch.setattr(api, "compress_and_finetune", never)
    with pytest.raises(ConfigError, match=r"int8 needs training data.*holdout=N"):
        robcomp.evaluate_model(trained_cnn, f"npz:path={test_file},split=test", compress=["int8"])


def test_training_without_training_data_is_a_config_error(digits: DataSplits) -> None:
    from robcomp.train import TrainConfig, fit

    test_only = DataSplits(
        name="t", train=digits.test.take(slice(0, 0)), val=digits.test.take(slice(0, 0)),
        test=digits.test, num_classes=10, classes=digits.classes, mean=(0.0,), std=(1.0,),
    )  # fmt: skip
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    with pytest.raises(ConfigError, match="train needs training data"):
        fit(model, test_only, TrainConfig(epochs=1))
