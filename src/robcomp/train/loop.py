"""The one training loop: any objective, SGD/Adam, LR schedules, best-validation checkpointing."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from robcomp.config import build_component
from robcomp.data.base import DataSplits
from robcomp.data.transforms import AugmentName, augmentation
from robcomp.evaluate.clean import accuracy
from robcomp.progress import track
from robcomp.train.objectives import OBJECTIVES, Objective

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How to train. ``epochs: 0`` means "do not train" (e.g. use pretrained weights as they are).

    Attributes:
        schedule: ``constant``; ``step`` (x gamma every ``lr_step`` epochs); ``multistep``
            (x gamma at each of ``milestones``); ``cosine`` (to 0 over the run, per iteration);
            ``cyclic`` (linear 0 -> lr at the middle -> 0, per iteration, as in Fast-AT).
        objective: ``{"name": ..., **fields}`` of a registered objective (``ce`` by default).
        keep_best: restore the weights of the epoch with the best validation accuracy.
    """

    epochs: int = 10
    batch_size: int = 128
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: Literal["constant", "step", "multistep", "cosine", "cyclic"] = "cosine"
    lr_step: int = 30
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    objective: dict[str, Any] = field(default_factory=lambda: {"name": "ce"})
    augment: AugmentName = "none"
    keep_best: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1:
            raise ValueError("epochs must be >= 0 and batch_size >= 1")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.schedule == "multistep" and not self.milestones:
            raise ValueError("schedule 'multistep' needs milestones, e.g. [50, 75]")

    def build_objective(self, where: str = "train.objective") -> Objective:
        objective: Objective = build_component(OBJECTIVES, self.objective, where)
        return objective


def make_optimizer(params: Any, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
        )  # fmt: skip
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(cfg: TrainConfig, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Multiplier of the base learning rate at ``step`` of ``epoch`` (both from 0)."""
    progress = (epoch + step / steps_per_epoch) / max(cfg.epochs, 1)  # in [0, 1)
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        return float(cfg.gamma ** (epoch // cfg.lr_step))
    if cfg.schedule == "multistep":
        return float(cfg.gamma ** sum(epoch >= m for m in cfg.milestones))
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - abs(2.0 * progress - 1.0)  # cyclic: triangle peaking at mid-run


@dataclass
class History:
    """Per-epoch records (loss, accuracies, learning rate, seconds) of one training run."""

    epochs: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "best_epoch": self.best_epoch}


def _mean(values: Mapping[str, list[float]]) -> dict[str, float]:
    return {k: sum(v) / len(v) for k, v in values.items() if v}


def fit(
    model: nn.Module,
    data: DataSplits,
    cfg: TrainConfig,
    *,
    seed: int = 0,
    description: str = "train",
) -> History:
    """Train ``model`` in place on ``data.train``, selecting on ``data.val``; returns the history.

    Shuffling and augmentation are driven by a generator seeded with ``seed``, so a run is
    reproducible on the same machine.
    """
    history = History()
    if cfg.epochs == 0:
        return history
    objective = cfg.build_objective()
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    augment = augmentation(cfg.augment)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout and anything else drawing from the global generator
    steps_per_epoch = math.ceil(len(data.train) / cfg.batch_size)
    best_acc, best_state = -1.0, None
    with track(description, cfg.epochs * steps_per_epoch) as advance:
        for epoch in range(cfg.epochs):
            start = time.perf_counter()
            model.train()
            sums: dict[str, list[float]] = {}
            correct = seen = 0
            batches = data.train.batches(
                cfg.batch_size, shuffle=True, generator=generator, augment=augment
            )
            for step, (x, y) in enumerate(batches):
                factor = lr_factor(cfg, epoch, step, steps_per_epoch)
                for group in optimizer.param_groups:
                    group["lr"] = cfg.lr * factor
                out = objective(model, x, y)
                optimizer.zero_grad(set_to_none=True)
                out["loss"].backward()
                optimizer.step()
                for key, value in out.items():
                    if key != "logits" and value.ndim == 0:
                        sums.setdefault(key, []).append(float(value.detach()))
                if "logits" in out:
                    correct += int((out["logits"].detach().argmax(1) == y).sum())
                    seen += len(y)
                advance(1, status=f"epoch {epoch + 1}/{cfg.epochs} loss {sums['loss'][-1]:.3f}")
            record = _mean(sums)
            if seen:
                record["train_accuracy"] = correct / seen
            record["lr"] = optimizer.param_groups[0]["lr"]
            if len(data.val):
                record["val_accuracy"] = accuracy(model, data.val)
            record["epoch"] = epoch + 1
            record["seconds"] = time.perf_counter() - start
            history.epochs.append(record)
            log.info("%s epoch %d: %s", description, epoch + 1, record)
            score = record.get("val_accuracy", -record["loss"])
            if cfg.keep_best and score > best_acc:
                best_acc, history.best_epoch = score, epoch + 1
                best_state = copy.deepcopy(model.state_dict())
    if cfg.keep_best and best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return history
