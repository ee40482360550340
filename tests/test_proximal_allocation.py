"""proximal-l0's allocation (Kwon & Lee 2021): ``global`` removes ``sparsity`` of the weights
with one threshold across the network, ``layer`` the same fraction of every layer's filters."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from torch import Tensor, nn

from robcomp.compress import count_params
from robcomp.compress.proximal import (
    ChannelGroup,
    ProximalL0,
    channel_scores,
    plan_channels,
    project,
    weight_sparsity,
)
from robcomp.config import absent_at, identity_dict
from robcomp.data.base import DataSplits
from robcomp.experiments.pipeline import _efficiency_metrics
from robcomp.experiments.spec import resolve
from robcomp.models import create
from robcomp.models.base import Classifier


def _lenet(seed: int = 0) -> Classifier:
    """Kwon & Lee's simulation LeNet (conv 32, conv 64, fc 32, fc 4) on 1x4x4 inputs."""
    torch.manual_seed(seed)
    return create("kwon_lenet", 4, (1, 4, 4))


def _weights(model: nn.Module) -> list[Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Linear)]


def _zero_fraction(model: nn.Module) -> float:
    """Fraction of the Conv/Linear weights that are exactly zero, counted on the tensors."""
    weights = _weights(model)
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def _channel_size(group: ChannelGroup) -> int:
    """Weights one channel of ``group`` has: its filter rows and its readers' columns."""
    rows = sum(w.layer.weight[0].numel() for w in group.writers)  # type: ignore[index]
    columns = sum(r.layer.weight[:, 0].numel() * r.per_channel for r in group.readers)  # type: ignore[index]
    return rows + columns


def _kept(groups: list[ChannelGroup], keeps: list[Tensor]) -> dict[str, int]:
    return {g.name: int(k.sum()) for g, k in zip(groups, keeps, strict=True)}


def _old_layer_rule(groups: list[ChannelGroup], sparsity: float) -> None:
    """robcomp's proximal map before ``allocation`` existed, written out: in forward order,
    zero each group's floor(s * C) lowest-norm filters (at least one stays), their biases and
    BatchNorm channels, and the readers' columns."""
    with torch.no_grad():
        for group in groups:
            norms = group.writers[0].layer.weight.flatten(1).norm(dim=1)  # type: ignore[union-attr]
            count = min(group.channels - 1, math.floor(sparsity * group.channels + 1e-9))
            drop = torch.zeros(group.channels, dtype=torch.bool)
            drop[norms.argsort(stable=True)[:count]] = True
            for writer in group.writers:
                for module in (writer.layer, writer.norm):
                    for name in ("weight", "bias"):
                        param = getattr(module, name, None) if module is not None else None
                        if param is not None:
                            param[drop] = 0.0
            for reader in group.readers:
                reader.layer.weight[:, drop.repeat_interleave(reader.per_channel)] = 0.0  # type: ignore[index]


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9, 0.95])
def test_global_allocation_removes_the_requested_fraction_of_weights(sparsity: float) -> None:
    model = _lenet()
    groups = plan_channels(model)
    keeps = project(groups, sparsity, "global")
    removed = _zero_fraction(model)
    total = sum(w.numel() for w in _weights(model))
    # the smallest set of filters that reaches the rate: over it by less than one channel
    assert sparsity <= removed < sparsity + max(map(_channel_size, groups)) / total
    assert weight_sparsity(groups, keeps) == pytest.approx(removed)
    if sparsity >= 0.9:  # where the per-layer rule removes far more than asked
        layer_model = _lenet()
        project(plan_channels(layer_model), sparsity, "layer")
        assert _zero_fraction(layer_model) > removed + 0.03


def test_layer_allocation_is_the_rule_from_before() -> None:
    trained = _lenet()
    with torch.no_grad():  # filters of unequal norms, as after training
        for weight in _weights(trained):
            weight.mul_(torch.rand(weight.shape[0], *[1] * (weight.dim() - 1)) + 0.5)
    new, old = copy.deepcopy(trained), copy.deepcopy(trained)
    for sparsity in (0.5, 0.95):
        project(plan_channels(new), sparsity, "layer")
        _old_layer_rule(plan_channels(old), sparsity)
        for (name, a), b in zip(new.state_dict().items(), old.state_dict().values(), strict=True):
            assert torch.equal(a, b), name


def test_a_layer_with_uniformly_larger_weights_keeps_more_filters() -> None:
    plain, scaled = _lenet(), _lenet()
    with torch.no_grad():
        scaled.net.conv1.weight.mul_(10.0)  # type: ignore[union-attr,operator]
    kept = {}
    for name, model in (("plain", plain), ("scaled", scaled)):
        groups = plan_channels(copy.deepcopy(model))
        kept[name] = _kept(groups, project(groups, 0.9, "global"))
        layer_groups = plan_channels(copy.deepcopy(model))
        kept[f"{name} layer"] = _kept(layer_groups, project(layer_groups, 0.9, "layer"))
    assert kept["scaled"]["net.conv1"] > kept["plain"]["net.conv1"]
    assert kept["scaled layer"] == kept["plain layer"]  # a per-layer rule cannot see it
    # the scores rank a group by the mean square of the weights its channels remove
    groups = plan_channels(scaled)
    assert channel_scores(groups[0]).min() > channel_scores(groups[1]).max()


def test_every_layer_keeps_at_least_one_filter() -> None:
    model = _lenet()
    with torch.no_grad():  # the hidden Linear layer alone would be cheapest to remove entirely
        model.net.fc1.weight.mul_(1e-4)  # type: ignore[union-attr,operator]
    groups = plan_channels(model)
    keeps = project(groups, 0.999, "global")
    assert all(int(k.sum()) == 1 for k in keeps)
    for group, keep in zip(groups, keeps, strict=True):
        assert group.writers[0].layer.weight[keep].abs().sum() > 0  # type: ignore[index]
    assert model(torch.rand(2, 1, 4, 4)).isfinite().all()


def test_the_record_gives_nominal_and_removed_rates(digits: DataSplits) -> None:
    torch.manual_seed(0)
    model = create("kwon_lenet", digits.num_classes, digits.in_shape)
    pruned, record = ProximalL0(sparsity=0.9, train={"epochs": 0})(model, digits)
    assert record.details["sparsity"] == 0.9 and record.details["allocation"] == "global"
    assert 0.9 <= record.details["weight_sparsity"] < 0.95
    assert record.details["removed"] is True
    # what was removed physically: the weights (biases too) are gone from the model
    assert count_params(pruned) == record.params < (1 - 0.85) * count_params(model)
    metrics = {m.name: m.value for m in _efficiency_metrics(record, model, digits)}
    assert metrics["weight_sparsity"] == record.details["weight_sparsity"]
    assert metrics["compression_rate"] > 0.85
    assert ProximalL0(sparsity=0.9).label() == "proximal-l0-0.9"
    assert ProximalL0(sparsity=0.9, allocation="layer").label() == "proximal-l0-0.9-layer"
    with pytest.raises(ValueError, match="allocation must be one of global, layer"):
        ProximalL0(sparsity=0.9, allocation="network")  # type: ignore[arg-type]


def test_layer_allocation_keeps_the_cell_ids_from_before_allocation_existed() -> None:
    """Cells written before ``allocation`` existed were per-layer: ``allocation: layer`` is
    the same cell; the new default (global) gives other results, so another cell."""
    spec = {"name": "proximal-l0", "sparsity": 0.5}
    default = resolve({"compress": spec}, "test")
    layer = resolve({"compress": {**spec, "allocation": "layer"}}, "test")
    glob = default.canonical()["compress"]
    assert glob["allocation"] == "global" and "allocation" not in layer.canonical()["compress"]
    assert layer.canonical()["compress"] == {k: v for k, v in glob.items() if k != "allocation"}
    assert layer.cell_id() != default.cell_id()


def test_absent_at_leaves_a_field_out_of_the_identity_at_its_old_value() -> None:
    @dataclasses.dataclass(frozen=True)
    class Component:
        rate: float
        mode: str = dataclasses.field(default="new", metadata=absent_at("old"))

    assert identity_dict(Component(0.5, "old")) == {"rate": 0.5}
    assert identity_dict(Component(0.5)) == {"rate": 0.5, "mode": "new"}


@pytest.mark.parametrize(
    ("name", "in_shape", "options"),
    [("resnet20", (3, 16, 16), {}), ("resnet18_1d", (3, 64), {"width": 8})],
)
def test_global_allocation_on_resnets_keeps_residual_sums_zero(
    name: str, in_shape: tuple[int, ...], options: dict[str, object]
) -> None:
    """Shared stream masks and option-A shortcuts: a removed channel of a residual sum is zero
    in the block's output, and the rate still holds."""
    torch.manual_seed(0)
    model = create(name, 10, in_shape, **options)
    groups = plan_channels(model)
    keeps = project(groups, 0.7, "global")
    total = sum(w.numel() for w in _weights(model))
    assert 0.7 <= _zero_fraction(model) < 0.7 + max(map(_channel_size, groups)) / total
    assert all(int(k.sum()) >= 1 for k in keeps)
    outputs: list[tuple[Tensor, Tensor]] = []
    for group, keep in zip(groups, keeps, strict=True):
        for writer in group.writers[1:]:  # a block's last convolution writing the stream
            block = next(m for m in model.modules() if writer.layer in list(m.children()))
            block.register_forward_hook(lambda _m, _i, out, keep=keep: outputs.append((out, keep)))
    model.train()  # batch statistics: a zero channel must stay zero in training mode too
    with torch.no_grad():
        model(torch.rand(4, *in_shape))
    assert outputs
    for out, keep in outputs:
        assert not out[:, ~keep].any()
