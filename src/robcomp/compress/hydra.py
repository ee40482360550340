"""HYDRA: prune by importance scores learned under the robust training objective.

Sehwag, Wang, Mittal & Jana, "HYDRA: Pruning Adversarially Robust Neural Networks", NeurIPS 2020
(reference code: inspire-group/hydra). Every Conv/Linear weight ``W`` gets a score tensor ``s``
of the same shape; the forward pass uses ``W * m`` where ``m`` keeps the largest ``|s|`` of that
layer (the same fraction ``k = 1 - sparsity`` in every layer). The stages:

1. the input model is the pretrained dense network;
2. *prune*: ``W`` frozen, the scores trained with the robust objective (TRADES in the paper),
   gradients reaching ``s`` through a straight-through estimator of the top-k; BatchNorm's
   affine parameters keep training, as in the reference code, unless ``freeze_bn``;
3. *fine-tune*: scores (so the mask) frozen, ``W`` trained;
4. export: a dense model carrying ``torch.nn.utils.prune`` masks like the other pruners, so that
   further fine-tuning keeps the zeros and :func:`robcomp.compress.finalize` bakes them.

The scores start at the scaled magnitude ``sqrt(6 / fan_in) * W / max|W|``, so before any score
training the mask *is* layer-wise magnitude pruning; skipping stage 2 (``method="lwm"``) gives
the paper's LWM baseline, one-shot magnitude pruning with the same per-layer ``k`` fine-tuned
with the same objective.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize, prune

from robcomp.compress.base import COMPRESSORS, Record
from robcomp.compress.efficiency import prunable_layers, select_layers
from robcomp.compress.prune import check_sparsity, finalize, record_for
from robcomp.config import build, build_component, nested_field
from robcomp.data.base import DataSplits
from robcomp.train import OBJECTIVES, TrainConfig, fit

Method = Literal["hydra", "lwm"]
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_DEFAULT_OBJECTIVE = TrainConfig().objective  # what a stage config holds when left unset


def pruned_count(total: int, sparsity: float) -> int:
    """How many of ``total`` entries a ``sparsity`` fraction removes: ``floor(sparsity * n)``.

    HYDRA's ``int((1 - k) * n)``; the tiny tolerance keeps e.g. ``0.29 * 100`` at 29. At least
    one entry always stays.
    """
    return min(total - 1, math.floor(sparsity * total + 1e-9))


def stage_config(
    value: TrainConfig | Mapping[str, Any], objective: Mapping[str, Any], where: str
) -> TrainConfig:
    """A stage's TrainConfig (built from a mapping if needed) with the compressor's objective.

    The objective is set once, on the compressor, so the stages cannot silently disagree: a
    stage config that names another objective is an error.
    """
    cfg = value if isinstance(value, TrainConfig) else build(TrainConfig, value, where)
    if cfg.objective not in (_DEFAULT_OBJECTIVE, objective):
        raise ValueError(
            f"{where}.objective: set the objective once, on the compressor's 'objective' field "
            f"(here {dict(objective)!r}), not in the stage config (got {cfg.objective!r})"
        )
    return dataclasses.replace(cfg, objective=dict(objective))


def checked_objective(value: Mapping[str, Any] | str, where: str) -> dict[str, Any]:
    """``{"name": ..., **fields}`` of a registered objective; a bare name is accepted."""
    spec = {"name": value} if isinstance(value, str) else dict(value)
    build_component(OBJECTIVES, spec, where)  # unknown names and fields fail here, not mid-run
    return spec


class _TopKStraightThrough(torch.autograd.Function):
    """Forward: a 0/1 mask keeping all but the ``pruned`` smallest entries of ``scores``.

    Backward: the straight-through estimator (HYDRA's ``GetSubnet``): the gradient reaches the
    scores unchanged, as if the mask were the identity.
    """

    @staticmethod
    def forward(ctx: Any, scores: Tensor, pruned: int) -> Tensor:
        mask = torch.ones_like(scores)
        order = scores.flatten().argsort(stable=True)  # ties broken by position, reproducibly
        mask.view(-1)[order[:pruned]] = 0.0
        return mask

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def scaled_scores(weight: Tensor) -> Tensor:
    """HYDRA's ``initialize_scaled_score``: ``sqrt(6 / fan_in) * W / max|W|``.

    Proportional to ``|W|`` within the layer, so the initial mask is magnitude pruning; the
    Kaiming-uniform scale keeps the scores in a range the score optimiser's lr suits.
    """
    fan_in = weight[0].numel()  # in_channels / groups * kernel size, or in_features
    return math.sqrt(6.0 / fan_in) * weight / weight.abs().max().clamp_min(1e-12)


class ScoreMask(nn.Module):
    """HYDRA's masked layer as a weight parametrization: ``W -> W * topk(|scores|)``.

    Attributes:
        scores: one learnable score per weight, initialised by :func:`scaled_scores`.
        pruned: number of weights the mask zeroes in this layer.
    """

    def __init__(self, weight: Tensor, sparsity: float) -> None:
        super().__init__()
        self.pruned = pruned_count(weight.numel(), sparsity)
        self.scores = nn.Parameter(scaled_scores(weight.detach().clone()))

    def mask(self) -> Tensor:
        result: Tensor = _TopKStraightThrough.apply(self.scores.abs(), self.pruned)
        return result

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.mask()


def weight_of(module: nn.Module, name: str = "weight") -> Tensor:
    """``module.weight`` (or another tensor attribute) as the forward pass sees it."""
    value = getattr(module, name)
    if not isinstance(value, Tensor):
        raise TypeError(f"{type(module).__name__}.{name} is not a tensor")
    return value


def _score_mask(module: nn.Module) -> ScoreMask:
    for child in module.modules():  # the parametrization lives in module.parametrizations
        if isinstance(child, ScoreMask):
            return child
    raise RuntimeError(f"{type(module).__name__} has no HYDRA scores")


def _set_trainable(model: nn.Module, *, scores: bool, weights: bool, batch_norm: bool) -> None:
    """Choose what the next stage trains (``fit`` optimises parameters that require grad)."""
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if isinstance(module, ScoreMask):
                param.requires_grad_(scores)
            elif isinstance(module, BATCH_NORMS):
                param.requires_grad_(batch_norm)
            else:  # conv/linear weights (``original``) and biases, and anything else
                param.requires_grad_(weights)


def _export(layers: list[tuple[str, nn.Module]]) -> dict[str, float]:
    """Swap each score parametrization for a fixed prune mask; returns kept fraction per layer."""
    kept: dict[str, float] = {}
    for name, module in layers:
        with torch.no_grad():
            mask = _score_mask(module).mask().detach().clone()
        # leave_parametrized=False restores the dense trained W; the prune mask re-applies m.
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        prune.custom_from_mask(module, "weight", mask)
        kept[name] = float(mask.mean())
    return kept


def _lwm_overlap(layers: list[tuple[str, nn.Module]]) -> dict[str, float]:
    """Per layer, the fraction of kept weights that one-shot magnitude pruning also keeps."""
    overlap: dict[str, float] = {}
    for name, module in layers:
        score_mask = _score_mask(module)
        with torch.no_grad():
            learned = score_mask.mask()
            original = module.get_parameter("parametrizations.weight.original")
            magnitude = _TopKStraightThrough.apply(original.abs(), score_mask.pruned)
        overlap[name] = float((learned * magnitude).sum() / learned.sum())
    return overlap


def _default_prune() -> TrainConfig:
    # HYDRA's prune stage: SGD lr 0.1, momentum 0.9, wd 1e-4 (on the scores too), cosine, 20 ep.
    return TrainConfig(epochs=20, lr=0.1, weight_decay=1e-4, schedule="cosine", keep_best=False)


def _default_finetune() -> TrainConfig:
    # HYDRA's fine-tune stage: the same recipe at lr 0.01.
    return TrainConfig(epochs=20, lr=0.01, weight_decay=1e-4, schedule="cosine", keep_best=False)


@COMPRESSORS.register("hydra")
@dataclass(frozen=True, kw_only=True)
class Hydra:
    """HYDRA (Sehwag et al., "HYDRA: Pruning Adversarially Robust Neural Networks", NeurIPS 2020).

    Learns which weights to keep by training per-weight importance scores with the robust
    objective while the pretrained weights stay fixed, then fine-tunes the kept weights. Every
    Conv/Linear layer keeps the same fraction ``1 - sparsity`` of its weights. The result
    carries ``torch.nn.utils.prune`` masks, like :class:`robcomp.compress.MagnitudePruning`.

    Attributes:
        sparsity: fraction of each layer's weights set to zero (HYDRA's ``1 - k``), in [0, 1).
        method: ``hydra`` (learn the scores) or ``lwm``: the paper's layer-wise magnitude
            baseline, which skips the score stage, i.e. one-shot magnitude pruning with the
            same per-layer ``k`` (``magnitude`` with ``scope: layer``) fine-tuned by ``finetune``.
        prune: TrainConfig fields of the score stage (its ``objective`` is ``objective``).
        finetune: TrainConfig fields of the weight fine-tuning stage.
        objective: ``{"name": ..., **fields}`` of a registered objective, used by both stages;
            TRADES as in the paper by default.
        include_first_last: also prune the first and last layers (the reference does).
        freeze_bn: keep BatchNorm's affine parameters fixed during the score stage (the
            reference's ``--freeze-bn``; off by default, so they train with the scores).
        seed: seeds both stages (the fine-tune stage with ``seed + 1``).
    """

    uses_training_data = True  # trains scores, then weights on data.train

    sparsity: float
    method: Method = "hydra"
    prune: TrainConfig = field(default_factory=_default_prune)
    finetune: TrainConfig = field(default_factory=_default_finetune)
    objective: dict[str, Any] = field(default_factory=lambda: {"name": "trades"})
    include_first_last: bool = True
    freeze_bn: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity, "hydra")
        if self.method not in ("hydra", "lwm"):
            raise ValueError(f"hydra.method must be 'hydra' or 'lwm', got {self.method!r}")
        objective = checked_objective(self.objective, "hydra.objective")
        object.__setattr__(self, "objective", objective)
        for stage in ("prune", "finetune"):
            value = nested_field(self, stage, f"hydra.{stage}")  # a mapping merges as in YAML
            cfg = stage_config(value, objective, f"hydra.{stage}")
            object.__setattr__(self, stage, cfg)

    def label(self) -> str:
        return f"{self.method}-{self.sparsity:g}"

    def __call__(self, model: nn.Module, data: DataSplits) -> tuple[nn.Module, Record]:
        start = time.perf_counter()
        new = finalize(copy.deepcopy(model))  # earlier masks become plain zeros; HYDRA remasks
        flags = {name: p.requires_grad for name, p in new.named_parameters()}
        layers = select_layers(prunable_layers(new), self.include_first_last)
        for _, module in layers:
            parametrize.register_parametrization(
                module, "weight", ScoreMask(weight_of(module), self.sparsity)
            )
        histories: dict[str, Any] = {}
        if self.method == "hydra":
            _set_trainable(new, scores=True, weights=False, batch_norm=not self.freeze_bn)
            histories["prune"] = fit(
                new, data, self.prune, seed=self.seed, description="hydra: scores"
            ).as_dict()
        overlap = _lwm_overlap(layers)
        _set_trainable(new, scores=False, weights=True, batch_norm=True)
        histories["finetune"] = fit(
            new, data, self.finetune, seed=self.seed + 1, description=f"{self.method}: weights"
        ).as_dict()
        kept = _export(layers)
        for name, param in new.named_parameters():
            param.requires_grad_(flags.get(name.replace("_orig", ""), True))
        new.eval()
        return new, record_for(
            self.label(), new, data, time.perf_counter() - start,
            sparsity=self.sparsity, kept=kept, overlap_with_magnitude=overlap,
            history=histories, objective=self.objective,
        )  # fmt: skip
