"""The transfer matrix of an experiment (``evaluate.transfer``), built after its cells.

Marshall (2020), Algorithm 3: adversarial examples are crafted on a source model and every
target model is scored on them with no further attack. Here the targets are the experiment's
finished cells and the sources are some of them or checkpoints.

Why a final step and not part of the cells: a cell never sees another cell's model (cells run
independently, possibly on Ray workers, and write only their own folder), so a target cell
could only score a cell source if the grid were ordered in waves. Instead the driver, which
alone writes the store, runs this step once the cells are done: it rebuilds each model from the
caches the cells filled (:func:`~robcomp.experiments.runner.cell_model`), crafts each source's
examples once per set of test points (kept as safetensors under ``cache/transfer/``, so a rerun
or another target never crafts them again), scores each target and adds the accuracies to the
target cell as ``transfer_accuracy`` metrics keyed by (attack, eps, source). Cell ids do not
depend on ``evaluate.transfer``: adding it to a finished grid reruns no cell, and an entry
already stored is never computed again.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from robcomp.attacks import Attack
from robcomp.config import config_hash, identity_dict
from robcomp.data.base import Split
from robcomp.evaluate.bpda import StraightThrough
from robcomp.evaluate.transfer import TransferExamples, craft_examples, transfer_accuracy
from robcomp.experiments.runner import cell_model, cell_threads
from robcomp.experiments.spec import Cell, Experiment, Transfer, TransferSource
from robcomp.experiments.store import Metric, ResultStore
from robcomp.experiments.threads import intra_op_threads
from robcomp.models import (
    capabilities,
    checkpoint_trust,
    gradient_form,
    load_checkpoint,
    model_device,
    save_tensors,
)

log = logging.getLogger(__name__)

TRANSFER_METRIC = "transfer_accuracy"
FOLDER = "transfer"  # under the run's cache


@dataclass
class TransferSummary:
    """What the transfer step did: entries (target, source, attack, eps) stored now, found
    already stored, and the ones that failed (with the reason)."""

    stored: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Entry:
    source: TransferSource
    attack: Attack

    def key(self, target: str) -> tuple[str, str, str, float]:
        return (target, self.source.name, self.attack.label(), float(self.attack.eps))


def run_transfer(experiment: Experiment, results: ResultStore, cache: Path) -> TransferSummary:
    """Score every finished cell of ``experiment`` on every source's examples not yet stored.

    Args:
        results: the store the cells were recorded in; the accuracies are added to it.
        cache: the run's artifact cache (trained baselines, compressed models), where the
            crafted examples are kept too.
    """
    summary = TransferSummary()
    transfer = experiment.transfer
    if transfer is None:
        return summary
    done = results.done_ids()
    targets = [c for c in experiment.cells if c.cell_id in done]
    stored = {
        (cid, m.source, m.attack, m.eps)
        for cid, metrics in results.metrics_named(TRANSFER_METRIC).items()
        for m in metrics
    }
    entries = [_Entry(s, a) for s in transfer.sources for a in transfer.attacks]
    work = _Work(transfer, cache, done)
    for target in targets:
        pending = [e for e in entries if e.key(target.cell_id) not in stored]
        summary.skipped += len(entries) - len(pending)
        if pending:
            metrics = work.score(target, pending, summary.failed)
            results.add_metrics(target.cell_id, metrics)
            summary.stored += len(metrics)
    if summary.stored:
        log.info("transfer: %d entries stored, %d already done", summary.stored, summary.skipped)
    return summary


class _Work:
    """The models and examples of one transfer step, each loaded or crafted once."""

    def __init__(self, transfer: Transfer, cache: Path, done: set[str]) -> None:
        self.transfer = transfer
        self.cache = cache
        self.done = done
        self.sources: dict[str, tuple[nn.Module, int]] = {}
        self.examples: dict[tuple[str, str, str], TransferExamples] = {}

    def score(self, target: Cell, pending: list[_Entry], failed: list[str]) -> list[Metric]:
        """``target``'s accuracy on the examples of every pending entry."""
        cfg = self.transfer
        with checkpoint_trust(target.config.trust_code):
            model, data = cell_model(target.config, self.cache)
            points = data.test.head(cfg.limit)
            threads = cell_threads(target.config, data)
        metrics = []
        for entry in pending:
            try:
                examples = self._examples(entry, points)
                with intra_op_threads(threads):
                    value = transfer_accuracy(model, examples, cfg.batch_size)
            except Exception as err:  # one bad source fails its entries, not the matrix
                log.exception("transfer %s -> %s failed", entry.source.written, target.cell_id)
                failed.append(f"{entry.source.written} -> {target.cell_id}: {err}")
                continue
            metrics.append(
                Metric(TRANSFER_METRIC, value, entry.attack.label(), float(entry.attack.eps),
                       source=entry.source.name, n=len(examples.y),
                       norm=entry.attack.norm)
            )  # fmt: skip
        return metrics

    def _examples(self, entry: _Entry, points: Split) -> TransferExamples:
        """The entry's examples on ``points``: from memory, from the cache, or crafted."""
        x, y = (t.cpu() for t in points.tensors())
        key = (entry.source.name, _attack_key(entry.attack), _points_digest(x, y))
        if key in self.examples:
            return self.examples[key]
        path = self.cache / FOLDER / f"{config_hash(list(key))}.safetensors"
        if path.is_file():
            stored = load_file(str(path))
            examples = TransferExamples(stored["x"], stored["x_adv"], stored["y"])
            if not (torch.equal(examples.x, x) and torch.equal(examples.y, y)):
                raise ValueError(f"{path}: its points are not the ones asked for")
            examples.check(entry.attack, f"{path.name}")  # a file is checked like a fresh craft
        else:
            examples = self._craft(entry, points)
            save_tensors(path, {"x": examples.x, "x_adv": examples.x_adv, "y": examples.y})
        self.examples[key] = examples
        return examples

    def _craft(self, entry: _Entry, points: Split) -> TransferExamples:
        source, threads = self._source(entry.source)
        attackable = source
        caps = capabilities(source)
        if entry.attack.uses_gradients and not caps.gradients:
            # int8 has no useful gradients: craft through its twin (BPDA), scored on itself
            attackable = StraightThrough(source, gradient_form(source, caps))
        with intra_op_threads(threads):
            return craft_examples(
                attackable, entry.attack, points.to(model_device(source)), self.transfer.batch_size
            )

    def _source(self, source: TransferSource) -> tuple[nn.Module, int]:
        """The source's model and the threads its cell ran with (loaded once)."""
        if source.name not in self.sources:
            self.sources[source.name] = self._load(source)
        return self.sources[source.name]

    def _load(self, source: TransferSource) -> tuple[nn.Module, int]:
        if source.cell is not None:
            cfg = source.cell.config
            if source.cell.cell_id not in self.done:
                raise RuntimeError(f"source cell {source.cell.cell_id} has not finished")
            with checkpoint_trust(cfg.trust_code):
                model, data = cell_model(cfg, self.cache)
                threads = cell_threads(cfg, data)
            return model, threads
        if source.checkpoint is None:
            raise ValueError(f"transfer source {source.written!r} is neither a cell nor a folder")
        model, _ = load_checkpoint(source.checkpoint, trust_code=self.transfer.trust_code)
        return model, torch.get_num_threads()


def _attack_key(attack: Attack) -> str:
    """The attack with every field, as the cache key sees it (seed and steps included)."""
    return config_hash({"label": attack.label(), **identity_dict(attack)})


def _points_digest(x: torch.Tensor, y: torch.Tensor) -> str:
    sha = hashlib.sha256()
    for t in (x, y):
        sha.update(str((tuple(t.shape), t.dtype)).encode())
        sha.update(t.contiguous().numpy().tobytes())
    return sha.hexdigest()
