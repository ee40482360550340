"""The training loop: it learns, it selects on validation, schedules and objectives plug in."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from robcomp.data.base import DataSplits
from robcomp.evaluate import accuracy
from robcomp.models import create
from robcomp.train import OBJECTIVES, Callback, TrainConfig, fit, lr_factor


def _model(data: DataSplits, name: str = "tiny_cnn") -> nn.Module:
    torch.manual_seed(0)
    return create(name, data.num_classes, data.in_shape, mean=data.mean, std=data.std)


def test_fit_learns_and_records_history(digits: DataSplits) -> None:
    model = _model(digits)
    history = fit(model, digits, TrainConfig(epochs=8, lr=0.05, batch_size=64), seed=0)
    assert len(history.epochs) == 8
    first, last = history.epochs[0], history.epochs[-1]
    assert {"loss", "train_accuracy", "val_accuracy", "lr", "seconds", "epoch"} <= set(last)
    assert last["loss"] < first["loss"]
    assert accuracy(model, digits.test) > 0.85
    assert history.best_epoch is not None


def test_fit_is_deterministic(digits: DataSplits) -> None:
    cfg = TrainConfig(epochs=1, lr=0.05, batch_size=64, augment="flip")
    a, b = _model(digits), _model(digits)
    fit(a, digits, cfg, seed=1)
    fit(b, digits, cfg, seed=1)
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(pa, pb)


def test_keep_best_restores_the_best_validation_epoch(digits: DataSplits) -> None:
    model = _model(digits, "tiny_mlp")
    # A huge constant learning rate makes later epochs diverge; the best one must come back.
    history = fit(model, digits, TrainConfig(epochs=4, lr=3.0, schedule="constant"), seed=0)
    best = max(e["val_accuracy"] for e in history.epochs)
    assert history.best_epoch == 1 + [e["val_accuracy"] for e in history.epochs].index(best)
    assert accuracy(model, digits.val) == pytest.approx(best)


def test_zero_epochs_leaves_the_model_alone(digits: DataSplits) -> None:
    model = _model(digits)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert fit(model, digits, TrainConfig(epochs=0)).epochs == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("schedule", "extra", "expected"),
    [
        ("constant", {}, [1, 1, 1, 1]),
        ("step", {"lr_step": 2}, [1, 1, 0.1, 0.1]),
        ("multistep", {"milestones": (1, 3)}, [1, 0.1, 0.1, 0.01]),
        ("cosine", {}, [1, 0.8535534, 0.5, 0.1464466]),
        ("cyclic", {}, [0, 0.5, 1, 0.5]),
    ],
)
def test_lr_schedules(schedule: str, extra: dict[str, object], expected: list[float]) -> None:
    cfg = TrainConfig(epochs=4, schedule=schedule, **extra)  # type: ignore[arg-type]
    factors = [lr_factor(cfg, epoch, 0, 10) for epoch in range(4)]
    assert factors == pytest.approx(expected, abs=1e-6)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="milestones"):
        TrainConfig(schedule="multistep")
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        TrainConfig(lr=0)


@dataclass(frozen=True, kw_only=True)
class NoisyCE:
    """A new objective added from outside: the loop must run it unchanged."""

    sigma: float = 0.1

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        logits = model((x + self.sigma * torch.randn_like(x)).clamp(0, 1))
        return {
            "loss": F.cross_entropy(logits, y),
            "logits": logits,
            "sigma": torch.tensor(self.sigma),
        }


def test_a_new_objective_fits_without_touching_the_loop(digits: DataSplits) -> None:
    model = _model(digits)
    with OBJECTIVES.temporarily("test-noisy-ce", NoisyCE):
        cfg = TrainConfig(epochs=5, lr=0.05, batch_size=64, objective={"name": "test-noisy-ce"})
        history = fit(model, digits, cfg)
    assert history.epochs[-1]["sigma"] == pytest.approx(0.1)  # extra entries are logged
    assert accuracy(model, digits.test) > 0.7


def test_adam_optimizer_trains(digits: DataSplits) -> None:
    model = _model(digits, "tiny_mlp")
    fit(model, digits, TrainConfig(epochs=3, optimizer="adam", lr=3e-3, weight_decay=0.0))
    assert accuracy(model, digits.test) > 0.8


class _Recorder(Callback):
    """Logs every hook fit calls, and adds a key to each epoch's record."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []

    def before_epoch(self, model: nn.Module, epoch: int) -> None:
        self.calls.append(("before_epoch", epoch, -1))

    def after_step(self, model: nn.Module, epoch: int, step: int) -> None:
        self.calls.append(("after_step", epoch, step))

    def after_epoch(self, model: nn.Module, epoch: int, record: dict[str, float]) -> None:
        self.calls.append(("after_epoch", epoch, -1))
        record["extra"] = 10.0 * epoch


def test_fit_runs_callbacks_in_order_and_takes_an_objective_and_lr_schedule(
    digits: DataSplits,
) -> None:
    recorder = _Recorder()

    @dataclass(frozen=True)
    class Marked:  # a wrapped objective, as ADMM adds its penalty
        def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
            logits = model(x)
            return {"loss": F.cross_entropy(logits, y), "logits": logits, "mark": torch.ones(())}

    cfg = TrainConfig(epochs=2, lr=0.1, batch_size=512, select="last")
    history = fit(
        _model(digits), digits, cfg, objective=Marked(), callbacks=[recorder],
        lr_schedule=lambda epoch, step, steps: 0.5 ** (epoch * steps + step),
    )  # fmt: skip
    steps = math.ceil(len(digits.train) / 512)
    expected = [
        call
        for e in range(2)
        for call in [("before_epoch", e, -1), *(("after_step", e, s) for s in range(steps)),
                     ("after_epoch", e, -1)]
    ]  # fmt: skip
    assert recorder.calls == expected
    assert [r["extra"] for r in history.epochs] == [0.0, 10.0]
    assert [r["mark"] for r in history.epochs] == [1.0, 1.0]  # the given objective, not ce
    last_lrs = [0.1 * 0.5 ** (e * steps + steps - 1) for e in range(2)]
    assert [r["lr"] for r in history.epochs] == pytest.approx(last_lrs)
