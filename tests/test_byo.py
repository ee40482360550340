"""Bring your own model: timm:/torchvision: names, foreign weights on the command line, a file
declared a test set, statistics for foreign weights, module:callable beside the experiment."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from robcomp import data as datasets
from robcomp.cli import app
from robcomp.config import ConfigError
from robcomp.data.base import DataSplits
from robcomp.evaluate import accuracy
from robcomp.experiments import STORE_NAME, load_experiment, run_experiment
from robcomp.experiments.runner import build_model
from robcomp.experiments.spec import CellConfig, ModelSpec
from robcomp.models import (
    MODELS,
    Classifier,
    Normalize,
    create,
    input_statistics,
    load_checkpoint,
    save_checkpoint,
)
from robcomp.models.small import tiny_mlp

# --- timm: and torchvision: ------------------------------------------------------------------


def test_torchvision_models_build_for_the_data_behind_normalize() -> None:
    from torchvision.models import ResNet

    model = create("torchvision:resnet18", 7, (1, 16, 16), mean=[0.5], std=[0.25])
    assert isinstance(model.normalize, Normalize) and isinstance(model.net, ResNet)
    assert model.normalize.std.tolist() == [0.25]
    assert model.net.conv1.in_channels == 1  # torchvision's RGB stem adapted to grey inputs
    assert model.eval()(torch.rand(2, 1, 16, 16)).shape == (2, 7)
    rgb = create("torchvision:mobilenet_v3_small", 4, (3, 32, 32))
    assert rgb.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 4)


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("torchvision:resnet81", {}, "did you mean.*resnet18"),
        ("torchvision:fasterrcnn_resnet50_fpn", {}, "no classification model"),
        ("torchvision:resnet18", {"weights": "IMAGENET1K_V1"}, "local files.*model.weights"),
    ],
)
def test_torchvision_names_and_downloads_are_refused_clearly(
    name: str, options: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        create(name, 10, (3, 32, 32), **options)


def test_a_checkpoint_naming_torchvision_loads_without_trusting_code(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create("torchvision:resnet18", 10, (3, 16, 16), mean=[0.4] * 3, std=[0.2] * 3)
    spec = {"name": "torchvision:resnet18", "num_classes": 10, "in_shape": [3, 16, 16],
            "mean": [0.4] * 3, "std": [0.2] * 3}  # fmt: skip
    save_checkpoint(model, tmp_path / "ckpt", spec)
    loaded, _ = load_checkpoint(tmp_path / "ckpt")  # no trust_code: it runs no user code
    x = torch.rand(3, 3, 16, 16)
    assert torch.allclose(loaded(x), model.eval()(x))


def test_timm_models_build_behind_normalize(tmp_path: Path) -> None:
    pytest.importorskip("timm")
    model = create("timm:resnet18", 5, (1, 16, 16), drop_rate=0.1)
    assert isinstance(model, Classifier) and isinstance(model.normalize, Normalize)
    assert model.eval()(torch.rand(2, 1, 16, 16)).shape == (2, 5)
    with pytest.raises(ValueError, match="pretrained: true would download"):
        create("timm:resnet18", 5, (3, 16, 16), pretrained=True)
    with pytest.raises(ValueError, match="did you mean"):
        create("timm:resnet1B", 5, (3, 16, 16))
    spec = {"name": "timm:resnet18", "num_classes": 5, "in_shape": [1, 16, 16],
            "options": {"drop_rate": 0.1}}  # fmt: skip
    save_checkpoint(model, tmp_path, spec)
    loaded, _ = load_checkpoint(tmp_path)
    x = torch.rand(2, 1, 16, 16)
    assert torch.allclose(loaded(x), model(x))


def test_without_timm_the_error_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(ValueError, match=r"pip install 'robcomp\[timm\]'"):
        create("timm:resnet18", 10, (3, 32, 32))


# --- foreign weights, a file as a test set, statistics --------------------------------------


@pytest.fixture
def foreign(trained_cnn: Classifier, digits: DataSplits, tmp_path: Path) -> dict[str, Any]:
    """A published-style checkpoint (the bare network's state dict, torch.save) and a test
    file of the first 150 digits test images, as a user would bring them."""
    weights = tmp_path / "cnn.pt"
    torch.save({"state_dict": trained_cnn.net.state_dict()}, weights)
    x, y = digits.test.head(150).tensors()
    npz = tmp_path / "test.npz"
    np.savez(npz, x=(x.numpy() * 255).round().astype(np.uint8), y=y.numpy())
    return {"weights": weights, "npz": npz, "mean": digits.mean[0], "std": digits.std[0]}


def test_evaluate_takes_foreign_weights_and_says_what_it_scored(
    foreign: dict[str, Any], trained_cnn: Classifier
) -> None:
    test = datasets.get({"name": "npz", "path": str(foreign["npz"]), "split": "test"}).test
    expected = 100 * accuracy(trained_cnn, test)
    args = ["evaluate", "--model", "tiny_cnn", "--weights", str(foreign["weights"]),
            "--mean", str(foreign["mean"]), "--std", str(foreign["std"]),
            "--data", f"npz:path={foreign['npz']},split=test", "--limit", "60",
            "--attack", "autoattack:eps=0.1,version=custom,attacks=[fgsm,pgd]"]  # fmt: skip
    result = CliRunner().invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "test split of npz: 150 points clean, 60 attacked" in result.output
    assert f"{expected:.2f}" in result.output
    # AutoAttack's breakdown: one row per stage with the points it broke.
    assert "points broken" in result.output
    assert any(line.split()[1:2] == ["fgsm"] for line in result.output.splitlines())


def test_foreign_weights_without_statistics_are_an_error(foreign: dict[str, Any]) -> None:
    args = ["evaluate", "--model", "tiny_cnn", "--weights", str(foreign["weights"]),
            "--data", f"npz:path={foreign['npz']},split=test"]  # fmt: skip
    result = CliRunner().invoke(app, args, terminal_width=300)
    assert result.exit_code == 2
    assert "model.mean and model.std" in result.output and "mean: [0]" in result.output


def test_build_model_wants_statistics_for_weights_unless_the_model_brings_them(
    foreign: dict[str, Any], digits: DataSplits
) -> None:
    weights = str(foreign["weights"])
    with pytest.raises(ValueError, match="statistics these weights were trained with"):
        build_model(CellConfig(model=ModelSpec(name="tiny_cnn", weights=weights)), digits)
    given = ModelSpec(name="tiny_cnn", weights=weights, mean=(0.5,), std=(0.5,))
    model, spec = build_model(CellConfig(model=given), digits)
    assert spec["mean"] == [0.5] and model.normalize.mean.tolist() == [0.5]

    # A factory that knows its weights' statistics (as torchvision's ImageNet weights do).
    @input_statistics(lambda options, channels: ((0.25,), (0.75,)))
    def own_stats(*, num_classes: int, in_shape: tuple[int, ...]) -> nn.Module:
        return tiny_mlp(num_classes=num_classes, in_shape=in_shape)

    state = tiny_mlp(num_classes=10, in_shape=(1, 8, 8)).state_dict()
    mlp = Path(foreign["weights"]).with_name("mlp.pt")
    torch.save(state, mlp)
    with MODELS.temporarily("test_own_stats", own_stats):
        cfg = CellConfig(model=ModelSpec(name="test_own_stats", weights=str(mlp)))
        _, spec = build_model(cfg, digits)
    assert spec["mean"] == [0.25] and spec["std"] == [0.75]


def test_an_npz_declared_a_test_set_is_scored_whole_and_in_order(
    foreign: dict[str, Any], digits: DataSplits
) -> None:
    spec: Mapping[str, Any] = {"name": "npz", "path": str(foreign["npz"]), "split": "test"}
    splits = datasets.get(spec)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (0, 0, 150)
    assert torch.equal(splits.test.y, digits.test.y[:150])
    auto = datasets.get({"name": "npz", "path": str(foreign["npz"])})
    assert len(auto.test) == 30  # the default still splits 20 % off at random
    cfg = CellConfig(data=dict(spec), model=ModelSpec(name="tiny_cnn"))
    with pytest.raises(ConfigError, match=r"test set only.*train.epochs: 0"):
        build_model(cfg, splits)


@pytest.mark.parametrize(
    "compress, train", [({"name": "int8"}, 0), ({"name": "none"}, 1)], ids=["int8", "train"]
)
def test_a_test_set_that_would_calibrate_or_train_is_refused_before_any_cell(
    foreign: dict[str, Any], tmp_path: Path, compress: dict[str, Any], train: int
) -> None:
    experiment = {
        "name": "test-only",
        "data": {"name": "npz", "path": str(foreign["npz"]), "split": "test"},
        "model": {"name": "tiny_cnn", "weights": str(foreign["weights"]),
                  "mean": [foreign["mean"]], "std": [foreign["std"]]},
        "train": {"epochs": train},
        "evaluate": {"attacks": [], "diagnostics": False, "latency_batch_sizes": []},
        "grid": {"compress": [compress]},
    }  # fmt: skip
    with pytest.raises(ConfigError, match=r"needs training data.*no training split"):
        run_experiment(load_experiment(experiment), tmp_path / "out")
    assert not (tmp_path / "out" / STORE_NAME).exists()


# --- module:callable beside the experiment file ----------------------------------------------


def test_a_callable_beside_the_experiment_file_imports_and_its_checkpoint_finds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, digits: DataSplits
) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))  # restored after the test
    module = f"mynets_{uuid.uuid4().hex[:8]}"
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / f"{module}.py").write_text(
        "from torch import nn\n\n"
        "def build(num_classes, in_shape):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))\n"
    )
    (folder / "e.yaml").write_text(f"model: {{name: '{module}:build'}}\ntrain: {{epochs: 0}}\n")
    monkeypatch.chdir(tmp_path)  # not the project folder, and no PYTHONPATH
    (cell,) = load_experiment(folder / "e.yaml").cells
    assert cell.config.model.code_path == str(folder.resolve())
    model, spec = build_model(cell.config, digits)
    assert spec["code_path"] == str(folder.resolve())
    save_checkpoint(model, tmp_path / "ckpt", spec)

    # A fresh process: the module is not imported and its folder is not on the path.
    monkeypatch.delitem(sys.modules, module)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(folder.resolve())])
    loaded, _ = load_checkpoint(tmp_path / "ckpt", trust_code=True)
    x = digits.test.head(5).tensors()[0]
    assert torch.equal(loaded(x), model.eval()(x))
