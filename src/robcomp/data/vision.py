"""Image datasets read from local files in torchvision's layouts (download only when asked)."""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from robcomp.config import OPERATIONAL
from robcomp.data.base import Dataset, DatasetNotFound, Split, data_root
from robcomp.data.registry import DATASETS

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), plain or gzipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {body.size} bytes")
    return body.reshape(dims)


def _find_idx(folders: Sequence[Path], stem: str) -> Path | None:
    for folder in folders:
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def _idx_split(folders: Sequence[Path], part: str) -> Split | None:
    images, labels = (_find_idx(folders, stem) for stem in _IDX_FILES[part])
    if images is None or labels is None:
        return None
    x = torch.from_numpy(read_idx(images).copy()).unsqueeze(1)  # (N, 1, 28, 28) uint8
    y = torch.from_numpy(read_idx(labels).astype(np.int64))
    return Split(x, y)


@dataclass(frozen=True, kw_only=True)
class _IdxDataset(Dataset):
    """MNIST-format data from the four IDX files (plain or .gz) in any of several folders."""

    # Where the files are read from and whether they may be fetched do not change the data.
    root: str | None = field(default=None, metadata=OPERATIONAL)
    download: bool = field(default=False, metadata=OPERATIONAL)

    _subdirs: ClassVar[tuple[str, ...]] = ()
    _torchvision: ClassVar[str] = ""
    _classes: ClassVar[tuple[str, ...]] = ()

    def _folders(self) -> list[Path]:
        root = data_root(self.root)
        return [root / sub for sub in self._subdirs] + [root]

    def _download(self) -> None:
        import torchvision.datasets as tvd

        getattr(tvd, self._torchvision)(str(data_root(self.root)), train=True, download=True)
        getattr(tvd, self._torchvision)(str(data_root(self.root)), train=False, download=True)

    def load_splits(self, seed: int) -> tuple[Split, Split, int, tuple[str, ...]]:
        folders = self._folders()
        train, test = _idx_split(folders, "train"), _idx_split(folders, "test")
        if (train is None or test is None) and self.download:
            self._download()
            train, test = _idx_split(folders, "train"), _idx_split(folders, "test")
        if train is None or test is None:
            looked = ", ".join(str(f) for f in folders)
            files = ", ".join(_IDX_FILES["train"] + _IDX_FILES["test"])
            raise DatasetNotFound(  # one line, like every user error
                f"{self._torchvision}: the IDX files ({files}, "
                f"plain or .gz) were not found. Looked in: {looked}. "
                "Put them in one of these folders, point ROBCOMP_DATA (or the dataset's `root`) at "
                "a folder holding them, or set `download: true` (needs network)."
            )
        return train, test, 10, self._classes


@DATASETS.register("mnist")
@dataclass(frozen=True, kw_only=True)
class MNIST(_IdxDataset):
    """MNIST (LeCun et al. 1998), 60k train / 10k test, 1x28x28."""

    _subdirs: ClassVar[tuple[str, ...]] = ("mnist", "MNIST/raw")
    _torchvision: ClassVar[str] = "MNIST"
    _classes: ClassVar[tuple[str, ...]] = tuple(str(i) for i in range(10))


@DATASETS.register("fashion-mnist")
@dataclass(frozen=True, kw_only=True)
class FashionMNIST(_IdxDataset):
    """Fashion-MNIST (Xiao et al. 2017), 60k/10k, 1x28x28; also read from Debian's package."""

    _subdirs: ClassVar[tuple[str, ...]] = ("fashion-mnist", "FashionMNIST/raw")
    _torchvision: ClassVar[str] = "FashionMNIST"
    _classes: ClassVar[tuple[str, ...]] = (
        "t-shirt", "trouser", "pullover", "dress", "coat",
        "sandal", "shirt", "sneaker", "bag", "ankle-boot",
    )  # fmt: skip

    def _folders(self) -> list[Path]:
        return [*super()._folders(), FASHION_MNIST_SYSTEM_DIR]


def _hwc_split(x: np.ndarray, y: Sequence[int] | np.ndarray) -> Split:
    images = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()
    return Split(images, torch.as_tensor(np.asarray(y), dtype=torch.int64))


@dataclass(frozen=True, kw_only=True)
class _TorchvisionDataset(Dataset):
    """A torchvision dataset read from ``root`` (torchvision's own layout)."""

    root: str | None = field(default=None, metadata=OPERATIONAL)
    download: bool = field(default=False, metadata=OPERATIONAL)

    _how_to_get: ClassVar[str] = ""

    def _read(self, root: str, train: bool) -> Split:
        raise NotImplementedError

    def load_splits(self, seed: int) -> tuple[Split, Split, int, tuple[str, ...]]:
        root = str(data_root(self.root))
        try:
            train, test = self._read(root, True), self._read(root, False)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
            name = type(self).__name__
            raise DatasetNotFound(
                f"{name}: not found under {Path(root).resolve()} ({err}). {self._how_to_get} "
                "Point ROBCOMP_DATA (or the dataset's `root`) at the folder, or set "
                "`download: true` (needs network)."
            ) from None
        return train, test, self.num_classes(), self.class_names()

    def num_classes(self) -> int:
        return len(self.class_names())

    def class_names(self) -> tuple[str, ...]:
        raise NotImplementedError


@DATASETS.register("cifar10")
@dataclass(frozen=True, kw_only=True)
class CIFAR10(_TorchvisionDataset):
    """CIFAR-10 (Krizhevsky 2009), 50k/10k, 3x32x32, from ``cifar-10-batches-py``.

    torchvision checks each batch file against the official MD5 before reading it.
    """

    _how_to_get: ClassVar[str] = "Expected ROOT/cifar-10-batches-py/ (the official python version)."

    def _read(self, root: str, train: bool) -> Split:
        from torchvision.datasets import CIFAR10 as TV

        ds = TV(root, train=train, download=self.download)
        return _hwc_split(ds.data, ds.targets)

    def class_names(self) -> tuple[str, ...]:
        return (
            "airplane", "automobile", "bird", "cat", "deer",
            "dog", "frog", "horse", "ship", "truck",
        )  # fmt: skip


@DATASETS.register("cifar100")
@dataclass(frozen=True, kw_only=True)
class CIFAR100(_TorchvisionDataset):
    """CIFAR-100 (Krizhevsky 2009), 50k/10k, 3x32x32, 100 fine classes."""

    _how_to_get: ClassVar[str] = "Expected ROOT/cifar-100-python/ (the official python version)."

    def _read(self, root: str, train: bool) -> Split:
        from torchvision.datasets import CIFAR100 as TV

        ds = TV(root, train=train, download=self.download)
        return _hwc_split(ds.data, ds.targets)

    def class_names(self) -> tuple[str, ...]:
        return tuple(str(i) for i in range(100))


@DATASETS.register("svhn")
@dataclass(frozen=True, kw_only=True)
class SVHN(_TorchvisionDataset):
    """SVHN (Netzer et al. 2011) cropped digits, 73k/26k, 3x32x32, from the .mat files."""

    _how_to_get: ClassVar[str] = "Expected ROOT/train_32x32.mat and ROOT/test_32x32.mat."

    def _read(self, root: str, train: bool) -> Split:
        from torchvision.datasets import SVHN as TV

        ds = TV(root, split="train" if train else "test", download=self.download)
        return Split(torch.from_numpy(ds.data), torch.as_tensor(ds.labels, dtype=torch.int64))

    def class_names(self) -> tuple[str, ...]:
        return tuple(str(i) for i in range(10))
