"""PGD and FGSM: threat model, strength, determinism, and a cross-check against torchattacks."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from robcomp.attacks import FGSM, PGD
from robcomp.data.base import DataSplits
from robcomp.evaluate import (
    ThreatModelViolation,
    attack_batch,
    attack_mode,
    check_threat_model,
    evaluate_attack,
)
from robcomp.evaluate.clean import predict


def _points(data: DataSplits, n: int = 200) -> tuple[Tensor, Tensor]:
    return data.test.head(n).tensors()


def _robust_acc(model: nn.Module, x_adv: Tensor, y: Tensor) -> float:
    return float((predict(model, x_adv) == y).float().mean())


@pytest.mark.parametrize(
    "attack",
    [
        FGSM(eps=0.3),
        FGSM(eps=2.0, norm="l2"),
        PGD(eps=0.3, steps=10),
        PGD(eps=2.0, norm="l2", steps=10),
        PGD(eps=0.3, steps=5, restarts=3, random_start=True),
    ],
    ids=lambda a: a.label(),
)
def test_attack_contract(trained_cnn: nn.Module, digits: DataSplits, attack: PGD | FGSM) -> None:
    x, y = _points(digits)
    x_before = x.clone()
    with attack_mode(trained_cnn):
        x_adv = attack(trained_cnn, x, y)
        again = attack(trained_cnn, x, y)
    assert torch.equal(x, x_before), "the attack modified its input"
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    check_threat_model(x, x_adv, attack.eps, attack.norm)
    assert torch.equal(x_adv, again), "not deterministic under its seed"
    clean, robust = _robust_acc(trained_cnn, x, y), _robust_acc(trained_cnn, x_adv, y)
    assert clean > 0.85
    assert robust < clean - 0.4, f"{attack.label()} barely lowers accuracy: {clean} -> {robust}"


def test_pgd_is_stronger_with_more_steps_and_eps(
    trained_cnn: nn.Module, digits: DataSplits
) -> None:
    x, y = _points(digits)
    with attack_mode(trained_cnn):
        acc = {
            (eps, steps): _robust_acc(trained_cnn, PGD(eps=eps, steps=steps)(trained_cnn, x, y), y)
            for eps in (0.05, 0.1)
            for steps in (1, 20)
        }
    assert acc[(0.1, 20)] <= acc[(0.05, 20)]
    assert acc[(0.1, 20)] <= acc[(0.1, 1)]
    assert acc[(0.1, 20)] < 0.3


def test_fgsm_is_one_full_pgd_step(trained_cnn: nn.Module, digits: DataSplits) -> None:
    x, y = _points(digits, 64)
    with attack_mode(trained_cnn):
        a = FGSM(eps=0.1)(trained_cnn, x, y)
        b = PGD(eps=0.1, steps=1, step_size=0.1, random_start=False)(trained_cnn, x, y)
    assert torch.equal(a, b)
    # Sign steps of size eps land on the ball's corners wherever the box allows.
    delta = (a - x).abs()
    assert bool(((delta - 0.1).abs() < 1e-6).logical_or(a == 0).logical_or(a == 1).all())


def test_restarts_never_weaken(trained_cnn: nn.Module, digits: DataSplits) -> None:
    x, y = _points(digits)
    with attack_mode(trained_cnn):
        one = _robust_acc(trained_cnn, PGD(eps=0.06, steps=5, restarts=1)(trained_cnn, x, y), y)
        five = _robust_acc(trained_cnn, PGD(eps=0.06, steps=5, restarts=5)(trained_cnn, x, y), y)
    assert five <= one


@pytest.mark.parametrize(("eps", "norm"), [(0.05, "linf"), (0.1, "linf"), (0.8, "l2")])
def test_pgd_agrees_with_torchattacks(
    trained_cnn: nn.Module, digits: DataSplits, eps: float, norm: str
) -> None:
    torchattacks = pytest.importorskip("torchattacks")
    x, y = _points(digits, 300)
    steps, alpha = 20, 2.5 * eps / 20
    ours = PGD(eps=eps, norm=norm, steps=steps, step_size=alpha, random_start=False)
    if norm == "linf":
        ref = torchattacks.PGD(trained_cnn, eps=eps, alpha=alpha, steps=steps, random_start=False)
    else:
        ref = torchattacks.PGDL2(trained_cnn, eps=eps, alpha=alpha, steps=steps, random_start=False)
    with attack_mode(trained_cnn):
        ours_acc = _robust_acc(trained_cnn, ours(trained_cnn, x, y), y)
        ref_acc = _robust_acc(trained_cnn, ref(x, y), y)
    # Same algorithm, no randomness: only float summation order differs (mean vs sum loss).
    assert abs(ours_acc - ref_acc) <= 0.01, (ours_acc, ref_acc)


@dataclass(frozen=True)
class Cheater:
    """An attack that ignores its budget: the evaluator must refuse its result."""

    eps: float = 0.05
    norm: str = "linf"
    overshoot: float = 2.0

    def label(self) -> str:
        return "cheater"

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return (x + self.overshoot * self.eps).clamp(0, 1)


@dataclass(frozen=True)
class OutOfBox(Cheater):
    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return x - 0.01


def test_evaluator_rejects_attacks_outside_the_threat_model(
    trained_cnn: nn.Module, digits: DataSplits
) -> None:
    x, y = _points(digits, 32)
    with pytest.raises(ThreatModelViolation, match="exceeds eps"):
        attack_batch(trained_cnn, Cheater(), x, y)
    with pytest.raises(ThreatModelViolation, match=r"leaves \[0, 1\]"):
        attack_batch(trained_cnn, OutOfBox(), x, y)
    with pytest.raises(ThreatModelViolation, match="exceeds eps"):
        evaluate_attack(trained_cnn, Cheater(), digits.test.head(32))
    check_threat_model(x, (x + 0.05).clamp(0, 1), 0.05, "linf")  # exactly on the boundary is fine


def test_attack_mode_freezes_and_restores(trained_cnn: nn.Module) -> None:
    model = trained_cnn.train()
    with attack_mode(model):
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())
    assert model.training and all(p.requires_grad for p in model.parameters())
    model.eval()


def test_evaluate_attack_counts(trained_cnn: nn.Module, digits: DataSplits) -> None:
    r = evaluate_attack(trained_cnn, PGD(eps=0.1, steps=10), digits.test, batch_size=100)
    assert r.n == len(digits.test)
    assert 0.0 <= r.robust_accuracy < r.clean_accuracy
    assert 0 < r.median_norm <= 0.1 + 1e-6 and r.seconds > 0
