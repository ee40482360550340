"""Gradient masking is detected; BPDA, transfer and sweeps give the numbers a user can trust."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from robcomp.attacks import PGD
from robcomp.attacks.square import Square
from robcomp.data.base import DataSplits
from robcomp.evaluate import accuracy
from robcomp.evaluate.adversarial import check_threat_model
from robcomp.evaluate.bpda import (
    IdentityGradient,
    RouteOutcome,
    StraightThrough,
    evaluate_without_gradients,
    worst_case,
)
from robcomp.evaluate.diagnostics import (
    check_black_box,
    check_monotone,
    check_randomness,
    diagnose,
    summarize,
    zero_gradient_fraction,
)
from robcomp.evaluate.sweeps import eps_sweep
from robcomp.evaluate.transfer import transfer_matrix
from robcomp.models import create
from robcomp.train import TrainConfig, fit


class InputQuantizer(nn.Module):
    """Rounds pixels to a few levels: a non-differentiable defense that masks gradients."""

    def __init__(self, levels: int = 8) -> None:
        super().__init__()
        self.levels = levels

    def forward(self, x: Tensor) -> Tensor:
        return torch.round(x * (self.levels - 1)) / (self.levels - 1)


def _points(digits: DataSplits, n: int = 200) -> tuple[Tensor, Tensor]:
    return digits.test.head(n).tensors()


@pytest.fixture(scope="module")
def quantized(trained_cnn: nn.Module) -> nn.Module:
    return nn.Sequential(InputQuantizer(), trained_cnn).eval()


def test_plain_model_raises_no_flag(trained_cnn: nn.Module, digits: DataSplits) -> None:
    x, y = _points(digits)
    flags = diagnose(trained_cnn, x, y, norm="linf", eps=0.1)
    assert {f.check for f in flags} >= {
        "zero_gradients",
        "unbounded_attack",
        "steps_converged",
        "randomness",
    }
    assert not any(f.raised for f in flags), [f.message for f in flags if f.raised]
    assert summarize(flags) == "no sign of gradient masking"


def test_masked_model_is_flagged_and_bpda_breaks_it(
    trained_cnn: nn.Module, quantized: nn.Module, digits: DataSplits
) -> None:
    x, y = _points(digits)
    assert accuracy(quantized, digits.test.head(200)) > 0.85  # the defense keeps clean accuracy
    assert zero_gradient_fraction(quantized, x, y) == 1.0
    flags = {f.check: f for f in diagnose(quantized, x, y, norm="linf", eps=0.1)}
    assert flags["zero_gradients"].raised
    assert "BPDA" in flags["zero_gradients"].message
    assert summarize(list(flags.values())).startswith("POSSIBLE GRADIENT MASKING")

    attack = PGD(eps=0.1, steps=20, random_start=False)
    bpda_model = nn.Sequential(IdentityGradient(InputQuantizer()), trained_cnn).eval()
    result = worst_case(
        quantized,
        {
            "naive-pgd": (quantized, attack),
            "bpda-pgd": (bpda_model, attack),
            "transfer-from-undefended": (trained_cnn, attack),
        },
        digits.test.head(200),
    )
    naive, bpda = result.per_attack["naive-pgd"], result.per_attack["bpda-pgd"]
    assert naive > 0.8, "zero gradients: the naive attack should not move"
    assert bpda < naive - 0.4, (naive, bpda)
    assert result.robust_accuracy <= min(result.per_attack.values())
    assert result.strongest in ("bpda-pgd", "transfer-from-undefended")
    assert "naive-pgd" not in set(result.found_by)  # it never breaks a point first
    assert check_black_box(
        naive, {"transfer": result.per_attack["transfer-from-undefended"]}
    ).raised


def test_straight_through_forward_is_exact(
    trained_cnn: nn.Module, quantized: nn.Module, digits: DataSplits
) -> None:
    x, _ = _points(digits, 32)
    hybrid = StraightThrough(quantized, trained_cnn)
    assert torch.equal(hybrid(x), quantized(x))
    x = x.clone().requires_grad_(True)
    hybrid(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_monotone_and_randomness_checks(trained_cnn: nn.Module, digits: DataSplits) -> None:
    assert not check_monotone({0.0: 0.9, 0.1: 0.5, 0.2: 0.1}).raised
    flag = check_monotone({0.0: 0.9, 0.1: 0.3, 0.2: 0.45})
    assert flag.raised and "from eps=0.1 to eps=0.2" in flag.message

    class AlwaysRandom(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return trained_cnn(x + 0.05 * torch.randn_like(x))

    x, _ = _points(digits, 16)
    assert check_randomness(AlwaysRandom(), x).raised
    assert not check_randomness(trained_cnn, x).raised


def test_eps_sweep_stops_below_chance(trained_cnn: nn.Module, digits: DataSplits) -> None:
    sweep = eps_sweep(
        trained_cnn, PGD(eps=0.0, steps=10), digits.test.head(150),
        [0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5], num_classes=10,
    )  # fmt: skip
    assert sweep.eps[0] == 0.0 and sweep.robust_accuracy[0] > 0.85
    assert all(b <= a + 0.02 for a, b in zip(sweep.robust_accuracy, sweep.robust_accuracy[1:]))
    assert sweep.stopped_early and sweep.robust_accuracy[-1] < 0.1
    assert all(r >= 0.1 for r in sweep.robust_accuracy[:-1])


def test_transfer_matrix(trained_cnn: nn.Module, digits: DataSplits) -> None:
    torch.manual_seed(1)
    other = create("tiny_mlp", 10, digits.in_shape, mean=digits.mean, std=digits.std)
    fit(other, digits, TrainConfig(epochs=8, lr=0.05, batch_size=64), seed=1)
    models = {"cnn": trained_cnn, "mlp": other}
    m = transfer_matrix(models, models, PGD(eps=0.1, steps=10), digits.test.head(150))
    assert m.sources == ["cnn", "mlp"] and m.targets == ["cnn", "mlp"]
    for s in models:
        for t in models:
            assert 0.0 <= m.accuracy[s][t] <= 1.0
        # white-box (diagonal) is stronger than transfer to the other model
        other_name = "mlp" if s == "cnn" else "cnn"
        assert m.accuracy[s][s] < m.accuracy[s][other_name]


def test_without_gradients_takes_the_worst_route_and_shares_the_black_box(
    trained_cnn: nn.Module, quantized: nn.Module, digits: DataSplits
) -> None:
    points = digits.test.head(100)
    pgd, square = PGD(eps=0.1, steps=10), Square(eps=0.1, queries=200)
    cache: dict[tuple[str, str, float], RouteOutcome] = {}
    twin = nn.Sequential(IdentityGradient(InputQuantizer()), trained_cnn).eval()
    result, worst = evaluate_without_gradients(
        quantized, twin, pgd, points, surrogate=trained_cnn, black_box=square, cache=cache
    )
    assert set(worst.per_attack) == {"bpda", "transfer", "black-box"}
    assert result.robust_accuracy == worst.robust_accuracy <= min(worst.per_attack.values())
    assert result.robust_accuracy < 0.5  # BPDA and transfer break the input quantizer
    assert sum(worst.found_counts().values()) == round(
        (result.clean_accuracy - result.robust_accuracy) * len(points)
    )
    assert 0 < result.mean_norm <= 0.1 + 1e-6
    assert len(cache) == 1
    cached = next(iter(cache.values()))
    evaluate_without_gradients(
        quantized, twin, PGD(eps=0.1, steps=5), points, black_box=square, cache=cache
    )
    assert len(cache) == 1 and next(iter(cache.values())) is cached  # one Square run, shared
    with pytest.raises(ValueError, match="threat model"):
        evaluate_without_gradients(
            quantized, twin, PGD(eps=0.05), points, black_box=square, cache=cache
        )


def test_threat_model_check_accepts_an_empty_batch() -> None:
    empty = torch.zeros(0, 1, 8, 8)
    assert len(check_threat_model(empty, empty.clone(), 0.1, "linf")) == 0
