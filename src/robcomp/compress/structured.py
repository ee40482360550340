"""L1-norm filter pruning (Li et al. 2017) that physically removes channels.

*What* to remove is an importance score (:class:`FilterL1`, the sum of absolute weights of a
filter); *how* to remove it is Torch-Pruning's dependency graph, which finds every layer coupled
to a channel (the BatchNorm after it, the next layer's input channels, every convolution feeding
the same residual addition) and shrinks them together, so the pruned network stays consistent.

Residual networks need care. torchvision's ResNets have 1x1 convolution shortcuts, and the
dependency graph couples all the layers that meet at an addition: their channels are removed
together. The CIFAR ResNets with option-A shortcuts (zero-padding, no parameters) are different:
Torch-Pruning traces the channel padding as an element-wise op, so pruning anything that passes
through a padding shortcut breaks the network (shapes no longer match at the next addition). For
those groups we do what Li et al.'s own code does (``res56prune.py``): only the first convolution
of each residual block is pruned; the block outputs keep their width.
"""

from __future__ import annotations

import copy
import difflib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch_pruning as tp
from torch import Tensor, nn

from robcomp.compress.base import COMPRESSORS, Record
from robcomp.compress.efficiency import PRUNABLE, count_params, execution_order
from robcomp.compress.prune import record_for
from robcomp.data.base import DataSplits
from robcomp.evaluate.clean import accuracy
from robcomp.models.capabilities import model_device
from robcomp.progress import track

log = logging.getLogger(__name__)

Residual = Literal["auto", "coupled", "internal"]

# Torch-Pruning's functions that remove *output* channels (filters). A depthwise convolution's
# output and input channels are the same, so its one function appears here too.
_FILTER_FNS = (
    tp.prune_conv_out_channels,
    tp.prune_linear_out_channels,
    tp.prune_depthwise_conv_out_channels,
)


class FilterL1(tp.importance.MagnitudeImportance):
    """Li et al.'s filter score: the L1 norm of each filter, ``sum_j |F_ij|`` (Shen et al. Eq. 1).

    When the dependency graph couples several layers (e.g. all convolutions feeding one residual
    addition), a channel's score is the sum of the L1 norms of all filters removed with it. For a
    group with a single convolution this is exactly Li et al.'s score. Unlike Torch-Pruning's
    default group importance, input-channel slices and BatchNorm scales do not count.
    """

    def __init__(self) -> None:
        super().__init__(p=1, group_reduction="sum", normalizer=None)

    @torch.no_grad()
    def __call__(self, group: Any) -> Tensor:
        scores: Tensor | None = None
        for item in group.items:
            dep, idxs = item.dep, item.idxs
            layer = dep.target.module
            if dep.handler not in _FILTER_FNS or not isinstance(layer, PRUNABLE):
                continue
            if getattr(layer, "transposed", False) or any(r is None for r in item.root_idxs):
                continue  # transposed convs keep filters in dim 1; None: not mapped to the root
            root = torch.as_tensor(item.root_idxs, device=layer.weight.device)
            local = layer.weight.detach()[list(idxs)].abs().flatten(1).sum(1)  # (len(idxs),)
            if scores is None:
                scores = torch.zeros(len(group[0].idxs), dtype=torch.float64, device=root.device)
            scores.scatter_add_(0, root, local.double())
        if scores is None:
            raise ValueError("a pruning group without convolution or linear filters")
        return scores


@dataclass
class PruningUnit:
    """One independently prunable set of channels: a root layer and the filters coupled to it.

    Attributes:
        name: the root layer's module name (how skip lists and sensitivity results name it).
        module: the root layer.
        channels: its number of output channels.
        scores: :class:`FilterL1` score of each channel, computed on the unpruned model.
        members: names of all layers whose filters are removed together with the root's.
        fan_in: weights per channel over all member filters (the L1 score's number of terms).
        weight_std: standard deviation of all weights of the member layers.
    """

    name: str
    module: nn.Module
    channels: int
    scores: Tensor
    members: list[str]
    fan_in: int
    weight_std: float


@dataclass
class PruningPlan:
    """The dependency graph of a model and its prunable units (see :func:`plan_filters`)."""

    model: nn.Module
    graph: Any  # tp.DependencyGraph
    units: list[PruningUnit]
    skipped: dict[str, str]  # root layer -> why it is kept intact


def _resolve_names(model: nn.Module, wanted: Sequence[str]) -> set[str]:
    """Module names as given, or relative to the network behind Normalize (``net.``)."""
    known = {n for n, _ in model.named_modules()}
    out = set()
    for name in wanted:
        if name in known:
            out.add(name)
        elif f"net.{name}" in known:
            out.add(f"net.{name}")
        else:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"skip_layers: the model has no module {name!r}{hint}")
    return out


def plan_filters(
    model: nn.Module,
    in_shape: Sequence[int],
    *,
    skip_layers: Sequence[str] = (),
    include_linear: bool = False,
    residual: Residual = "auto",
) -> PruningPlan:
    """Build Torch-Pruning's dependency graph of ``model`` (in place) and list its prunable units.

    Args:
        model: the model whose channels will be removed; the plan keeps references into it.
        in_shape: shape of one input.
        skip_layers: module names whose filters are kept; a unit coupled to one is kept whole.
        include_linear: also prune hidden Linear neurons (the final classifier is always kept).
        residual: ``coupled`` prunes every group the dependency graph finds; ``internal`` only
            groups that touch no residual addition (the first convolution of each block, as in
            Li et al.'s ResNet code); ``auto`` is ``coupled`` except for groups that pass a
            zero-padding shortcut, which Torch-Pruning cannot prune consistently.
    """
    was_training = model.training
    model.eval()  # a batch of one through BatchNorm in training mode would fail
    try:
        order = execution_order(model, in_shape)
        if not order:
            raise ValueError("the model has no Conv or Linear layer to prune")
        graph = tp.DependencyGraph().build_dependency(
            model,
            example_inputs=torch.zeros(1, *in_shape, device=model_device(model)),
            verbose=False,
        )
    finally:
        model.train(was_training)
    modules = dict(model.named_modules())
    name_of = {m: n for n, m in modules.items()}
    classifier = order[-1]
    keep = _resolve_names(model, skip_layers) | {classifier}
    importance = FilterL1()
    units: list[PruningUnit] = []
    skipped: dict[str, str] = {}
    seen: set[str] = set()
    for name in order:
        module = modules[name]
        if name in seen or (isinstance(module, nn.Linear) and not include_linear):
            continue
        fn = graph.get_pruner_of_module(module).prune_out_channels
        channels = graph.get_out_channels(module)
        group = graph.get_pruning_group(module, fn, idxs=list(range(channels)))
        members = [
            name_of[item.dep.target.module]
            for item in group.items
            if item.dep.handler in _FILTER_FNS and isinstance(item.dep.target.module, PRUNABLE)
        ]
        ops = " ".join(item.dep.target.name for item in group.items)
        seen.update(members)
        reason = ""
        if keep & set(members):
            reason = f"coupled to kept layer(s) {sorted(keep & set(members))}"
        elif residual == "auto" and "ConstantPadNd" in ops:
            reason = "passes a zero-padding shortcut (Li et al. keep block outputs)"
        elif residual == "internal" and "AddBackward" in ops:
            reason = "feeds a residual addition"
        elif channels < 2:
            reason = "a single channel"
        if reason:
            skipped[name] = reason
            continue
        weights = [modules[m].weight.detach() for m in members]
        fan_in = sum(w[0].numel() for w in weights)
        std = float(torch.cat([w.flatten() for w in weights]).std())
        units.append(PruningUnit(name, module, channels, importance(group), members, fan_in, std))
    return PruningPlan(model, graph, units, skipped)


def _keep_count(channels: int, ratio: float) -> int:
    """Filters kept when removing ``ratio`` of ``channels``: floor(n (1 - p)), at least one."""
    return max(1, min(channels, math.floor(channels * (1.0 - ratio) + 1e-9)))


def sensitivity_count(unit: PruningUnit, sensitivity: float) -> int:
    """Filters of ``unit`` whose mean absolute weight is below ``sensitivity`` x the weight std.

    Han et al.'s (2015) threshold, which Distiller's sensitivity pruner implements: a weight
    goes when ``|w| < s * std(layer weights)``. Lifted to filters, the filter's L1 norm divided
    by its number of weights (Li et al.'s score, per weight) is compared with ``s`` times the
    standard deviation of all weights of the layer (of all coupled layers for a coupled unit).
    The threshold scales with each layer, so one ``s`` sets a different ratio per layer: more
    where many filters are weak relative to the layer's spread. For Gaussian-like weights the
    mean |w| of a filter is about 0.8 of its std, so ``s`` around 0.5-1 prunes moderately.
    """
    per_weight = unit.scores / unit.fan_in
    return int((per_weight < sensitivity * unit.weight_std).sum())


def apply_plan(plan: PruningPlan, removed: Callable[[PruningUnit], int]) -> dict[str, list[int]]:
    """Remove, from each unit, the ``removed(unit)`` filters with the lowest scores. In place.

    Returns ``{root layer: [kept, total]}``. Scores come from the unpruned model, so the result
    does not depend on the order in which units are pruned (Li et al.'s independent pruning).
    """
    kept: dict[str, list[int]] = {}
    for unit in plan.units:
        n = min(max(int(removed(unit)), 0), unit.channels - 1)
        kept[unit.name] = [unit.channels - n, unit.channels]
        if n == 0:
            continue
        idxs = torch.argsort(unit.scores, stable=True)[:n].tolist()
        fn = plan.graph.get_pruner_of_module(unit.module).prune_out_channels
        group = plan.graph.get_pruning_group(unit.module, fn, idxs=idxs)
        if not plan.graph.check_pruning_group(group):  # would empty a layer; never with n < C
            raise RuntimeError(f"pruning {n} channels of {unit.name} would empty a layer")
        group.prune()
    return kept


@COMPRESSORS.register("l1-filter")
@dataclass(frozen=True, kw_only=True)
class L1FilterPruning:
    """L1-norm filter pruning (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017),
    as used by Shen et al. (2024) to compare pruning with distillation and quantization.

    Each prunable convolution loses the filters with the smallest L1 norm; the channels are
    physically removed (with the BatchNorm and next-layer slices that depend on them), so the
    result has fewer parameters *and* fewer MACs. Give exactly one of ``ratio``,
    ``sensitivity`` or ``target_params``. Fine-tune afterwards; this is one-shot pruning.

    Attributes:
        ratio: fraction of filters removed from every prunable unit, in [0, 1).
        sensitivity: one hyper-parameter for all layers. Shen et al. prune "using a single
            sensitivity hyper-parameter to control the pruning ratios in each ResNet block"
            without defining it. Here it is Han et al.'s (2015) and Distiller's sensitivity
            threshold lifted to filters (:func:`sensitivity_count`): a filter goes when its
            mean absolute weight is below ``sensitivity`` times the std of its layer's weights.
        target_params: prune until the model has at most this many parameters (Shen et al.
            compare models pruned to equal size): the smallest uniform ``ratio`` that gets
            there, found by bisection.
        skip_layers: module names whose filters are kept (the final classifier always is).
        include_linear: also remove hidden Linear neurons.
        residual: how to treat residual connections; see :func:`plan_filters`.
    """

    ratio: float | None = None
    sensitivity: float | None = None
    target_params: int | None = None
    skip_layers: tuple[str, ...] = ()
    include_linear: bool = False
    residual: Residual = "auto"

    def __post_init__(self) -> None:
        options = ("ratio", "sensitivity", "target_params")
        given = [n for n in options if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of ratio, sensitivity, target_params (got {given or 'none'})"
            )
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.sensitivity is not None and self.sensitivity < 0:
            raise ValueError(f"sensitivity must be >= 0, got {self.sensitivity}")
        if self.target_params is not None and self.target_params < 1:
            raise ValueError(f"target_params must be positive, got {self.target_params}")

    def label(self) -> str:
        if self.sensitivity is not None:
            return f"l1-filter-s{self.sensitivity:g}"
        if self.target_params is not None:
            return f"l1-filter-{self.target_params}p"
        return f"l1-filter-{self.ratio:g}"

    def _pruned(
        self, model: nn.Module, data: DataSplits, ratio: float | None
    ) -> tuple[nn.Module, PruningPlan, dict[str, list[int]]]:
        new = copy.deepcopy(model)
        plan = plan_filters(
            new, data.in_shape, skip_layers=self.skip_layers,
            include_linear=self.include_linear, residual=self.residual,
        )  # fmt: skip
        if ratio is not None:
            kept = apply_plan(plan, lambda u: u.channels - _keep_count(u.channels, ratio))
        else:
            sens = float(self.sensitivity or 0.0)
            kept = apply_plan(plan, lambda u: sensitivity_count(u, sens))
        return new, plan, kept

    def _search_ratio(self, model: nn.Module, data: DataSplits, target: int) -> float:
        """The smallest uniform ratio (to 1e-3) whose pruned model has <= target parameters."""

        def params_at(r: float) -> int:
            return count_params(self._pruned(model, data, r)[0])

        if count_params(model) <= target:
            return 0.0
        lo, hi = 0.0, 0.999
        smallest = params_at(hi)
        if smallest > target:
            raise ValueError(
                f"target_params={target} is out of reach: removing all but one filter of every "
                f"prunable unit leaves {smallest} parameters (skip_layers, the classifier and "
                "unprunable residual groups are kept)"
            )
        while hi - lo > 1e-3:
            mid = (lo + hi) / 2
            if params_at(mid) <= target:
                hi = mid
            else:
                lo = mid
        return hi

    def __call__(self, model: nn.Module, data: DataSplits) -> tuple[nn.Module, Record]:
        start = time.perf_counter()
        ratio = self.ratio
        if self.target_params is not None:
            ratio = self._search_ratio(model, data, self.target_params)
        new, plan, kept = self._pruned(model, data, ratio)
        seconds = time.perf_counter() - start
        details: dict[str, object] = {
            "channels": kept,
            "skipped": plan.skipped,
            "residual": self.residual,
            "base_params": count_params(model),
        }
        if ratio is not None:
            details["ratio"] = ratio
        if self.sensitivity is not None:
            details["sensitivity"] = self.sensitivity
        return new, record_for(self.label(), new, data, seconds, **details)


def _only(name: str, ratio: float) -> Callable[[PruningUnit], int]:
    """Remove ``ratio`` of the filters of unit ``name`` and none elsewhere."""

    def removed(unit: PruningUnit) -> int:
        return unit.channels - _keep_count(unit.channels, ratio) if unit.name == name else 0

    return removed


def sensitivity_analysis(
    model: nn.Module,
    data: DataSplits,
    ratios: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    *,
    include_linear: bool = False,
    residual: Residual = "auto",
    batch_size: int = 512,
) -> dict[str, list[tuple[float, float]]]:
    """Li et al.'s per-layer sensitivity (their Fig. 2b): prune each unit alone, no fine-tuning.

    Returns ``{root layer: [(ratio, validation accuracy), ...]}`` (test accuracy when the data
    has no validation split). ``model`` is not modified.
    """
    split = data.val if len(data.val) else data.test
    probe = copy.deepcopy(model)
    names = [u.name for u in plan_filters(
        probe, data.in_shape, include_linear=include_linear, residual=residual
    ).units]  # fmt: skip
    result: dict[str, list[tuple[float, float]]] = {}
    with track("sensitivity", len(names) * len(ratios)) as advance:
        for name in names:
            curve = []
            for ratio in ratios:
                new = copy.deepcopy(model)
                plan = plan_filters(
                    new, data.in_shape, include_linear=include_linear, residual=residual
                )
                apply_plan(plan, _only(name, ratio))
                curve.append((float(ratio), accuracy(new, split, batch_size)))
                advance(1, status=f"{name} {ratio:g}")
            result[name] = curve
            log.info("sensitivity of %s: %s", name, curve)
    return result


def plot_sensitivity(result: dict[str, list[tuple[float, float]]], path: str | Path) -> Path:
    """Plot a :func:`sensitivity_analysis` result (accuracy against ratio, one line per layer)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, curve in result.items():
        xs, ys = zip(*curve, strict=True) if curve else ((), ())
        ax.plot([100 * x for x in xs], [100 * y for y in ys], marker="o", ms=3, label=name)
    ax.set_xlabel("filters pruned away (%)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Sensitivity to L1-norm filter pruning (each layer alone)")
    ax.grid(alpha=0.3)
    if len(result) <= 20:
        ax.legend(fontsize=6, ncol=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path
