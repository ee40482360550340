"""Compressors: the contract every registered one keeps, and what defines each method."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch_pruning as tp
from torch import Tensor, nn

from robcomp.attacks import PGD
from robcomp.compress import COMPRESSORS, count_macs, count_nonzero, count_params, measure
from robcomp.compress.latency import latency, peak_memory_bytes
from robcomp.compress.quantize import Int8PTQ, LowBit, QuantizedModel, bake, twin_agreement
from robcomp.compress.structured import (
    L1FilterPruning,
    plot_sensitivity,
    sensitivity_analysis,
)
from robcomp.compress.unstructured import GradualPruning, RandomPruning, cubic_schedule
from robcomp.data.base import DataSplits, Split
from robcomp.evaluate import accuracy
from robcomp.models import create, load_weights, save_checkpoint
from robcomp.train import OBJECTIVES, TrainConfig, fit
from robcomp.train.distill import KnowledgeDistillation, load_teacher, registered_teacher

# Every registered compressor needs an entry: (constructor options, what it claims to reduce).
# Claims: "nonzeros" (fewer nonzero weights), "structure" (fewer parameters and MACs),
# "bits" (fewer bits per weight and fewer bytes), "student" (a smaller model).
ONE_EPOCH: dict[str, Any] = {"epochs": 1, "lr": 0.01, "batch_size": 128, "keep_best": False}
CASES: dict[str, tuple[dict[str, Any], set[str]]] = {
    "none": ({}, set()),
    "magnitude": ({"sparsity": 0.6}, {"nonzeros"}),
    "random": ({"sparsity": 0.6}, {"nonzeros"}),
    "gradual": ({"sparsity": 0.6, "steps": 2, "train": ONE_EPOCH}, {"nonzeros"}),
    "l1-filter": ({"ratio": 0.5}, {"structure"}),
    "int8": ({"compile": False, "calibration_batches": 3}, {"bits"}),
    "lowbit": ({"bits": 4, "act_bits": 8, "calibration_batches": 2}, {"bits"}),
    "binary": ({}, {"bits"}),
    "admm": (
        {"sparsity": 0.6, "admm_epochs": 2, "retrain": ONE_EPOCH, "objective": {"name": "ce"}},
        {"nonzeros"},
    ),
    "distill": (
        {"student": "tiny_mlp", "student_options": {"hidden": 16}, "train": ONE_EPOCH},
        {"student"},
    ),
    "hydra": (
        {"sparsity": 0.6, "prune": ONE_EPOCH, "finetune": ONE_EPOCH, "objective": {"name": "ce"}},
        {"nonzeros"},
    ),
    "proximal-l0": ({"sparsity": 0.5, "train": ONE_EPOCH}, {"nonzeros"}),
}


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _fake_data(in_shape: tuple[int, ...], n: int = 32, classes: int = 10) -> DataSplits:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, *in_shape, generator=g)
    y = torch.arange(n) % classes
    split = Split(x, y)
    names = tuple(str(c) for c in range(classes))
    return DataSplits("fake", split, split, split, classes, names, (0.5,), (0.25,))


@pytest.mark.parametrize("name", COMPRESSORS.names())
def test_compressor_contract(name: str, trained_cnn: nn.Module, digits: DataSplits) -> None:
    if name not in CASES:
        pytest.fail(f"compressor {name!r} has no test case: add it to CASES in this file")
    options, claims = CASES[name]
    compressor = COMPRESSORS.get(name)(**options)
    before = _state(trained_cnn)
    base = measure(trained_cnn, digits.in_shape)

    new, record = compressor(trained_cnn, digits)

    after = trained_cnn.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "the input model was modified"
    assert new is not trained_cnn
    x, _ = digits.test.tensors()
    with torch.no_grad():
        out = new.eval()(x[:5])
    assert out.shape == (5, digits.num_classes)
    assert isinstance(compressor.label(), str) and compressor.label()
    assert record.params > 0 and record.nonzero_params > 0
    assert record.size_bytes > 0 and record.macs > 0 and record.seconds >= 0
    assert 1 <= record.bits <= 32
    if "nonzeros" in claims:
        assert record.nonzero_params < base.nonzero_params
        assert count_nonzero(new) == record.nonzero_params
    if "structure" in claims:
        assert record.params < base.params and record.macs < base.macs
        assert record.params == count_params(new)
    if "bits" in claims:
        assert record.bits < 32 and record.size_bytes < base.size_bytes
    if "student" in claims:
        assert record.params < base.params and record.params == count_params(new)


# ------------------------------------------------------------------------------ l1-filter


def test_l1_filter_on_resnet20_prunes_block_convs_only() -> None:
    data = _fake_data((3, 32, 32), n=8)
    model = create("resnet20", 10, (3, 32, 32)).eval()
    pruned, record = L1FilterPruning(ratio=0.5)(model, data)
    with torch.no_grad():
        assert pruned(torch.rand(4, 3, 32, 32)).shape == (4, 10)
    net: Any = pruned.net
    for stage, width in ((net.layer1, 16), (net.layer2, 32), (net.layer3, 64)):
        for block in stage:
            assert block.conv1.out_channels == width // 2  # the block's inner width: pruned
            assert block.conv2.in_channels == width // 2 and block.bn1.num_features == width // 2
            assert block.conv2.out_channels == width  # feeds the option-A shortcut: kept
    assert "net.conv1" in record.details["skipped"]
    assert record.params < count_params(model) and record.macs < count_macs(model, (3, 32, 32))


def test_l1_filter_on_torchvision_resnet18_prunes_coupled_groups() -> None:
    data = _fake_data((3, 16, 16), n=8)
    model = create("resnet18", 10, (3, 16, 16)).eval()
    pruned, record = L1FilterPruning(ratio=0.25)(model, data)
    with torch.no_grad():
        assert pruned(torch.rand(2, 3, 16, 16)).shape == (2, 10)
    net: Any = pruned.net
    assert net.conv1.out_channels == 48  # the stem is coupled to the first stage's additions
    assert net.layer1[0].conv2.out_channels == 48
    assert net.layer2[0].downsample[0].out_channels == net.layer2[0].conv2.out_channels == 96
    assert not record.details["skipped"]


def test_l1_filter_removes_the_smallest_filters(trained_cnn: nn.Module, digits: DataSplits) -> None:
    pruned, _ = L1FilterPruning(ratio=0.25)(trained_cnn, digits)
    old = trained_cnn.net.conv1.weight.detach()  # type: ignore[union-attr]
    new = pruned.net.conv1.weight.detach()  # type: ignore[union-attr]
    norms = old.abs().flatten(1).sum(1)
    keep = norms.argsort(descending=True)[: new.shape[0]].sort().values
    assert new.shape[0] == 12
    assert torch.equal(new[:, :, :, :], old[keep])  # the 12 largest-L1 filters, in order
    # conv2 keeps its own 24 largest filters, and loses the input channels conv1 lost
    old2 = trained_cnn.net.conv2.weight.detach()  # type: ignore[union-attr]
    keep2 = old2.abs().flatten(1).sum(1).argsort(descending=True)[:24].sort().values
    new2 = pruned.net.conv2.weight.detach()  # type: ignore[union-attr]
    assert torch.equal(new2, old2[keep2][:, keep])


@pytest.mark.parametrize(("name", "shape"), [("tiny_cnn", (1, 8, 8)), ("resnet20", (3, 32, 32))])
def test_macs_agree_with_torch_pruning(name: str, shape: tuple[int, ...]) -> None:
    model = create(name, 10, shape).eval()
    theirs, params = tp.utils.count_ops_and_params(model, torch.zeros(1, *shape))
    ours = count_macs(model, shape)
    # Torch-Pruning also counts BatchNorm and activations; within 5% of the conv/linear MACs.
    assert abs(theirs - ours) / ours < 0.05
    assert params == count_params(model)


def test_l1_filter_target_params(trained_cnn: nn.Module, digits: DataSplits) -> None:
    target = count_params(trained_cnn) // 2
    _, record = L1FilterPruning(target_params=target)(trained_cnn, digits)
    assert record.params <= target
    assert record.params > 0.6 * target  # the smallest ratio that fits, not an overshoot
    with pytest.raises(ValueError, match="out of reach"):
        L1FilterPruning(target_params=10)(trained_cnn, digits)


def test_l1_filter_sensitivity_rule(trained_cnn: nn.Module, digits: DataSplits) -> None:
    counts = []
    for s in (0.0, 0.75, 0.9):
        _, record = L1FilterPruning(sensitivity=s)(trained_cnn, digits)
        counts.append(record.params)
    assert counts[0] == count_params(trained_cnn)  # threshold 0 removes nothing
    assert counts[0] > counts[1] > counts[2]
    _, record = L1FilterPruning(sensitivity=0.75)(trained_cnn, digits)
    removed = []
    for name, (kept, total) in record.details["channels"].items():
        w = dict(trained_cnn.named_modules())[name].weight.detach()
        mean_abs = w.abs().flatten(1).mean(1)  # the filter's L1 norm per weight
        assert total - kept == int((mean_abs < 0.75 * w.std()).sum())  # Han et al.'s threshold
        removed.append((total - kept) / total)
    assert len(set(removed)) > 1  # one hyper-parameter, a different ratio per layer


def test_l1_filter_options_are_checked(trained_cnn: nn.Module, digits: DataSplits) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        L1FilterPruning()
    with pytest.raises(ValueError, match="exactly one"):
        L1FilterPruning(ratio=0.5, sensitivity=1.0)
    with pytest.raises(ValueError, match="conv3"):
        L1FilterPruning(ratio=0.5, skip_layers=("conv3",))(trained_cnn, digits)
    pruned, _ = L1FilterPruning(ratio=0.5, skip_layers=("conv1",))(trained_cnn, digits)
    assert pruned.net.conv1.out_channels == 16  # type: ignore[union-attr]
    assert pruned.net.conv2.out_channels == 16  # type: ignore[union-attr]


def test_sensitivity_analysis_and_plot(
    trained_cnn: nn.Module, digits: DataSplits, tmp_path: Path
) -> None:
    before = _state(trained_cnn)
    result = sensitivity_analysis(trained_cnn, digits, ratios=(0.25, 0.9))
    assert set(result) == {"net.conv1", "net.conv2"}
    for curve in result.values():
        assert [r for r, _ in curve] == [0.25, 0.9]
        assert all(0.0 <= acc <= 1.0 for _, acc in curve)
        assert curve[1][1] <= curve[0][1] + 0.05  # pruning more rarely helps
    assert all(torch.equal(before[k], v) for k, v in trained_cnn.state_dict().items())
    path = plot_sensitivity(result, tmp_path / "sens.png")
    assert path.is_file() and path.stat().st_size > 1000


# ------------------------------------------------------------------------ unstructured


def test_random_pruning_is_exact_seeded_and_not_magnitude(
    trained_cnn: nn.Module, digits: DataSplits
) -> None:
    a, _ = RandomPruning(sparsity=0.5, seed=1)(trained_cnn, digits)
    b, _ = RandomPruning(sparsity=0.5, seed=1)(trained_cnn, digits)
    c, _ = RandomPruning(sparsity=0.5, seed=2)(trained_cnn, digits)
    wa, wb, wc = (m.net.conv2.weight.detach() for m in (a, b, c))  # type: ignore[union-attr]
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    layer, _ = RandomPruning(sparsity=0.5, scope="layer")(trained_cnn, digits)
    for module in (layer.net.conv1, layer.net.conv2, layer.net.fc):  # type: ignore[union-attr]
        assert abs(float((module.weight == 0).float().mean()) - 0.5) < 0.01
    kept = wa[wa != 0].abs()
    assert float(kept.min()) < float(wa.abs().max()) / 100  # small weights survive too


def test_cubic_schedule() -> None:
    s = cubic_schedule(0.9, 0.1, 4)
    assert s[0] == pytest.approx(0.1) and s[-1] == pytest.approx(0.9)
    assert all(a < b for a, b in itertools.pairwise(s))
    steps = [b - a for a, b in itertools.pairwise(s)]
    assert all(a > b for a, b in itertools.pairwise(steps))  # fast first, slow near the end


def test_gradual_masks_survive_fine_tuning(trained_cnn: nn.Module, digits: DataSplits) -> None:
    pruned, record = GradualPruning(sparsity=0.7, steps=2, train=ONE_EPOCH)(trained_cnn, digits)
    weights = [pruned.net.conv1.weight, pruned.net.conv2.weight, pruned.net.fc.weight]  # type: ignore[union-attr]
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros == round(0.7 * total)
    assert record.details["reached"][-1] == pytest.approx(0.7, abs=1e-3)
    assert hasattr(pruned.net.conv2, "weight_mask")  # type: ignore[union-attr]
    fit(pruned, digits, TrainConfig(**ONE_EPOCH), seed=3)  # more fine-tuning keeps the zeros
    assert sum(int((w == 0).sum()) for w in weights) >= zeros


# ----------------------------------------------------------------------------------- kd


class _Fixed(nn.Module):
    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits.clone())

    def forward(self, x: Tensor) -> Tensor:
        return self.logits[: len(x)]


def test_kd_loss_matches_the_formula_by_hand() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g), 3 * torch.randn(6, 5, generator=g)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    tau, alpha = 3.0, 0.7
    p = torch.exp(t / tau) / torch.exp(t / tau).sum(1, keepdim=True)
    q = torch.exp(s / tau) / torch.exp(s / tau).sum(1, keepdim=True)
    kl = (p * (p.log() - q.log())).sum() / len(s)
    softmax = torch.exp(s) / torch.exp(s).sum(1, keepdim=True)
    ce = -softmax[torch.arange(6), y].log().mean()
    expected = alpha * tau**2 * kl + (1 - alpha) * ce
    with registered_teacher(_Fixed(t)) as handle:
        objective = OBJECTIVES.get("kd")(teacher=handle, tau=tau, alpha=alpha)
        out = objective(_Fixed(s), torch.zeros(6, 1), y)
    assert float(out["loss"].detach()) == pytest.approx(float(expected), rel=1e-5)
    assert float(out["kd"].detach()) == pytest.approx(float(kl), rel=1e-5)
    assert float(out["ce"].detach()) == pytest.approx(float(ce), rel=1e-5)
    out["loss"].backward()  # the student gets a gradient, the teacher does not need one
    with pytest.raises(KeyError, match="no longer registered"):
        load_teacher(handle)


def test_kd_teacher_loads_once_from_a_checkpoint(
    trained_cnn: nn.Module, digits: DataSplits, tmp_path: Path
) -> None:
    spec = {"name": "tiny_cnn", "num_classes": 10, "in_shape": list(digits.in_shape),
            "mean": list(digits.mean), "std": list(digits.std)}  # fmt: skip
    save_checkpoint(trained_cnn, tmp_path / "teacher", spec)
    objective = KnowledgeDistillation(teacher=str(tmp_path / "teacher"))
    x, y = next(digits.train.batches(16))
    student = create("tiny_mlp", 10, digits.in_shape)
    out = objective(student, x, y)
    assert {"loss", "logits", "kd", "ce"} <= set(out) and out["logits"].shape == (16, 10)
    first = load_teacher(str(tmp_path / "teacher"))
    assert load_teacher(str(tmp_path / "teacher")) is first and not first.training
    assert not any(p.requires_grad for p in first.parameters())
    with pytest.raises(ValueError, match="tau"):
        KnowledgeDistillation(teacher="x", tau=0.0)


# --------------------------------------------------------------------------- quantization


def test_int8_keeps_accuracy_twin_agrees_and_is_a_quarter(
    trained_cnn: nn.Module, digits: DataSplits
) -> None:
    qmodel, record = Int8PTQ(compile=False)(trained_cnn, digits)
    assert isinstance(qmodel, QuantizedModel)
    fp32, int8 = accuracy(trained_cnn, digits.test), accuracy(qmodel, digits.test)
    assert abs(fp32 - int8) <= 0.01
    x, y = digits.test.tensors()
    assert twin_agreement(qmodel, x) >= 0.98
    x_adv = PGD(eps=0.1, steps=10)(qmodel.twin, x, y)
    assert twin_agreement(qmodel, x_adv) >= 0.98
    assert accuracy(qmodel, Split(x_adv, y)) < int8 - 0.3  # the twin's attack transfers
    assert record.bits == 8
    assert record.size_bytes <= 0.3 * measure(trained_cnn, digits.in_shape).size_bytes
    with pytest.raises(RuntimeError, match="twin"):
        qmodel(x[:2].requires_grad_(True))
    with pytest.raises(RuntimeError, match="cannot be trained"):
        qmodel.train()


class _FlattensAMap(nn.Module):
    """Conv-Pool-Conv-Flatten-Linear, LeNet-style: the classifier reads a 4x4 map, not 1x1."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 8, 3)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.max_pool2d(self.conv1(x).relu(), 2)  # (B, 4, 6, 6)
        return self.fc(self.conv2(x).relu().flatten(1))  # (B, 8 * 4 * 4) -> (B, 10)


def test_int8_runs_models_that_flatten_a_feature_map() -> None:
    """oneDNN's int8 convolutions return channels-last maps; the ``view`` that flatten was
    exported as raised on them ("view size is not compatible") for any map over 1x1."""
    data = _fake_data((1, 14, 14), n=32)
    torch.manual_seed(0)
    model = _FlattensAMap().eval()
    qmodel, record = Int8PTQ(compile=False, calibration_batches=2, batch_size=16)(model, data)
    x, _ = data.test.tensors()
    with torch.no_grad():
        out, fp32 = qmodel(x), model(x)
    assert out.shape == (32, 10)
    assert record.details["twin_agreement_calibration"] == 1.0
    assert twin_agreement(qmodel, x) == 1.0
    # int8 rounding, not a scrambled channel order: the logits stay near the float model's
    assert (out - fp32).abs().max() < 0.1 * fp32.abs().max()


class _ResidualAdd(nn.Module):
    """conv-ReLU6, then conv + identity (a MobileNetV2 block): int8 lowering fuses the add into
    the second convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0, self.conv1 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.relu6(self.conv0(x))  # (B, 4, H, W); ReLU6 as in MobileNetV2
        x = self.conv1(x) + x  # (B, 4, H, W)
        return self.fc(x.mean((2, 3)))  # (B, 10)


@pytest.mark.slow
def test_int8_answers_an_empty_batch() -> None:
    """Square calls the model on empty batches; oneDNN's conv with a fused residual add raised
    "accum tensor must be contiguous" on them."""
    data = _fake_data((1, 6, 6), n=16)
    torch.manual_seed(0)
    qmodel, _ = Int8PTQ(compile=False, calibration_batches=1, batch_size=8)(
        _ResidualAdd().eval(), data
    )
    assert any("binary" in str(n.target) for n in qmodel.int8.graph.nodes)  # the fused add
    with torch.no_grad():
        assert qmodel(torch.zeros(0, 1, 6, 6)).shape == (0, 10)
        assert qmodel(torch.zeros(3, 1, 6, 6)).shape == (3, 10)


@pytest.mark.slow
def test_int8_compiled_runs_the_same_int8_model(trained_cnn: nn.Module, digits: DataSplits) -> None:
    qmodel, _ = Int8PTQ(compile=True, calibration_batches=2)(trained_cnn, digits)
    eager = QuantizedModel(qmodel.int8, qmodel.twin, qmodel.reference, compiled=False)
    x, _ = digits.test.tensors()
    for batch in (x[:64], x[:7]):  # each batch size compiles once (static shapes)
        with torch.no_grad():
            compiled_out, eager_out = qmodel(batch), eager(batch)
        assert qmodel.compile_error is None
        assert (compiled_out.argmax(1) == eager_out.argmax(1)).float().mean() >= 0.98
    duplicate = copy.deepcopy(eager)
    with torch.no_grad():
        assert torch.equal(duplicate(x[:5]), eager(x[:5]))


def test_lowbit_levels_per_channel(trained_cnn: nn.Module, digits: DataSplits) -> None:
    for bits, levels in ((8, 255), (4, 15), (2, 3)):
        model, record = LowBit(bits=bits)(trained_cnn, digits)
        assert record.bits == bits
        for module in (model.net.conv1, model.net.conv2, model.net.fc):  # type: ignore[union-attr]
            for row in module.weight.detach().flatten(1):
                assert len(torch.unique(row)) <= min(levels, 2**bits)
    binary, record = COMPRESSORS.get("binary")(include_first_last=True)(trained_cnn, digits)
    for row in binary.net.conv2.weight.detach().flatten(1):  # type: ignore[union-attr]
        values = torch.unique(row)
        assert len(values) == 2 and torch.allclose(values[0], -values[1])
    w = trained_cnn.net.conv2.weight.detach().flatten(1)  # type: ignore[union-attr]
    assert torch.allclose(
        binary.net.conv2.weight.detach().flatten(1).abs().mean(1),  # type: ignore[union-attr]
        w.abs().mean(1),
    )
    fp32_bytes = measure(trained_cnn, digits.in_shape).size_bytes
    assert record.size_bytes < fp32_bytes / 10


def test_lowbit_trains_through_its_quantizers(trained_cnn: nn.Module, digits: DataSplits) -> None:
    model, _ = LowBit(bits=2, act_bits=4, calibration_batches=2)(trained_cnn, digits)
    low = accuracy(model, digits.test)
    latent = model.net.conv2.parametrizations.weight.original.detach().clone()  # type: ignore[union-attr]
    fit(model, digits, TrainConfig(epochs=2, lr=0.02, batch_size=64, keep_best=False), seed=0)
    assert not torch.equal(latent, model.net.conv2.parametrizations.weight.original)  # type: ignore[union-attr]
    assert accuracy(model, digits.test) > low  # quantization-aware training recovers
    baked = bake(model)
    for row in baked.net.conv2.weight.detach().flatten(1):  # type: ignore[union-attr]
        assert len(torch.unique(row)) <= 3


# ------------------------------------------------------------------------------ latency


def test_latency_and_memory(trained_cnn: nn.Module, digits: DataSplits) -> None:
    trained_cnn.train()
    one = latency(trained_cnn, digits.in_shape, batch_size=1, warmup=1, repeats=5)
    many = latency(trained_cnn, digits.in_shape, 32, warmup=1, repeats=5, include_load=True)
    assert trained_cnn.training  # mode restored
    trained_cnn.eval()
    assert 0 < one.median_ms <= one.p90_ms and many.batch_size == 32
    assert one.threads == torch.get_num_threads() and many.include_load
    small = peak_memory_bytes(trained_cnn, digits.in_shape, 1)
    large = peak_memory_bytes(trained_cnn, digits.in_shape, 64)
    assert 0 < small < large
    assert large >= 64 * 16 * 8 * 8 * 4  # at least one activation map of the batch


# ---------------------------------------------------------------------------- real data


def _cifar(root: Path) -> tuple[Tensor, Tensor]:
    arrays = np.load(root / "cifar10-test-first1000.npz")
    x = torch.from_numpy(arrays["x"]).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32) uint8
    return x, torch.from_numpy(arrays["y"]).long()


@pytest.mark.realdata
def test_pretrained_resnet20_int8_and_l1_filter(robcomp_data: Path) -> None:
    x, y = _cifar(robcomp_data)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    model = create("resnet20", 10, (3, 32, 32), mean=mean, std=std)
    load_weights(model, robcomp_data / "models" / "resnet20-12fca82f.th")
    model.eval()
    first, second, empty = Split(x[:500], y[:500]), Split(x[500:], y[500:]), Split(x[:0], y[:0])
    names = tuple(str(c) for c in range(10))
    data = DataSplits("cifar10-1000", first, empty, second, 10, names, mean, std)
    everything = Split(x, y)
    fp32 = accuracy(model, everything)

    qmodel, qrecord = Int8PTQ(compile=False, calibration_batches=8)(model, data)
    int8 = accuracy(qmodel, everything)
    # the twin that attacks int8 must see the same model: agreement on clean and PGD inputs
    xs, ys = everything.head(200).tensors()
    x_adv = PGD(eps=2 / 255, steps=10)(qmodel.twin, xs, ys)
    agree_clean, agree_adv = twin_agreement(qmodel, xs), twin_agreement(qmodel, x_adv)
    size_ratio = qrecord.size_bytes / measure(model, (3, 32, 32)).size_bytes

    pruned, record = L1FilterPruning(ratio=0.3)(model, data)
    held_out_before = accuracy(pruned, second)
    fit(pruned, data, TrainConfig(epochs=3, lr=0.01, batch_size=50, keep_best=False,
                                  weight_decay=1e-4, schedule="constant"), seed=0)  # fmt: skip
    held_out_after = accuracy(pruned, second)
    dense_held_out = accuracy(model, second)
    print(  # noqa: T201  (the numbers are the point; run with -s)
        f"\nresnet20 on 1000 CIFAR-10 test images: fp32 {fp32:.3f}, int8 {int8:.3f} "
        f"(twin agreement clean {agree_clean:.3f}, PGD {agree_adv:.3f}, size {size_ratio:.3f}x); "
        f"L1 30% ({record.params} of {count_params(model)} params): held-out "
        f"{held_out_before:.3f} -> {held_out_after:.3f} after 3 epochs on 500 images "
        f"(dense {dense_held_out:.3f})"
    )
    assert fp32 > 0.9 and int8 >= 0.9 and abs(int8 - fp32) <= 0.01
    assert agree_clean >= 0.98 and agree_adv >= 0.98
    assert 0.2 < size_ratio <= 0.3
    assert held_out_before < dense_held_out
    assert held_out_after > held_out_before
