"""Adversarial training objectives (PGD-AT, FGSM-AT, Fast-AT, TRADES, mixed) and the loop's
early stop and monitor: each test shows the behaviour that defines the method."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from robcomp.attacks import PGD
from robcomp.config import ConfigError, build_component
from robcomp.data.base import DataSplits
from robcomp.evaluate import accuracy, evaluate_attack
from robcomp.models import create
from robcomp.train import OBJECTIVES, TrainConfig, fit
from robcomp.train.adversarial import (
    FGSMAT,
    PGDAT,
    TRADES,
    FastAT,
    MixedAT,
    inner_attack_mode,
)
from robcomp.train.loop import collapsed
from robcomp.train.objectives import Progress

NAMES = ["pgd-at", "fgsm-at", "fast-at", "trades", "mixed"]


def _model(data: DataSplits, name: str = "tiny_cnn", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create(name, data.num_classes, data.in_shape, mean=data.mean, std=data.std)


def _batch(data: DataSplits, n: int = 64) -> tuple[Tensor, Tensor]:
    return data.train.head(n).tensors()


def _robust(model: nn.Module, data: DataSplits, eps: float) -> tuple[float, float]:
    result = evaluate_attack(model, PGD(eps=eps, steps=10), data.test)
    return result.clean_accuracy, result.robust_accuracy


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# --- contracts shared by every objective --------------------------------------------------------


def test_objectives_are_registered_under_their_contract_names() -> None:
    assert set(NAMES) <= set(OBJECTIVES.names())


@pytest.mark.parametrize("name", NAMES)
def test_objective_leaves_no_gradients_mode_or_statistics_behind(
    name: str, digits: DataSplits
) -> None:
    """The inner attack must not fill .grad, change requires_grad or the train/eval mode, or
    move BatchNorm statistics: only the training forward passes may update them."""
    model = _model(digits).train()
    x, y = _batch(digits)
    objective = build_component(OBJECTIVES, {"name": name, "eps": 0.1}, name)
    out = objective(model, x, y)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert model.training
    forwards = {"pgd-at": 1, "fast-at": 1, "fgsm-at": 2, "mixed": 2, "trades": 2}[name]
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert int(bn.num_batches_tracked) == forwards
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_inner_attack_mode_restores_mode_flags_and_buffers(mode: str, digits: DataSplits) -> None:
    model = _model(digits).train()
    next(m for m in model.modules() if isinstance(m, nn.Linear)).requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with inner_attack_mode(model, mode):  # type: ignore[arg-type]
        assert model.training == (mode == "train")
        assert not any(p.requires_grad for p in model.parameters())
        model(_batch(digits)[0])  # in train mode this moves the running statistics
    assert model.training
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- PGD-AT -------------------------------------------------------------------------------------


def test_pgd_at_raises_pgd_accuracy_over_cross_entropy(digits: DataSplits) -> None:
    eps = 0.1
    budget = {"epochs": 4, "lr": 0.05, "batch_size": 64}
    natural, robust = _model(digits), _model(digits)
    fit(natural, digits, TrainConfig(**budget), seed=0)
    pgd_at = {"name": "pgd-at", "eps": eps, "step": eps / 2, "steps": 3}
    history = fit(robust, digits, TrainConfig(**budget, objective=pgd_at), seed=0)
    _, natural_robust = _robust(natural, digits, eps)
    _, at_robust = _robust(robust, digits, eps)
    assert at_robust > natural_robust + 0.1
    assert 0 <= history.epochs[-1]["adv_accuracy"] <= 1  # trained-on accuracy is logged


def test_pgd_at_stays_in_the_ball_and_attacks_harder_than_noise(digits: DataSplits) -> None:
    model = _model(digits).eval()
    x, y = _batch(digits)
    for norm, eps in [("linf", 0.1), ("l2", 1.0)]:
        objective = PGDAT(eps=eps, step=eps / 4, steps=5, norm=norm)  # type: ignore[arg-type]
        x_adv = objective.adversarial_examples(model, x, y)
        delta = (x_adv - x).flatten(1)
        size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
        assert float(size.max()) <= eps + 1e-6
        assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
        with torch.no_grad():
            assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)


def test_pgd_at_trains_with_any_registered_attack(digits: DataSplits) -> None:
    model = _model(digits).eval()
    x, y = _batch(digits)
    objective = PGDAT(attack={"name": "pgd", "eps": 0.1, "steps": 2, "seed": 0})
    torch.manual_seed(0)
    first, second = (objective.adversarial_examples(model, x, y) for _ in range(2))
    assert not torch.equal(first, second)  # a fresh random start per batch, not the fixed seed
    torch.manual_seed(0)
    assert torch.equal(first, objective.adversarial_examples(model, x, y))  # yet reproducible
    fgsm = {"name": "pgd-at", "attack": {"name": "fgsm", "eps": 0.1}}
    history = fit(model, digits, TrainConfig(epochs=1, lr=0.05, batch_size=64, objective=fgsm))
    assert history.epochs[0]["loss"] > 0


# --- FGSM-AT ------------------------------------------------------------------------------------


def test_fgsm_at_with_alpha_one_is_cross_entropy_exactly(digits: DataSplits) -> None:
    cfg = {"epochs": 2, "lr": 0.05, "batch_size": 64}
    natural, fgsm = _model(digits), _model(digits)
    a = fit(natural, digits, TrainConfig(**cfg), seed=0)
    b = fit(fgsm, digits, TrainConfig(**cfg, objective={"name": "fgsm-at", "alpha": 1.0}), seed=0)
    assert _same_weights(natural, fgsm)
    assert [e["loss"] for e in a.epochs] == [e["loss"] for e in b.epochs]


def test_fgsm_at_mixes_clean_and_fgsm_losses(digits: DataSplits) -> None:
    model = _model(digits).eval()  # eval: the two forward passes see the same statistics
    x, y = _batch(digits)
    out = FGSMAT(eps=0.1, alpha=0.3)(model, x, y)
    loss, natural, adv = (float(out[k].detach()) for k in ("loss", "natural_loss", "adv_loss"))
    assert loss == pytest.approx(0.3 * natural + 0.7 * adv)
    assert adv > natural
    x_adv = FGSMAT(eps=0.1).adversarial_examples(model, x, y)
    moved = (x_adv - x).abs()
    # one full signed step: every pixel moves by eps unless [0, 1] clips it
    assert torch.all(torch.isclose(moved, torch.tensor(0.1)) | (x_adv == 0) | (x_adv == 1))


# --- Fast-AT ------------------------------------------------------------------------------------


def test_fast_at_perturbation_stays_in_eps_and_the_image_range(digits: DataSplits) -> None:
    model = _model(digits).train()
    x, y = _batch(digits, 128)
    assert float(x.min()) == 0.0  # digits has black pixels: the [0, 1] clip is exercised
    objective = FastAT(eps=0.3)
    assert objective.step_size == pytest.approx(0.375)  # 1.25 * eps by default
    torch.manual_seed(0)
    x_adv = objective.adversarial_examples(model, x, y)
    delta = x_adv - x
    assert float(delta.abs().max()) <= 0.3 + 1e-6
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    at_bound = delta.abs() > 0.3 - 1e-6
    # a 1.25 eps step from a uniform start ends mostly on the boundary, but not everywhere
    assert 0.3 < float(at_bound.float().mean()) < 1.0
    torch.manual_seed(1)
    assert not torch.equal(x_adv, objective.adversarial_examples(model, x, y))  # random start


# --- TRADES -------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_trades_larger_beta_trades_clean_for_robust_accuracy(seed: int, digits: DataSplits) -> None:
    eps = 0.2
    results = {}
    for beta in (0.1, 6.0):
        model = _model(digits, "tiny_mlp", seed)
        objective = {"name": "trades", "eps": eps, "step": eps / 3, "steps": 4, "beta": beta}
        cfg = TrainConfig(epochs=10, lr=0.05, batch_size=64, objective=objective, keep_best=False)
        history = fit(model, digits, cfg, seed=seed)
        assert {"natural_loss", "robust_loss"} <= set(history.epochs[-1])
        results[beta] = _robust(model, digits, eps)
    (clean_small, robust_small), (clean_large, robust_large) = results[0.1], results[6.0]
    assert clean_large < clean_small
    assert robust_large > robust_small + 0.15


def test_trades_loss_is_ce_plus_beta_times_batch_mean_kl(digits: DataSplits) -> None:
    model = _model(digits).eval()
    x, y = _batch(digits)
    out = TRADES(eps=0.1, beta=2.0)(model, x, y)
    loss, natural, robust = (
        float(out[k].detach()) for k in ("loss", "natural_loss", "robust_loss")
    )
    assert loss == pytest.approx(natural + 2.0 * robust)
    with torch.no_grad():
        assert natural == pytest.approx(float(F.cross_entropy(model(x), y)))
    assert robust > 0


# --- mixed (Marshall 2020) ----------------------------------------------------------------------


def test_mixed_schedule_raises_eps_in_thirds_and_ramps_steps_within_each() -> None:
    mixed = MixedAT(eps=0.3, steps=7, min_steps=1)
    third = 1 / 3
    expected = {
        0.0: (0.1, 1),
        third / 2: (0.1, 4),
        third - 1e-9: (0.1, 7),
        third: (0.2, 1),  # eps steps up, steps reset
        0.5: (0.2, 4),
        2 * third: (0.3, 1),
        0.999: (0.3, 7),
        1.0: (0.3, 7),
        None: (0.3, 7),  # outside fit: the final strength
    }
    for fraction, (eps, steps) in expected.items():
        got_eps, got_steps = mixed.schedule(fraction)
        assert got_eps == pytest.approx(eps) and got_steps == steps, fraction
    assert MixedAT(eps=0.3, stages=1, ramp_steps=False).schedule(0.1) == (0.3, 7)


def test_fit_drives_the_mixed_schedule(digits: DataSplits) -> None:
    objective = {"name": "mixed", "eps": 0.15, "steps": 3, "min_steps": 1}
    cfg = TrainConfig(epochs=3, lr=0.05, batch_size=128, objective=objective)
    history = fit(_model(digits), digits, cfg, seed=0)
    assert [e["attack_eps"] for e in history.epochs] == pytest.approx([0.05, 0.1, 0.15])
    for record in history.epochs:  # 10 batches per epoch: steps 1, 1, 1, 1, 2, 2, 2, 3, 3, 3
        assert record["attack_steps"] == pytest.approx(1.9)
        assert {"natural_loss", "adv_loss", "train_accuracy"} <= set(record)


def test_mixed_loss_weights_natural_and_adversarial_terms(digits: DataSplits) -> None:
    model = _model(digits).eval()
    x, y = _batch(digits)
    out = MixedAT(eps=0.1, steps=3)(model, x, y)  # default natural_weight 0.1
    loss, natural, adv = (float(out[k].detach()) for k in ("loss", "natural_loss", "adv_loss"))
    assert loss == pytest.approx(0.1 * natural + 0.9 * adv)


# --- early stop ---------------------------------------------------------------------------------


def test_early_stop_rule() -> None:
    assert not collapsed(None, 0.0, 0.2)  # the first epoch has nothing to fall from
    assert not collapsed(0.5, 0.31, 0.2)
    assert collapsed(0.5, 0.29, 0.2)
    assert not collapsed(0.1, 0.9, 0.2)  # rising is never a collapse


@dataclass(frozen=True, kw_only=True)
class Sabotage:
    """Cross-entropy, then gradient ascent on it from epoch ``at`` (from 0): an engineered
    collapse of robust accuracy, the way catastrophic overfitting looks to the early stop."""

    at: int = 2
    progress: Progress = field(default_factory=Progress, init=False, compare=False)

    def set_progress(self, epoch: int, step: int, steps_per_epoch: int, epochs: int) -> None:
        self.progress.update(epoch, step, steps_per_epoch, epochs)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        return {"loss": -loss if self.progress.epoch >= self.at else loss, "logits": logits}


@pytest.fixture
def sabotage() -> Iterator[None]:
    with OBJECTIVES.temporarily("test-sabotage", Sabotage):
        yield


@pytest.mark.parametrize("keep_best", [False, True])
@pytest.mark.usefixtures("sabotage")
def test_early_stop_on_a_collapse_restores_the_previous_epoch(
    keep_best: bool, digits: DataSplits
) -> None:
    base: dict[str, Any] = {
        "lr": 0.05, "batch_size": 64, "schedule": "constant", "keep_best": keep_best,
        "objective": {"name": "test-sabotage", "at": 2},
    }  # fmt: skip
    early_stop = {"eps": 0.05, "steps": 5, "step_size": 0.02, "drop": 0.2}
    model = _model(digits)
    history = fit(model, digits, TrainConfig(epochs=5, early_stop=early_stop, **base), seed=0)
    assert history.stopped_epoch == 3 and len(history.epochs) == 3
    accuracies = [e["early_stop_accuracy"] for e in history.epochs]
    assert accuracies[1] - accuracies[2] > 0.2
    reference = _model(digits)  # the same run, two epochs, no early stop
    fit(reference, digits, TrainConfig(epochs=2, **base), seed=0)
    assert _same_weights(model, reference)
    assert history.best_epoch in ((1, 2) if keep_best else (None,))


def test_early_stop_does_not_fire_on_healthy_training(digits: DataSplits) -> None:
    cfg = TrainConfig(epochs=3, lr=0.05, batch_size=64, early_stop={"eps": 0.05})
    history = fit(_model(digits), digits, cfg, seed=0)
    assert history.stopped_epoch is None and len(history.epochs) == 3
    assert history.as_dict()["stopped_epoch"] is None


# --- monitor ------------------------------------------------------------------------------------


def test_monitor_records_clean_and_adversarial_validation_curves(digits: DataSplits) -> None:
    base = {"epochs": 2, "lr": 0.05, "batch_size": 64, "keep_best": False}
    monitor = {"attack": {"name": "pgd", "eps": 0.1, "steps": 3}, "points": 64}
    watched, plain = _model(digits), _model(digits)
    history = fit(watched, digits, TrainConfig(**base, monitor=monitor), seed=0)
    fit(plain, digits, TrainConfig(**base), seed=0)
    for record in history.epochs:
        assert {"val_loss", "val_accuracy", "val_adv_loss", "val_adv_accuracy"} <= set(record)
        assert record["val_adv_loss"] > record["val_loss"] > 0
        assert 0 <= record["val_adv_accuracy"] < record["val_accuracy"] <= 1
    assert history.epochs[-1]["val_accuracy"] == accuracy(watched, digits.val)
    assert _same_weights(watched, plain)  # watching costs time, never changes the training


def test_no_monitor_no_extra_keys(digits: DataSplits) -> None:
    history = fit(_model(digits), digits, TrainConfig(epochs=1, lr=0.05, batch_size=64))
    assert not {"val_loss", "val_adv_loss", "val_adv_accuracy"} & set(history.epochs[0])


# --- configuration errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"name": "pgd-at", "eps": -0.1}, "eps must be a positive"),
        ({"name": "pgd-at", "eps": 8}, "write 8/255"),
        ({"name": "pgd-at", "steps": 0}, "steps must be >= 1"),
        ({"name": "pgd-at", "norm": "l0"}, "expected one of 'linf', 'l2'"),
        ({"name": "pgd-at", "attack": {"name": "pgdd", "eps": 0.1}}, "unknown attack 'pgdd'"),
        ({"name": "pgd-at", "attack": {"name": "pgd", "eps": 0.1}, "eps": 0.2}, "inside `attack`"),
        ({"name": "trades", "beta": -1}, "beta must be >= 0"),
        ({"name": "fgsm-at", "alpha": 1.5}, r"alpha must be in \[0, 1\]"),
        ({"name": "fast-at", "step": 0}, "step must be positive"),
        ({"name": "mixed", "natural_weight": -0.1}, "natural_weight"),
        ({"name": "mixed", "steps": 3, "min_steps": 5}, "min_steps"),
        ({"name": "mixed", "stages": 0}, "stages must be >= 1"),
        ({"name": "trades", "gamma": 1}, "unknown key 'gamma'"),
    ],
)
def test_bad_objective_configs_fail_clearly(spec: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TrainConfig(objective=spec).build_objective()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"early_stop": {"drop": 0}}, r"drop must be in \(0, 1\]"),
        ({"early_stop": {"attack": "nope"}}, "unknown attack 'nope'"),
        ({"early_stop": {"attack": {"name": "pgd", "eps": 0.1}, "eps": 0.2}}, "contradicts"),
        ({"early_stop": {"patience": 3}}, "unknown key 'patience'"),
        ({"monitor": {"points": 0}}, "points must be >= 1"),
        ({"monitor": {"attack": {"name": "pgd"}}}, "missing required key"),
        ({"monitor": {"attack": {"name": "pgd", "eps": -1}}}, "eps must be a finite number >= 0"),
    ],
)
def test_bad_early_stop_and_monitor_configs_fail_at_construction(
    options: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**options)


def test_objectives_are_plain_hashable_configs() -> None:
    a, b = MixedAT(eps=0.1), MixedAT(eps=0.1)
    a.set_progress(1, 0, 10, 3)
    assert a == b and hash(a) == hash(b)  # the progress state is not part of the config
    assert "progress" not in repr(a)
    assert dataclasses.replace(a, eps=0.2).progress.fraction is None  # a fresh state


# --- which epoch fit keeps (train.select) -------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RobustThenNatural:
    """PGD-AT before epoch ``at`` (from 0), plain cross-entropy after: clean accuracy keeps
    rising while robust accuracy falls, the shape of catastrophic overfitting that selecting on
    clean accuracy walks into. Adversarial (it has an ``eps``), so ``select: auto`` is robust."""

    eps: float = 0.1
    at: int = 3
    progress: Progress = field(default_factory=Progress, init=False, compare=False)

    def set_progress(self, epoch: int, step: int, steps_per_epoch: int, epochs: int) -> None:
        self.progress.update(epoch, step, steps_per_epoch, epochs)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        if self.progress.epoch < self.at:
            return PGDAT(eps=self.eps, step=self.eps / 4, steps=5)(model, x, y)
        logits = model(x)
        return {"loss": F.cross_entropy(logits, y), "logits": logits}


SELECT_RUN: dict[str, Any] = {
    "epochs": 5, "lr": 0.05, "batch_size": 64, "schedule": "constant",
    "objective": {"name": "test-robust-then-natural", "eps": 0.1, "at": 3},
}  # fmt: skip
SELECT_MONITOR = {"eps": 0.1, "steps": 10, "points": 256}


def _select_run(digits: DataSplits, **options: Any) -> tuple[nn.Module, Any]:
    model = _model(digits)
    return model, fit(model, digits, TrainConfig(**SELECT_RUN, **options), seed=0)


@pytest.fixture
def robust_then_natural() -> Iterator[None]:
    with OBJECTIVES.temporarily("test-robust-then-natural", RobustThenNatural):
        yield


@pytest.mark.usefixtures("robust_then_natural")
@pytest.mark.slow
def test_adversarial_training_keeps_the_most_robust_epoch_not_the_most_accurate(
    digits: DataSplits,
) -> None:
    model, history = _select_run(digits, monitor=SELECT_MONITOR)  # select: auto
    clean = [e["val_accuracy"] for e in history.epochs]
    robust = [e["val_adv_accuracy"] for e in history.epochs]
    most_accurate, most_robust = clean.index(max(clean)) + 1, robust.index(max(robust)) + 1
    assert robust[most_accurate - 1] < max(robust) - 0.05, (clean, robust)  # the trap is real
    assert history.best_epoch == most_robust != most_accurate
    reference = _model(digits)  # the same run stopped after that epoch: its weights came back
    cfg = TrainConfig(**{**SELECT_RUN, "epochs": most_robust}, select="last")
    fit(reference, digits, cfg, seed=0)
    assert _same_weights(model, reference)


@pytest.mark.usefixtures("robust_then_natural")
@pytest.mark.slow
def test_robust_selection_without_a_monitor_attacks_at_the_objectives_eps(
    digits: DataSplits,
) -> None:
    watched, with_monitor = _select_run(digits, monitor=SELECT_MONITOR)
    model, history = _select_run(digits)  # PGD-10 at the objective's eps 0.1, 256 points
    assert history.best_epoch == with_monitor.best_epoch
    assert [e["val_adv_accuracy"] for e in history.epochs] == pytest.approx(
        [e["val_adv_accuracy"] for e in with_monitor.epochs]
    )
    assert _same_weights(model, watched)


@pytest.mark.usefixtures("robust_then_natural")
@pytest.mark.parametrize("select", ["clean", "last"])
def test_select_clean_or_last_is_honoured(select: str, digits: DataSplits) -> None:
    model, history = _select_run(digits, select=select, monitor=SELECT_MONITOR)
    clean = [e["val_accuracy"] for e in history.epochs]
    expected = clean.index(max(clean)) + 1 if select == "clean" else None
    assert history.best_epoch == expected
    final = history.epochs[(expected or len(clean)) - 1]
    assert accuracy(model, digits.val) == pytest.approx(final["val_accuracy"])


def test_select_auto_is_clean_for_natural_training() -> None:
    assert TrainConfig().criterion() == "clean"
    assert TrainConfig(objective={"name": "trades"}).criterion() == "robust"
    assert TrainConfig(objective={"name": "pgd-at"}, keep_best=False).criterion() == "last"
    l2 = TrainConfig(objective={"name": "pgd-at", "eps": 0.1, "norm": "l2"})
    attack, points = l2.selection_attack()
    assert (attack.eps, attack.norm, points) == (0.1, "l2", 256)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"select": "robust"}, "needs an adversarial objective"),
        ({"select": "best"}, "select must be one of auto, clean, robust, last"),
        ({"select": "clean", "keep_best": False}, "contradicts select: clean"),
    ],
)
def test_bad_select_fails_at_construction(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**options)
