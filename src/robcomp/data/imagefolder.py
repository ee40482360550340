"""Multi-domain image folders: Office-31, Office-Home, PACS, DomainNet.

Layout ``root/<domain>/<class>/<image files>`` (Office-31: ``amazon``, ``webcam``, ``dslr``,
each holding the same 31 class folders). Images are decoded with PIL, converted to RGB, resized
to ``size`` x ``size`` (bilinear, as Shen et al. 2024 resize Office-31 to 224 x 224) and kept as
uint8 in memory; a domain of DomainNet's size needs a small ``size`` or a subset to fit.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from robcomp.data.base import DataError, Dataset, DatasetNotFound, DataSplits, Split, data_root
from robcomp.data.domains import check_protocol_fields, domain_splits
from robcomp.data.registry import DATASETS
from robcomp.progress import track

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


def _subfolders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    files = (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    return sorted(files)


def _decode(path: Path, size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            # PIL's bilinear filter widens its support when it shrinks, so it antialiases.
            rgb = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8)  # (size, size, 3)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise DataError(f"{path}: not a readable image ({err})") from None


@DATASETS.register("imagefolder")
@dataclass(frozen=True, kw_only=True)
class ImageFolder(Dataset):
    """One domain of a multi-domain image folder as the source, split as Shen et al. (2024) do.

    The ``source`` domain's images are split ``1 - val_fraction`` train / ``val_fraction``
    validation with ``split_seed`` (the paper's 1, independent of the run seed); the test split
    is the validation split (the paper reports source validation accuracy). Classes are the
    sorted union of the class folders of ``domains``, so a class has one index in every domain;
    every domain must hold every class. The ``domains`` shift scores the other domains whole.

    Example: ``data: {name: imagefolder, root: office31, domains: [amazon, webcam, dslr],
    source: amazon, size: 224}``.

    Attributes:
        root: the folder holding one subfolder per domain; a relative path not found as given is
            looked up under ``$ROBCOMP_DATA``. Part of the cell's identity (it says which
            dataset this is).
        source: the domain to train on.
        domains: the domains that make up the dataset; empty = every subfolder of ``root``.
        size: images are resized to ``size`` x ``size``.
        split_seed: seed of the train/validation split.
    """

    root: str
    source: str
    domains: tuple[str, ...] = ()
    size: int = 224
    split_seed: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_protocol_fields(self.val_fraction, self.split_seed, self.test_limit)
        if not 1 <= self.size <= 4096:
            raise ValueError(f"size must be in [1, 4096] pixels, got {self.size}")
        if len(set(self.domains)) != len(self.domains):
            raise ValueError(f"domains lists a domain twice: {list(self.domains)}")
        if self.domains and self.source not in self.domains:
            raise ValueError(f"source {self.source!r} is not one of domains {list(self.domains)}")

    @property
    def path(self) -> Path:
        """The dataset folder: ``root`` as given, else under ``$ROBCOMP_DATA``."""
        given = Path(self.root).expanduser()
        if given.is_dir() or given.is_absolute():
            return given
        under = data_root(None) / given
        return under if under.is_dir() else given

    def domain_names(self) -> tuple[str, ...]:
        """The dataset's domains, each checked to exist."""
        folder = self.path
        if not folder.is_dir():
            raise DatasetNotFound(
                f"imagefolder: no folder {self.root!r} (looked at {folder.resolve()} and under "
                "ROBCOMP_DATA); expected ROOT/<domain>/<class>/<images>, e.g. office31/amazon/"
                "back_pack/frame_0001.jpg"
            )
        available = _subfolders(folder)
        names = self.domains or tuple(available)
        for name in (*names, self.source):
            if name not in available:
                close = difflib.get_close_matches(name, available, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise DatasetNotFound(
                    f"imagefolder {folder}: no domain {name!r}{hint}; the domains there: "
                    f"{', '.join(available) or 'none'}"
                )
        return names

    def class_names(self) -> tuple[str, ...]:
        """The sorted union of the class folders of every domain (one index everywhere)."""
        per_domain = {d: _subfolders(self.path / d) for d in self.domain_names()}
        classes = sorted(set().union(*per_domain.values()))
        if not classes:
            raise DataError(f"imagefolder {self.path}: the domains hold no class folders")
        for domain, present in per_domain.items():
            missing = sorted(set(classes) - set(present))
            if missing:
                shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
                raise DataError(
                    f"imagefolder {self.path}: domain {domain!r} has no folder for "
                    f"{len(missing)} class(es) the other domains have: {shown}; every domain "
                    "needs every class (or list only matching domains in `domains`)"
                )
        return tuple(classes)

    def read_domain(self, domain: str, classes: tuple[str, ...]) -> Split:
        """Every image of ``domain``, as uint8 (N, 3, size, size), labelled by ``classes``."""
        files: list[tuple[Path, int]] = []
        for label, name in enumerate(classes):
            found = _image_files(self.path / domain / name)
            if not found:
                raise DataError(
                    f"imagefolder: {self.path / domain / name} holds no images "
                    f"({', '.join(sorted(IMAGE_EXTENSIONS))})"
                )
            files += [(f, label) for f in found]
        x = np.empty((len(files), self.size, self.size, 3), dtype=np.uint8)
        with track(f"decode {domain}", len(files)) as advance:
            for i, (file, _) in enumerate(files):
                x[i] = _decode(file, self.size)
                advance()
        images = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()  # (N, 3, size, size)
        return Split(images, torch.tensor([label for _, label in files], dtype=torch.int64))

    def whole(self) -> tuple[Split, int, tuple[str, ...]]:
        """Every image of the source domain, its class count and names."""
        classes = self.class_names()
        return self.read_domain(self.source, classes), len(classes), classes

    def load(self, seed: int = 0) -> DataSplits:
        del seed  # the protocol's split never depends on the run seed
        whole, num_classes, classes = self.whole()
        return domain_splits(
            whole,
            name=self.source,
            num_classes=num_classes,
            classes=classes,
            val_fraction=self.val_fraction,
            split_seed=self.split_seed,
            train_limit=self.train_limit,
        )
