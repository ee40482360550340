"""Magnitude pruning and the efficiency measures it reports."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robcomp.compress import (
    MagnitudePruning,
    NoCompression,
    count_macs,
    count_nonzero,
    count_params,
    finalize,
    measure,
)
from robcomp.compress.efficiency import prunable_layers
from robcomp.data.base import DataSplits
from robcomp.evaluate import accuracy
from robcomp.train import TrainConfig, fit


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight.detach() for _, m in prunable_layers(model)]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_magnitude_pruning_hits_the_sparsity(
    trained_cnn: nn.Module, digits: DataSplits, scope: str, sparsity: float
) -> None:
    before = _state(trained_cnn)
    pruned, record = MagnitudePruning(sparsity=sparsity, scope=scope)(trained_cnn, digits)  # type: ignore[arg-type]
    assert all(torch.equal(before[k], v) for k, v in trained_cnn.state_dict().items())
    weights = _weights(pruned)
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros == round(sparsity * total) or abs(zeros / total - sparsity) < 1e-3
    if scope == "layer":  # the same fraction in each layer
        for w in weights:
            assert abs(float((w == 0).float().mean()) - sparsity) < 0.01
    assert record.nonzero_params == count_nonzero(pruned)
    assert record.params == count_params(trained_cnn)
    assert record.macs == count_macs(trained_cnn, digits.in_shape)  # dense kernels: no fewer MACs
    assert record.sparse_bytes < measure(trained_cnn, digits.in_shape).sparse_bytes or sparsity == 0


def test_global_pruning_keeps_large_weights(trained_cnn: nn.Module, digits: DataSplits) -> None:
    pruned, _ = MagnitudePruning(sparsity=0.7)(trained_cnn, digits)
    kept = torch.cat([w[w != 0].abs() for w in _weights(pruned)])
    dense = torch.cat([w.flatten().abs() for w in _weights(trained_cnn)])
    threshold = dense.sort().values[int(0.7 * len(dense)) - 1]
    assert float(kept.min()) >= float(threshold)


def test_masks_survive_fine_tuning_then_finalize(
    trained_cnn: nn.Module, digits: DataSplits
) -> None:
    pruned, _ = MagnitudePruning(sparsity=0.8)(trained_cnn, digits)
    zero_masks = [w == 0 for w in _weights(pruned)]
    fit(pruned, digits, TrainConfig(epochs=2, lr=0.02, batch_size=64))
    finalize(pruned)
    for mask, w in zip(zero_masks, _weights(pruned)):
        assert bool((w[mask] == 0).all()), "fine-tuning regrew pruned weights"
    assert not any(n.endswith("_mask") for n, _ in pruned.named_buffers())
    assert accuracy(pruned, digits.test) > 0.8


def test_no_compression_is_a_measured_copy(trained_cnn: nn.Module, digits: DataSplits) -> None:
    copy, record = NoCompression()(trained_cnn, digits)
    assert copy is not trained_cnn
    assert record.nonzero_params == count_nonzero(trained_cnn) and record.bits == 32


def test_sparsity_out_of_range() -> None:
    with pytest.raises(ValueError, match="sparsity"):
        MagnitudePruning(sparsity=1.0)


def test_count_macs_by_hand() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    assert count_macs(model, (1, 8, 8)) == 4 * 8 * 8 * 9 + 256 * 10
    grouped = nn.Conv2d(4, 4, 3, groups=4)
    assert count_macs(grouped, (4, 5, 5)) == 4 * 3 * 3 * 9


def test_size_bytes_tracks_parameters() -> None:
    for layer in (nn.Linear(10, 10), nn.Linear(100, 100)):
        size = measure(layer, (layer.in_features,)).size_bytes
        # float32 values plus a small safetensors header, nothing else
        assert 4 * count_params(layer) <= size <= 4 * count_params(layer) + 512


def test_macs_cross_check_with_torch_pruning(trained_cnn: nn.Module, digits: DataSplits) -> None:
    tp = pytest.importorskip("torch_pruning")
    macs, _ = tp.utils.count_ops_and_params(trained_cnn.net, torch.zeros(1, *digits.in_shape))
    ours = count_macs(trained_cnn, digits.in_shape)
    assert abs(ours - macs) / macs < 0.05  # theirs also counts BatchNorm/pooling ops
