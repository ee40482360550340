"""ADMM robust pruning: adversarial training and pruning solved together.

Ye et al. 2019, "Adversarial Robustness vs. Model Compression, or Both?" (ICCV), reference code
yeshaokai/Robustness-Aware-Pruning-ADMM, and Marshall 2020, "Robust Convolutional Neural
Networks with Resource Constraints" (MSc thesis, Sec. 3, Algorithm 1). Pruning is the
constraint ``W in S`` of an adversarial-training problem; ADMM splits it into

* a W-step: SGD on ``objective(W) + sum_l rho/2 ||W_l - Z_l + U_l||^2`` (the objective is
  PGD-AT by default, any registered objective otherwise),
* a Z-step: ``Z_l = Pi_S(W_l + U_l)``, the Euclidean projection onto the sparsity set,
* a dual step: ``U_l = U_l + W_l - Z_l``,

then hard-prunes W with the projection and retrains with the zeros held by masks. The Z- and
U-steps run every ``period`` epochs and rho grows by ``rho_growth`` each time, as in the
reference code (the thesis's Algorithm 1 writes them per iteration; a period of one epoch is the
finest granularity here).
"""

from __future__ import annotations

import copy
import difflib
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from robcomp.compress.base import COMPRESSORS, Record
from robcomp.compress.efficiency import execution_order, prunable_layers, select_layers
from robcomp.compress.prune import check_sparsity, record_for
from robcomp.config import build, build_component
from robcomp.data.base import DataSplits
from robcomp.data.transforms import AugmentName
from robcomp.train.loop import Callback, TrainConfig, fit
from robcomp.train.objectives import OBJECTIVES, Objective, ProgressAware

log = logging.getLogger(__name__)

Scheme = Literal["irregular", "filter", "column", "funnel", "redundant"]
Pattern = Literal["irregular", "filter", "column", "redundant"]  # one layer's projection
KSchedule = Literal["fixed", "decreasing"]
SCHEMES: tuple[str, ...] = get_args(Scheme)


# ------------------------------------------------------------------------------ projections


def _count(fraction: float, n: int) -> int:
    """Whole number of units to prune; rounded like ``torch.nn.utils.prune``'s amounts."""
    return min(n, round(fraction * n))


def _keep_largest(scores: Tensor, n_prune: int) -> Tensor:
    """Boolean keep-mask over the 1-D ``scores`` dropping exactly the ``n_prune`` smallest.

    Ranking (rather than thresholding, as the reference's percentile does) makes the count exact
    even when scores tie; the stable sort makes the choice among ties deterministic.
    """
    keep = torch.ones_like(scores, dtype=torch.bool)
    if n_prune > 0:
        keep[torch.argsort(scores, stable=True)[:n_prune]] = False
    return keep


def _rows_to_weight(keep_rows: Tensor, weight: Tensor) -> Tensor:
    return keep_rows.view(-1, *([1] * (weight.ndim - 1))).expand_as(weight).clone()


def _irregular(weight: Tensor, sparsity: float) -> Tensor:
    scores = weight.abs().flatten()
    return _keep_largest(scores, _count(sparsity, scores.numel())).view_as(weight)


def _filter(weight: Tensor, sparsity: float) -> Tensor:
    norms = weight.flatten(1).norm(dim=1)  # (out,): one L2 norm per output filter / neuron
    return _rows_to_weight(_keep_largest(norms, _count(sparsity, len(norms))), weight)


def _column(weight: Tensor, sparsity: float) -> Tensor:
    matrix = weight.flatten(1)  # (out, in*kh*kw): a column is one input position of all filters
    norms = matrix.norm(dim=0)  # (in*kh*kw,)
    keep = _keep_largest(norms, _count(sparsity, len(norms)))
    return keep.expand_as(matrix).reshape(weight.shape).clone()


def _redundant(weight: Tensor, phi: float) -> Tensor:
    """Keep filters greedily, largest norm first, dropping each filter ``a`` that a kept filter
    ``b`` already spans up to a small rest: ``||a - (a . b / |b|^2) b|| < phi * |b|``.

    Up to a rescaling (which the BatchNorm after a conv undoes), ``a`` then differs from ``b`` by
    less than ``phi`` of ``b``. Measuring the rest against ``b`` keeps zero inside the redundant
    set, so ADMM's pull of a duplicate towards zero never takes it out of the constraint (with a
    plain distance, a shrinking duplicate stops being one). Minimising the projection error
    means losing as little filter energy as possible, hence the largest-first order; the exact
    projection (a maximum-weight independent set) is NP-hard.
    """
    rows = weight.flatten(1)  # (out, fan_in)
    gram = rows @ rows.T  # (out, out): dot products between filters
    sq_norms = gram.diagonal()
    keep = torch.zeros(len(rows), dtype=torch.bool, device=weight.device)
    kept: list[int] = []
    for i in torch.argsort(sq_norms, descending=True, stable=True).tolist():
        if kept:
            along = gram[i, kept] ** 2 / sq_norms[kept].clamp(min=torch.finfo(rows.dtype).tiny)
            rest = (sq_norms[i] - along).clamp(min=0)  # squared distance to each b's line
            if bool((rest < phi**2 * sq_norms[kept]).any()):
                continue
        kept.append(i)
        keep[i] = True
    return _rows_to_weight(keep, weight)


_PROJECTIONS: dict[str, Callable[[Tensor, float], Tensor]] = {
    "irregular": _irregular,
    "filter": _filter,
    "column": _column,
    "redundant": _redundant,
}


def projection_mask(weight: Tensor, pattern: Pattern, amount: float) -> Tensor:
    """Boolean keep-mask of the projection of ``weight`` onto one layer's sparsity set.

    ``weight * mask`` is that projection (``weight_pruning`` in the authors' code,
    yeshaokai/Robustness-Aware-Pruning-ADMM). Rows of
    ``weight.flatten(1)`` are output filters (Conv) or neurons (Linear); columns are one input
    position across all filters.

    Args:
        weight: a Conv or Linear weight.
        pattern: ``irregular`` (the ``amount`` fraction of smallest |w| is zeroed), ``filter``
            (the ``amount`` fraction of rows with the smallest L2 norm), ``column`` (the same for
            columns), ``redundant`` (rows within relative distance ``amount`` = phi of a larger
            kept row, see :func:`_redundant`).
        amount: the fraction pruned, or phi for ``redundant``.
    """
    with torch.no_grad():
        return _PROJECTIONS[pattern](weight.detach(), amount)


# ------------------------------------------------------------------------------- schedules


def funnel_sparsities(sizes: list[int], sparsity: float, ratio: float) -> list[float]:
    """Per-layer sparsities of funnel pruning (Marshall 2020, Sec. 3.2.1), shallow to deep.

    The thesis only requires that "each consecutive layer ... have proportionally more weights
    pruned than the previous layer". Here the kept fraction (density) decays geometrically with
    normalised depth ``t = i / (N - 1)``: ``density_i = d * ratio ** t``, so the deepest layer
    keeps ``ratio`` times the fraction the first keeps whatever the depth, and ``d`` is set so
    that ``sparsity`` of all the weights is pruned, the same budget as the other schemes.

    Raises:
        ValueError: if the first layer would need more than all its weights.
    """
    depth = [i / (len(sizes) - 1) if len(sizes) > 1 else 0.0 for i in range(len(sizes))]
    relative = [ratio**t for t in depth]
    first = (1.0 - sparsity) * sum(sizes) / sum(n * r for n, r in zip(sizes, relative, strict=True))
    if first > 1.0:
        raise ValueError(
            f"funnel: sparsity {sparsity:g} is too low for funnel_ratio {ratio:g} (the first "
            f"layer would keep {first:.3f} of its weights); raise sparsity or funnel_ratio"
        )
    return [1.0 - first * r for r in relative]


def k_fraction(period: int, periods: int, stages: int) -> float:
    """Fraction of the final target used in ADMM ``period`` under a decreasing-k schedule.

    The thesis (Sec. 3.1) lowers k, the number of weights kept, along "a set sequence"; here the
    periods are split into ``stages`` equal groups and stage ``j`` uses ``(j + 1) / stages`` of
    the final target (k falls linearly), reaching it in the last stage. ``stages = 1`` is fixed k.
    """
    return (period * stages // periods + 1) / stages


def admm_lr_factor(epoch: int, period: int) -> float:
    """Learning-rate multiplier in the ADMM stage: reset to 1 at each period's start, then x0.1
    after each third of it (``admm_adjust_learning_rate`` in the authors' code,
    yeshaokai/Robustness-Aware-Pruning-ADMM)."""
    return float(0.1 ** math.floor((epoch % period) / (period / 3)))


# ------------------------------------------------------------------------------ ADMM state


@dataclass(frozen=True)
class _Layer:
    name: str
    module: nn.Module
    amount: float  # final sparsity of this layer (fraction of weights / filters / columns) or phi

    @property
    def weight(self) -> Tensor:
        """The weight the forward pass uses (the masked one, once pruned)."""
        weight = self.module.weight
        if not isinstance(weight, Tensor):
            raise TypeError(f"{self.name}.weight is not a tensor")
        return weight


class _ADMMState:
    """Z (the projected copy of W) and U (the scaled dual variable) per layer, and rho."""

    def __init__(self, layers: list[_Layer], pattern: Pattern, rho: float) -> None:
        self.layers, self.pattern, self.rho = layers, pattern, rho
        self.z = [layer.weight.detach().clone() for layer in layers]
        self.u = [torch.zeros_like(z) for z in self.z]

    def _weights(self) -> list[Tensor]:
        return [layer.weight for layer in self.layers]

    @torch.no_grad()
    def project(self, fraction: float) -> None:
        """Z-step: ``Z = Pi(W + U)`` at ``fraction`` of each layer's final target."""
        for i, (layer, w) in enumerate(zip(self.layers, self._weights(), strict=True)):
            v = w + self.u[i]
            self.z[i] = v * projection_mask(v, self.pattern, layer.amount * fraction)

    @torch.no_grad()
    def dual_step(self) -> None:
        """``U = U + W - Z``. The reference does not rescale U when rho changes; nor do we."""
        for u, w, z in zip(self.u, self._weights(), self.z, strict=True):
            u += w - z

    def penalty(self) -> Tensor:
        """``sum_l rho/2 ||W_l - Z_l + U_l||^2``, differentiable in W."""
        terms = [(w - z + u).pow(2).sum() for w, z, u in zip(self._weights(), self.z, self.u)]
        return 0.5 * self.rho * torch.stack(terms).sum()

    @torch.no_grad()
    def residual(self) -> float:
        """Primal residual ``||W - Z||_F`` over all layers: how far W is from being pruned."""
        return math.sqrt(sum(float((w - z).pow(2).sum()) for w, z in zip(self._weights(), self.z)))

    def z_sparsity(self) -> dict[str, float]:
        return {layer.name: float((z == 0).float().mean()) for layer, z in zip(self.layers, self.z)}


# ---------------------------------------------------------------------------- the compressor


DEFAULT_OBJECTIVE: dict[str, Any] = {"name": "pgd-at", "eps": 8 / 255, "step": 2 / 255, "steps": 10}


def _default_objective() -> dict[str, Any]:
    return dict(DEFAULT_OBJECTIVE)


def _default_retrain() -> dict[str, Any]:
    # The reference's retrain stage: lr 0.01, MultiStep [80, 150] x0.1, 200 epochs, wd 1e-4.
    return {"epochs": 200, "lr": 0.01, "schedule": "multistep", "milestones": [80, 150],
            "weight_decay": 1e-4, "keep_best": False}  # fmt: skip


@COMPRESSORS.register("admm")
@dataclass(frozen=True, kw_only=True)
class ADMMPruning:
    """ADMM robust pruning (Ye et al. 2019, ICCV; Marshall 2020, MSc thesis, Algorithm 1).

    Trains the model with ``objective`` (PGD-AT by default) plus the ADMM penalty for
    ``admm_epochs`` epochs, hard-prunes it with the projection, then retrains it with the zeros
    held by ``torch.nn.utils.prune`` masks (left on the returned model, so later fine-tuning
    keeps them). Every scheme prunes each layer separately, as the reference does:

    * ``irregular``: the ``sparsity`` fraction of smallest-|w| weights of each layer.
    * ``filter``: the ``sparsity`` fraction of output filters (Linear: neurons) with the
      smallest L2 norm. Zeroed filters are **not physically removed** (as in the reference): the
      layer keeps its shape, its bias and the BatchNorm after it, so the channel still outputs a
      constant; ``l1-filter`` is the compressor that shrinks layers.
    * ``column``: the ``sparsity`` fraction of columns of ``W.reshape(out, -1)`` (one input
      channel and kernel position across all filters) with the smallest L2 norm.
    * ``funnel`` (thesis Sec. 3.2.1): irregular with a sparsity that grows strictly with depth
      (forward-pass order); the deepest layer keeps ``funnel_ratio`` times the fraction of
      weights the first keeps and ``sparsity`` is the overall fraction (:func:`funnel_sparsities`).
    * ``redundant`` (thesis Sec. 3.2.1): zeroes each filter ``a`` that nearly duplicates a
      larger kept filter ``b`` of the same layer up to a scale, ``||a - c b|| < phi ||b||`` for
      the best ``c`` (so filters below ``phi`` of the largest one's norm go too). The thesis
      asks that no two "weight matrices" of different layers lie within an absolute distance
      phi; layers' weights do not share a shape, so we compare the filters of one layer, with
      a measure one phi fits at any scale and that ADMM's shrinking of a duplicate does not
      escape (:func:`_redundant`). The number pruned follows from phi; ``sparsity`` is unused.

    ``k_schedule="decreasing"`` (thesis Sec. 3.1: k follows "a set sequence") raises each
    layer's target (phi for ``redundant``) in ``k_stages`` equal steps over the ADMM periods
    (:func:`k_fraction`); ``fixed`` projects onto the final target from the start.

    Attributes:
        sparsity: fraction pruned in every layer (of weights, or of filters / columns for those
            schemes), in [0, 1); or ``{layer: fraction}``, which also chooses the layers (names
            from ``named_modules``, with or without the ``net.`` prefix). Not for ``redundant``.
        scheme: ``irregular``, ``filter``, ``column``, ``funnel`` or ``redundant``.
        funnel_ratio: ``funnel`` only: density of the deepest layer over that of the first,
            in (0, 1).
        phi: ``redundant`` only: the near-duplicate threshold, relative to the larger
            filter's norm, in (0, 1).
        k_schedule: ``fixed`` or ``decreasing``.
        k_stages: number of targets of the decreasing schedule, at most the number of periods.
        rho: initial ADMM penalty (reference 1e-3; on a short run the pull is then weak and
            the hard pruning does most of the work).
        rho_growth: factor on rho at every Z/U update (reference 1.3).
        admm_epochs: epochs of the ADMM stage (reference 200).
        period: epochs between Z/U updates (reference ``admm_epoch`` 20); the learning rate
            restarts at ``lr`` each period and drops x0.1 after each third of it.
        lr: ADMM-stage learning rate (SGD, reference 0.01).
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        batch_size: ADMM-stage batch size.
        augment: ADMM-stage augmentation (``none``, ``flip``, ``crop_flip``).
        retrain: the masked retraining: TrainConfig fields overriding the reference's (200
            epochs, lr 0.01, multistep x0.1 at 80 and 150, weight decay 1e-4, no best-epoch
            selection) and ``objective``; or a whole TrainConfig. ``{"epochs": 0}`` skips it
            (the thesis does not retrain).
        include_first_last: also prune the first and last layers (forward-pass order), when
            ``sparsity`` is a number.
        objective: the training objective ``{"name": ..., **fields}`` (PGD-AT, eps 8/255, step
            2/255, 10 steps by default, as the reference).
        seed: seeds shuffling, the objective's randomness and retraining.
    """

    uses_training_data = True  # trains under the ADMM penalty on data.train

    sparsity: float | dict[str, float] | None = None
    scheme: Scheme = "irregular"
    funnel_ratio: float = 0.5
    phi: float | None = None
    k_schedule: KSchedule = "fixed"
    k_stages: int = 3
    rho: float = 1e-3
    rho_growth: float = 1.3
    admm_epochs: int = 200
    period: int = 20
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 128
    augment: AugmentName = "none"
    retrain: dict[str, Any] | TrainConfig = field(default_factory=dict)
    include_first_last: bool = True
    objective: dict[str, Any] = field(default_factory=_default_objective)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}; got {self.scheme!r}")
        self._check_sparsity()
        self._check_scheme_options()
        self._check_admm()
        self.build_objective()  # an unknown objective or field fails here, not after training
        self.retrain_config()

    def _check_sparsity(self) -> None:
        if self.scheme == "redundant":
            if self.sparsity is not None:
                raise ValueError("scheme 'redundant' prunes by phi; leave sparsity unset")
            return
        if self.sparsity is None:
            raise ValueError(f"scheme {self.scheme!r} needs sparsity (a fraction in [0, 1))")
        values = self.sparsity.values() if isinstance(self.sparsity, Mapping) else [self.sparsity]
        if isinstance(self.sparsity, Mapping) and not self.sparsity:
            raise ValueError("sparsity: the per-layer mapping is empty")
        for value in values:
            check_sparsity(value, "admm")
        if self.scheme == "funnel" and isinstance(self.sparsity, Mapping):
            raise ValueError("scheme 'funnel' derives per-layer sparsities; give one number")

    def _check_scheme_options(self) -> None:
        if self.scheme == "redundant" and (self.phi is None or not 0 < self.phi < 1):
            raise ValueError(f"scheme 'redundant' needs phi in (0, 1), got {self.phi}")
        if self.scheme != "redundant" and self.phi is not None:
            raise ValueError(f"phi is for scheme 'redundant' only (scheme is {self.scheme!r})")
        if not 0.0 < self.funnel_ratio < 1.0:
            raise ValueError(f"funnel_ratio must be in (0, 1), got {self.funnel_ratio}")

    def _check_admm(self) -> None:
        if not 0 < self.rho < math.inf or not 1 <= self.rho_growth < math.inf:
            raise ValueError(f"need rho > 0 and rho_growth >= 1, got {self.rho}, {self.rho_growth}")
        if self.admm_epochs < 1 or self.period < 1:
            raise ValueError("admm_epochs and period must be >= 1")
        if self.k_schedule not in get_args(KSchedule):
            raise ValueError(f"k_schedule must be 'fixed' or 'decreasing', got {self.k_schedule!r}")
        periods = self.periods()
        if self.k_stages < 1 or (self.k_schedule == "decreasing" and self.k_stages > periods):
            raise ValueError(
                f"k_stages must be in [1, {periods}] (the number of ADMM periods, "
                f"ceil(admm_epochs / period)), got {self.k_stages}"
            )
        self.admm_config()  # lr, momentum, weight decay, batch size

    def periods(self) -> int:
        """Number of ADMM periods (Z/U updates plus the initial projection)."""
        return math.ceil(self.admm_epochs / self.period)

    def build_objective(self) -> Objective:
        objective: Objective = build_component(OBJECTIVES, self.objective, "admm.objective")
        return objective

    def admm_config(self) -> TrainConfig:
        """The ADMM stage as a TrainConfig for :func:`fit` (its learning rate follows
        :func:`admm_lr_factor`; no epoch is selected: the stage's end is pruned)."""
        return TrainConfig(
            epochs=self.admm_epochs, batch_size=self.batch_size, lr=self.lr,
            momentum=self.momentum, weight_decay=self.weight_decay, objective=self.objective,
            augment=self.augment, schedule="constant", select="last",
        )  # fmt: skip

    def retrain_config(self) -> TrainConfig:
        """The masked retraining: a mapping overrides the reference's settings key by key, and
        inherits ``objective`` unless it sets its own."""
        if isinstance(self.retrain, TrainConfig):
            return self.retrain
        values = {**_default_retrain(), "objective": self.objective, **self.retrain}
        return build(TrainConfig, values, "admm.retrain")

    def label(self) -> str:
        if self.scheme == "redundant":
            return f"admm-redundant-phi{self.phi:g}"
        amount = "layerwise" if isinstance(self.sparsity, Mapping) else f"{self.sparsity:g}"
        return f"admm-{self.scheme}-{amount}"

    @property
    def pattern(self) -> Pattern:
        return "irregular" if self.scheme == "funnel" else self.scheme

    # -- layers -------------------------------------------------------------------------------

    def _layers(self, model: nn.Module, in_shape: tuple[int, ...]) -> list[_Layer]:
        """The layers to prune, in forward-pass order, with their final targets."""
        order = execution_order(model, in_shape)  # "deeper" for funnel pruning
        order += [n for n, _ in prunable_layers(model) if n not in order]  # unused layers last
        if isinstance(self.sparsity, Mapping):
            chosen = _resolve(model, self.sparsity)
            named = dict(model.named_modules())
            return [_Layer(n, named[n], chosen[n]) for n in order if n in chosen]
        order = select_layers(order, self.include_first_last)
        if not order:
            raise ValueError("admm: the model has no Conv/Linear layer to prune")
        modules = dict(model.named_modules())
        if self.sparsity is None:  # redundant: the target is phi
            return [_Layer(n, modules[n], float(self.phi or 0.0)) for n in order]
        amounts = [float(self.sparsity)] * len(order)
        if self.scheme == "funnel":
            sizes = [modules[n].weight.numel() for n in order]
            amounts = funnel_sparsities(sizes, float(self.sparsity), self.funnel_ratio)
        return [_Layer(n, modules[n], a) for n, a in zip(order, amounts, strict=True)]

    # -- ADMM stage ---------------------------------------------------------------------------

    def _begin_period(self, state: _ADMMState, epoch: int) -> dict[str, Any]:
        """Initial projection (period 0) or the Z-, U- and rho-updates (later periods)."""
        period = epoch // self.period
        fraction = 1.0
        if self.k_schedule == "decreasing":
            fraction = k_fraction(period, self.periods(), self.k_stages)
        state.project(fraction)  # in period 0, U = 0 and this is Z = Pi(W)
        if period > 0:
            state.dual_step()
            state.rho *= self.rho_growth
        return {
            "period": period, "epoch": epoch, "rho": state.rho, "k_fraction": fraction,
            "targets": {layer.name: layer.amount * fraction for layer in state.layers},
            "z_sparsity": state.z_sparsity(), "residual_start": state.residual(),
        }  # fmt: skip

    def _admm_stage(
        self, model: nn.Module, data: DataSplits, layers: list[_Layer]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Train with the ADMM penalty (the W-step) in :func:`fit`, the Z-, U- and rho-updates
        running before each period's first epoch; returns per-epoch and per-period records."""
        state = _ADMMState(layers, self.pattern, self.rho)
        periods = _Periods(self, state)
        history = fit(
            model, data, self.admm_config(), seed=self.seed, description="admm",
            objective=ADMMPenalty(self.build_objective(), state), callbacks=[periods],
            lr_schedule=lambda epoch, _step, _steps: admm_lr_factor(epoch, self.period),
        )  # fmt: skip
        return list(history.epochs), periods.records

    # -- the compressor -----------------------------------------------------------------------

    def __call__(self, model: nn.Module, data: DataSplits) -> tuple[nn.Module, Record]:
        start = time.perf_counter()
        new = copy.deepcopy(model)
        layers = self._layers(new, tuple(data.in_shape))
        epochs, periods = self._admm_stage(new, data, layers)
        for layer in layers:  # hard pruning: W itself (not W + U) projected onto the final S
            mask = projection_mask(layer.weight, self.pattern, layer.amount)
            prune.custom_from_mask(layer.module, "weight", mask)
        history = fit(new, data, self.retrain_config(), seed=self.seed, description="admm retrain")
        new.eval()
        seconds = time.perf_counter() - start
        return new, record_for(
            self.label(), new, data, seconds,
            scheme=self.scheme, sparsity=self.sparsity, phi=self.phi, k_schedule=self.k_schedule,
            layers={layer.name: _pruned(layer, self.pattern) for layer in layers},
            history=epochs, periods=periods, retrain=history.as_dict(),
            filters_removed_physically=False,
        )  # fmt: skip


# ------------------------------------------------------------------------------ helpers


@dataclass(frozen=True)
class ADMMPenalty:
    """The W-step's loss: ``objective`` plus ``sum_l rho/2 ||W_l - Z_l + U_l||^2``.

    ``loss`` is the sum minimised; ``task_loss`` is the objective's own loss (the adversarial
    loss the thesis plots) and ``penalty`` the ADMM term, both logged per epoch by :func:`fit`.
    """

    objective: Objective
    state: _ADMMState

    def set_progress(self, epoch: int, step: int, steps_per_epoch: int, epochs: int) -> None:
        if isinstance(self.objective, ProgressAware):  # e.g. the thesis's eps/steps schedules
            self.objective.set_progress(epoch, step, steps_per_epoch, epochs)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        out = self.objective(model, x, y)
        penalty = self.state.penalty()
        return {**out, "loss": out["loss"] + penalty, "task_loss": out["loss"], "penalty": penalty}


class _Periods(Callback):
    """ADMM's Z-, U- and rho-updates at the start of every ``period`` epochs, and the
    per-epoch and per-period records of how far W is from its projection."""

    def __init__(self, admm: ADMMPruning, state: _ADMMState) -> None:
        self.admm, self.state = admm, state
        self.records: list[dict[str, Any]] = []

    def before_epoch(self, model: nn.Module, epoch: int) -> None:
        if epoch % self.admm.period == 0:
            self.records.append(self.admm._begin_period(self.state, epoch))

    def after_epoch(self, model: nn.Module, epoch: int, record: dict[str, float]) -> None:
        record.update(period=epoch // self.admm.period, rho=self.state.rho)
        record["residual"] = self.records[-1]["residual_end"] = self.state.residual()


def _resolve(model: nn.Module, sparsity: Mapping[str, float]) -> dict[str, float]:
    """Per-layer sparsities keyed by full module name; ``conv1`` may stand for ``net.conv1``."""
    known = [n for n, _ in prunable_layers(model)]
    out: dict[str, float] = {}
    for name, value in sparsity.items():
        full = name if name in known else f"net.{name}"
        if full not in known:
            short = {n.removeprefix("net."): n for n in known}  # "conv3" is close to "conv2"
            close = [short.get(c, c) for c in difflib.get_close_matches(name, [*known, *short])]
            close = list(dict.fromkeys(close))
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(
                f"admm sparsity: no Conv/Linear layer {name!r}{hint} (layers: {', '.join(known)})"
            )
        out[full] = value
    return out


def _pruned(layer: _Layer, pattern: Pattern) -> dict[str, Any]:
    """What is zero in one layer after pruning and retraining."""
    w = layer.weight.detach()
    zero = w == 0
    info: dict[str, Any] = {
        "target": layer.amount, "zeros": int(zero.sum()), "total": w.numel(),
        "sparsity": float(zero.float().mean()),
    }  # fmt: skip
    if pattern in ("filter", "redundant"):
        info["filters_pruned"] = zero.flatten(1).all(1).nonzero().flatten().tolist()
    if pattern == "column":
        info["columns_pruned"] = zero.flatten(1).all(0).nonzero().flatten().tolist()
    return info
