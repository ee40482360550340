"""Sensor time series: .ts parsing, UCI HAR folders, min-max scaling, 1-D models and tooling."""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from robcomp import data as datasets
from robcomp.attacks.pgd import PGD
from robcomp.compress.efficiency import count_macs, measure
from robcomp.compress.proximal import ProximalL0
from robcomp.compress.structured import L1FilterPruning
from robcomp.data import DataError, DatasetNotFound, DataSplits, Split
from robcomp.data.sensors import UCI_HAR_SIGNALS, UCIHAR, MinMax, ScaledSplits, read_ts
from robcomp.evaluate.clean import accuracy
from robcomp.models import create
from robcomp.train import TrainConfig, fit

HEADER = "@problemName t\n@dimensions 2\n@seriesLength 3\n@classLabel true up down\n@data\n"


def _ts(tmp_path: Path, body: str, header: str = HEADER) -> Path:
    path = tmp_path / "x.ts"
    path.write_text("# a comment\n" + header + body)
    return path


def _basicmotions(robcomp_data: Path) -> Path:
    folder = robcomp_data / "sensors"
    if not (folder / "BasicMotions_TRAIN.ts").is_file():
        pytest.skip("BasicMotions .ts files are not under ROBCOMP_DATA/sensors")
    return folder


# ------------------------------------------------------------------------------ .ts files


def test_read_ts_values_labels_and_class_order(tmp_path: Path) -> None:
    path = _ts(tmp_path, "1,2,3:4,5,6:down\n\n0.5,-1,2e-1:7,8,9:up\n")
    x, y, classes = read_ts(path)
    assert classes == ("up", "down")  # @classLabel order, not order of appearance
    assert x.dtype == torch.float32 and x.shape == (2, 2, 3)
    assert torch.equal(x[0], torch.tensor([[1.0, 2, 3], [4, 5, 6]]))
    assert torch.allclose(x[1, 0], torch.tensor([0.5, -1.0, 0.2]))
    assert y.tolist() == [1, 0]


@pytest.mark.parametrize(
    ("body", "header", "message"),
    [
        ("1,2,3:4,x,6:up\n", HEADER, "x.ts:7: channel 1 holds 'x', not a number"),
        ("1,2,3:4,?,6:up\n", HEADER, "x.ts:7: channel 1 holds '?'"),
        ("1,2,3:4,5:up\n", HEADER, "x.ts:7: channels have unequal lengths [3, 2]"),
        ("1,2,3:4,5,6:up\n1,2:3,4:up\n", HEADER, "x.ts:8: series has 2 channels of length 2"),
        ("1,2,3:4,5,6:sideways\n", HEADER, "x.ts:7: label 'sideways' is not one of"),
        ("1,2,3\n", HEADER, "x.ts:7: expected channels separated by ':'"),
        (
            "1,2,3:4,5,6:up\n",
            HEADER.replace("@classLabel true up down\n", ""),
            "x.ts:5: no class labels",
        ),
        ("", HEADER, "no series"),
        ("1,2,3:4,5,6:up\n", HEADER.replace("@dimensions 2", "@dimensions 3"), "@dimensions 3"),
        ("1,2,3:up\n", "@equalLength false\n" + HEADER, "equal-length series only"),
        ("1:up\n", "@classLabel false\n@data\n", "no class labels"),
        ("1,nan,3:4,5,6:up\n", HEADER, "x.ts:7: channel 0 holds NaN"),
    ],
)
def test_read_ts_refuses_malformed_files_naming_file_and_line(
    tmp_path: Path, body: str, header: str, message: str
) -> None:
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("?", r"\?")):
        read_ts(_ts(tmp_path, body, header))


def test_basicmotions_real_files(robcomp_data: Path) -> None:
    folder = _basicmotions(robcomp_data)
    for part in ("TRAIN", "TEST"):
        x, y, classes = read_ts(folder / f"BasicMotions_{part}.ts")
        assert x.shape == (40, 6, 100) and x.dtype == torch.float32
        assert classes == ("Standing", "Running", "Walking", "Badminton")
        assert torch.bincount(y).tolist() == [10, 10, 10, 10]
    splits = datasets.get({"name": "basicmotions", "root": str(robcomp_data)})
    assert isinstance(splits, ScaledSplits) and splits.scale is not None
    assert (len(splits.train), len(splits.val), len(splits.test)) == (36, 4, 40)
    assert splits.in_shape == (6, 100) and splits.num_classes == 4
    # The scale reproduces the inputs from the raw file: it is the transform that was applied.
    raw_test, _, _ = read_ts(folder / "BasicMotions_TEST.ts")
    assert torch.allclose(splits.scale.apply(raw_test), splits.test.x)


def test_basicmotions_missing_names_the_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFound, match=r"BasicMotions_TRAIN\.ts and BasicMotions_TEST\.ts"):
        datasets.get({"name": "basicmotions", "root": str(tmp_path)})


# ------------------------------------------------------------------------------ UCI HAR


def _uci_tree(root: Path, n: dict[str, int], length: int = 16) -> Path:
    """A tiny 'UCI HAR Dataset' folder: channel c of window i holds 100 c + i + t / 100."""
    folder = root / "UCI HAR Dataset"
    names = ["WALKING", "WALKING_UPSTAIRS", "WALKING_DOWNSTAIRS", "SITTING", "STANDING", "LAYING"]
    folder.mkdir(parents=True)
    (folder / "activity_labels.txt").write_text(
        "".join(f"{i} {name}\n" for i, name in enumerate(names, start=1))
    )
    for part, count in n.items():
        signals = folder / part / "Inertial Signals"
        signals.mkdir(parents=True)
        labels = np.arange(count) % 6 + 1
        np.savetxt(folder / part / f"y_{part}.txt", labels, fmt="%d")
        for c, signal in enumerate(UCI_HAR_SIGNALS):
            values = 100 * c + np.arange(count)[:, None] + np.arange(length)[None, :] / 100
            np.savetxt(signals / f"{signal}_{part}.txt", values, fmt="%.6e")
    return folder


def test_uci_har_reads_a_tiny_tree_in_channel_order(tmp_path: Path) -> None:
    _uci_tree(tmp_path, {"train": 12, "test": 6})
    train, test, classes = UCIHAR(root=str(tmp_path)).read()
    assert classes[0] == "WALKING" and classes[5] == "LAYING" and len(classes) == 6
    assert train.x.shape == (12, 9, 16) and test.x.shape == (6, 9, 16)
    assert train.y.tolist() == [0, 1, 2, 3, 4, 5] * 2  # labels 1..6 become 0..5
    # body_acc xyz, body_gyro xyz, total_acc xyz: channel c is the file written c-th.
    assert torch.allclose(train.x[3, :, 0], torch.arange(9) * 100.0 + 3)
    splits = datasets.get({"name": "uci-har", "root": str(tmp_path), "val_fraction": 0.25})
    assert splits.in_shape == (9, 16) and splits.num_classes == 6
    assert (len(splits.train), len(splits.val), len(splits.test)) == (9, 3, 6)
    assert isinstance(splits, ScaledSplits) and splits.scale is not None
    assert splits.scale.low[8] == pytest.approx(800.0) and splits.scale.high[8] > 811.0


def test_uci_har_absent_or_broken_says_what_is_expected(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFound, match=r"Inertial Signals/<signal>_.*body_acc_x"):
        datasets.get({"name": "uci-har", "root": str(tmp_path)})
    folder = _uci_tree(tmp_path, {"train": 6, "test": 6})
    (folder / "test" / "Inertial Signals" / "body_gyro_y_test.txt").unlink()
    with pytest.raises(DatasetNotFound, match=r"body_gyro_y_test\.txt is missing"):
        datasets.get({"name": "uci-har", "root": str(tmp_path)})
    np.savetxt(folder / "test" / "Inertial Signals" / "body_gyro_y_test.txt", np.zeros((5, 16)))
    with pytest.raises(DataError, match="body_gyro_y of shape \\(5, 16\\)"):
        datasets.get({"name": "uci-har", "root": str(tmp_path)})
    np.savetxt(folder / "test" / "Inertial Signals" / "body_gyro_y_test.txt", np.zeros((6, 16)))
    np.savetxt(folder / "test" / "y_test.txt", np.full(6, 7), fmt="%d")
    with pytest.raises(DataError, match=r"y_test.txt: labels range over \[7, 7\]"):
        datasets.get({"name": "uci-har", "root": str(tmp_path)})


# ------------------------------------------------------------------------------ scaling


def test_minmax_scales_training_data_to_unit_range_and_clips_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    train = torch.tensor([[[-2.0, 0.0, 2.0], [5.0, 5.0, 5.0]], [[1.0, 1.0, 1.0], [5.0, 5, 5]]])
    scale = MinMax.fit(train)
    assert scale.low == (-2.0, 5.0) and scale.high == (2.0, 5.0)
    scaled = scale.apply(train)
    assert torch.equal(scaled[0, 0], torch.tensor([0.0, 0.5, 1.0]))
    assert torch.equal(scaled[:, 1], torch.zeros(2, 3))  # a constant channel maps to 0
    test = torch.tensor([[[-4.0, 0.0, 3.0], [7.0, 5.0, 4.0]]])
    with caplog.at_level(logging.INFO, logger="robcomp.data.sensors"):
        out = scale.apply(test, "probe test")
    assert torch.equal(out[0, 0], torch.tensor([0.0, 0.5, 1.0]))  # -4 and 3 clipped
    assert torch.equal(out[0, 1], torch.tensor([1.0, 0.0, 0.0]))  # span 1: 7 -> 2 -> 1, 4 -> 0
    assert "probe test: 4 of 6 values" in caplog.text
    assert torch.allclose(scale.invert(scaled), train)
    assert scale.as_dict() == {"kind": "minmax", "low": [-2.0, 5.0], "high": [2.0, 5.0]}
    with pytest.raises(ValueError, match="fitted on 2 channels"):
        scale.apply(torch.zeros(1, 3, 4))


# ------------------------------------------------------------------------------ models


def _waves(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes of noisy sine waves (2 channels x 64 steps) differing in frequency."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    t = torch.arange(64) / 64
    phase = torch.rand(n, 2, 1, generator=g) * 2 * math.pi
    x = torch.sin(2 * math.pi * (2 + 3 * y).view(-1, 1, 1) * t + phase)
    return x + 0.3 * torch.randn(n, 2, 64, generator=g), y


@pytest.fixture(scope="module")
def waves() -> DataSplits:
    x_train, y_train = _waves(90, 0)
    x_test, y_test = _waves(60, 1)
    scale = MinMax.fit(x_train)
    return DataSplits(
        name="waves",
        train=Split(scale.apply(x_train), y_train),
        val=Split(scale.apply(x_test[:0]), y_test[:0]),
        test=Split(scale.apply(x_test), y_test),
        num_classes=3,
        classes=("2 Hz", "5 Hz", "8 Hz"),
    )


@pytest.mark.parametrize(
    ("name", "options"), [("har_cnn", {}), ("resnet18_1d", {}), ("resnet18_1d", {"width": 8})]
)
@pytest.mark.parametrize("in_shape", [(9, 128), (6, 100), (1, 8)])
def test_1d_models_output_logits(name: str, options: dict[str, int], in_shape: tuple[int, int]):
    model = create(name, 5, in_shape, **options).eval()
    out = model(torch.rand(3, *in_shape))
    assert out.shape == (3, 5) and torch.isfinite(out).all()
    assert count_macs(model, in_shape) > 0


def test_har_cnn_is_the_authors_size_and_refuses_bad_shapes() -> None:
    # Kwon & Lee's HARClassifier on UCI HAR (9 x 128, 6 classes) has 247,414 parameters.
    assert sum(p.numel() for p in create("har_cnn", 6, (9, 128)).parameters()) == 247_414
    with pytest.raises(ValueError, match=r"'har_cnn' needs at least 1 channel and 8 time steps"):
        create("har_cnn", 6, (9, 7))
    with pytest.raises(ValueError, match=r"'resnet18_1d' needs signal inputs \(C, L\)"):
        create("resnet18_1d", 6, (3, 32, 32))


@pytest.mark.slow
def test_har_cnn_learns_separable_waves_and_pgd_stays_in_the_ball(waves: DataSplits) -> None:
    torch.manual_seed(0)
    model = create("har_cnn", 3, waves.in_shape, mean=waves.mean, std=waves.std)
    fit(model, waves, TrainConfig(epochs=30, lr=0.05, batch_size=8, select="last"), seed=0)
    model.eval()
    clean = accuracy(model, waves.test)
    assert clean > 0.9  # chance is 1/3; measured 1.0
    x, y = waves.test.tensors()
    eps = 0.1
    x_adv = PGD(eps=eps, steps=10)(model, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == torch.float32
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    with torch.no_grad():
        robust = float((model(x_adv).argmax(1) == y).float().mean())
    assert robust < clean


def test_har_cnn_learns_basicmotions(robcomp_data: Path) -> None:
    _basicmotions(robcomp_data)
    splits = datasets.get({"name": "basicmotions", "root": str(robcomp_data), "val_fraction": 0})
    torch.manual_seed(0)
    model = create("har_cnn", 4, splits.in_shape, mean=splits.mean, std=splits.std)
    fit(model, splits, TrainConfig(epochs=40, lr=0.05, batch_size=8, select="last"), seed=0)
    assert accuracy(model.eval(), splits.test) >= 0.6  # chance 0.25; measured 0.80


# ------------------------------------------------------------------------------ compressors


@pytest.mark.parametrize(("name", "options"), [("har_cnn", {}), ("resnet18_1d", {"width": 8})])
def test_l1_filter_pruning_shrinks_1d_models(
    waves: DataSplits, name: str, options: dict[str, int]
) -> None:
    torch.manual_seed(0)
    model = create(name, 3, waves.in_shape, **options).eval()
    before = copy.deepcopy(model.state_dict())
    pruned, record = L1FilterPruning(ratio=0.5)(model, waves)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    dense = measure(model, waves.in_shape)
    assert record.macs < 0.5 * dense.macs and record.params < dense.params
    assert pruned.eval()(torch.rand(2, *waves.in_shape)).shape == (2, 3)


def test_proximal_l0_prunes_the_har_cnn_chain(waves: DataSplits) -> None:
    torch.manual_seed(0)
    model = create("har_cnn", 3, waves.in_shape).eval()
    train = TrainConfig(epochs=1, batch_size=32, lr=0.01, select="last")
    # per layer: half of every conv's 32, 64, 128 filters
    pruned, record = ProximalL0(sparsity=0.5, allocation="layer", train=train)(model, waves)
    convs = [m for m in pruned.modules() if isinstance(m, torch.nn.Conv1d)]
    assert [c.out_channels for c in convs] == [16, 32, 64]
    assert record.macs < count_macs(model, waves.in_shape)
    # global (the paper's rate): half of the chain's weights, wherever the threshold puts them
    pruned, record = ProximalL0(sparsity=0.5, train=train)(model, waves)
    assert 0.5 <= record.details["weight_sparsity"] < 0.6
    assert record.params < 0.55 * sum(p.numel() for p in model.parameters())
    # resnet18_1d: tests/test_proximal.py (torchvision-layout ResNets)


def test_a_cell_on_sensor_data_keeps_its_input_scale_in_the_checkpoint_spec(
    tmp_path: Path,
) -> None:
    import json

    from robcomp.experiments import load_experiment, run_experiment

    _uci_tree(tmp_path / "data", {"train": 60, "test": 24})
    raw = {
        "name": "har",
        "data": {"name": "uci-har", "root": str(tmp_path / "data")},
        "model": {"name": "har_cnn", "options": {"hidden": 8}},
        "train": {"epochs": 1, "lr": 0.01, "batch_size": 16},
        "evaluate": {"attacks": [{"name": "fgsm", "eps": 0.05}], "limit": 8,
                     "diagnostics": False, "latency_batch_sizes": []},
    }  # fmt: skip
    summary = run_experiment(load_experiment(raw), tmp_path / "out")
    assert summary.ran == 1 and not summary.failed
    (spec_file,) = (tmp_path / "out" / "cache").glob("baseline-*/spec.json")
    scale = json.loads(spec_file.read_text())["input_scale"]
    assert scale["kind"] == "minmax" and len(scale["low"]) == len(UCI_HAR_SIGNALS) == 9
    assert scale["low"][0] < scale["high"][0]
