"""Running one cell: data -> model -> train (cached) -> compress -> fine-tune -> evaluate.

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
from typing import Any

import torch
import yaml
from torch import nn

from robcomp import data as datasets
from robcomp.compress import COMPRESSORS, finalize, measure
from robcomp.config import build_component, to_dict
from robcomp.data.base import DataSplits
from robcomp.evaluate import AttackResult, accuracy, evaluate_attack
from robcomp.evaluate.diagnostics import Flag, diagnose, summarize
from robcomp.experiments.spec import Cell, CellConfig
from robcomp.experiments.store import Metric
from robcomp.models import Classifier, create, load_checkpoint, load_weights, save_checkpoint
from robcomp.train import fit

log = logging.getLogger(__name__)
# Attacks that use no gradients of the model (their label prefixes): the masking check compares
# them with the gradient attacks at the same threat model.
BLACK_BOX = ("square", "salt-and-pepper", "transfer")


@dataclass(frozen=True)
class CellResult:
    """Everything a cell produced, ready for the store."""

    cell_id: str
    experiment: str
    config: dict[str, Any]
    grid_values: dict[str, Any]
    metrics: list[Metric] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None


def build_model(cfg: CellConfig, data: DataSplits) -> tuple[Classifier, dict[str, Any]]:
    """The untrained (or pretrained-weights) model of a cell and its checkpoint spec."""
    spec: dict[str, Any] = {
        "name": cfg.model.name,
        "num_classes": data.num_classes,
        "in_shape": list(data.in_shape),
        "mean": list(cfg.model.mean or data.mean),
        "std": list(cfg.model.std or data.std),
        "options": dict(cfg.model.options),
    }
    torch.manual_seed(cfg.seed)  # weight initialisation is part of the cell's determinism
    model = create(
        spec["name"], spec["num_classes"], spec["in_shape"],
        mean=spec["mean"], std=spec["std"], **spec["options"],
    )  # fmt: skip
    if cfg.model.weights:
        load_weights(model, cfg.model.weights)
    return model, spec


def trained_baseline(
    cfg: CellConfig, data: DataSplits, cache: Path
) -> tuple[nn.Module, dict[str, Any]]:
    """The trained uncompressed model, from the cache when an earlier cell produced it."""
    folder = cache / f"baseline-{cfg.baseline_key()}"
    if (folder / "history.json").is_file():
        model, _ = load_checkpoint(folder)
        log.info("baseline %s from cache", folder.name)
        return model, json.loads((folder / "history.json").read_text())
    model, spec = build_model(cfg, data)
    history = fit(model, data, cfg.train, seed=cfg.seed, description="train baseline")
    save_checkpoint(model, folder, spec)
    info = {"history": history.as_dict(), "test_accuracy": accuracy(model, data.test)}
    # history.json is written last: its presence marks a complete cache entry.
    (folder / "history.json").write_text(json.dumps(info, indent=2))
    return model, info


def _efficiency_metrics(model: nn.Module, base: nn.Module, data: DataSplits) -> list[Metric]:
    eff, base_eff = measure(model, data.in_shape), measure(base, data.in_shape)
    return [
        Metric("params", eff.params),
        Metric("nonzero_params", eff.nonzero_params),
        Metric("compression_rate", eff.compression_rate(base_eff.nonzero_params)),
        Metric("bits", eff.bits),
        Metric("size_bytes", eff.size_bytes),
        Metric("sparse_bytes", eff.sparse_bytes),
        Metric("macs", eff.macs),
    ]


def _evaluate(
    cfg: CellConfig, model: nn.Module, data: DataSplits
) -> tuple[list[Metric], list[AttackResult]]:
    metrics = [Metric("clean_accuracy", accuracy(model, data.test, cfg.evaluate.batch_size))]
    points = data.test.head(cfg.evaluate.limit)
    results = []
    for attack in cfg.evaluate.build_attacks():
        result = evaluate_attack(model, attack, points, cfg.evaluate.batch_size)
        results.append(result)
        metrics += [
            Metric("robust_accuracy", result.robust_accuracy, result.attack, result.eps),
            Metric("mean_norm", result.mean_norm, result.attack, result.eps),
            Metric("median_norm", result.median_norm, result.attack, result.eps),
            Metric("attack_seconds", result.seconds, result.attack, result.eps),
        ]
    return metrics, results


def _diagnostics(
    cfg: CellConfig, model: nn.Module, data: DataSplits, results: list[AttackResult]
) -> tuple[list[Metric], list[dict[str, Any]]]:
    """The gradient-masking checklist at the threat model of the first gradient attack."""
    if not cfg.evaluate.diagnostics:
        return [], []
    first = next((r for r in results if r.norm in ("linf", "l2")), None)
    norm, eps = (first.norm, first.eps) if first else ("linf", 0.1)
    white_box = [r for r in results if (r.norm, r.eps) == (norm, eps)]
    same_attack = [r for r in results if first and (r.attack, r.norm) == (first.attack, norm)]
    black_box = {r.attack: r.robust_accuracy for r in white_box if r.attack.startswith(BLACK_BOX)}
    gradient = [r.robust_accuracy for r in white_box if not r.attack.startswith(BLACK_BOX)]
    x, y = data.test.head(cfg.evaluate.diagnostics_points).tensors()
    flags = diagnose(
        model, x, y, norm=norm, eps=eps,
        robust_by_eps={r.eps: r.robust_accuracy for r in same_attack} or None,
        black_box=black_box or None,
        white_box=min(gradient) if gradient else None,
    )  # fmt: skip
    metrics = [Metric(f"flag:{f.check}", float(f.raised), "", 0.0) for f in flags]
    return metrics, [to_dict(f) for f in flags]


def run_cell(cell: Cell, workdir: Path) -> CellResult:
    """Run one cell; errors are caught and returned so one bad cell never stops a grid."""
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
        data = datasets.get(cfg.data, seed=cfg.seed)
        baseline, baseline_info = trained_baseline(cfg, data, workdir / "cache")
        compressor = build_component(COMPRESSORS, cfg.compress, "compress")
        model, record = compressor(baseline, data)
        finetune = None
        if cfg.finetune is not None and cfg.finetune.epochs > 0:
            finetune = fit(model, data, cfg.finetune, seed=cfg.seed, description="fine-tune")
        model = finalize(model)
        evaluated, results = _evaluate(cfg, model, data)
        flag_metrics, flags = _diagnostics(cfg, model, data, results)
        metrics = _efficiency_metrics(model, baseline, data) + evaluated + flag_metrics
        info = {
            "data": data.summary(),
            "compressor": compressor.label(),
            "record": to_dict(record),
            "baseline": baseline_info,
            "finetune": finetune.as_dict() if finetune else None,
            "diagnostics": flags,
            "masking": summarize([Flag(**f) for f in flags]) if flags else None,
        }
        (folder / "history.json").write_text(json.dumps(info, indent=2, default=str))
        seconds = time.perf_counter() - start
        return CellResult(**common, metrics=metrics, info=info, seconds=seconds)
    except Exception as err:  # recorded as a failed cell; KeyboardInterrupt still stops the run
        log.exception("cell %s failed", cell.cell_id)
        error = f"{type(err).__name__}: {err}\n{traceback.format_exc()}"
        return CellResult(**common, seconds=time.perf_counter() - start, error=error)
