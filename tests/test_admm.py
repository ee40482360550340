"""ADMM robust pruning (Ye et al. 2019; Marshall 2020, Algorithm 1): what defines the method."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from robcomp.compress import COMPRESSORS
from robcomp.compress.admm import (
    ADMMPruning,
    admm_lr_factor,
    funnel_sparsities,
    k_fraction,
    projection_mask,
)
from robcomp.data.base import DataSplits
from robcomp.evaluate import accuracy
from robcomp.train import OBJECTIVES

CE = {"name": "ce"}
NO_RETRAIN = {"epochs": 0}
ONE_EPOCH = {"epochs": 1, "lr": 0.01, "batch_size": 128, "keep_best": False}
# Cheap but real: a strong rho and a high lr let W meet Z within a few short periods.
FAST: dict[str, Any] = {"rho": 2.0, "lr": 0.05, "batch_size": 128, "objective": CE}
HALF = {"sparsity": 0.5}


def _weights(model: nn.Module) -> dict[str, Tensor]:
    layers = (nn.Conv2d, nn.Linear)
    return {n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, layers)}


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------- projections


@pytest.mark.parametrize("shape", [(8, 4, 3, 3), (10, 20)])
def test_projections_prune_exact_counts_even_with_ties(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    for w in (torch.randn(shape, generator=g), torch.ones(shape)):  # ones: every score ties
        mask = projection_mask(w, "irregular", 0.7)
        assert int((~mask).sum()) == round(0.7 * w.numel())
        rows = projection_mask(w, "filter", 0.25).flatten(1)
        assert rows.all(1).sum() + (~rows).all(1).sum() == shape[0]  # whole rows only
        assert int((~rows).all(1).sum()) == round(0.25 * shape[0])
        cols = projection_mask(w, "column", 0.5).flatten(1)
        assert cols.all(0).sum() + (~cols).all(0).sum() == cols.shape[1]  # whole columns only
        assert int((~cols).all(0).sum()) == round(0.5 * cols.shape[1])


def test_projections_drop_the_smallest() -> None:
    w = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(1))
    mask = projection_mask(w, "irregular", 0.5)
    assert float(w[~mask].abs().max()) <= float(w[mask].abs().min())
    rows = projection_mask(w, "filter", 1 / 3)[:, 0, 0, 0]
    norms = w.flatten(1).norm(dim=1)
    assert set((~rows).nonzero().flatten().tolist()) == set(norms.argsort()[:2].tolist())
    cols = projection_mask(w, "column", 0.5).flatten(1)[0]
    col_norms = w.flatten(1).norm(dim=0)
    assert float(col_norms[~cols].max()) <= float(col_norms[cols].min())


def _rest(a: Tensor, b: Tensor) -> float:
    """How far ``a`` is from the line through ``b``, over ``|b|`` (the redundancy measure)."""
    a, b = a.flatten(), b.flatten()
    return float((a - (a @ b) / (b @ b) * b).norm() / b.norm())


def _largest_first(rows: Any) -> list[Tensor]:
    return sorted(rows, key=lambda r: -float(r.norm()))


def test_redundant_projection_removes_planted_near_duplicates() -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(7, 4, 3, 3, generator=g)
    w[3] = 0.5 * w[0]  # a rescaled copy: the same channel after BatchNorm
    w[5] = 0.9 * w[2] + 0.02 * torch.randn(4, 3, 3, generator=g)  # a noisy one
    w[6] = 0.05 * w[6]  # too small to matter next to the largest filter
    kept = projection_mask(w, "redundant", 0.1)[:, 0, 0, 0]
    assert kept.tolist() == [True, True, True, False, True, False, False]
    strict = projection_mask(w, "redundant", 0.01)[:, 0, 0, 0]
    assert strict.tolist() == [True, True, True, False, True, True, True]  # the exact copy only
    rows = _largest_first(w.flatten(1)[kept])
    for big, small in itertools.combinations(rows, 2):  # kept filters satisfy the constraint
        assert _rest(small, big) >= 0.1


# ------------------------------------------------------------------------------ schedules


def test_funnel_sparsities_grow_with_depth_and_keep_the_budget() -> None:
    sizes = [144, 4608, 320, 1000]
    s = funnel_sparsities(sizes, 0.8, 0.5)
    assert all(a < b for a, b in itertools.pairwise(s))  # deeper: strictly more pruned
    assert sum(n * x for n, x in zip(sizes, s, strict=True)) == pytest.approx(0.8 * sum(sizes))
    assert (1 - s[-1]) / (1 - s[0]) == pytest.approx(0.5)  # the deepest keeps ratio x the first
    assert funnel_sparsities([100], 0.6, 0.5) == pytest.approx([0.6])
    with pytest.raises(ValueError, match="too low"):
        funnel_sparsities(sizes, 0.1, 0.2)


def test_k_fraction_and_the_reference_lr_schedule() -> None:
    expected = [1 / 3, 1 / 3, 2 / 3, 2 / 3, 1.0, 1.0]  # k falls in 3 equal steps over 6 periods
    assert [k_fraction(p, 6, 3) for p in range(6)] == pytest.approx(expected)
    assert [k_fraction(p, 4, 1) for p in range(4)] == [1.0] * 4
    # The authors' code (yeshaokai/Robustness-Aware-Pruning-ADMM) with admm_epoch 20:
    # 0-6, 7-13, 14-19, then repeat.
    factors = [admm_lr_factor(e, 20) for e in range(41)]
    assert factors[:7] == [1.0] * 7
    assert factors[7:14] == pytest.approx([0.1] * 7)
    assert factors[14:20] == pytest.approx([0.01] * 6)
    assert factors[20] == 1.0 and factors[40] == 1.0


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize(
    ("scheme", "sparsity"), [("irregular", 0.7), ("filter", 0.5), ("column", 0.4)]
)
def test_admm_ends_with_exactly_the_requested_pattern(
    scheme: Any, sparsity: float, trained_cnn: nn.Module, digits: DataSplits
) -> None:
    before = _state(trained_cnn)
    compressor = ADMMPruning(
        sparsity=sparsity, scheme=scheme, admm_epochs=4, period=2, retrain=ONE_EPOCH, **FAST
    )
    pruned, record = compressor(trained_cnn, digits)
    assert all(torch.equal(before[k], v) for k, v in trained_cnn.state_dict().items())
    for name, w in _weights(pruned).items():
        matrix = w.flatten(1)
        info = record.details["layers"][name]
        if scheme == "irregular":
            expected = round(sparsity * w.numel())
            assert int((w == 0).sum()) == info["zeros"] == expected
        else:
            axis = 1 if scheme == "filter" else 0  # filters are rows, columns are columns
            whole = (matrix == 0).all(axis)
            assert int(whole.sum()) == round(sparsity * len(whole))
            assert int((w == 0).sum()) == int(whole.sum()) * matrix.shape[axis]  # nothing else
            key = "filters_pruned" if scheme == "filter" else "columns_pruned"
            assert info[key] == whole.nonzero().flatten().tolist()
        assert hasattr(dict(pruned.named_modules())[name], "weight_mask")  # retraining kept zeros
    assert record.details["filters_removed_physically"] is False
    assert pruned.net.conv2.weight.shape == trained_cnn.net.conv2.weight.shape  # type: ignore[union-attr]


def test_funnel_prunes_deeper_layers_more(trained_cnn: nn.Module, digits: DataSplits) -> None:
    compressor = ADMMPruning(
        sparsity=0.6, scheme="funnel", funnel_ratio=0.4, admm_epochs=2, period=1,
        retrain=NO_RETRAIN, **FAST,
    )  # fmt: skip
    pruned, _ = compressor(trained_cnn, digits)
    weights = _weights(pruned)
    names = ["net.conv1", "net.conv2", "net.fc"]  # forward-pass order
    fractions = [float((weights[n] == 0).float().mean()) for n in names]
    assert all(a < b for a, b in itertools.pairwise(fractions))
    targets = funnel_sparsities([weights[n].numel() for n in names], 0.6, 0.4)
    for name, target in zip(names, targets, strict=True):
        assert int((weights[name] == 0).sum()) == round(target * weights[name].numel())
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    assert zeros / sum(w.numel() for w in weights.values()) == pytest.approx(0.6, abs=1e-3)


def test_redundant_removes_near_duplicate_filters(
    trained_cnn: nn.Module, digits: DataSplits
) -> None:
    model = copy.deepcopy(trained_cnn)
    conv2: Any = model.net.conv2  # type: ignore[union-attr]
    with torch.no_grad():
        conv2.weight[7] = 0.98 * conv2.weight[3]  # a planted near-duplicate of filter 3
    phi = 0.1
    compressor = ADMMPruning(
        scheme="redundant", phi=phi, admm_epochs=6, period=2, retrain=NO_RETRAIN, **FAST
    )
    pruned, record = compressor(model, digits)
    periods = record.details["periods"]
    assert all(p["z_sparsity"]["net.conv2"] == 1 / 32 for p in periods)  # Z: one filter of 32
    residuals = [p["residual_end"] for p in periods]
    assert all(a > b for a, b in itertools.pairwise(residuals)), residuals
    w = _weights(pruned)["net.conv2"].flatten(1)
    assert bool((w[7] == 0).all()) and bool(w[3].any())
    assert record.details["layers"]["net.conv2"]["filters_pruned"] == [7]
    for name, weight in _weights(pruned).items():
        rows = _largest_first([r for r in weight.flatten(1) if bool(r.any())])
        for big, small in itertools.combinations(rows, 2):
            assert _rest(small, big) >= phi, name


def test_residual_falls_rho_grows_and_hard_pruning_costs_little(
    trained_cnn: nn.Module, digits: DataSplits
) -> None:
    compressor = ADMMPruning(
        sparsity=0.5, admm_epochs=12, period=3, rho_growth=1.5, retrain=NO_RETRAIN, **FAST
    )
    pruned, record = compressor(trained_cnn, digits)
    periods = record.details["periods"]
    assert [p["rho"] for p in periods] == pytest.approx([2.0 * 1.5**p for p in range(4)])
    residuals = [p["residual_end"] for p in periods]
    assert all(a > b for a, b in itertools.pairwise(residuals)), residuals
    assert residuals[-1] < 0.2 * periods[0]["residual_start"]
    history = record.details["history"]
    assert len(history) == 12
    lrs = [0.05 * admm_lr_factor(e, 3) for e in range(12)]  # reset every period, /10 per third
    assert [h["lr"] for h in history] == pytest.approx(lrs)
    assert {"loss", "penalty", "residual", "rho", "train_accuracy"} <= set(history[0])
    # ADMM has moved W next to its pruned projection: hard pruning it costs far less than
    # one-shot magnitude pruning of the dense model at the same per-layer sparsity.
    magnitude, _ = COMPRESSORS.get("magnitude")(sparsity=0.5, scope="layer")(trained_cnn, digits)
    assert accuracy(pruned, digits.test) > accuracy(magnitude, digits.test) + 0.1
    assert accuracy(pruned, digits.test) > 0.85


def test_decreasing_k_reaches_intermediate_targets(
    trained_cnn: nn.Module, digits: DataSplits
) -> None:
    compressor = ADMMPruning(
        sparsity=0.6, k_schedule="decreasing", k_stages=3, admm_epochs=6, period=2,
        retrain=NO_RETRAIN, **FAST,
    )  # fmt: skip
    pruned, record = compressor(trained_cnn, digits)
    sizes = {n: w.numel() for n, w in _weights(pruned).items()}
    for stage, period in enumerate(record.details["periods"]):
        fraction = 0.6 * (stage + 1) / 3
        assert period["k_fraction"] == pytest.approx((stage + 1) / 3)
        for name, z_sparsity in period["z_sparsity"].items():
            assert z_sparsity == pytest.approx(round(fraction * sizes[name]) / sizes[name])
    for name, w in _weights(pruned).items():
        assert int((w == 0).sum()) == round(0.6 * sizes[name])


def test_per_layer_sparsity_and_first_last(trained_cnn: nn.Module, digits: DataSplits) -> None:
    compressor = ADMMPruning(
        sparsity={"conv2": 0.7, "net.fc": 0.3}, admm_epochs=1, retrain=NO_RETRAIN, **FAST
    )
    pruned, record = compressor(trained_cnn, digits)
    w = _weights(pruned)
    assert int((w["net.conv1"] == 0).sum()) == 0
    assert int((w["net.conv2"] == 0).sum()) == round(0.7 * w["net.conv2"].numel())
    assert int((w["net.fc"] == 0).sum()) == round(0.3 * w["net.fc"].numel())
    assert set(record.details["layers"]) == {"net.conv2", "net.fc"}
    inner = ADMMPruning(
        sparsity=0.5, include_first_last=False, admm_epochs=1, retrain=NO_RETRAIN, **FAST
    )
    pruned, record = inner(trained_cnn, digits)
    assert set(record.details["layers"]) == {"net.conv2"}
    assert int((_weights(pruned)["net.fc"] == 0).sum()) == 0
    with pytest.raises(ValueError, match=r"did you mean net\.conv2"):
        ADMMPruning(sparsity={"conv3": 0.5}, **FAST)(trained_cnn, digits)


def test_adversarial_objective_is_the_default_and_logged(
    trained_cnn: nn.Module, digits: DataSplits
) -> None:
    if "pgd-at" not in OBJECTIVES.names():
        pytest.skip("the pgd-at objective is not registered")
    assert ADMMPruning(sparsity=0.5).objective == {
        "name": "pgd-at", "eps": 8 / 255, "step": 2 / 255, "steps": 10,
    }  # fmt: skip
    objective = {"name": "pgd-at", "eps": 0.1, "step": 0.05, "steps": 2}
    compressor = ADMMPruning(
        sparsity=0.5, admm_epochs=2, period=1, rho=1.0, objective=objective,
        retrain={"epochs": 1, "lr": 0.01, "keep_best": False},
    )  # fmt: skip
    assert compressor.retrain_config().objective == objective  # retraining is adversarial too
    _, record = compressor(trained_cnn, digits)
    for epoch in record.details["history"]:
        assert epoch["loss"] > 0 and 0 <= epoch["adv_accuracy"] <= 1  # the thesis's curve
    assert "adv_accuracy" in record.details["retrain"]["epochs"][0]


def test_retrain_overrides_the_reference_settings() -> None:
    config = ADMMPruning(sparsity=0.5, objective=CE, retrain={"epochs": 3}).retrain_config()
    assert (config.epochs, config.lr, config.weight_decay, config.keep_best) == (
        3,
        0.01,
        1e-4,
        False,
    )
    assert config.objective == CE  # retraining uses the ADMM objective unless told otherwise
    own = ADMMPruning(
        sparsity=0.5, objective=CE, retrain={"objective": {"name": "kd", "teacher": "t"}}
    )
    assert own.retrain_config().objective["name"] == "kd"


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": -0.1}, "sparsity"),
        ({}, "needs sparsity"),
        ({"sparsity": {}}, "empty"),
        ({"sparsity": 0.5, "scheme": "channel"}, "scheme must be one of"),
        ({"scheme": "redundant"}, "phi"),
        ({"scheme": "redundant", "phi": 1.0}, "phi"),
        ({"scheme": "redundant", "phi": 0.1, "sparsity": 0.5}, "leave sparsity unset"),
        ({"sparsity": 0.5, "phi": 0.1}, "phi is for scheme 'redundant'"),
        ({"sparsity": {"conv1": 0.5}, "scheme": "funnel"}, "one number"),
        ({"sparsity": 0.5, "scheme": "funnel", "funnel_ratio": 1.5}, "funnel_ratio"),
        ({"sparsity": 0.5, "rho": 0.0}, "rho"),
        ({"sparsity": 0.5, "rho_growth": 0.9}, "rho_growth"),
        ({"sparsity": 0.5, "period": 0}, "period"),
        ({"sparsity": 0.5, "k_schedule": "linear"}, "k_schedule"),
        ({"k_schedule": "decreasing", "k_stages": 5, "period": 50, **HALF}, "k_stages"),
        ({"sparsity": 0.5, "lr": 0.0}, "lr"),
        ({"sparsity": 0.5, "objective": {"name": "pgd"}}, "objective"),
        ({"sparsity": 0.5, "retrain": {"epoch": 1}}, "did you mean 'epochs'"),
    ],
)
def test_bad_config_is_a_clear_value_error(options: dict[str, Any], match: str) -> None:
    options = {"objective": CE, **options}
    with pytest.raises(ValueError, match=match):
        ADMMPruning(**options)


def test_funnel_too_low_for_the_ratio_fails_before_training(
    trained_cnn: nn.Module, digits: DataSplits
) -> None:
    compressor = ADMMPruning(sparsity=0.05, scheme="funnel", funnel_ratio=0.1, **FAST)
    with pytest.raises(ValueError, match="too low"):
        compressor(trained_cnn, digits)
