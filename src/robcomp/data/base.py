"""Dataset splits held in memory, with batching that always yields float32 in [0, 1]."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from robcomp.config import ConfigError

Augment = Callable[[Tensor, torch.Generator], Tensor]


class DatasetNotFound(FileNotFoundError):
    """A dataset's files are missing; the message says where we looked and how to get them."""


class DataError(ValueError):
    """A dataset's files exist but hold data robcomp cannot use; the message says what is wrong
    in one line (the file, the array, the offending values)."""


def data_root(root: str | None) -> Path:
    """The folder datasets are read from: ``root``, else ``$ROBCOMP_DATA``, else ``./data``."""
    return Path(root or os.environ.get("ROBCOMP_DATA") or "data").expanduser()


@dataclass(frozen=True)
class Split:
    """One split: ``x`` is uint8 (stored compactly) or float32 in [0, 1], NCHW or NCL."""

    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"x has {len(self.x)} rows but y has {len(self.y)}")

    def __len__(self) -> int:
        return len(self.y)

    def take(self, index: Tensor | slice) -> Split:
        """A sub-split (the tensors are views or copies, never modified)."""
        return Split(self.x[index], self.y[index])

    def head(self, n: int | None) -> Split:
        return self if n is None or n >= len(self) else self.take(slice(0, n))

    def to(self, device: torch.device | str) -> Split:
        """The split on ``device`` (itself when already there); uint8 stays uint8, so an
        accelerator holds the compact copy and converts each batch where it is used."""
        device = torch.device(device)
        if self.x.device == device and self.y.device == device:
            return self
        return Split(self.x.to(device), self.y.to(device))

    @staticmethod
    def to_float(x: Tensor) -> Tensor:
        return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()

    def tensors(self) -> tuple[Tensor, Tensor]:
        """The whole split as float32 inputs in [0, 1] and int64 labels."""
        return self.to_float(self.x), self.y

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        augment: Augment | None = None,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(x, y)`` batches; ``x`` float32 in [0, 1]. Shuffling needs a ``generator``."""
        n = len(self)
        if shuffle:
            if generator is None:
                raise ValueError("shuffle=True needs a seeded torch.Generator for determinism")
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        order = order.to(self.x.device)  # drawn on the CPU generator, the same on every device
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            x = self.to_float(self.x[idx])
            if augment is not None and generator is not None:
                x = augment(x, generator)
            yield x, self.y[idx]


@dataclass(frozen=True)
class DataSplits:
    """Train/validation/test splits and what a model needs to know about them."""

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    classes: tuple[str, ...]
    mean: tuple[float, ...] = dataclasses.field(default=())
    std: tuple[float, ...] = dataclasses.field(default=())
    # How the dataset mapped raw recordings to [0, 1] (sensor signals: per-channel min-max of
    # the training file), kept in checkpoints so new inputs can be mapped the same way.
    input_scale: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.mean:  # per-channel statistics of the training split, for Normalize
            x = Split.to_float(self.train.x)
            dims = [0, *range(2, x.ndim)]
            object.__setattr__(self, "mean", tuple(float(v) for v in x.mean(dim=dims)))
            std = x.std(dim=dims).clamp_min(1e-3)
            object.__setattr__(self, "std", tuple(float(v) for v in std))

    def to(self, device: torch.device | str) -> DataSplits:
        """Every split on ``device``: the one place a run moves its data."""
        return dataclasses.replace(
            self, train=self.train.to(device), val=self.val.to(device), test=self.test.to(device)
        )

    @property
    def device(self) -> torch.device:
        """Where the splits live (see :meth:`to`)."""
        return self.train.x.device

    @property
    def in_shape(self) -> tuple[int, ...]:
        """Shape of one input, e.g. ``(3, 32, 32)``."""
        return tuple(self.train.x.shape[1:])

    def summary(self) -> str:
        return (
            f"{self.name}: {len(self.train)} train / {len(self.val)} val / {len(self.test)} test, "
            f"input {self.in_shape}, {self.num_classes} classes"
        )


def check_splits(splits: DataSplits, where: str, *, test_only: bool = False) -> None:
    """Reject data that would train or be attacked silently wrong, before any cell runs.

    Inputs must be uint8 (0-255) or finite floats in [0, 1] (NaN passes a ``<``/``>`` range
    check, so finiteness is tested on its own), labels integers in ``[0, num_classes)``, and
    the train and test splits non-empty (validation may be empty with ``val_fraction: 0``;
    train too with ``test_only``: a file declared a test set, ``split: test``).

    Raises:
        DataError: naming ``where``, the split and what is wrong.
    """
    for part in ("train", "val", "test"):
        split: Split = getattr(splits, part)
        if len(split) == 0:
            if part == "val" or (part == "train" and test_only):
                continue
            raise DataError(f"{where}: the {part} split is empty")
        check_inputs(split.x, f"{where}: {part} inputs")
        _check_labels(split.y, splits.num_classes, f"{where}: {part} labels")


def check_inputs(x: Tensor, where: str) -> None:
    """Inputs must be uint8, or finite floats in [0, 1]; raises DataError naming `where`."""
    if x.dtype == torch.uint8:
        return
    if not x.is_floating_point():
        raise DataError(f"{where} are {x.dtype}; store uint8 0-255 or floats in [0, 1]")
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise DataError(f"{where} hold {bad} NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise DataError(
            f"{where} must lie in [0, 1] but range over [{lo:.4g}, {hi:.4g}]; scale them, or "
            "store uint8 0-255"
        )


def _check_labels(y: Tensor, num_classes: int, where: str) -> None:
    if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
        raise DataError(f"{where} are {y.dtype}; class labels must be integers")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise DataError(
            f"{where} range over [{lo}, {hi}] but must lie in [0, {num_classes - 1}] "
            f"({num_classes} classes)"
        )


def split_off(split: Split, fraction: float, generator: torch.Generator) -> tuple[Split, Split]:
    """Randomly split ``split`` into (rest, part) with ``part`` holding ``fraction`` of it."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    order = torch.randperm(len(split), generator=generator)
    n_part = round(fraction * len(split))
    return split.take(order[n_part:]), split.take(order[:n_part])


def require_training_split(data: DataSplits, who: str, hint: str = "") -> None:
    """Refuse, naming the missing split and the remedy, to calibrate or train on data that
    holds only a test set (an npz file with ``split: test``, ``(x, y)`` tensors given to the
    API): it would otherwise fail deep inside with an IndexError, or silently train on nothing.
    ``hint`` ends the message with a remedy of the caller's (", or ...").

    Raises:
        ConfigError: when ``data.train`` is empty.
    """
    if len(data.train):
        return
    raise ConfigError(
        f"{who} needs training data, but data {data.name!r} has no training split (only a "
        f"test set of {len(data.test)} points); give data with one: a dataset name, an npz "
        f"file without split=test, or DataSplits{hint}"
    )


def hold_out(data: DataSplits, n: int, seed: int = 0) -> DataSplits:
    """``data`` with ``n`` random test points (drawn with ``seed``) moved to the training
    split, for a test-only dataset whose compressors calibrate: the points a compressor sees
    are then never scored. The rest of the test split keeps its order.

    Raises:
        ConfigError: when ``data`` already has a training split, or ``n`` would leave fewer
            than one test point.
    """
    if len(data.train):
        raise ConfigError(
            f"holdout: data {data.name!r} has a training split ({len(data.train)} points), "
            "which compressors calibrate and train on; holdout is only for test-only data"
        )
    if not 1 <= n < len(data.test):
        raise ConfigError(
            f"holdout={n}: must be between 1 and {len(data.test) - 1} (the test split has "
            f"{len(data.test)} points)"
        )
    order = torch.randperm(len(data.test), generator=torch.Generator().manual_seed(seed))
    held, kept = order[:n], order[n:].sort().values
    return dataclasses.replace(data, train=data.test.take(held), test=data.test.take(kept))


@dataclass(frozen=True, kw_only=True)
class Dataset:
    """Fields every dataset shares; subclasses implement :meth:`load_splits`.

    Attributes:
        val_fraction: share of the training data held out for validation (model selection).
        train_limit: keep at most this many training examples (quick runs); None keeps all.
        test_limit: keep at most this many test examples; None keeps all.
    """

    val_fraction: float = 0.1
    train_limit: int | None = None
    test_limit: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("train_limit", "test_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer or null, got {value}")
        # Datasets that split their own test set off the pool (digits, gaussians, npz).
        test_fraction = getattr(self, "test_fraction", 0.5)
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")

    def load_splits(self, seed: int) -> tuple[Split, Split, int, tuple[str, ...]]:
        """Return (train+val pool, test, num_classes, class names)."""
        raise NotImplementedError

    def load(self, seed: int = 0) -> DataSplits:
        """Load the data and split off validation with a generator seeded by ``seed``."""
        pool, test, num_classes, classes = self.load_splits(seed)
        g = torch.Generator().manual_seed(seed)
        train, val = split_off(pool, self.val_fraction, g)
        name = type(self).__name__.lower()
        return DataSplits(
            name=name,
            train=train.head(self.train_limit),
            val=val,
            test=test.head(self.test_limit),
            num_classes=num_classes,
            classes=classes,
        )
