"""Tests for the model zoo, the Normalize layer, model factories and checkpoints."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from robcomp.models import (
    MODELS,
    create,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)

TINY = {"tiny_mlp", "tiny_cnn", "kwon_lenet"}
SLOW = {"wrn_34_10", "resnet50"}  # run with batch 1
SHAPES: dict[str, list[tuple[int, ...]]] = {
    "tiny_mlp": [(1, 8, 8), (1, 4, 4)],
    "tiny_cnn": [(1, 8, 8), (1, 4, 4)],
    "lenet5": [(1, 28, 28), (1, 32, 32), (3, 32, 32), (1, 16, 16), (1, 12, 12), (1, 30, 40)],
    "kwon_lenet": [(1, 8, 8), (1, 4, 4)],
    "small_cnn": [(1, 28, 28)],
    "har_cnn": [(9, 128), (6, 100)],  # 1-D signals (C, L)
    "resnet18_1d": [(9, 128)],
}
CIFAR = (3, 32, 32)


def _cases() -> list[tuple[str, tuple[int, ...]]]:
    return [(name, shape) for name in MODELS.names() for shape in SHAPES.get(name, [CIFAR])]


def _forward(model: nn.Module, shape: tuple[int, ...], batch: int) -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.rand(batch, *shape)  # (B, C, H, W) in [0, 1]
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize(
    ("name", "shape"), _cases(), ids=[f"{n}-{'x'.join(map(str, s))}" for n, s in _cases()]
)
def test_forward_shape(name: str, shape: tuple[int, int, int]) -> None:
    batch = 1 if name in SLOW else 2
    out = _forward(create(name, num_classes=10, in_shape=shape), shape, batch)
    assert out.shape == (batch, 10)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_every_factory_has_the_registry_signature() -> None:
    for name in MODELS.names():
        params = inspect.signature(MODELS.get(name)).parameters
        assert {"num_classes", "in_shape"} <= params.keys(), name
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values()), name


@pytest.mark.parametrize("name", ["vgg16", "mobilenet_v2", "resnet20", "wrn_28_4"])
def test_cifar_models_run_on_tiny_inputs(name: str) -> None:
    out = _forward(create(name, num_classes=3, in_shape=(1, 8, 8)), (1, 8, 8), 2)
    assert out.shape == (2, 3)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_lenet5_is_lecuns_lenet5() -> None:
    """C1 5x5 (6), S2, C3 5x5 (16), S4, C5 120, F6 84, output: 61,706 parameters at 1x28x28."""
    model = create("lenet5", num_classes=10, in_shape=(1, 28, 28))
    assert _params(model) == 61_706
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (1, 6, (5, 5)),
        (6, 16, (5, 5)),
    ]
    assert convs[0].padding == (2, 2) and convs[1].padding == (0, 0)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 2
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(fc.in_features, fc.out_features) for fc in linears] == [
        (16 * 5 * 5, 120),
        (120, 84),
        (84, 10),
    ]


def test_lenet5_on_32x32_is_the_unpadded_original() -> None:
    model = create("lenet5", num_classes=10, in_shape=(1, 32, 32))
    conv1 = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert conv1.padding == (0, 0)
    assert _params(model) == 61_706  # the same 16x5x5 maps reach C5


@pytest.mark.parametrize(
    ("shape", "params"),
    [((1, 30, 29), 61_706), ((1, 16, 16), 61_706 - 16 * 21 * 120), ((3, 32, 32), 61_706 + 300)],
)
def test_lenet5_other_sizes_change_only_c1_and_c5(shape: tuple[int, ...], params: int) -> None:
    """28-32 px reach S4 at 16x5x5; USPS's 16x16 at 16x2x2; RGB adds 2x150 C1 weights."""
    assert _params(create("lenet5", num_classes=10, in_shape=shape)) == params


@pytest.mark.parametrize("shape", [(1, 11, 11), (1, 8, 8), (3, 32, 11), (1, 4, 4)])
def test_lenet5_rejects_too_small_inputs(shape: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError, match=r"'lenet5' needs images of at least 12x12.*kwon_lenet"):
        create("lenet5", num_classes=10, in_shape=shape)


def test_kwon_lenet_is_the_former_lenet5() -> None:
    """Kwon & Lee's modified LeNet, unchanged: 3x3 convs, global average pool, 21,226 params."""
    model = create("kwon_lenet", num_classes=10, in_shape=(1, 28, 28))
    assert _params(model) == 21_226
    assert any(isinstance(m, nn.AdaptiveAvgPool2d) for m in model.modules())
    out = _forward(create("kwon_lenet", num_classes=4, in_shape=(1, 4, 4)), (1, 4, 4), 2)
    assert out.shape == (2, 4)


def test_small_cnn_rejects_too_small_inputs() -> None:
    with pytest.raises(ValueError, match="small_cnn"):
        create("small_cnn", num_classes=10, in_shape=(1, 8, 8))


def test_resnet18_torchvision_stem() -> None:
    model = create("resnet18", num_classes=10, in_shape=(3, 64, 64), stem="torchvision")
    conv1 = model.net.conv1
    assert isinstance(conv1, nn.Conv2d)
    assert conv1.kernel_size == (7, 7) and conv1.stride == (2, 2)
    assert isinstance(model.net.maxpool, nn.MaxPool2d)
    assert _forward(model, (3, 64, 64), 2).shape == (2, 10)


@pytest.mark.parametrize("stem", ["cifar", "torchvision"])
def test_resnet18_one_channel(stem: str) -> None:
    model = create("resnet18", num_classes=10, in_shape=(1, 32, 32), stem=stem)
    assert model.net.conv1.in_channels == 1
    out = _forward(model, (1, 32, 32), 2)
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_resnet18_rejects_unknown_stem() -> None:
    with pytest.raises(ValueError, match="stem"):
        create("resnet18", num_classes=10, in_shape=CIFAR, stem="imagenet")


@pytest.mark.parametrize(("size", "stride"), [(32, 1), (96, 2)])
def test_mobilenet_v2_first_stride(size: int, stride: int) -> None:
    model = create("mobilenet_v2", num_classes=10, in_shape=(1, size, size), width_mult=0.5)
    first = model.net.features[0][0]
    assert first.in_channels == 1 and first.stride == (stride, stride)


def test_resnet20_parameter_count() -> None:
    model = create("resnet20", num_classes=10, in_shape=CIFAR)
    assert sum(p.numel() for p in model.net.parameters()) == 269_722


def test_resnet20_module_names_match_akamaster() -> None:
    keys = set(create("resnet20", num_classes=10, in_shape=CIFAR).net.state_dict())
    for key in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer1.0.bn2.bias"):
        assert key in keys
    assert "layer3.2.conv2.weight" in keys and "layer3.3.conv1.weight" not in keys
    assert {"linear.weight", "linear.bias"} <= keys


def test_normalize_is_applied() -> None:
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.2)
    model = create("tiny_cnn", num_classes=10, in_shape=(3, 8, 8), mean=mean, std=std).eval()
    x = torch.rand(2, 3, 8, 8)
    expected = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(model.normalize(x), expected)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.net(expected))


def test_normalize_defaults_to_identity() -> None:
    model = create("tiny_mlp", num_classes=10, in_shape=(1, 4, 4))
    x = torch.rand(2, 1, 4, 4)
    torch.testing.assert_close(model.normalize(x), x)


def test_normalize_channel_mismatch() -> None:
    with pytest.raises(ValueError, match="channels"):
        create("tiny_cnn", num_classes=10, in_shape=(3, 8, 8), mean=(0.5,), std=(0.5,))
    with pytest.raises(ValueError, match="channels"):
        create("tiny_cnn", num_classes=10, in_shape=(3, 8, 8), mean=(0.5,) * 3, std=(0.5,) * 2)


def test_bring_your_own_model() -> None:
    # SqueezeNet names num_classes explicitly and has no **kwargs, so in_shape is dropped.
    model = create("torchvision.models:SqueezeNet", num_classes=10, in_shape=(3, 64, 64))
    assert _forward(model, (3, 64, 64), 2).shape == (2, 10)


def test_bring_your_own_torchvision_resnet18() -> None:
    model = create("torchvision.models:resnet18", num_classes=10, in_shape=CIFAR)
    assert _forward(model, CIFAR, 1).shape == (1, 10)


def test_unknown_option_is_named() -> None:
    with pytest.raises(ValueError, match="'depth'"):
        create("torchvision.models:SqueezeNet", num_classes=10, in_shape=(3, 64, 64), depth=3)
    with pytest.raises(ValueError, match="'width'"):
        create("resnet20", num_classes=10, in_shape=CIFAR, width=2)


def test_none_options_keep_the_default() -> None:
    model = create("tiny_mlp", num_classes=10, in_shape=(1, 4, 4), hidden=None)
    assert model.net.fc1.out_features == 64


@pytest.mark.parametrize(
    ("name", "in_shape", "options"),
    [("tiny_cnn", (3, 8, 8), {}), ("tiny_mlp", (1, 4, 4), {"hidden": 16})],
)
def test_checkpoint_round_trip(
    tmp_path: Path, name: str, in_shape: tuple[int, ...], options: dict[str, int]
) -> None:
    spec = {
        "name": name,
        "num_classes": 10,
        "in_shape": list(in_shape),
        "mean": [0.5] * in_shape[0],
        "std": [0.25] * in_shape[0],
        "options": options,
    }
    model = create(name, 10, in_shape, mean=spec["mean"], std=spec["std"], **options)
    model.train()(torch.rand(4, *in_shape))  # move the BatchNorm running stats off their init
    save_checkpoint(model, tmp_path, spec)
    loaded, loaded_spec = load_checkpoint(tmp_path)
    assert loaded_spec == spec
    assert not loaded.training
    x = torch.rand(3, *in_shape)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)


def test_load_weights_strips_module_prefix(tmp_path: Path) -> None:
    source = create("resnet20", num_classes=10, in_shape=CIFAR)
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in source.net.state_dict().items()}}, path)
    target = load_weights(create("resnet20", num_classes=10, in_shape=CIFAR), path)
    for key, value in source.net.state_dict().items():
        torch.testing.assert_close(target.net.state_dict()[key], value, rtol=0, atol=0)


class NotWeights:
    """A custom class: unpickling it needs arbitrary code, which weights_only refuses."""

    def __init__(self) -> None:
        self.payload = torch.zeros(3)


def test_load_weights_refuses_pickled_objects(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save(NotWeights(), path)
    with pytest.raises(ValueError, match="weights_only"):
        load_weights(create("tiny_mlp", num_classes=10, in_shape=(1, 4, 4)), path)


@pytest.mark.realdata
@pytest.mark.skipif("ROBCOMP_DATA" not in os.environ, reason="needs ROBCOMP_DATA")
@pytest.mark.parametrize(
    ("name", "file", "expected"),
    [("resnet20", "resnet20-12fca82f.th", 0.915), ("resnet32", "resnet32-d509ac18.th", 0.928)],
)
def test_pretrained_cifar_resnet(name: str, file: str, expected: float) -> None:
    root = Path(os.environ["ROBCOMP_DATA"])
    model = create(
        name, 10, (3, 32, 32), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
    ).eval()
    load_weights(model, root / "models" / file)
    with np.load(root / "cifar10-test-first1000.npz") as data:
        x_np, y_np = data["x"], data["y"]
    x = torch.from_numpy(x_np).permute(0, 3, 1, 2).float() / 255  # (1000, 3, 32, 32)
    y = torch.from_numpy(y_np)
    correct = 0
    with torch.no_grad():
        for start in range(0, len(x), 250):
            pred = model(x[start : start + 250]).argmax(dim=1)
            correct += int((pred == y[start : start + 250]).sum())
    accuracy = correct / len(x)
    assert abs(accuracy - expected) <= 0.01, f"{name}: accuracy {accuracy:.3f}"
