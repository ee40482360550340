"""Shifted splits for a cell: produced once per (data, shift, seed) and kept on disk.

A grid of ten compressed variants of one baseline shifts its test data once: the arrays of a
shift live under ``OUT/cache/shift-<key>.safetensors`` with the key a hash of the cell's
canonical data section, the shift's fields (defaults filled in), the seed, ``shift_limit``,
for a shift built against the dense baseline (an on-manifold test set) the baseline's key, and
for a shift made through the cell's VAE its settings. The
dense baseline's accuracies on those splits, which normalise mCE, are kept beside them per
baseline, so they too are computed once.

Nothing is unpickled: the file is safetensors, its list of splits JSON in the header.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from robcomp.attacks.manifold import needs_manifold
from robcomp.config import build_component, config_hash, identity_dict
from robcomp.data.base import DataSplits, Split
from robcomp.data.shifts import ShiftContext, ShiftedSplit, uses_baseline
from robcomp.evaluate import SHIFTS, accuracy
from robcomp.experiments.spec import CellConfig
from robcomp.models import model_device, save_tensors

log = logging.getLogger(__name__)

Scores = dict[tuple[str, int], float]


def build_shifts(cfg: CellConfig) -> list[Any]:
    """The shift components of the cell's evaluation suite, in order."""
    return [
        build_component(SHIFTS, spec, f"evaluate.shifts[{i}]")
        for i, spec in enumerate(cfg.evaluate.shifts)
    ]


def shift_key(cfg: CellConfig, shift: Any) -> str:
    """Hash of what the shifted arrays depend on (see the module docstring)."""
    canonical = cfg.canonical()  # builds every component: once per key
    parts: dict[str, Any] = {
        "data": canonical["data"],
        "shift": {"name": type(shift).__name__, **identity_dict(shift)},
        **({"revision": shift.revision} if getattr(shift, "revision", None) else {}),
        "seed": cfg.seed,
        "shift_limit": cfg.evaluate.shift_limit,
    }
    if uses_baseline(shift):
        parts["baseline"] = cfg.baseline_key()
    if needs_manifold(shift) and "vae" in canonical:
        parts["vae"] = canonical["vae"]  # the adv-on set is made through the VAE
    return config_hash(parts)


def shifted_splits(
    cfg: CellConfig, shift: Any, data: DataSplits, baseline: nn.Module, cache: Path
) -> list[ShiftedSplit]:
    """The shift's splits of the cell's test data, from ``cache`` when an earlier cell made
    them (on the CPU; callers move a split where its model runs)."""
    path = cache / f"shift-{shift_key(cfg, shift)}.safetensors"
    if path.is_file():
        log.info("shifted splits %s from cache", path.name)
        return _load(path)
    test = data.test.head(cfg.evaluate.shift_limit)
    context = ShiftContext(data_spec=dict(cfg.data), seed=cfg.seed, baseline=baseline, cache=cache)
    splits = list(shift.shifted(dataclasses.replace(data, test=test), context))
    names = [(s.shift, s.severity) for s in splits]
    if len(set(names)) != len(names):
        raise ValueError(f"shift {shift.label()} gave two splits of one (shift, severity)")
    _save(path, splits)
    return _load(path)  # what a later cell will read, so every cell scores the same arrays


def _save(path: Path, splits: Sequence[ShiftedSplit]) -> None:
    tensors, meta = {}, []
    for i, s in enumerate(splits):
        # save_tensors copies: severities share their labels, a corruption may return a
        # strided view (jpeg), and safetensors refuses both.
        tensors[f"x{i}"], tensors[f"y{i}"] = s.split.x, s.split.y
        meta.append({"shift": s.shift, "severity": s.severity, "family": s.family})
    save_tensors(path, tensors, {"splits": json.dumps(meta)})


def _load(path: Path) -> list[ShiftedSplit]:
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {})["splits"])
    tensors = load_file(str(path))
    return [
        ShiftedSplit(m["shift"], int(m["severity"]), Split(tensors[f"x{i}"], tensors[f"y{i}"]),
                     m["family"])
        for i, m in enumerate(meta)
    ]  # fmt: skip


def scores(model: nn.Module, splits: Sequence[ShiftedSplit], batch_size: int) -> Scores:
    """Clean accuracy of ``model`` on each shifted split; NaN (stored as missing) for an empty
    one (an on-manifold set where no example kept its class)."""
    device = model_device(model)
    return {
        (s.shift, s.severity): accuracy(model, s.split.to(device), batch_size)
        if len(s.split) else math.nan
        for s in splits
    }  # fmt: skip


def baseline_scores(
    cfg: CellConfig, shift: Any, splits: Sequence[ShiftedSplit], baseline: nn.Module, cache: Path
) -> Scores:
    """The dense baseline's accuracies on the shift's splits, computed once per baseline."""
    path = cache / f"shift-{shift_key(cfg, shift)}-baseline-{cfg.baseline_key()}.json"
    if path.is_file():
        rows = json.loads(path.read_text())
        return {(r["shift"], int(r["severity"])): float(r["accuracy"]) for r in rows}
    result = scores(baseline, splits, cfg.evaluate.batch_size)
    rows = [{"shift": k[0], "severity": k[1], "accuracy": v} for k, v in result.items()]
    path.write_text(json.dumps(rows))
    return result
