"""Every registered dataset keeps the contract: float32 in [0, 1], int64 labels, three splits."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from robcomp import data as datasets
from robcomp.config import ConfigError
from robcomp.data import DATASETS, DataError, DatasetNotFound
from robcomp.data.base import DataSplits
from robcomp.data.transforms import crop_flip

REAL = os.environ.get("ROBCOMP_DATA")


def _npz(tmp_path: Path) -> str:
    rng = np.random.default_rng(0)
    path = tmp_path / "toy.npz"
    np.savez(path, x=rng.integers(0, 256, (60, 6, 6, 3), dtype=np.uint8), y=rng.integers(0, 3, 60))
    return str(path)


def _image_tree(tmp_path: Path) -> Path:
    """root/<domain>/<class>/<png>: two domains, two classes, five 12x12 images each."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for domain in ("a", "b"):
        for label in ("cat", "dog"):
            folder = tmp_path / "tree" / domain / label
            folder.mkdir(parents=True)
            for i in range(5):
                pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return tmp_path / "tree"


def _spec(name: str, tmp_path: Path) -> dict[str, Any]:
    """A loadable spec for each registered dataset, or a skip when its files are absent."""
    if name == "digits":
        return {"name": name}
    if name == "gaussians":
        return {"name": name, "n": 2000}
    if name == "npz":
        return {"name": name, "path": _npz(tmp_path)}
    if name == "domain":  # the domain protocol around any source
        return {"name": name, "source": "digits"}
    if name == "imagefolder":
        return {"name": name, "root": str(_image_tree(tmp_path)), "source": "a", "size": 8}
    if name == "fashion-mnist" and Path("/usr/share/datasets/fashion-mnist").is_dir():
        return {"name": name}
    if not REAL:
        pytest.skip(f"{name}: real data; set ROBCOMP_DATA to run")
    return {"name": name, "root": REAL}


def check_contract(splits: DataSplits) -> None:
    assert len(splits.train) > 0 and len(splits.test) > 0
    for split in (splits.train, splits.val, splits.test):
        if len(split) == 0:
            continue
        x, y = next(split.batches(64))
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == splits.in_shape
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        assert int(y.min()) >= 0 and int(y.max()) < splits.num_classes
    assert len(splits.mean) == len(splits.std) == splits.in_shape[0]
    assert len(splits.classes) == splits.num_classes


@pytest.mark.parametrize("name", DATASETS.names())
def test_dataset_contract(name: str, tmp_path: Path) -> None:
    try:
        splits = datasets.get(_spec(name, tmp_path), seed=0)
    except DatasetNotFound as err:
        pytest.skip(f"{name} not present: {err}")
    assert splits.name == name
    check_contract(splits)


def test_digits_shape_and_determinism() -> None:
    a, b = datasets.get("digits", seed=3), datasets.get("digits", seed=3)
    assert a.in_shape == (1, 8, 8) and a.num_classes == 10
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert torch.equal(a.train.y, b.train.y) and torch.equal(a.val.x, b.val.x)
    c = datasets.get("digits", seed=4)
    assert not torch.equal(a.train.y, c.train.y)  # the seed changes the train/val split...
    assert torch.equal(a.test.y, c.test.y)  # ...but never the test split


def test_limits_and_val_fraction() -> None:
    s = datasets.get({"name": "digits", "train_limit": 100, "test_limit": 50, "val_fraction": 0.2})
    assert len(s.train) == 100 and len(s.test) == 50
    assert len(s.val) == round(0.2 * (1797 - len(datasets.get("digits").test)))


def test_gaussians_follow_the_simulation() -> None:
    s = datasets.get({"name": "gaussians", "n": 4000})
    assert s.in_shape == (1, 4, 4) and s.num_classes == 4
    counts = torch.bincount(torch.cat([s.train.y, s.val.y, s.test.y]), minlength=4)
    assert counts.tolist() == [1000, 1000, 1000, 1000]


def test_npz_layouts_and_errors(tmp_path: Path) -> None:
    s = datasets.get({"name": "npz", "path": _npz(tmp_path), "test_fraction": 0.25})
    assert s.in_shape == (3, 6, 6) and len(s.test) == 15
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.full((10, 4), 2.0, dtype=np.float32), y=np.zeros(10, dtype=np.int64))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        datasets.get({"name": "npz", "path": str(bad)})
    with pytest.raises(DatasetNotFound, match="no file"):
        datasets.get({"name": "npz", "path": str(tmp_path / "nope.npz")})
    with pytest.raises(DataError, match="no array 'images'"):
        datasets.get({"name": "npz", "path": _npz(tmp_path), "x_key": "images"})


def test_real_cifar_npz_loads(robcomp_data: Path) -> None:
    path = robcomp_data / "cifar10-test-first1000.npz"
    s = datasets.get({"name": "npz", "path": str(path), "val_fraction": 0.0})
    assert s.in_shape == (3, 32, 32) and len(s.train) + len(s.test) == 1000


def test_missing_dataset_says_where_and_how(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFound) as info:
        datasets.get({"name": "mnist", "root": str(tmp_path)})
    msg = str(info.value)
    assert str(tmp_path / "mnist") in msg and "download: true" in msg and "ROBCOMP_DATA" in msg
    with pytest.raises(DatasetNotFound, match="download: true"):
        datasets.get({"name": "cifar10", "root": str(tmp_path)})


def test_unknown_dataset_and_option() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'digits'"):
        datasets.get("digit")
    with pytest.raises(ConfigError, match="unknown key 'val_fracton'"):
        datasets.get({"name": "digits", "val_fracton": 0.1})
    with pytest.raises(ConfigError, match="val_fraction must be in"):
        datasets.get({"name": "digits", "val_fraction": 1.5})


def test_mnist_from_shared_gz_files(robcomp_data: Path) -> None:
    s = datasets.get({"name": "mnist", "root": str(robcomp_data)})
    assert s.in_shape == (1, 28, 28)
    assert torch.bincount(s.test.y).tolist() == [
        980,
        1135,
        1032,
        1010,
        982,
        892,
        958,
        1028,
        974,
        1009,
    ]


def test_shuffled_batches_need_a_generator_and_cover_everything(digits: DataSplits) -> None:
    with pytest.raises(ValueError, match="seeded"):
        next(digits.train.batches(32, shuffle=True))
    g = torch.Generator().manual_seed(0)
    ys = torch.cat([y for _, y in digits.train.batches(100, shuffle=True, generator=g)])
    assert sorted(ys.tolist()) == sorted(digits.train.y.tolist())


def test_crop_flip_keeps_range_and_shape() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 32, 32)
    out = crop_flip(x, g)
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    assert not torch.equal(out, x)
