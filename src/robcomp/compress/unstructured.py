"""Unstructured pruning beyond one-shot magnitude: the random control and gradual pruning.

Both leave ``torch.nn.utils.prune`` masks on the returned model, like
:class:`robcomp.compress.MagnitudePruning`, so fine-tuning keeps the zeros;
:func:`robcomp.compress.finalize` makes them permanent.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.nn.utils import prune

from robcomp.compress.base import COMPRESSORS, Record
from robcomp.compress.efficiency import count_nonzero, prunable_layers, select_layers
from robcomp.compress.prune import check_sparsity, record_for
from robcomp.config import build
from robcomp.data.base import DataSplits
from robcomp.train import TrainConfig, fit

log = logging.getLogger(__name__)

Scope = Literal["global", "layer"]


def _targets(model: nn.Module, include_first_last: bool) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for _, m in select_layers(prunable_layers(model), include_first_last)]


def _zeros(targets: list[tuple[nn.Module, str]]) -> tuple[int, int]:
    """(zeroed weights, total weights) over the pruning targets, masks included."""
    total = sum(getattr(m, n).numel() for m, n in targets)
    zeros = sum(int((getattr(m, n) == 0).sum()) for m, n in targets)
    return zeros, total


def _prune_to(
    targets: list[tuple[nn.Module, str]],
    sparsity: float,
    scope: Scope,
    method: type[prune.BasePruningMethod],
) -> None:
    """Grow the masks (never shrink them) until ``sparsity`` of the targets is zero. In place.

    Amounts are whole numbers of weights, counted among those not pruned yet, so repeated calls
    reach the overall sparsity asked for; ``torch.nn.utils.prune`` stacks the new mask on the old.
    """
    if scope == "global":
        zeros, total = _zeros(targets)
        extra = round(sparsity * total) - zeros
        if extra > 0:
            prune.global_unstructured(targets, pruning_method=method, amount=extra)
        return
    for module, name in targets:
        zeros, total = _zeros([(module, name)])
        extra = round(sparsity * total) - zeros
        if extra > 0:
            method.apply(module, name, amount=extra)


@COMPRESSORS.register("random")
@dataclass(frozen=True, kw_only=True)
class RandomPruning:
    """Random unstructured pruning: the control for magnitude pruning.

    Zeroes a uniformly random ``sparsity`` fraction of the Conv/Linear weights (over all of them,
    or the same fraction per layer). Any robustness a pruning criterion keeps beyond this control
    is due to the criterion, not to sparsity itself (cf. Liu et al. 2019, "Rethinking the Value of
    Network Pruning"; Frankle & Carbin 2019 use random re-initialisation the same way).

    Attributes:
        sparsity: fraction of weights set to zero, in [0, 1).
        scope: ``global`` or ``layer``.
        include_first_last: also prune the first and last layers.
        seed: seeds the random choice.
    """

    sparsity: float
    scope: Scope = "global"
    include_first_last: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity, "random")

    def label(self) -> str:
        return f"random-{self.scope}-{self.sparsity:g}"

    def __call__(self, model: nn.Module, data: DataSplits) -> tuple[nn.Module, Record]:
        start = time.perf_counter()
        new = copy.deepcopy(model)
        targets = _targets(new, self.include_first_last)
        # torch's RandomUnstructured draws from the global generator: seed it locally.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            _prune_to(targets, self.sparsity, self.scope, prune.RandomUnstructured)
        seconds = time.perf_counter() - start
        return new, record_for(
            self.label(), new, data, seconds, sparsity=self.sparsity, layers=len(targets)
        )


def cubic_schedule(final: float, initial: float, steps: int) -> list[float]:
    """Zhu & Gupta's sparsity at each pruning step ``k = 0..steps``.

    ``s_k = s_f + (s_i - s_f) (1 - k / n)^3``: prune fast while redundant weights are plenty,
    slowly near the target.
    """
    return [final + (initial - final) * (1.0 - k / steps) ** 3 for k in range(steps + 1)]


def _default_finetune() -> TrainConfig:
    return TrainConfig(epochs=1, lr=0.01, schedule="constant", keep_best=False)


@COMPRESSORS.register("gradual")
@dataclass(frozen=True, kw_only=True)
class GradualPruning:
    """Gradual magnitude pruning (Zhu & Gupta, "To prune, or not to prune", ICLR-W 2018).

    Sparsity rises from ``initial_sparsity`` to ``sparsity`` over ``steps`` pruning steps along
    a cubic schedule (:func:`cubic_schedule`); after every step the model is fine-tuned with
    ``train`` (:func:`robcomp.train.fit`) while the masks keep pruned weights at zero. The
    smallest-magnitude weights go first, ranked globally or per layer. The paper prunes every
    few hundred SGD steps inside one training run; here each step is a short ``fit`` (one epoch
    by default), which is the same algorithm at a coarser time step.

    Attributes:
        sparsity: final fraction of Conv/Linear weights at zero, in [0, 1).
        initial_sparsity: sparsity of the first step.
        steps: number of pruning steps after the first (Zhu & Gupta's n).
        train: the fine-tuning between steps (TrainConfig fields); its seed is ``seed + step``.
        scope: ``global`` or ``layer``.
        include_first_last: also prune the first and last layers.
        seed: seeds fine-tuning.
    """

    uses_training_data = True  # trains between pruning steps on data.train

    sparsity: float
    initial_sparsity: float = 0.0
    steps: int = 10
    train: TrainConfig = field(default_factory=_default_finetune)
    scope: Scope = "global"
    include_first_last: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity, "gradual")
        check_sparsity(self.initial_sparsity, "gradual", "initial_sparsity")
        if self.initial_sparsity > self.sparsity:
            raise ValueError("initial_sparsity must not exceed sparsity")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if isinstance(self.train, dict):  # a mapping written in Python rather than YAML
            object.__setattr__(self, "train", build(TrainConfig, self.train, "gradual.train"))

    def label(self) -> str:
        return f"gradual-{self.scope}-{self.sparsity:g}"

    def __call__(self, model: nn.Module, data: DataSplits) -> tuple[nn.Module, Record]:
        start = time.perf_counter()
        new = copy.deepcopy(model)
        targets = _targets(new, self.include_first_last)
        schedule = cubic_schedule(self.sparsity, self.initial_sparsity, self.steps)
        reached: list[float] = []
        for step, target in enumerate(schedule):
            if target <= 0.0:
                continue
            _prune_to(targets, target, self.scope, prune.L1Unstructured)
            fit(new, data, self.train, seed=self.seed + step, description=f"gradual {step}")
            zeros, total = _zeros(targets)
            reached.append(zeros / total)
            log.info("gradual pruning step %d: sparsity %.4f", step, zeros / total)
        new.eval()
        seconds = time.perf_counter() - start
        return new, record_for(
            self.label(), new, data, seconds,
            sparsity=self.sparsity, schedule=schedule, reached=reached,
            nonzero=count_nonzero(new), layers=len(targets),
        )  # fmt: skip
