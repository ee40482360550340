"""Running one cell: data -> model -> train (cached) -> compress -> fine-tune -> evaluate, the
last four by the one pipeline (:func:`robcomp.experiments.pipeline.evaluate_variant`).

A cell is a pure function of its configuration: it reads the shared baseline cache and writes
only its own folder, and it returns its results instead of writing the store, so any executor
(a local loop, a Ray cluster) can run it.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
import yaml
from torch import nn

from robcomp import data as datasets
from robcomp.attacks.manifold import using_manifold
from robcomp.compress.efficiency import count_macs
from robcomp.config import ConfigError, to_dict
from robcomp.data.base import DataSplits
from robcomp.evaluate import accuracy
from robcomp.experiments.cache import own_callables
from robcomp.experiments.pipeline import (
    CellInfo,
    Variant,
    cell_manifold,
    compress_and_finetune,
    evaluate_variant,
    prepare_variant,
)
from robcomp.experiments.spec import Cell, CellConfig
from robcomp.experiments.store import Metric
from robcomp.experiments.threads import choose_threads, intra_op_threads
from robcomp.models import (
    Classifier,
    checkpoint_trust,
    create,
    factory_for,
    load_checkpoint,
    load_weights,
    normalizes_inputs,
    resolve_device,
    save_checkpoint,
    statistics_for,
)
from robcomp.models.base import code_origin, code_paths
from robcomp.train import fit

__all__ = [
    "CellResult",
    "build_model",
    "cell_model",
    "cell_threads",
    "compress_and_finetune",
    "run_cell",
    "trained_baseline",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CellResult:
    """Everything a cell produced, ready for the store."""

    cell_id: str
    experiment: str
    config: dict[str, Any]
    grid_values: dict[str, Any]
    metrics: list[Metric] = field(default_factory=list)
    info: CellInfo | None = None  # None for a failed cell
    seconds: float = 0.0
    error: str | None = None

    def info_json(self) -> dict[str, Any]:
        """``info`` as the store and ``history.json`` hold it (empty for a failed cell)."""
        return self.info.as_json() if self.info is not None else {}


def build_model(cfg: CellConfig, data: DataSplits) -> tuple[Classifier, dict[str, Any]]:
    """The untrained (or pretrained-weights) model of a cell and its checkpoint spec."""
    channels = data.in_shape[0]
    if not len(data.train) and cfg.train.epochs > 0:  # fit would silently train on nothing
        raise ConfigError(
            f"data {data.name!r} is a test set only (no training split): it cannot train a "
            "model; set train.epochs: 0 and model.weights to evaluate a trained one"
        )
    # Models that normalize their own inputs (an ensemble's members do) get the identity in
    # front, since a second Normalize would normalize twice, unless the file says otherwise.
    # Pretrained weights bring the statistics they were trained with.
    with code_paths(cfg.model.code_path):
        factory = factory_for(cfg.model.name)
    identity = ((0.0,) * channels, (1.0,) * channels) if normalizes_inputs(factory) else None
    own = identity or statistics_for(factory, cfg.model.options, channels)
    if cfg.model.weights and own is None and (cfg.model.mean is None or cfg.model.std is None):
        _missing_statistics(cfg.model.weights, channels)
    mean, std = own or (data.mean, data.std)
    spec: dict[str, Any] = {
        "name": cfg.model.name,
        "num_classes": data.num_classes,
        "in_shape": list(data.in_shape),
        "mean": list(cfg.model.mean or mean),
        "std": list(cfg.model.std or std),
        "options": dict(cfg.model.options),
    }
    if origin := code_origin(cfg.model.name):  # so loading the checkpoint finds the code
        spec["code_path"] = origin
    if data.input_scale is not None:
        # Inputs scaled by the training file's statistics (sensor signals): whoever loads the
        # checkpoint must scale new inputs the same way.
        spec["input_scale"] = data.input_scale
    torch.manual_seed(cfg.seed)  # weight initialisation is part of the cell's determinism
    model = create(
        spec["name"], spec["num_classes"], spec["in_shape"],
        mean=spec["mean"], std=spec["std"], **spec["options"],
    )  # fmt: skip
    if cfg.model.weights:
        load_weights(model, cfg.model.weights)
    return model, spec


def _missing_statistics(weights: str, channels: int) -> NoReturn:
    """Foreign weights expect the normalization they were trained with; the training data's
    statistics would be a silent guess (a published MNIST net at 99.48 % scored 97.07 %)."""
    zeros, ones = [0] * channels, [1] * channels
    raise ValueError(
        f"model.weights {weights}: set model.mean and model.std to the per-channel statistics "
        f"these weights were trained with (one value per channel), or mean: {zeros}, std: "
        f"{ones} if they were trained on unnormalized [0, 1] inputs (CLI: --mean/--std)"
    )


def trained_baseline(
    cfg: CellConfig, data: DataSplits, cache: Path
) -> tuple[nn.Module, dict[str, Any]]:
    """The trained uncompressed model, from the cache when an earlier cell produced it, on the
    data's device."""
    folder = cache / f"baseline-{cfg.baseline_key()}"
    if (folder / "history.json").is_file():
        # Its spec came from the cell's own model config, so the callables that names are trusted.
        model, _ = load_checkpoint(folder, trust_code=own_callables(cfg))
        log.info("baseline %s from cache", folder.name)
        return model.to(data.device), json.loads((folder / "history.json").read_text())
    model, spec = build_model(cfg, data)
    model.to(data.device)
    history = fit(model, data, cfg.train, seed=cfg.seed, description="train baseline")
    save_checkpoint(model, folder, spec)
    info = {"history": history.as_dict(), "test_accuracy": accuracy(model, data.test)}
    # history.json is written last: its presence marks a complete cache entry.
    (folder / "history.json").write_text(json.dumps(info, indent=2))
    return model, info


def run_cell(cell: Cell, workdir: Path) -> CellResult:
    """Run one cell; errors are caught and returned so one bad cell never stops a grid.

    Checkpoints the cell loads may import the code their spec names only if its config says
    ``trust_code: true``. The cell picks its own intra-op threads; the caller's are restored.
    """
    with checkpoint_trust(cell.config.trust_code), intra_op_threads(torch.get_num_threads()):
        return _run_cell(cell, workdir)


def _macs_per_image(cfg: CellConfig, data: DataSplits) -> int:
    """Multiply-accumulates per image of the cell's model, built untrained on the CPU (cheap)."""
    model, _ = build_model(cfg, data)
    return count_macs(model, data.in_shape)


def cell_model(cfg: CellConfig, cache: Path) -> tuple[nn.Module, DataSplits]:
    """A finished cell's model as its evaluation attacked it (compressed and fine-tuned; an
    int8 model's eager form) and its data on that model's device, for work that needs several
    cells' models at once (transfer attacks).

    The model comes from the caches the cell filled in ``cache`` (trained baseline, compressed
    model), bit for bit the one the cell evaluated; a model the compressed cache cannot hold
    (int8) is compressed again from the cached baseline, deterministically under the cell's
    seed. Call it inside the cell's :func:`checkpoint_trust` and threads, as :func:`run_cell`.
    """
    data = datasets.get(cfg.data, seed=cfg.seed).to(resolve_device(cfg.device))
    with using_manifold(cell_manifold(cfg, data, cache)):
        prepared = prepare_variant(_variant(cfg, data, cache, cache), data)
    return prepared.attacked, prepared.data


def _variant(cfg: CellConfig, data: DataSplits, cache: Path, folder: Path) -> Variant:
    """The cell as a variant: its baseline trained (or read from ``cache``), its compressor
    from its config, its compressed model cached."""
    return Variant(
        config=cfg,
        baseline=lambda: trained_baseline(cfg, data, cache),
        cache=cache,
        folder=folder,
    )


def cell_threads(cfg: CellConfig, data: DataSplits) -> int:
    """The intra-op threads :func:`run_cell` gives the cell (the same threads give the same
    floating-point sums, so a model scored again reproduces the cell's numbers)."""
    return choose_threads(
        cfg.threads, None if cfg.threads is not None else _macs_per_image(cfg, data)
    )


def _run_cell(cell: Cell, workdir: Path) -> CellResult:
    cfg, start = cell.config, time.perf_counter()
    config = to_dict(cfg)
    common = {
        "cell_id": cell.cell_id,
        "experiment": cfg.name,
        "config": config,
        "grid_values": cell.grid_values,
    }
    folder = workdir / "cells" / cell.cell_id
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        # The one place data moves; every model follows the data's device.
        data = datasets.get(cfg.data, seed=cfg.seed).to(resolve_device(cfg.device))
        macs = None if cfg.threads is not None else _macs_per_image(cfg, data)
        torch.set_num_threads(choose_threads(cfg.threads, macs))
        result = evaluate_variant(_variant(cfg, data, workdir / "cache", folder), data)
        info = result.info.as_json()
        (folder / "history.json").write_text(json.dumps(info, indent=2, default=str))
        seconds = time.perf_counter() - start
        return CellResult(**common, metrics=result.metrics, info=result.info, seconds=seconds)
    except Exception as err:  # recorded as a failed cell; KeyboardInterrupt still stops the run
        log.exception("cell %s failed", cell.cell_id)
        error = f"{type(err).__name__}: {err}\n{traceback.format_exc()}"
        return CellResult(**common, seconds=time.perf_counter() - start, error=error)
