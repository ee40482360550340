"""Datasets that need no download: scikit-learn's digits, the on-manifold Gaussians, npz files."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from robcomp.data.base import (
    DataError,
    Dataset,
    DatasetNotFound,
    DataSplits,
    Split,
    check_inputs,
    split_off,
)
from robcomp.data.registry import DATASETS


def _split_test(
    x: torch.Tensor, y: torch.Tensor, fraction: float, seed: int
) -> tuple[Split, Split]:
    # The test split depends only on the data, never on the run seed, so every run of an
    # experiment is scored on the same points.
    del seed
    return split_off(Split(x, y), fraction, torch.Generator().manual_seed(1234))


@DATASETS.register("digits")
@dataclass(frozen=True, kw_only=True)
class Digits(Dataset):
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes), 1x8x8 in [0, 1].

    The embedded default: it ships inside scikit-learn, so it never touches the network.
    """

    test_fraction: float = 0.25

    def load_splits(self, seed: int) -> tuple[Split, Split, int, tuple[str, ...]]:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = torch.tensor(bunch.images, dtype=torch.float32).div_(16.0).unsqueeze(1)  # (N, 1, 8, 8)
        y = torch.tensor(bunch.target, dtype=torch.int64)
        pool, test = _split_test(x, y, self.test_fraction, seed)
        return pool, test, 10, tuple(str(i) for i in range(10))


# The four latent classes of the on-manifold paper's simulation (Kwon & Lee 2021;
# the authors' sanglee/MC-ATON, src/simulation/make_data.py).
GAUSSIAN_MEANS = ((-0.1, 0.5), (0.8, 0.1), (-0.1, -0.6), (-0.8, 0.2))
GAUSSIAN_COVS = (
    ((0.05, 0.0), (0.0, 0.05)),
    ((0.05, 0.0), (0.0, 0.05)),
    ((0.07, 0.06), (0.06, 0.07)),
    ((0.08, -0.07), (-0.07, 0.08)),
)


def gaussian_latents(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` latent points z (n, 2) with balanced labels from the four Gaussian classes."""
    y = torch.arange(n) % 4
    y = y[torch.randperm(n, generator=generator)]
    eps = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    means = torch.tensor(GAUSSIAN_MEANS, dtype=torch.float64)
    chol = torch.linalg.cholesky(torch.tensor(GAUSSIAN_COVS, dtype=torch.float64))
    z = means[y] + torch.einsum("nij,nj->ni", chol[y], eps)
    return z.float(), y


def gaussian_encoder(seed: int = 0) -> nn.Sequential:
    """The fixed 2-D -> 16-D map of the simulation: Linear 2-8-16-16 with LeakyReLU(0.2).

    The reference trains an auto-encoder and uses its encoder; what matters for the benchmark is a
    fixed smooth nonlinear embedding of the 2-D latent into 16-D, so we use a seeded random one
    (deterministic, no training needed).
    """
    g = torch.Generator().manual_seed(seed)
    layers = [nn.Linear(2, 8), nn.LeakyReLU(0.2), nn.Linear(8, 16), nn.LeakyReLU(0.2)]
    layers.append(nn.Linear(16, 16))
    encoder = nn.Sequential(*layers)
    with torch.no_grad():
        for p in encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 if p.ndim > 1 else 0.1))
    return encoder.requires_grad_(False)


@DATASETS.register("gaussians")
@dataclass(frozen=True, kw_only=True)
class Gaussians(Dataset):
    """The on-manifold paper's simulation: four Gaussian classes in 2-D mapped to 16-D (1x4x4).

    Inputs are min-max scaled to [0, 1] over the whole set, so attack budgets are comparable.
    """

    n: int = 70000
    test_fraction: float = 1 / 7
    encoder_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n < 100:  # enough for four classes in each of train, validation and test
            raise ValueError(f"n must be >= 100, got {self.n}")

    def load_splits(self, seed: int) -> tuple[Split, Split, int, tuple[str, ...]]:
        g = torch.Generator().manual_seed(42)  # the data set is fixed; the run seed splits it
        z, y = gaussian_latents(self.n, g)
        with torch.no_grad():
            x = gaussian_encoder(self.encoder_seed)(z)
        x = (x - x.min()) / (x.max() - x.min())
        pool, test = _split_test(x.reshape(-1, 1, 4, 4), y, self.test_fraction, seed)
        return pool, test, 4, ("0", "1", "2", "3")


def _to_nchw(x: np.ndarray, layout: str, where: str) -> torch.Tensor:
    if layout == "auto":
        if x.ndim == 4:
            layout = "nhwc" if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4) else "nchw"
        elif x.ndim == 3:
            layout = "nhw"
        elif x.ndim == 2:
            layout = "nl"
        else:
            raise ValueError(f"{where}: cannot infer the layout of x with shape {x.shape}")
    t = torch.from_numpy(np.ascontiguousarray(x))
    if layout == "nhwc":
        t = t.permute(0, 3, 1, 2)
    elif layout in ("nhw", "nl"):
        t = t.unsqueeze(1)
    return t.contiguous()


@DATASETS.register("npz")
@dataclass(frozen=True, kw_only=True)
class Npz(Dataset):
    """Arrays from a ``.npz`` file: ``x`` (uint8 0-255, or float in [0, 1]) and integer ``y``.

    Layout ``auto`` reads 4-D arrays as NHWC when the last axis looks like channels (1, 3, 4),
    else NCHW; 3-D as NHW (one channel); 2-D as N x L signals. If the file also holds
    ``x_test``/``y_test``, those form the test split; otherwise ``test_fraction`` is split off.

    Attributes:
        split: ``auto`` (as above) or ``test``: the file is a test set, scored whole and in
            order; train and validation are empty, so it evaluates a model that brings its
            weights (``train.epochs: 0``) and cannot train one.
    """

    path: str
    x_key: str = "x"
    y_key: str = "y"
    layout: Literal["auto", "nhwc", "nchw", "nhw", "ncl", "nl"] = "auto"
    test_fraction: float = 0.2
    num_classes: int | None = None
    split: Literal["auto", "test"] = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_classes is not None and self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 or null, got {self.num_classes}")
        if self.split not in ("auto", "test"):
            raise ValueError(f"split must be 'auto' or 'test', got {self.split!r}")

    def _arrays(
        self, data: np.lib.npyio.NpzFile, x_key: str, y_key: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        for key in (x_key, y_key):
            if key not in data.files:
                raise DataError(f"{self.path}: no array {key!r}; the file holds {data.files}")
        try:
            x_raw, y_raw = np.asarray(data[x_key]), np.asarray(data[y_key])
        except ValueError as err:  # object arrays, refused by allow_pickle=False
            raise DataError(f"{self.path}: cannot read {x_key!r}/{y_key!r}: {err}") from None
        if y_raw.dtype.kind not in "iu":  # a float label would be truncated to a wrong class
            raise DataError(f"{self.path}: labels {y_key!r} are {y_raw.dtype}; store integers")
        if len(y_raw) == 0 or len(x_raw) != len(y_raw):
            raise DataError(
                f"{self.path}: {x_key!r} has {len(x_raw)} rows and {y_key!r} {len(y_raw)}; "
                "need the same number, at least one"
            )
        x = _to_nchw(x_raw, self.layout, self.path)
        if x.dtype != torch.uint8:
            x = x.float()
            check_inputs(x, f"{self.path}: {x_key!r}")
        y = torch.from_numpy(y_raw.astype(np.int64)).reshape(-1)
        return x, y

    def load_splits(self, seed: int) -> tuple[Split, Split, int, tuple[str, ...]]:
        path = Path(self.path).expanduser()
        if not path.is_file():
            raise DatasetNotFound(f"npz dataset: no file at {path.resolve()}")
        # allow_pickle=False: an npz is someone else's file; object arrays would unpickle.
        try:
            data = np.load(path, allow_pickle=False)
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            raise DataError(f"{path}: not a readable .npz file ({err})") from None
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise DataError(
                f"{path}: holds one array (a .npy file); robcomp reads an .npz holding inputs "
                "and labels, written with np.savez(path, x=inputs, y=labels)"
            )
        with data:
            x, y = self._arrays(data, self.x_key, self.y_key)
            if self.split == "test":  # all of it, in order: nothing is split off at random
                pool, test = Split(x[:0], y[:0]), Split(x, y)
            elif "x_test" in data.files and "y_test" in data.files:
                pool, test = Split(x, y), Split(*self._arrays(data, "x_test", "y_test"))
            else:
                pool, test = _split_test(x, y, self.test_fraction, seed)
        num_classes = self.num_classes or int(torch.cat([pool.y, test.y]).max()) + 1
        return pool, test, num_classes, tuple(str(i) for i in range(num_classes))

    def load(self, seed: int = 0) -> DataSplits:
        """The splits; a test set (``split: test``) has no training data, hence no statistics
        to normalize with: the identity stands in (a model with weights must set its own)."""
        if self.split != "test":
            return super().load(seed)
        _, test, num_classes, classes = self.load_splits(seed)
        empty = test.take(slice(0, 0))
        channels = int(test.x.shape[1])
        return DataSplits(
            name="npz", train=empty, val=empty, test=test.head(self.test_limit),
            num_classes=num_classes, classes=classes,
            mean=(0.0,) * channels, std=(1.0,) * channels,
        )  # fmt: skip
