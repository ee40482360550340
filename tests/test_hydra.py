"""HYDRA (Sehwag et al. 2020): what defines the score stage, the fine-tune stage and the export."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from robcomp.compress import MagnitudePruning
from robcomp.compress.hydra import Hydra, ScoreMask, scaled_scores
from robcomp.config import ConfigError
from robcomp.data.base import DataSplits
from robcomp.train import TrainConfig, fit

CE = {"name": "ce"}
EPOCH: dict[str, Any] = {"epochs": 1, "batch_size": 128, "keep_best": False}
SCORES: dict[str, Any] = {**EPOCH, "lr": 0.1}
NO_FINETUNE: dict[str, Any] = {"epochs": 0}
LAYERS = ("conv1", "conv2", "fc")


def _layer(model: nn.Module, name: str) -> nn.Module:
    module: nn.Module = getattr(model.net, name)
    return module


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def scored(trained_cnn: nn.Module, digits: DataSplits) -> nn.Module:
    """After one epoch of score training and no weight fine-tuning (at 75% sparsity)."""
    hydra = Hydra(sparsity=0.75, prune=SCORES, finetune=NO_FINETUNE, objective=CE)
    return hydra(trained_cnn, digits)[0]


def test_masks_keep_exactly_k_in_every_layer(scored: nn.Module) -> None:
    for name in LAYERS:
        mask = _layer(scored, name).weight_mask
        assert int(mask.sum()) == mask.numel() - math.floor(0.75 * mask.numel())
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(_layer(scored, name).weight == 0, mask == 0)


def test_score_stage_trains_scores_and_batch_norm_but_not_weights(
    trained_cnn: nn.Module, scored: nn.Module, digits: DataSplits
) -> None:
    before = _state(trained_cnn)
    for name in LAYERS:  # the dense weights under the mask are the pretrained ones
        assert torch.equal(_layer(scored, name).weight_orig, before[f"net.{name}.weight"])
    assert torch.equal(scored.net.fc.bias, before["net.fc.bias"])  # type: ignore[union-attr]
    assert not torch.equal(scored.net.bn1.weight, before["net.bn1.weight"])  # type: ignore[union-attr]
    # The scores moved: the learned mask is no longer the magnitude mask it started from.
    magnitude, _ = MagnitudePruning(sparsity=0.75, scope="layer")(trained_cnn, digits)
    changed = [
        not torch.equal(_layer(scored, n).weight_mask, _layer(magnitude, n).weight_mask)
        for n in LAYERS
    ]
    assert any(changed)
    assert all(torch.equal(v, trained_cnn.state_dict()[k]) for k, v in before.items())


def test_freeze_bn_keeps_batch_norm_affine(trained_cnn: nn.Module, digits: DataSplits) -> None:
    hydra = Hydra(sparsity=0.75, prune=SCORES, finetune=NO_FINETUNE, objective=CE, freeze_bn=True)
    pruned, record = hydra(trained_cnn, digits)
    before, after = trained_cnn.state_dict(), pruned.state_dict()
    for key in ("net.bn1.weight", "net.bn1.bias", "net.bn2.weight", "net.bn2.bias"):
        assert torch.equal(after[key], before[key])
    assert min(record.details["overlap_with_magnitude"].values()) < 1.0  # scores still trained


def test_fine_tune_trains_weights_under_a_fixed_mask(
    scored: nn.Module, trained_cnn: nn.Module, digits: DataSplits
) -> None:
    hydra = Hydra(sparsity=0.75, prune=SCORES, finetune={**EPOCH, "lr": 0.01}, objective=CE)
    tuned, record = hydra(trained_cnn, digits)  # same seed: the same score stage as `scored`
    for name in LAYERS:
        assert torch.equal(_layer(tuned, name).weight_mask, _layer(scored, name).weight_mask)
        assert not torch.equal(_layer(tuned, name).weight_orig, _layer(scored, name).weight_orig)
    assert set(record.details["history"]) == {"prune", "finetune"}
    assert len(record.details["history"]["finetune"]["epochs"]) == 1
    assert record.details["kept"]["net.conv2"] == pytest.approx(0.25, abs=1e-3)
    zeros = [int((_layer(tuned, n).weight == 0).sum()) for n in LAYERS]
    fit(tuned, digits, TrainConfig(**EPOCH, lr=0.01), seed=1)  # later fine-tuning keeps them
    assert [int((_layer(tuned, n).weight == 0).sum()) for n in LAYERS] >= zeros
    assert all(p.requires_grad for p in tuned.parameters())


def test_lwm_is_layerwise_magnitude_pruning(trained_cnn: nn.Module, digits: DataSplits) -> None:
    lwm, record = Hydra(sparsity=0.75, method="lwm", finetune=NO_FINETUNE, objective=CE)(
        trained_cnn, digits
    )
    magnitude, _ = MagnitudePruning(sparsity=0.75, scope="layer")(trained_cnn, digits)
    for name in LAYERS:  # 0.75 x (144, 4608, 320) weights are whole numbers: same counts
        assert torch.equal(_layer(lwm, name).weight_mask, _layer(magnitude, name).weight_mask)
    assert set(record.details["overlap_with_magnitude"].values()) == {1.0}
    assert "prune" not in record.details["history"]
    assert record.method == "lwm-0.75"


def test_first_and_last_layers_can_stay_dense(trained_cnn: nn.Module, digits: DataSplits) -> None:
    hydra = Hydra(
        sparsity=0.5, method="lwm", finetune=NO_FINETUNE, objective=CE, include_first_last=False
    )
    pruned, record = hydra(trained_cnn, digits)
    assert list(record.details["kept"]) == ["net.conv2"]
    assert not hasattr(pruned.net.conv1, "weight_mask")  # type: ignore[union-attr]
    assert not hasattr(pruned.net.fc, "weight_mask")  # type: ignore[union-attr]


def test_scaled_scores_and_straight_through_gradient() -> None:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 3, 3, 3, generator=g)
    expected = math.sqrt(6 / 27) * weight / weight.abs().max()
    assert torch.allclose(scaled_scores(weight), expected)
    layer = ScoreMask(weight, sparsity=0.5)
    assert layer.pruned == 54
    masked = layer(weight)
    kept = masked != 0
    assert int(kept.sum()) == 54
    assert weight.abs()[kept].min() >= weight.abs()[~kept].max()  # starts as magnitude pruning
    upstream = torch.randn(weight.shape, generator=g)
    (masked * upstream).sum().backward()
    grad = layer.scores.grad
    assert grad is not None  # straight through: d/ds of W * m(|s|) taken as W * sign(s)
    assert torch.allclose(grad, upstream * weight * layer.scores.detach().sign())


def test_bad_configurations_fail_early() -> None:
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        Hydra(sparsity=1.0, objective=CE)
    with pytest.raises(ValueError, match="method"):
        Hydra(sparsity=0.5, method="magnitude", objective=CE)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"hydra\.objective"):
        Hydra(sparsity=0.5, objective={"name": "no-such-objective"})
    with pytest.raises(ValueError, match="set the objective once"):
        Hydra(sparsity=0.5, objective=CE, prune={"objective": {"name": "pgd-at"}})
    with pytest.raises(ConfigError, match=r"hydra\.finetune: unknown key 'epoch'"):
        Hydra(sparsity=0.5, objective=CE, finetune={"epoch": 1})
    hydra = Hydra(sparsity=0.5)
    assert hydra.objective == {"name": "trades"}  # the paper's robust objective by default
    assert hydra.prune.objective == hydra.finetune.objective == {"name": "trades"}
