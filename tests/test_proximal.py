"""Proximal filter-wise L0 pruning (Kwon & Lee 2021): the constraint holds after training, the
zeros propagate to BatchNorm and the next layers, and residual sums stay aligned."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.nn.utils import prune

from robcomp.compress import count_params, finalize, measure
from robcomp.compress.proximal import ProximalL0, ProximalStep, plan_channels
from robcomp.config import ConfigError
from robcomp.data.base import DataSplits, Split
from robcomp.models import create
from robcomp.train import OBJECTIVES, Callback, TrainConfig, fit

EPOCH: dict[str, Any] = {"epochs": 1, "lr": 0.01, "batch_size": 128, "keep_best": False}


def _fake_data(in_shape: tuple[int, ...], n: int = 16) -> DataSplits:
    g = torch.Generator().manual_seed(0)
    split = Split(torch.rand(n, *in_shape, generator=g), torch.arange(n) % 10)
    names = tuple(str(c) for c in range(10))
    return DataSplits("fake", split, split, split, 10, names, (0.5,), (0.25,))


def _zero_rows(weight: Tensor) -> Tensor:
    return weight.detach().flatten(1).abs().sum(1) == 0  # (C_out,) all-zero filters


def _check_groups(model: nn.Module, sparsity: float) -> None:
    """Every group has exactly floor(s * C) zero channels: filters, BatchNorm, readers' columns."""
    for group in plan_channels(model):
        drop = _zero_rows(group.writers[0].layer.weight)  # type: ignore[arg-type]
        assert int(drop.sum()) == math.floor(sparsity * group.channels), group.name
        for writer in group.writers:
            assert torch.equal(_zero_rows(writer.layer.weight), drop)  # type: ignore[arg-type]
            if writer.norm is not None:
                assert not writer.norm.weight[drop].any() and not writer.norm.bias[drop].any()
        for reader in group.readers:
            columns = drop.repeat_interleave(reader.per_channel)
            assert not reader.layer.weight[:, columns].any()  # type: ignore[index]


@pytest.mark.parametrize("name", ["tiny_cnn", "kwon_lenet", "tiny_mlp"])
def test_every_layer_has_the_requested_zero_filters(name: str, digits: DataSplits) -> None:
    torch.manual_seed(0)
    model = create(name, digits.num_classes, digits.in_shape, mean=digits.mean, std=digits.std)
    before = copy.deepcopy(model.state_dict())
    pruned, record = ProximalL0(
        sparsity=0.4, allocation="layer", train={**EPOCH, "lr": 0.05}, remove=False
    )(model, digits)
    _check_groups(pruned, 0.4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for layer, (kept, total) in record.details["channels"].items():
        assert kept == total - math.floor(0.4 * total), layer
    assert len(record.details["history"]["epochs"]) == 1
    if name == "kwon_lenet":  # conv biases and the hidden Linear layer's rows go too
        assert not pruned.net.conv1.bias[_zero_rows(pruned.net.conv1.weight)].any()  # type: ignore[union-attr,index]
        assert record.details["channels"]["net.fc1"] == [20, 32]
    assert not {"net.fc", "net.fc2"} & set(record.details["channels"])  # logits stay


def test_projection_runs_after_every_optimizer_step(
    trained_cnn: nn.Module, digits: DataSplits
) -> None:
    """A fit callback, run after ProximalStep, sees the constraint hold after every step."""
    model = copy.deepcopy(trained_cnn)
    groups = plan_channels(model)
    checked: list[tuple[int, int]] = []

    class Check(Callback):
        def after_step(self, model: nn.Module, epoch: int, step: int) -> None:
            _check_groups(model, 0.5)
            checked.append((epoch, step))

    cfg = TrainConfig(epochs=2, lr=0.05, batch_size=256, keep_best=False)
    fit(model, digits, cfg, callbacks=[ProximalStep(groups, 0.5, "layer"), Check()])
    steps = math.ceil(len(digits.train) / 256)
    assert checked == [(e, s) for e in range(2) for s in range(steps)]


def test_pruned_channels_are_zero_and_removable(trained_cnn: nn.Module, digits: DataSplits) -> None:
    layer = ProximalL0(sparsity=0.5, allocation="layer", train=EPOCH, remove=False)
    pruned, record = layer(trained_cnn, digits)
    model = finalize(copy.deepcopy(pruned)).eval()
    x, _ = digits.test.tensors()
    outputs: dict[str, Tensor] = {}
    for name in ("bn1", "bn2"):
        getattr(model.net, name).register_forward_hook(
            lambda _m, _i, out, name=name: outputs.__setitem__(name, out)
        )
    with torch.no_grad():
        expected = model(x)
    # Physically remove the zero filters (and what depends on them): the outputs do not change.
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    for conv, bn in ((model.net.conv1, "bn1"), (model.net.conv2, "bn2")):  # type: ignore[union-attr]
        drop = _zero_rows(conv.weight)
        assert not outputs[bn][:, drop].any()  # zeroed filters give all-zero channels
        idxs = drop.nonzero().flatten().tolist()
        graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=idxs).prune()
    assert model.net.conv1.out_channels == 8 and model.net.conv2.out_channels == 16  # type: ignore[union-attr]
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-5)
    assert count_params(model) < count_params(trained_cnn)
    assert record.nonzero_params < record.params
    assert record.details["removed"] is False and record.macs == measure_macs(trained_cnn, digits)


def measure_macs(model: nn.Module, data: DataSplits) -> int:
    return measure(model, data.in_shape).macs


@pytest.mark.parametrize("name", ["tiny_cnn", "kwon_lenet", "tiny_mlp"])
def test_remove_cuts_the_zeroed_channels_out(name: str, digits: DataSplits) -> None:
    """The default: same function as the masked model, but really smaller and cheaper."""
    torch.manual_seed(0)
    model = create(name, digits.num_classes, digits.in_shape, mean=digits.mean, std=digits.std)
    masked, _ = ProximalL0(sparsity=0.5, train=EPOCH, remove=False)(model, digits)
    removed, record = ProximalL0(sparsity=0.5, train=EPOCH)(model, digits)
    x, _ = digits.test.tensors()
    with torch.no_grad():
        assert torch.allclose(removed(x), masked(x), atol=1e-5)
    assert record.details["removed"] is True and record.details["not_removed"] is None
    assert record.params == record.nonzero_params < count_params(model)  # no zeros left
    assert record.params <= measure(masked, digits.in_shape).nonzero_params
    assert record.macs < measure_macs(model, digits)
    assert not any(prune.is_pruned(m) for m in removed.modules())  # nothing left to mask


def test_zeros_survive_further_fine_tuning(trained_cnn: nn.Module, digits: DataSplits) -> None:
    one_shot = ProximalL0(sparsity=0.5, allocation="layer", train={"epochs": 0}, remove=False)
    pruned, _ = one_shot(trained_cnn, digits)
    # One-shot: the filters kept in the first layer are those of largest L2 norm.
    norms = trained_cnn.net.conv1.weight.detach().flatten(1).norm(dim=1)  # type: ignore[union-attr]
    kept = ~_zero_rows(pruned.net.conv1.weight)  # type: ignore[union-attr]
    assert torch.equal(kept.nonzero().flatten(), norms.argsort()[8:].sort().values)
    fit(pruned, digits, TrainConfig(**EPOCH), seed=1)
    # The readers' columns are masked, so pruned channels get no gradient: all stays zero.
    _check_groups(finalize(pruned), 0.5)
    assert torch.equal(~_zero_rows(pruned.net.conv1.weight), kept)  # type: ignore[union-attr]


def test_resnet20_residual_sums_stay_aligned() -> None:
    data = _fake_data((3, 32, 32))
    torch.manual_seed(0)
    model = create("resnet20", 10, (3, 32, 32))
    layer = ProximalL0(sparsity=0.5, allocation="layer", train={**EPOCH, "batch_size": 8})
    pruned, record = layer(model, data)
    assert len(record.details["channels"]) == 19  # every convolution has its filters pruned
    # the padding shortcuts stop Torch-Pruning, so the zeros stay, masked, and the record says so
    assert record.details["removed"] is False
    assert "cannot remove" in record.details["not_removed"]
    assert all(kept == total // 2 for kept, total in record.details["channels"].values())
    _check_groups(pruned, 0.5)
    net: Any = pruned.net
    blocks: dict[str, Tensor] = {}
    for s, stage in enumerate((net.layer1, net.layer2, net.layer3), start=1):
        for b, block in enumerate(stage):
            block.register_forward_hook(
                lambda _m, _i, out, key=f"{s}.{b}": blocks.__setitem__(key, out)
            )
    pruned.train()  # batch statistics: a zero channel must stay zero in training mode too
    with torch.no_grad():
        pruned(torch.rand(4, 3, 32, 32))
    for s, stage in enumerate((net.layer1, net.layer2, net.layer3), start=1):
        width = 16 * 2 ** (s - 1)
        stream = _zero_rows(stage[0].conv2.weight)  # the stage's residual-stream mask
        assert int(stream.sum()) == width // 2
        for b, block in enumerate(stage):
            assert torch.equal(_zero_rows(block.conv2.weight), stream)  # conv2 follows it
            out = blocks[f"{s}.{b}"]  # (B, width, H, W): the ReLU of the residual sum
            assert not out[:, stream].any(), f"layer{s}.{b}: a pruned channel of the sum is live"
            assert out[:, ~stream].abs().sum() > 0
    assert not net.linear.weight[:, _zero_rows(net.layer3[0].conv2.weight)].any()


@pytest.mark.parametrize(
    ("name", "in_shape", "options"),
    [("resnet18_1d", (3, 64), {"width": 8}), ("resnet18", (3, 16, 16), {"stem": "cifar"})],
)
def test_torchvision_layout_resnets_prune_with_their_downsample_shortcuts(
    name: str, in_shape: tuple[int, ...], options: dict[str, Any]
) -> None:
    """Kwon & Lee's ResNet18-1d (and torchvision's ResNets): a downsample block's last conv and
    its 1x1 shortcut share the new stream's mask, identity blocks' last conv follows it, so
    the channels really come out and the zeroed model's outputs do not change."""
    data = _fake_data(in_shape)
    torch.manual_seed(0)
    model = create(name, 10, in_shape, **options).eval()
    groups = plan_channels(model)
    net: Any = model.net
    for stage in (net.layer2, net.layer3, net.layer4):  # each starts a stream at its block 0
        stream = next(g for g in groups if stage[0].downsample[0] in [w.layer for w in g.writers])
        members = [w.layer for w in stream.writers]
        assert stage[0].conv2 in members and stage[1].conv2 in members
    layer = ProximalL0(sparsity=0.5, allocation="layer", train={**EPOCH, "batch_size": 8})
    pruned, record = layer(model, data)
    assert record.details["removed"] is True
    assert all(kept == total // 2 for kept, total in record.details["channels"].values())
    x = torch.rand(4, *in_shape)
    assert pruned.eval()(x).shape == (4, 10)
    assert record.macs < 0.4 * measure(model, in_shape).macs  # half of every conv's filters


@pytest.mark.skipif("pgd-at" not in OBJECTIVES, reason="needs the pgd-at objective")
def test_adversarial_objective_mc_at_off(trained_cnn: nn.Module, digits: DataSplits) -> None:
    objective = {"name": "pgd-at", "eps": 0.1, "step": 0.05, "steps": 2}
    mc_at_off = ProximalL0(
        sparsity=0.5, allocation="layer", train=EPOCH, objective=objective, remove=False
    )
    pruned, record = mc_at_off(trained_cnn, digits)
    _check_groups(finalize(pruned), 0.5)
    assert record.details["objective"] == objective


def test_bad_configurations_and_models_fail_clearly(digits: DataSplits) -> None:
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        ProximalL0(sparsity=-0.1)
    with pytest.raises(ConfigError, match=r"proximal-l0\.objective"):
        ProximalL0(sparsity=0.5, objective={"name": "ce", "eps": 0.1})
    with pytest.raises(ValueError, match="set the objective once"):
        ProximalL0(sparsity=0.5, train={"objective": {"name": "trades"}})
    with pytest.raises(ValueError, match="not a chain of layers"):
        ProximalL0(sparsity=0.5)(create("mobilenet_v2", 10, (3, 16, 16)), _fake_data((3, 16, 16)))
    grouped = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(64, 10)
    )
    with pytest.raises(ValueError, match="grouped"):
        ProximalL0(sparsity=0.5)(grouped, digits)
