"""Sensor time series (NCL inputs): BasicMotions from sktime/aeon ``.ts`` files, and UCI HAR.

Raw sensor readings are in physical units (g, rad/s), so every dataset here scales each channel
to [0, 1] by min-max over its **official training file** (the training and validation splits,
so the transform does not depend on the run seed) and keeps the transform (:class:`MinMax`) on
the returned splits (:class:`ScaledSplits`), so the same map can be applied to new recordings.
Test values outside the training range are clipped to [0, 1]; how many is logged.

This follows Kwon & Lee, "Improving the Robustness of Model Compression by On-Manifold
Adversarial Training", Future Internet 2021 (authors' code: sanglee/MC-ATON), who use UCI HAR's
nine inertial signals with a 1-D CNN and a 1-D ResNet-18 (see :mod:`robcomp.models.signals`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from robcomp.config import OPERATIONAL
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

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- scaling


@dataclass(frozen=True)
class MinMax:
    """Per-channel min-max scaling ``(x - low) / (high - low)``, clipped to [0, 1].

    Attributes:
        low: per-channel minimum of the training data, in the sensor's units.
        high: per-channel maximum of the training data.
    """

    low: tuple[float, ...]
    high: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.low) != len(self.high) or not self.low:
            raise ValueError(
                f"MinMax needs one low and one high per channel, got {len(self.low)} lows and "
                f"{len(self.high)} highs"
            )
        if any(h < lo for lo, h in zip(self.low, self.high, strict=True)):
            raise ValueError(f"MinMax: high {self.high} below low {self.low}")

    @classmethod
    def fit(cls, x: Tensor) -> MinMax:
        """The per-channel range of ``x`` (N, C, L) or (N, C, ...)."""
        dims = [0, *range(2, x.ndim)]
        low = x.double().amin(dim=dims)
        high = x.double().amax(dim=dims)
        return cls(tuple(float(v) for v in low), tuple(float(v) for v in high))

    def _check(self, x: Tensor, where: str) -> None:
        if x.ndim < 2 or x.shape[1] != len(self.low):
            raise ValueError(
                f"{where}: MinMax fitted on {len(self.low)} channels, got shape {tuple(x.shape)}"
            )

    def _view(self, values: tuple[float, ...], ndim: int) -> Tensor:
        return torch.tensor(values, dtype=torch.float64).view((1, -1) + (1,) * (ndim - 2))

    def apply(self, x: Tensor, where: str = "inputs") -> Tensor:
        """``x`` (N, C, ...) scaled to float32 [0, 1]; values outside the range are clipped.

        A channel constant on the training data (``high == low``) is scaled with span 1 in its
        units: its training value maps to 0.
        """
        self._check(x, where)
        low, high = self._view(self.low, x.ndim), self._view(self.high, x.ndim)
        span = torch.where(high > low, high - low, torch.ones_like(high))
        scaled = (x.double() - low) / span  # float64: the training extremes map to exactly 0, 1
        clipped = int(((scaled < 0) | (scaled > 1)).sum())
        if clipped:
            log.info(
                "%s: %d of %d values (%.3g%%) outside the training range clipped to [0, 1]",
                where, clipped, scaled.numel(), 100.0 * clipped / scaled.numel(),
            )  # fmt: skip
        return scaled.clamp_(0.0, 1.0).float()

    def invert(self, x: Tensor) -> Tensor:
        """Map [0, 1] inputs back to sensor units (float32)."""
        self._check(x, "inputs")
        low, high = self._view(self.low, x.ndim), self._view(self.high, x.ndim)
        return (x.double() * (high - low) + low).float()

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form, e.g. for a checkpoint's spec: ``{"kind": "minmax", "low": ...}``."""
        return {"kind": "minmax", "low": list(self.low), "high": list(self.high)}


@dataclass(frozen=True)
class ScaledSplits(DataSplits):
    """:class:`DataSplits` whose inputs were scaled from raw units by ``scale``."""

    scale: MinMax | None = None


# ----------------------------------------------------------------------------- .ts files


def _ts_header(path: Path, lineno: int, line: str, header: dict[str, str]) -> bool:
    """Record one ``@key value`` header line; True when it is ``@data``."""
    if not line.startswith("@"):
        raise DataError(
            f"{path}:{lineno}: expected a header line starting with '@' (or @data) before the "
            f"series, got {line[:40]!r}"
        )
    key, _, value = line[1:].partition(" ")
    key = key.strip().lower()
    if key == "data":
        return True
    header[key] = value.strip()
    return False


def _ts_classes(path: Path, lineno: int, header: dict[str, str]) -> tuple[str, ...]:
    """Check the header describes equal-length labelled series; return the class names."""
    if header.get("timestamps", "false").lower() == "true":
        raise DataError(f"{path}: @timeStamps true (time-value pairs) is not supported")
    if header.get("equallength", "true").lower() != "true":
        raise DataError(
            f"{path}: @equalLength {header['equallength']}: robcomp reads equal-length series "
            "only; pad or resample the series to one length first"
        )
    given = header.get("classlabel")
    tokens = (given or "").split()
    if not tokens or tokens[0].lower() != "true" or len(tokens) < 3:
        got = f"@classLabel {given}" if given is not None else "no @classLabel line"
        raise DataError(
            f"{path}:{lineno}: no class labels before @data; the header needs "
            f"'@classLabel true <name> <name> ...' (got {got!r})"
        )
    classes = tuple(tokens[1:])
    if len(set(classes)) != len(classes):
        raise DataError(f"{path}: @classLabel repeats a class name: {' '.join(classes)}")
    return classes


def _ts_channel(text: str, path: Path, lineno: int, channel: int) -> np.ndarray:
    try:
        values = np.array(text.split(","), dtype=np.float64)
    except ValueError:
        bad = next((v for v in text.split(",") if not _is_number(v)), text[:20])
        raise DataError(
            f"{path}:{lineno}: channel {channel} holds {bad.strip()!r}, not a number "
            "(missing values '?' are not supported)"
        ) from None
    if not np.isfinite(values).all():
        raise DataError(f"{path}:{lineno}: channel {channel} holds NaN or infinite values")
    return values


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _ts_series(
    path: Path, lineno: int, line: str, classes: Sequence[str]
) -> tuple[np.ndarray, int]:
    """One data line: channels separated by ':', values by ',', the label last."""
    fields = line.split(":")
    if len(fields) < 2:
        raise DataError(
            f"{path}:{lineno}: expected channels separated by ':' and the class label last"
        )
    label = fields[-1].strip()
    if label not in classes:
        raise DataError(
            f"{path}:{lineno}: label {label!r} is not one of the @classLabel classes "
            f"{', '.join(classes)}"
        )
    channels = [_ts_channel(text, path, lineno, c) for c, text in enumerate(fields[:-1])]
    lengths = {len(c) for c in channels}
    if len(lengths) != 1:
        raise DataError(
            f"{path}:{lineno}: channels have unequal lengths {[len(c) for c in channels]}; "
            "robcomp reads equal-length series only"
        )
    return np.stack(channels), classes.index(label)


def _check_ts_shape(path: Path, header: dict[str, str], shape: tuple[int, ...]) -> None:
    """The series' (channels, length) must match each other and what the header declares."""
    declared = {"dimensions": shape[0], "serieslength": shape[1]}
    for key, actual in declared.items():
        if key in header and header[key].isdigit() and int(header[key]) != actual:
            raise DataError(
                f"{path}: the header says @{key} {header[key]} but series have {actual}"
            )


def read_ts(path: str | Path) -> tuple[Tensor, Tensor, tuple[str, ...]]:
    """Read a labelled, equal-length sktime/aeon ``.ts`` file.

    The format: ``#`` comments, header lines ``@key value`` (``@classLabel true A B C`` names the
    classes, in order), then after ``@data`` one series a line, its channels separated by
    ``:``, each channel's values by ``,``, the class label last.

    Returns:
        x: float32 (N, C, L) in the file's units; y: int64 indices into the class names;
        the class names in ``@classLabel`` order.

    Raises:
        DataError: naming the file and line of malformed input, missing values, or series of
            unequal lengths or channel counts.
    """
    path = Path(path)
    header: dict[str, str] = {}
    series: list[np.ndarray] = []
    labels: list[int] = []
    classes: tuple[str, ...] = ()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not a UTF-8 text .ts file ({err})") from None
    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not classes:
            if _ts_header(path, lineno, line, header):
                classes = _ts_classes(path, lineno, header)
            continue
        x, y = _ts_series(path, lineno, line, classes)
        if series and x.shape != series[0].shape:
            raise DataError(
                f"{path}:{lineno}: series has {x.shape[0]} channels of length {x.shape[1]} but "
                f"the first has {series[0].shape[0]} of length {series[0].shape[1]}; robcomp "
                "reads equal-length series only"
            )
        series.append(x)
        labels.append(y)
    if not series:
        raise DataError(f"{path}: no series (a .ts file needs an @data line followed by series)")
    _check_ts_shape(path, header, series[0].shape)
    x_all = torch.from_numpy(np.stack(series).astype(np.float32))  # (N, C, L)
    return x_all, torch.tensor(labels, dtype=torch.int64), classes


# ----------------------------------------------------------------------------- datasets


@dataclass(frozen=True, kw_only=True)
class _SensorDataset(Dataset):
    """Raw train/test series scaled to [0, 1] by a :class:`MinMax` fitted on the training file.

    Attributes:
        root: the data folder; default ``$ROBCOMP_DATA``, else ``./data``.
    """

    root: str | None = field(default=None, metadata=OPERATIONAL)

    def read(self) -> tuple[Split, Split, tuple[str, ...]]:
        """The raw (train, test) series in sensor units and the class names."""
        raise NotImplementedError

    def scaled(self) -> tuple[Split, Split, tuple[str, ...], MinMax]:
        """(train, test) in [0, 1], the class names, and the scaling fitted on train."""
        train, test, classes = self.read()
        scale = MinMax.fit(train.x)
        name = type(self).__name__
        train = Split(scale.apply(train.x, f"{name} train"), train.y)
        test = Split(scale.apply(test.x, f"{name} test"), test.y)
        return train, test, classes, scale

    def load_splits(self, seed: int) -> tuple[Split, Split, int, tuple[str, ...]]:
        pool, test, classes, _ = self.scaled()
        return pool, test, len(classes), classes

    def load(self, seed: int = 0) -> ScaledSplits:
        """As :meth:`Dataset.load`, keeping the scaling on the result (``.scale``)."""
        pool, test, classes, scale = self.scaled()
        train, val = split_off(pool, self.val_fraction, torch.Generator().manual_seed(seed))
        return ScaledSplits(
            name=type(self).__name__.lower(),
            train=train.head(self.train_limit),
            val=val,
            test=test.head(self.test_limit),
            num_classes=len(classes),
            classes=classes,
            scale=scale,
            input_scale=scale.as_dict(),
        )


@DATASETS.register("basicmotions")
@dataclass(frozen=True, kw_only=True)
class BasicMotions(_SensorDataset):
    """BasicMotions (UEA multivariate archive; Bagnall et al. 2018): smartwatch 3-D
    accelerometer and 3-D gyroscope, 6 channels x 100 steps (10 Hz), 4 activities (Standing,
    Running, Walking, Badminton), 40 train / 40 test series, inputs (6, 100).

    Read from ``ROOT/sensors/BasicMotions_{TRAIN,TEST}.ts`` (or ``ROOT/BasicMotions/``, or
    ``ROOT``), the sktime/aeon ``.ts`` files (see :func:`read_ts`).
    """

    def folders(self) -> list[Path]:
        root = data_root(self.root)
        return [root / "sensors", root / "BasicMotions", root]

    def read(self) -> tuple[Split, Split, tuple[str, ...]]:
        files = ("BasicMotions_TRAIN.ts", "BasicMotions_TEST.ts")
        folder = next((f for f in self.folders() if all((f / n).is_file() for n in files)), None)
        if folder is None:
            looked = ", ".join(str(f) for f in self.folders())
            raise DatasetNotFound(
                f"basicmotions: {' and '.join(files)} were not found. Looked in: {looked}. "
                "Point ROBCOMP_DATA (or the dataset's `root`) at a folder holding them (aeon "
                "ships them in aeon/datasets/data/BasicMotions/)."
            )
        x_train, y_train, classes = read_ts(folder / files[0])
        x_test, y_test, test_classes = read_ts(folder / files[1])
        if test_classes != classes or x_test.shape[1:] != x_train.shape[1:]:
            raise DataError(
                f"basicmotions: {folder / files[1]} holds classes {test_classes} and series "
                f"{tuple(x_test.shape[1:])}, but the training file {classes} and "
                f"{tuple(x_train.shape[1:])}"
            )
        return Split(x_train, y_train), Split(x_test, y_test), classes


# The nine inertial signals in the order of the authors' UCI HAR loader (sanglee/MC-ATON,
# src/data/UCI_har_preprocessing.py), which is also the usual order in HAR code: body
# acceleration (total minus gravity) xyz, body angular velocity xyz, total acceleration xyz.
UCI_HAR_SIGNALS = (
    "body_acc_x", "body_acc_y", "body_acc_z",
    "body_gyro_x", "body_gyro_y", "body_gyro_z",
    "total_acc_x", "total_acc_y", "total_acc_z",
)  # fmt: skip
UCI_HAR_FOLDER = "UCI HAR Dataset"
_UCI_HAR_LAYOUT = (
    f"ROOT/{UCI_HAR_FOLDER}/activity_labels.txt, ROOT/{UCI_HAR_FOLDER}/{{train,test}}/"
    f"y_{{train,test}}.txt and ROOT/{UCI_HAR_FOLDER}/{{train,test}}/Inertial Signals/"
    f"<signal>_{{train,test}}.txt for the signals {', '.join(UCI_HAR_SIGNALS)}"
)


def _read_matrix(path: Path, dtype: type) -> np.ndarray:
    """A whitespace-separated numeric text file as a 2-D array; DataError when unreadable."""
    if not path.is_file():
        raise DatasetNotFound(f"uci-har: {path} is missing; expected {_UCI_HAR_LAYOUT}")
    try:
        return np.loadtxt(path, dtype=dtype, ndmin=2)
    except ValueError as err:
        raise DataError(f"{path}: not a whitespace-separated table of numbers ({err})") from None


def _read_activity_labels(path: Path) -> tuple[str, ...]:
    """``activity_labels.txt``: lines ``<id> <NAME>`` with ids 1..K; the names in id order."""
    if not path.is_file():
        raise DatasetNotFound(f"uci-har: {path} is missing; expected {_UCI_HAR_LAYOUT}")
    names: dict[int, str] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        key, _, name = line.strip().partition(" ")
        if not key.isdigit() or not name.strip():
            raise DataError(f"{path}:{lineno}: expected '<id> <NAME>', got {line.strip()!r}")
        names[int(key)] = name.strip()
    if sorted(names) != list(range(1, len(names) + 1)) or len(names) < 2:
        raise DataError(f"{path}: activity ids must be 1..K (K >= 2), got {sorted(names)}")
    return tuple(names[i] for i in range(1, len(names) + 1))


@DATASETS.register("uci-har")
@dataclass(frozen=True, kw_only=True)
class UCIHAR(_SensorDataset):
    """UCI Human Activity Recognition Using Smartphones (Anguita et al. 2013): waist-worn
    smartphone accelerometer and gyroscope at 50 Hz in 2.56 s windows, 9 channels x 128
    steps, 6 activities, 7,352 train / 2,947 test windows (subjects split 21/9).

    Reads the user's unzipped copy of the official archive from ``ROOT/UCI HAR Dataset/``
    (ROOT: ``root``, else ``$ROBCOMP_DATA``, else ``./data``; also ``ROOT/uci-har/`` and
    ``ROOT/sensors/`` under it); it is not downloaded. Channels are the nine raw inertial
    signals in the order of :data:`UCI_HAR_SIGNALS` (body_acc xyz, body_gyro xyz, total_acc
    xyz), as Kwon & Lee (2021) use them; labels 1..6 become 0..5, named by
    ``activity_labels.txt``.
    """

    def folders(self) -> list[Path]:
        root = data_root(self.root)
        return [root / UCI_HAR_FOLDER, root / "uci-har" / UCI_HAR_FOLDER,
                root / "sensors" / UCI_HAR_FOLDER]  # fmt: skip

    def _folder(self) -> Path:
        for folder in self.folders():
            if folder.is_dir():
                return folder
        looked = ", ".join(str(f) for f in self.folders())
        raise DatasetNotFound(
            f"uci-har: no {UCI_HAR_FOLDER!r} folder. Looked in: {looked}. Unzip the official "
            f"archive (UCI HAR Dataset.zip) into ROOT and point ROBCOMP_DATA (or the dataset's "
            f"`root`) at ROOT; expected {_UCI_HAR_LAYOUT}"
        )

    @staticmethod
    def _part(folder: Path, part: str, num_classes: int) -> Split:
        signals = [
            _read_matrix(folder / part / "Inertial Signals" / f"{s}_{part}.txt", np.float32)
            for s in UCI_HAR_SIGNALS
        ]
        labels_path = folder / part / f"y_{part}.txt"
        labels = _read_matrix(labels_path, np.int64).reshape(-1)
        for name, signal in zip(UCI_HAR_SIGNALS, signals, strict=True):
            if signal.shape != signals[0].shape or len(signal) != len(labels):
                raise DataError(
                    f"uci-har: {folder / part} holds {name} of shape {signal.shape}, "
                    f"{UCI_HAR_SIGNALS[0]} {signals[0].shape} and {len(labels)} labels; every "
                    "signal needs one row per label, all of one length"
                )
        if labels.size and (labels.min() < 1 or labels.max() > num_classes):
            raise DataError(
                f"{labels_path}: labels range over [{labels.min()}, {labels.max()}] but must "
                f"lie in [1, {num_classes}] (activity_labels.txt)"
            )
        x = torch.from_numpy(np.stack(signals, axis=1))  # (N, 9, L)
        return Split(x, torch.from_numpy(labels - 1))

    def read(self) -> tuple[Split, Split, tuple[str, ...]]:
        folder = self._folder()
        classes = _read_activity_labels(folder / "activity_labels.txt")
        train = self._part(folder, "train", len(classes))
        test = self._part(folder, "test", len(classes))
        if train.x.shape[1:] != test.x.shape[1:]:
            raise DataError(
                f"uci-har: train windows are {tuple(train.x.shape[1:])} but test windows "
                f"{tuple(test.x.shape[1:])}"
            )
        return train, test, classes


__all__ = [
    "UCIHAR",
    "UCI_HAR_SIGNALS",
    "BasicMotions",
    "MinMax",
    "ScaledSplits",
    "read_ts",
]
