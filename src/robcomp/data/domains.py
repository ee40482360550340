"""Digit domains and the domain-shift protocol of Shen et al. (2024).

Shen et al., *Robustness to distribution shifts of compressed networks for edge devices* (2024),
train on one domain and score on the others: the source domain (all of its images) is split
90 % train / 10 % validation with the random seed 1, the model trains on the 90 %, and the paper
reports the source *validation* accuracy beside the accuracy on the *whole* of every other domain.

- ``usps`` and ``mnist-m`` are two more digit domains beside ``mnist``, ``svhn`` and ``digits``.
- ``domain`` wraps any dataset in that protocol: ``data: {name: domain, source: mnist}`` trains
  on 90 % of all of MNIST's 70,000 images, split with ``split_seed`` (1, whatever the run seed);
  its validation split is also its test split, so the cell's clean accuracy *is* the source
  validation accuracy the paper reports (Office-31 has no test split; the paper's adversarial
  test set is the same 10 %).

The other domains are scored by the ``domains`` shift (:mod:`robcomp.data.shifts.domains`).
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from robcomp.config import OPERATIONAL, build_component
from robcomp.data.base import (
    DataError,
    Dataset,
    DatasetNotFound,
    DataSplits,
    Split,
    data_root,
    split_off,
)
from robcomp.data.registry import DATASETS

DIGIT_CLASSES = tuple(str(i) for i in range(10))
# The fixed seed of the test split of a domain that ships without one (MNIST-M offline).
_TEST_SPLIT_SEED = 1


def concat(*splits: Split) -> Split:
    """One split holding the rows of ``splits`` in order."""
    return Split(torch.cat([s.x for s in splits]), torch.cat([s.y for s in splits]))


def whole_domain(dataset: Any, seed: int = 0) -> tuple[Split, int, tuple[str, ...]]:
    """Every image of a dataset (train, validation and test) with its class count and names.

    A dataset with a ``whole()`` method (``imagefolder``, ``domain``) says itself what its domain
    holds; any other one is the concatenation of its ``load_splits`` pool and test split.
    """
    whole = getattr(dataset, "whole", None)
    if whole is not None:
        split, num_classes, classes = whole()
        return split, int(num_classes), tuple(classes)
    pool, test, num_classes, classes = dataset.load_splits(seed)
    return concat(pool, test), num_classes, tuple(classes)


def domain_splits(
    whole: Split,
    *,
    name: str,
    num_classes: int,
    classes: tuple[str, ...],
    val_fraction: float,
    split_seed: int,
    train_limit: int | None = None,
) -> DataSplits:
    """The source-domain splits of Shen et al. (2024): ``val_fraction`` of ``whole`` (drawn
    with ``split_seed``, never the run seed) is validation, the rest is train, and the test
    split is the validation split (the paper reports source validation accuracy)."""
    train, val = split_off(whole, val_fraction, torch.Generator().manual_seed(split_seed))
    return DataSplits(
        name=name,
        train=train.head(train_limit),
        val=val,
        test=val,
        num_classes=num_classes,
        classes=classes,
    )


def check_protocol_fields(val_fraction: float, split_seed: int, test_limit: int | None) -> None:
    """Reject settings the source-domain protocol cannot honour (raises ValueError)."""
    if val_fraction <= 0.0:  # the validation split is the test split
        raise ValueError(
            f"val_fraction must be in (0, 1) for a domain source (its validation split is the "
            f"test split), got {val_fraction}"
        )
    if split_seed < 0:
        raise ValueError(f"split_seed must be >= 0, got {split_seed}")
    if test_limit is not None:
        raise ValueError(
            "test_limit must be null for a domain source: its test split is its validation "
            "split; make val_fraction smaller instead"
        )


def _find_file(root: str | None, filename: str, dataset: str) -> Path:
    base = data_root(root)
    candidates = [base / "domains" / filename, base / filename]
    for path in candidates:
        if path.is_file():
            return path
    looked = ", ".join(str(p.resolve()) for p in candidates)
    raise DatasetNotFound(
        f"{dataset}: the file {filename} was not found. Looked in: {looked}. Put it in "
        "ROOT/domains/ and point ROBCOMP_DATA (or the dataset's `root`) at ROOT"
    )


def _read_npz(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    # allow_pickle=False: an npz is someone else's file; object arrays would unpickle.
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in keys if k not in data.files]
            if missing:
                raise DataError(f"{path}: no array {missing[0]!r}; the file holds {data.files}")
            return {k: np.asarray(data[k]) for k in keys}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{path}: not a readable .npz file ({err})") from None


def _images(x: np.ndarray, path: Path, key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """uint8 images checked against their expected per-image shape, as NCHW."""
    if x.dtype != np.uint8 or x.shape[1:] != shape:
        raise DataError(f"{path}: {key!r} is {x.dtype} {x.shape}; expected uint8 (N, {shape})")
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2).contiguous()


def _labels(y: np.ndarray, n: int, path: Path, key: str) -> torch.Tensor:
    if y.dtype.kind not in "iu" or y.shape != (n,):
        raise DataError(f"{path}: {key!r} is {y.dtype} {y.shape}; expected {n} integer labels")
    return torch.from_numpy(y.astype(np.int64))


@DATASETS.register("usps")
@dataclass(frozen=True, kw_only=True)
class USPS(Dataset):
    """USPS handwritten digits (Hull 1994), 7,291 train / 2,007 test, 1x16x16.

    Read from ``ROOT/domains/usps.npz`` (``x_train`` uint8 (7291, 16, 16), ``y_train``,
    ``x_test``, ``y_test``), ROOT being ``root``, else ``$ROBCOMP_DATA``, else ``./data``.
    """

    root: str | None = field(default=None, metadata=OPERATIONAL)

    filename: ClassVar[str] = "usps.npz"

    def load_splits(self, seed: int) -> tuple[Split, Split, int, tuple[str, ...]]:
        path = _find_file(self.root, self.filename, "usps")
        arrays = _read_npz(path, ("x_train", "y_train", "x_test", "y_test"))
        parts = []
        for part in ("train", "test"):
            x = _images(arrays[f"x_{part}"], path, f"x_{part}", (16, 16))
            parts.append(Split(x, _labels(arrays[f"y_{part}"], len(x), path, f"y_{part}")))
        return parts[0], parts[1], 10, DIGIT_CLASSES


@DATASETS.register("mnist-m")
@dataclass(frozen=True, kw_only=True)
class MNISTM(Dataset):
    """MNIST-M (Ganin & Lempitsky 2015): MNIST digits blended over colour photo patches, 3x32x32.

    Only its 9,001-image test part is read, from ``ROOT/domains/mnist_m_test.npz`` (``x`` uint8
    (9001, 32, 32, 3) HWC, ``y``, ``mnist_test_index``: the MNIST test image each one was made
    from). Used as a source on its own, ``test_fraction`` of it is held out as the test split with
    a fixed seed (every run is scored on the same images) and the run seed splits validation off
    the rest; under ``{name: domain, source: mnist-m}`` it is split 90/10 like any domain.
    """

    root: str | None = field(default=None, metadata=OPERATIONAL)
    test_fraction: float = 0.2

    filename: ClassVar[str] = "mnist_m_test.npz"

    def _arrays(self) -> tuple[Path, dict[str, np.ndarray]]:
        path = _find_file(self.root, self.filename, "mnist-m")
        return path, _read_npz(path, ("x", "y", "mnist_test_index"))

    def load_splits(self, seed: int) -> tuple[Split, Split, int, tuple[str, ...]]:
        path, arrays = self._arrays()
        x = _images(arrays["x"], path, "x", (32, 32, 3))
        whole = Split(x, _labels(arrays["y"], len(x), path, "y"))
        pool, test = split_off(
            whole, self.test_fraction, torch.Generator().manual_seed(_TEST_SPLIT_SEED)
        )
        return pool, test, 10, DIGIT_CLASSES

    def mnist_test_index(self) -> torch.Tensor:
        """The MNIST test images (indices into the 10,000) this domain's images were made from."""
        path, arrays = self._arrays()
        index = arrays["mnist_test_index"]
        if index.dtype.kind not in "iu" or index.ndim != 1:
            raise DataError(f"{path}: 'mnist_test_index' is {index.dtype} {index.shape}")
        return torch.from_numpy(index.astype(np.int64))


def dataset_spec(spec: Mapping[str, Any] | str) -> dict[str, Any]:
    """A dataset spec as a ``{"name": ..., **options}`` dict (a bare name is ``{"name": name}``)."""
    if isinstance(spec, str):
        return {"name": spec}
    return dict(spec)


@DATASETS.register("domain")
@dataclass(frozen=True, kw_only=True)
class Domain(Dataset):
    """A dataset used as a source domain under the protocol of Shen et al. (2024).

    All of ``source``'s images (its train and test splits together) are split ``1 -
    val_fraction`` train / ``val_fraction`` validation with ``split_seed``, independent of the
    run seed; the test split is the validation split, so a cell's clean accuracy is the
    source validation accuracy of the paper. ``train_limit`` caps the training split.

    Example: ``data: {name: domain, source: {name: mnist, root: /data}}``.

    Attributes:
        source: the dataset (a name or ``{name: ..., **options}``) that is the source domain.
        split_seed: seed of the train/validation split (the paper's 1).
    """

    source: str | dict[str, Any]
    split_seed: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_protocol_fields(self.val_fraction, self.split_seed, self.test_limit)
        if dataset_spec(self.source).get("name") == "domain":
            raise ValueError("source must be a dataset, not another domain")
        self.dataset()  # an unknown name or a bad option fails when the file is loaded

    def dataset(self) -> Any:
        """The source dataset component."""
        return build_component(DATASETS, dataset_spec(self.source), "source")

    def whole(self) -> tuple[Split, int, tuple[str, ...]]:
        """Every image of the source domain."""
        return whole_domain(self.dataset())

    def load(self, seed: int = 0) -> DataSplits:
        del seed  # the protocol's split never depends on the run seed
        whole, num_classes, classes = self.whole()
        return domain_splits(
            whole,
            name=str(dataset_spec(self.source)["name"]),
            num_classes=num_classes,
            classes=classes,
            val_fraction=self.val_fraction,
            split_seed=self.split_seed,
            train_limit=self.train_limit,
        )


# ITU-R BT.601 luma weights of R, G, B: what PIL's convert("L") and torchvision's rgb_to_grayscale
# use, so a colour domain turns grey as those libraries would turn it.
LUMA_601 = (0.299, 0.587, 0.114)


def describe_match(shape: tuple[int, ...], in_shape: tuple[int, ...]) -> str:
    """The transform :func:`match_shape` applies from ``shape`` to ``in_shape``, in words."""
    steps = []
    if shape[0] != in_shape[0]:
        steps.append("RGB -> grey (ITU-R 601 luma)" if in_shape[0] == 1 else "grey -> RGB (repeat)")
    if shape[1:] != in_shape[1:]:
        steps.append("resize (bilinear, antialias)")
    shown = "x".join(map(str, shape)) + " -> " + "x".join(map(str, in_shape))
    return f"{shown}: {', '.join(steps) or 'unchanged'}"


def match_shape(split: Split, in_shape: tuple[int, ...], chunk: int = 2048) -> Split:
    """``split``'s images at the shape ``in_shape`` (C, H, W) of another domain.

    Colour becomes grey by ITU-R 601 luma, grey becomes colour by repeating the channel, and the
    height and width are resized bilinearly with antialiasing (so shrinking a photo averages
    its pixels instead of aliasing). uint8 stays uint8 (rounded once at the end), floats stay
    in [0, 1]; the labels are unchanged. A split already of that shape is returned as is.

    Raises:
        ValueError: when either shape is not (C, H, W), or the channel counts are neither equal
            nor 1 and 3.
    """
    shape = tuple(split.x.shape[1:])
    in_shape = tuple(int(s) for s in in_shape)
    if shape == in_shape:
        return split
    if len(shape) != 3 or len(in_shape) != 3:
        raise ValueError(f"match_shape needs images (C, H, W), got {shape} -> {in_shape}")
    if shape[0] != in_shape[0] and {shape[0], in_shape[0]} != {1, 3}:
        raise ValueError(
            f"match_shape turns grey into RGB or back, not {shape[0]} into {in_shape[0]} channels"
        )
    parts = [_match_chunk(split.x[i : i + chunk], in_shape) for i in range(0, len(split), chunk)]
    x = torch.cat(parts) if parts else split.x.new_empty((0, *in_shape))
    return Split(x, split.y)


def _match_chunk(x: torch.Tensor, in_shape: tuple[int, ...]) -> torch.Tensor:
    out = Split.to_float(x)  # (B, C, H, W) in [0, 1]
    channels, height, width = in_shape
    if out.shape[1] == 3 and channels == 1:  # before resizing: one channel is cheaper
        weights = torch.tensor(LUMA_601, dtype=out.dtype).view(1, 3, 1, 1)
        out = (out * weights).sum(dim=1, keepdim=True)
    if tuple(out.shape[2:]) != (height, width):
        out = F.interpolate(
            out, size=(height, width), mode="bilinear", align_corners=False, antialias=True
        )
    if out.shape[1] == 1 and channels == 3:  # after resizing: three equal channels
        out = out.expand(-1, 3, -1, -1)
    out = out.clamp(0.0, 1.0)  # bilinear interpolation stays in range; float error may not
    if x.dtype == torch.uint8:
        return out.mul(255.0).round_().to(torch.uint8)
    return out.contiguous()
