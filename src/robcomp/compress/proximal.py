"""Filter-wise L0 pruning by proximal gradient steps, as in MC-AT (Kwon & Lee 2021).

Kwon & Lee, "Improving the Robustness of Model Compression by On-Manifold Adversarial Training",
Future Internet 13(12):300, 2021 (reference code: sanglee/MC-ATON, ``model_prune.py``), after
Lee & Lee's proximal-gradient robust compression. Their eq. (1)/(7) add a group-L0 penalty
``lambda * sum_g 1[||w_g||_2 != 0]`` over the filters ``g`` of every layer to the training loss
(CE for MC(regular), PGD-AT for MC-AT(off), TRADES for MC-TRADES, on-manifold examples for
MC-AT(on)). Proximal gradient descent alternates a gradient step on the loss with the proximal
map of the penalty, which zeroes whole filters of small norm. The threshold is set by a
sparsity level rather than by ``lambda`` (the paper: "the value of lambda' can be computed
during optimization to achieve a specific rate of model compression"), **after every optimizer
step**, in one of two ways (``allocation``):

- ``global`` (the default): the paper's rate, over the weights (eq. 7 penalises
  ``lambda ||w||_0``). One threshold across the network on each filter's root-mean-square
  weight, counting the weights its removal takes (its filter and the next layer's input
  columns), since that is where the proximal map of a weight-counting L0 penalty puts a
  group; filters go in increasing order until ``sparsity`` of the Conv/Linear weights are gone.
- ``layer``: each layer's ``sparsity`` fraction of filters with the smallest L2 norm, as the
  reference code's ``model_prune.structured_lenet``/``get_prun_idx`` do. On the simulation
  LeNet, 95 % of every layer's filters is 99.4 % of the weights.

Zeroing a filter silences a channel, so its consumers are zeroed too: the BatchNorm scale and
shift of the channel, the next layer's input channels (input columns of a Linear layer after a
flatten, one block of columns per channel). A hidden Linear layer first loses the input columns
of pruned channels, then its own lowest-norm output rows; the classifier keeps all its outputs.

Residual networks (the CIFAR option-A ResNets of :mod:`robcomp.models.resnet_cifar`): channels
that meet at an addition must be pruned together, or the sum is not zero where the mask says.

- Identity blocks: ``conv2``'s output follows the mask of the block's input (the residual
  stream), as in the reference; ``conv1``'s output is the block's own, independent mask.
- The stem convolution ranks the channels of the first stage's stream.
- Option-A downsampling blocks have no shortcut convolution to share a joint norm with (the
  reference's ResNet has 1x1 downsample convolutions): the shortcut zero-pads the previous
  stream. The new stream's mask is ranked by the block's ``conv2`` filters, restricted to the
  channels the shortcut leaves at zero (the padding, and channels carrying an already-pruned
  input channel), so the sum is zero on every pruned channel. That set is always large enough.

torchvision-layout ResNets (``resnet18/34/50`` of :mod:`robcomp.models.torchvision_nets`, the
1-D ``resnet18_1d`` of the authors' HAR experiments) have 1x1 ``downsample`` convolutions: the
block's last convolution and its downsample convolution write the new stream together and share
its mask, as in the reference's ``structured_resnet``.

Models must be a chain of Conv/Linear layers (BatchNorm, activations, pooling, dropout and
flattening in between: ``tiny_cnn``, ``tiny_mlp``, ``lenet5``, ``kwon_lenet``, ``small_cnn``,
``vgg16``, ``har_cnn``) or one of those ResNets; anything else is rejected with an error.
"""

from __future__ import annotations

import copy
import heapq
import itertools
import time
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.utils import prune

from robcomp.compress.base import COMPRESSORS, Record
from robcomp.compress.efficiency import PRUNABLE
from robcomp.compress.hydra import (
    BATCH_NORMS,
    check_sparsity,
    checked_objective,
    pruned_count,
    stage_config,
    weight_of,
)
from robcomp.compress.prune import finalize, record_for
from robcomp.compress.structured import PruningUnit, plan_filters
from robcomp.config import absent_at, nested_field
from robcomp.data.base import DataSplits
from robcomp.models.base import Classifier
from robcomp.models.resnet_cifar import BasicBlock, CifarResNet, PadShortcut
from robcomp.train import Callback, TrainConfig, fit

_SHAPE_QUERIES = {"size", "dim", "shape", "ndim"}  # uses of a tensor that do not consume it


@dataclass
class Writer:
    """A layer whose output channels (conv filters, linear rows) a group's mask zeroes."""

    name: str
    layer: nn.Module
    norm: nn.Module | None = None  # the BatchNorm on those channels, zeroed with them


@dataclass
class Reader:
    """A layer reading a group's channels; ``per_channel`` input columns per channel."""

    layer: nn.Module
    per_channel: int = 1


@dataclass
class ChannelGroup:
    """Channels that share one mask.

    Attributes:
        name: the ranking layer's module name.
        channels: number of channels.
        writers: layers producing the channels. ``writers[0]`` ranks them by filter L2 norm;
            the others (identity blocks' ``conv2``) follow its mask.
        readers: layers whose input channels are these channels.
        shortcut: ``(group index, offset)`` when an option-A shortcut also adds the channels of
            an earlier group, channel ``c`` there landing on ``c + offset`` here.
    """

    name: str
    channels: int
    writers: list[Writer]
    readers: list[Reader] = field(default_factory=list)
    shortcut: tuple[int, int] | None = None


# --------------------------------------------------------------------------- planning


def _out_channels(layer: nn.Module) -> int:
    return weight_of(layer).shape[0]


def _in_width(layer: nn.Module) -> int:
    return weight_of(layer).shape[1]


def _check_layer(name: str, layer: nn.Module) -> None:
    if getattr(layer, "groups", 1) != 1 or getattr(layer, "transposed", False):
        raise ValueError(
            f"proximal-l0: {name} is a grouped or transposed convolution, which couples "
            "channels across layers; it is not supported"
        )


def _reader(name: str, layer: nn.Module, next_name: str, following: nn.Module) -> Reader:
    """How ``following`` reads the channels of ``layer`` (columns per channel after a flatten)."""
    channels, width = _out_channels(layer), _in_width(following)
    if isinstance(following, nn.Linear) and width % channels == 0:
        return Reader(following, width // channels)  # flatten of (B, C, ...) is channel-major
    if width == channels:
        return Reader(following)
    raise ValueError(
        f"proximal-l0: {name} has {channels} output channels but {next_name}, the next layer, "
        f"reads {width}; the model is not a plain chain of layers"
    )


def _check_chain(graph: torch.fx.Graph, what: str) -> None:
    """Refuse graphs where a value feeds two operations (a residual, a branch, a concat)."""
    for node in graph.nodes:
        users = [
            u for u in node.users if not (u.op == "call_method" and u.target in _SHAPE_QUERIES)
        ]
        users = [u for u in users if not (u.op == "call_function" and _is_shape_getattr(u))]
        if len(users) > 1:
            raise ValueError(
                f"proximal-l0: {what} is not a chain of layers ({node.name} feeds "
                f"{len(users)} operations: a residual or a branch). Supported: chains of "
                "Conv/Linear layers, the CIFAR option-A ResNets (resnet20, ...) and "
                "torchvision-layout ResNets (resnet18/34/50, resnet18_1d)"
            )


def _is_shape_getattr(node: torch.fx.Node) -> bool:
    return getattr(node.target, "__name__", "") == "getattr" and node.args[1] in _SHAPE_QUERIES


def _plan_chain(net: nn.Module, prefix: str) -> list[ChannelGroup]:
    """One group per Conv/Linear layer but the last, read by the layer after it."""
    what = type(net).__name__
    try:
        graph = torch.fx.symbolic_trace(net).graph
    except Exception as err:  # tracing fails in many ways (data-dependent control flow, ...)
        raise ValueError(f"proximal-l0: cannot trace {what} with torch.fx: {err}") from None
    _check_chain(graph, what)
    modules = dict(net.named_modules())
    writers: list[Writer] = []
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        name, module = prefix + str(node.target), modules[str(node.target)]
        if any(module is w.layer or module is w.norm for w in writers):
            raise ValueError(
                f"proximal-l0: {name} is called twice; shared layers are not supported"
            )
        if isinstance(module, PRUNABLE):
            _check_layer(name, module)
            writers.append(Writer(name, module))
        elif isinstance(module, BATCH_NORMS) and not writers:
            continue  # normalises the input, whose channels are never pruned
        elif isinstance(module, BATCH_NORMS) and writers[-1].norm is None:
            if module.num_features != _out_channels(writers[-1].layer):
                raise ValueError(f"proximal-l0: {name} does not match {writers[-1].name}")
            writers[-1].norm = module
        elif any(True for _ in module.parameters(recurse=False)):
            raise ValueError(
                f"proximal-l0: {name} ({type(module).__name__}) has parameters and sits between "
                "layers; only BatchNorm is supported there"
            )
    if len(writers) < 2:
        raise ValueError(f"proximal-l0: {what} has fewer than two Conv/Linear layers to prune")
    return [
        ChannelGroup(
            w.name, _out_channels(w.layer), [w], [_reader(w.name, w.layer, n.name, n.layer)]
        )
        for w, n in itertools.pairwise(writers)
    ]


def _plan_resnet(net: CifarResNet, prefix: str) -> list[ChannelGroup]:
    """Groups of a CIFAR ResNet, in forward order (see the module docstring)."""
    stem = Writer(f"{prefix}conv1", net.conv1, net.bn1)
    stream = ChannelGroup(stem.name, _out_channels(net.conv1), [stem])
    groups, stream_index = [stream], 0
    for s, stage in enumerate((net.layer1, net.layer2, net.layer3), start=1):
        for b, block in enumerate(stage):
            if not isinstance(block, BasicBlock):
                raise ValueError(f"proximal-l0: unexpected block {type(block).__name__}")
            name = f"{prefix}layer{s}.{b}"
            stream.readers.append(Reader(block.conv1))
            inner = Writer(f"{name}.conv1", block.conv1, block.bn1)
            groups.append(ChannelGroup(inner.name, _out_channels(block.conv1), [inner]))
            groups[-1].readers.append(Reader(block.conv2))
            out = Writer(f"{name}.conv2", block.conv2, block.bn2)
            if isinstance(block.shortcut, PadShortcut):  # a new stream starts here
                shortcut = (stream_index, block.shortcut.before)
                stream = ChannelGroup(out.name, _out_channels(block.conv2), [out], [], shortcut)
                groups.append(stream)
                stream_index = len(groups) - 1
            else:  # identity: the sum keeps the stream's channels, conv2 follows its mask
                stream.writers.append(out)
    stream.readers.append(Reader(net.linear))
    return groups


def _is_staged_resnet(net: nn.Module) -> bool:
    """torchvision's layout: ``conv1``/``bn1`` stem, stages ``layer1``..., classifier ``fc``."""
    return all(isinstance(getattr(net, a, None), nn.Module) for a in ("conv1", "bn1", "layer1"))


def _plan_staged_resnet(net: Any, prefix: str) -> list[ChannelGroup]:
    """Groups of a torchvision-layout ResNet (torchvision's ``resnet18/34/50``, ``resnet18_1d``),
    in forward order. A block's inner convolutions each have their own mask; a block with a 1x1
    ``downsample`` starts a new stream that its last convolution and the downsample
    convolution write together (one mask, ranked by the last convolution's filters, where the
    authors' ``structured_resnet`` ranks the two jointly); an identity block's last
    convolution follows the stream's mask."""
    stem = Writer(f"{prefix}conv1", net.conv1, net.bn1)
    stream = ChannelGroup(stem.name, _out_channels(net.conv1), [stem])
    groups = [stream]
    for s in itertools.count(1):
        stage = getattr(net, f"layer{s}", None)
        if stage is None:
            break
        for b, block in enumerate(stage):
            name = f"{prefix}layer{s}.{b}"
            convs = [
                Writer(f"{name}.conv{i}", getattr(block, f"conv{i}"), getattr(block, f"bn{i}"))
                for i in (1, 2, 3) if hasattr(block, f"conv{i}")
            ]  # fmt: skip
            downsample = getattr(block, "downsample", None)
            stream.readers.append(Reader(convs[0].layer))
            if downsample is not None:
                stream.readers.append(Reader(downsample[0]))
            for writer, following in itertools.pairwise(convs):
                reader = Reader(following.layer)
                groups.append(
                    ChannelGroup(writer.name, _out_channels(writer.layer), [writer], [reader])
                )
            if downsample is None:
                stream.writers.append(convs[-1])
                continue
            shortcut = Writer(f"{name}.downsample.0", downsample[0], downsample[1])
            stream = ChannelGroup(
                convs[-1].name, _out_channels(convs[-1].layer), [convs[-1], shortcut]
            )
            groups.append(stream)
    stream.readers.append(Reader(net.fc))
    return groups


def plan_channels(model: nn.Module) -> list[ChannelGroup]:
    """The channel groups of ``model`` (a chain, a CIFAR ResNet or a torchvision-layout ResNet,
    behind Normalize or not)."""
    net, prefix = (model.net, "net.") if isinstance(model, Classifier) else (model, "")
    if isinstance(net, CifarResNet):
        return _plan_resnet(net, prefix)
    if _is_staged_resnet(net):
        return _plan_staged_resnet(net, prefix)
    return _plan_chain(net, prefix)


# ------------------------------------------------------------------------- the proximal map


def _filter_norms(layer: nn.Module) -> Tensor:
    return torch.linalg.vector_norm(weight_of(layer).flatten(1), dim=1)  # (C_out,)


def _zero(group: ChannelGroup, keep: Tensor) -> None:
    """Zero the pruned channels' filters, biases, BatchNorm affine and readers' columns."""
    drop = ~keep
    for writer in group.writers:
        for module in (writer.layer, writer.norm):
            if module is None:
                continue
            for name in ("weight", "bias"):
                param = getattr(module, name, None)
                if param is not None:
                    param[drop] = 0.0
    for reader in group.readers:
        columns = drop.repeat_interleave(reader.per_channel)
        weight_of(reader.layer)[:, columns] = 0.0


Allocation = Literal["global", "layer"]
ALLOCATIONS: tuple[str, ...] = typing.get_args(Allocation)


@torch.no_grad()
def project(
    groups: list[ChannelGroup], sparsity: float, allocation: Allocation = "global"
) -> list[Tensor]:
    """The proximal step: zero the channels of smallest norm, with their BatchNorm channels and
    readers' columns. Returns each group's keep mask (bool).

    ``layer``: in each group, the lowest-L2-norm ``sparsity`` fraction of its filters. Groups
    are in forward order, so a layer's pruned input columns are zeroed before its own filters
    are ranked (the reference's ``structured_lenet`` order).

    ``global``: one threshold across all groups, chosen so that ``sparsity`` of the weights go
    (:func:`global_keeps`).
    """
    if allocation == "global":
        chosen = global_keeps(groups, sparsity)
        for group, keep in zip(groups, chosen, strict=True):
            _zero(group, keep)
        return chosen
    keeps: list[Tensor] = []
    for group in groups:
        norms = _filter_norms(group.writers[0].layer)
        count = pruned_count(group.channels, sparsity)
        if group.shortcut is not None:  # channels a live shortcut input reaches cannot be zero
            source, offset = group.shortcut
            live = torch.zeros(group.channels, dtype=torch.bool, device=norms.device)
            live[offset : offset + len(keeps[source])] = keeps[source]
            norms = norms.masked_fill(live, float("inf"))
            count = min(count, int((~live).sum()))
        keep = torch.ones(group.channels, dtype=torch.bool, device=norms.device)
        keep[norms.argsort(stable=True)[:count]] = False
        _zero(group, keep)
        keeps.append(keep)
    return keeps


# ------------------------------------------------------------------ global allocation


def channel_scores(group: ChannelGroup) -> Tensor:
    """Root mean square of the weights that zeroing each channel removes: the writers' filters
    (rows) and the readers' input columns. (C,) on the group's device.

    This is how groups of different sizes compare under the paper's penalty
    ``lambda' ||w||_0`` (Kwon & Lee eq. 7), which counts weights: its proximal map keeps a
    group ``g`` of ``|g|`` weights iff ``||w_g||_2^2 / (2 eta) >= lambda' |g|``, i.e. iff the
    group's mean square weight is above one network-wide threshold.
    """
    squares = torch.zeros(group.channels, device=weight_of(group.writers[0].layer).device)
    count = 0
    for writer in group.writers:
        rows = weight_of(writer.layer).flatten(1)  # (C, fan_in)
        squares += rows.pow(2).sum(1)
        count += rows.shape[1]
    for reader in group.readers:
        weight = weight_of(reader.layer)  # (out, C * per_channel, ...), channel-major columns
        columns = weight.pow(2).movedim(1, 0).reshape(group.channels, -1)
        squares += columns.sum(1)
        count += columns.shape[1]
    return (squares / count).sqrt()


@dataclass
class _Dense:
    """A Conv/Linear weight as a (rows x columns x cell) block with rows and columns removed."""

    rows: int
    columns: int
    cell: int  # weights per (row, column): the kernel size
    kept_rows: int
    kept_columns: int


class WeightCount:
    """Weights of the groups' layers that removing channels takes away, counted exactly: a
    filter takes its row of the columns still kept, a reader's column the rows still kept, so
    a weight in a removed row and a removed column is counted once."""

    def __init__(self, groups: list[ChannelGroup]) -> None:
        self.groups = groups
        self.layers: dict[int, _Dense] = {}
        for group in groups:
            for layer in [w.layer for w in group.writers] + [r.layer for r in group.readers]:
                weight = weight_of(layer)
                rows, columns = weight.shape[:2]
                cell = weight.numel() // (rows * columns)
                self.layers.setdefault(id(layer), _Dense(rows, columns, cell, rows, columns))
        self.total = sum(d.rows * d.columns * d.cell for d in self.layers.values())
        self.removed = 0

    def remove(self, group: int) -> None:
        """Count one more removed channel of ``groups[group]`` (which one does not matter:
        every channel of a group has as many weights)."""
        for writer in self.groups[group].writers:
            dense = self.layers[id(writer.layer)]
            self.removed += dense.kept_columns * dense.cell
            dense.kept_rows -= 1
        for reader in self.groups[group].readers:
            dense = self.layers[id(reader.layer)]
            self.removed += dense.kept_rows * reader.per_channel * dense.cell
            dense.kept_columns -= reader.per_channel

    @property
    def fraction(self) -> float:
        return self.removed / self.total if self.total else 0.0


def weight_sparsity(groups: list[ChannelGroup], keeps: list[Tensor]) -> float:
    """Fraction of the groups' Conv/Linear weights that the keep masks remove."""
    count = WeightCount(groups)
    for g, keep in enumerate(keeps):
        for _ in range(int((~keep).sum())):
            count.remove(g)
    return count.fraction


def global_keeps(groups: list[ChannelGroup], sparsity: float) -> list[Tensor]:
    """Keep masks for one network-wide threshold on :func:`channel_scores`: channels are
    removed in increasing score until ``sparsity`` of the weights are gone (the smallest such
    set, so the fraction overshoots by less than one channel's weights). Every group keeps at
    least one channel, so the network stays connected; a channel an option-A shortcut adds
    to becomes removable only once the shortcut's source channel is removed.
    """
    scores = [channel_scores(group).tolist() for group in groups]
    keeps = [
        torch.ones(g.channels, dtype=torch.bool, device=weight_of(g.writers[0].layer).device)
        for g in groups
    ]
    count = WeightCount(groups)
    kept = [g.channels for g in groups]
    waiting: dict[tuple[int, int], list[tuple[int, int]]] = {}
    heap: list[tuple[float, int, int]] = []
    for g, group in enumerate(groups):
        for c in range(group.channels):
            if group.shortcut is not None:
                source, offset = group.shortcut
                if 0 <= c - offset < groups[source].channels:
                    waiting.setdefault((source, c - offset), []).append((g, c))
                    continue
            heap.append((scores[g][c], g, c))
    heapq.heapify(heap)
    target = sparsity * count.total
    while heap and count.removed < target:
        _, g, c = heapq.heappop(heap)
        if kept[g] == 1:
            continue  # the last channel of a group stays
        keeps[g][c] = False
        kept[g] -= 1
        count.remove(g)
        for g2, c2 in waiting.pop((g, c), []):
            heapq.heappush(heap, (scores[g2][c2], g2, c2))
    return keeps


@dataclass(frozen=True)
class ProximalStep(Callback):
    """The proximal map after every optimizer step of :func:`robcomp.train.fit`: zero the
    lowest-norm channels, ``sparsity`` of the weights (``global``) or of each group's
    channels (``layer``) (:func:`project`)."""

    groups: list[ChannelGroup]
    sparsity: float
    allocation: Allocation = "global"

    def after_step(self, model: nn.Module, epoch: int, step: int) -> None:
        project(self.groups, self.sparsity, self.allocation)


def _kept(groups: list[ChannelGroup], keeps: list[Tensor]) -> dict[str, list[int]]:
    """``{writer layer: [kept filters, filters]}``."""
    return {
        writer.name: [int(keep.sum()), group.channels]
        for group, keep in zip(groups, keeps, strict=True)
        for writer in group.writers
    }


def _attach_masks(groups: list[ChannelGroup], keeps: list[Tensor]) -> None:
    """Fix the final zeros with prune masks (rows and columns)."""
    masks: dict[nn.Module, Tensor] = {}
    for group, keep in zip(groups, keeps, strict=True):
        for writer in group.writers:
            mask = masks.setdefault(writer.layer, torch.ones_like(weight_of(writer.layer)))
            mask[~keep] = 0.0
        for reader in group.readers:
            mask = masks.setdefault(reader.layer, torch.ones_like(weight_of(reader.layer)))
            mask[:, ~keep.repeat_interleave(reader.per_channel)] = 0.0
    for layer, mask in masks.items():
        prune.custom_from_mask(layer, "weight", mask)


def remove_channels(
    model: nn.Module, in_shape: Sequence[int], groups: list[ChannelGroup], keeps: list[Tensor]
) -> str | None:
    """Physically remove the zeroed channels with Torch-Pruning's dependency graph, in place.

    A zeroed channel contributes nothing (its filter, bias and BatchNorm affine are zero), so
    the outputs do not change, while parameters, bytes, MACs and latency really shrink. Returns
    None when done, or why it cannot be done consistently (e.g. channels meeting an option-A
    zero-padding shortcut), in which case the model is left untouched.
    """
    drop_of = {w.name: ~keep for g, keep in zip(groups, keeps, strict=True) for w in g.writers}
    plan = plan_filters(model, in_shape, include_linear=True, residual="auto")
    unit_of = {member: unit for unit in plan.units for member in unit.members}
    stuck = sorted(name for name, drop in drop_of.items() if drop.any() and name not in unit_of)
    if stuck:
        reasons = {n: plan.skipped.get(n, "not a prunable unit") for n in stuck}
        return f"Torch-Pruning cannot remove these channels consistently: {reasons}"
    plans: list[tuple[PruningUnit, list[int]]] = []
    for unit in plan.units:
        drops = [drop_of[m] for m in unit.members if m in drop_of]
        if not drops or not drops[0].any():
            continue
        if any(not torch.equal(d, drops[0]) for d in drops):  # coupled filters, other masks
            return f"the layers coupled to {unit.name} were pruned with different masks"
        plans.append((unit, drops[0].nonzero().flatten().tolist()))
    for unit, idxs in plans:
        fn = plan.graph.get_pruner_of_module(unit.module).prune_out_channels
        plan.graph.get_pruning_group(unit.module, fn, idxs=idxs).prune()
    return None


def _default_train() -> TrainConfig:
    # MC-ATON fine-tunes the dense model for 15-20 epochs with SGD lr 0.01, momentum 0.91.
    return TrainConfig(epochs=20, lr=0.01, momentum=0.91, schedule="constant", keep_best=False)


@COMPRESSORS.register("proximal-l0")
@dataclass(frozen=True, kw_only=True)
class ProximalL0:
    """Filter-wise L0 pruning by proximal gradient descent (Kwon & Lee, "Improving the
    Robustness of Model Compression by On-Manifold Adversarial Training", Future Internet 2021,
    eq. 1 and 7; MC(regular), MC-AT(off), MC-TRADES and MC-AT(on) differ only in ``objective``).

    Trains the model with ``objective`` and, after every optimizer step, zeroes the filters of
    smallest norm (with their BatchNorm channels and the next layers' input channels;
    residual-aware on ResNets): with ``allocation: global`` (the paper's rate), filters
    anywhere in the network until ``sparsity`` of the Conv/Linear weights are gone; with
    ``layer``, ``sparsity`` of every layer's filters. The result
    carries ``torch.nn.utils.prune`` masks on those rows and columns, so later fine-tuning keeps
    them at zero; with ``remove`` (the default) the zeroed channels are then cut out of the
    model. ``train.epochs: 0`` is one-shot filter pruning by L2 norm.

    Attributes:
        sparsity: the L0 rate. ``global``: fraction of the Conv/Linear weights removed (the
            smallest set of filters that reaches it); ``layer``: fraction of filters zeroed in
            every layer. The classifier keeps its outputs, every layer at least one filter.
        allocation: ``global`` (default): one threshold on the root-mean-square weight of each
            filter's group (its filter and the next layer's input columns) across the whole
            network, as the proximal map of Kwon & Lee's ``lambda' ||w||_0`` does (see
            :func:`channel_scores`); ``layer``: every layer loses the same fraction of its
            filters, as the authors' ``model_prune.structured_lenet`` does (robcomp's only
            behaviour before ``allocation`` existed: its cells keep their ids).
        train: TrainConfig fields of the training run (its ``objective`` is ``objective``).
        objective: ``{"name": ..., **fields}`` of a registered objective: ``ce``, ``pgd-at``,
            ``trades``, ...
        remove: physically remove the zeroed channels afterwards (Torch-Pruning), so the
            saved model is smaller and faster, as deployed; where that cannot be done
            consistently (option-A ResNets' padding shortcuts) the zeros stay, masked, and the
            record says why (``removed``). False keeps the masked dense model.
        seed: seeds training.
    """

    uses_training_data = True  # trains with the proximal step on data.train

    sparsity: float
    allocation: Allocation = field(default="global", metadata=absent_at("layer"))
    train: TrainConfig = field(default_factory=_default_train)
    objective: dict[str, Any] = field(default_factory=lambda: {"name": "ce"})
    remove: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity, "proximal-l0")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(
                f"proximal-l0.allocation must be one of {', '.join(ALLOCATIONS)}, "
                f"got {self.allocation!r}"
            )
        objective = checked_objective(self.objective, "proximal-l0.objective")
        object.__setattr__(self, "objective", objective)
        train = nested_field(self, "train", "proximal-l0.train")  # a mapping merges as in YAML
        object.__setattr__(self, "train", stage_config(train, objective, "proximal-l0.train"))

    def label(self) -> str:
        suffix = "-layer" if self.allocation == "layer" else ""
        return f"proximal-l0-{self.sparsity:g}{suffix}"

    def check(self, model: nn.Module, data: DataSplits) -> None:
        """Raise a ValueError naming the supported models if ``model``'s filters cannot be
        grouped (see :func:`plan_channels`); works on the meta device."""
        plan_channels(model)

    def __call__(self, model: nn.Module, data: DataSplits) -> tuple[nn.Module, Record]:
        start = time.perf_counter()
        new = finalize(copy.deepcopy(model))  # earlier masks become plain zeros
        groups = plan_channels(new)
        # start training from a point of the constraint set
        project(groups, self.sparsity, self.allocation)
        history = fit(
            new, data, self.train, seed=self.seed, description=self.label(),
            callbacks=[ProximalStep(groups, self.sparsity, self.allocation)],
        )  # fmt: skip
        keeps = project(groups, self.sparsity, self.allocation)
        removed_weights = weight_sparsity(groups, keeps)  # before the layers shrink
        kept = _kept(groups, keeps)
        order = {name: i for i, (name, _) in enumerate(new.named_modules())}
        kept = dict(sorted(kept.items(), key=lambda item: order[item[0]]))
        not_removed = remove_channels(new, data.in_shape, groups, keeps) if self.remove else None
        if not_removed or not self.remove:
            _attach_masks(groups, keeps)
        new.eval()
        return new, record_for(
            self.label(), new, data, time.perf_counter() - start,
            sparsity=self.sparsity, allocation=self.allocation,
            weight_sparsity=removed_weights, channels=kept,
            history=history.as_dict(),
            objective=self.objective, removed=self.remove and not not_removed,
            not_removed=not_removed,
        )  # fmt: skip
