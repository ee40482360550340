"""The AutoAttack cascade and the wrapped official attacks (fab-t, square)."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from torch import Tensor, nn

import robcomp.data
import robcomp.models
import robcomp.train
from robcomp.attacks import ATTACKS, Attack
from robcomp.attacks.apgd import APGDCE, APGDDLR, APGDT, AutoAttackNorm
from robcomp.attacks.cascade import Cascade, CascadeResult
from robcomp.attacks.fab import FABT
from robcomp.attacks.square import Square
from robcomp.config import ConfigError, build_component
from robcomp.evaluate import attack_batch, check_threat_model
from test_apgd import NoisyModel

GENEROUS = {"linf": 0.3, "l2": 3.0}


@pytest.fixture(scope="module")
def digits(
    frozen_digits_cnn: tuple[nn.Module, Tensor, Tensor],
) -> tuple[nn.Module, Tensor, Tensor]:
    return frozen_digits_cnn


def predictions(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x).argmax(1)


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return float((predictions(model, x) == y).float().mean())


# --- the wrapped official attacks -----------------------------------------------------------

CHEAP = {
    "fab-t": {"steps": 10, "n_target_classes": 3},
    "square": {"queries": 200},
    "autoattack": {},
}


@pytest.mark.parametrize("name", ["fab-t", "square", "autoattack"])
def test_registered_and_constructible_from_eps_alone(name: str) -> None:
    cls = ATTACKS.get(name)
    attack = cls(eps=0.1)
    assert {"eps", "norm", "seed"} <= {f.name for f in dataclasses.fields(cls)}
    assert attack.norm == "linf" and isinstance(attack.label(), str)
    assert cls.__doc__ is not None and "2020" in cls.__doc__
    with pytest.raises(ValueError, match="linf, l2"):
        cls(eps=0.1, norm="l1")


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("name", ["fab-t", "square", "autoattack"])
def test_contract(digits: tuple[nn.Module, Tensor, Tensor], name: str, norm: str) -> None:
    model, x, y = digits
    x, y = x[:64], y[:64]
    eps = GENEROUS[norm]
    attack = ATTACKS.get(name)(eps=eps, norm=norm, seed=5, **CHEAP[name])
    x_before = x.clone()
    x_adv = attack(model, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    check_threat_model(x, x_adv, eps, norm, where=attack.label())
    assert torch.equal(x, x_before), "the attack modified its input"
    assert accuracy(model, x, y) > 0.85
    assert accuracy(model, x_adv, y) < 0.1
    assert torch.equal(attack(model, x, y), x_adv), "not deterministic under a fixed seed"


@pytest.mark.parametrize(
    "attack", [FABT(eps=0.1, steps=5, n_target_classes=2), Square(eps=0.1, queries=50)]
)
def test_fab_and_square_leave_the_global_rng_and_the_parameter_flags(
    digits: tuple[nn.Module, Tensor, Tensor], attack: Attack
) -> None:
    model, x, y = digits
    trainable = robcomp.models.create("tiny_cnn", 10, (1, 8, 8))
    trainable.load_state_dict(model.state_dict())
    trainable.eval()  # parameters require grad, as a freshly built model's do
    state = torch.random.get_rng_state()
    attack(trainable, x[:16], y[:16])
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(p.requires_grad and p.grad is None for p in trainable.parameters())


def test_square_returns_points_inside_the_threat_model(
    digits: tuple[nn.Module, Tensor, Tensor],
) -> None:
    # Square's Linf steps clamp to x + eps, which float32 can round just past eps: the
    # perturbation, measured again, must be within float rounding of eps.
    model, x, y = digits
    eps = 0.1
    x_adv = Square(eps=eps, queries=100)(model, x, y)
    assert float((x_adv - x).abs().amax()) <= eps + 1e-7
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0


def test_square_rejects_non_images(digits: tuple[nn.Module, Tensor, Tensor]) -> None:
    model, _, _ = digits
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        Square(eps=0.1)(model, torch.rand(4, 64), torch.zeros(4, dtype=torch.long))


# --- the cascade -----------------------------------------------------------------------------


def test_standard_version_pins_the_reference_settings() -> None:
    members = dict(Cascade(eps=8 / 255, seed=7).members())
    assert list(members) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert members["apgd-ce"] == APGDCE(eps=8 / 255, steps=100, restarts=1, seed=7)
    assert members["apgd-t"] == APGDT(
        eps=8 / 255, steps=100, restarts=1, n_target_classes=9, seed=7
    )
    assert members["fab-t"] == FABT(eps=8 / 255, steps=100, restarts=1, n_target_classes=9, seed=7)
    assert members["square"] == Square(eps=8 / 255, queries=5000, p_init=0.8, restarts=1, seed=7)


def test_rand_and_custom_versions_pin_the_reference_settings() -> None:
    rand = dict(Cascade(eps=0.5, norm="l2", version="rand").members())
    assert rand == {
        "apgd-ce": APGDCE(eps=0.5, norm="l2", restarts=1, eot_iter=20),
        "apgd-dlr": APGDDLR(eps=0.5, norm="l2", restarts=1, eot_iter=20),
    }
    custom = dict(
        Cascade(eps=0.1, version="custom", attacks=("apgd-dlr", "apgd-ce", "pgd")).members()
    )
    assert list(custom) == ["apgd-dlr", "apgd-ce", "pgd"]
    assert custom["apgd-ce"].restarts == 5 and custom["apgd-dlr"].restarts == 5  # type: ignore[attr-defined]
    assert custom["apgd-ce"].steps == 100  # type: ignore[attr-defined]
    assert custom["pgd"].eps == 0.1 and custom["pgd"].norm == "linf"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"version": "custom"}, "non-empty"),
        ({"attacks": ("apgd-ce",)}, "only used with version='custom'"),
        ({"version": "custom", "attacks": ("apgd-cee",)}, "Did you mean 'apgd-ce'"),
        ({"version": "custom", "attacks": ("apgd-ce", "apgd-ce")}, "more than once"),
        ({"version": "custom", "attacks": ("autoattack",)}, "cannot contain"),
        ({"norm": "l1"}, "linf, l2"),
    ],
)
def test_invalid_cascades_are_explained(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Cascade(eps=0.1, **options)  # type: ignore[arg-type]


def test_builds_from_a_config_mapping() -> None:
    spec = {"name": "autoattack", "eps": "8/255", "version": "custom", "attacks": ["apgd-ce"]}
    cascade = build_component(ATTACKS, spec, "evaluate.attacks[0]")
    assert cascade == Cascade(eps=8 / 255, version="custom", attacks=("apgd-ce",))
    with pytest.raises(ConfigError, match="version"):
        build_component(ATTACKS, {"name": "autoattack", "eps": 0.1, "version": "plus"}, "a")


class CheapCascade(Cascade):
    """The standard cascade's logic with small budgets, so every member gets points to break."""

    def members(self) -> list[tuple[str, Attack]]:
        eps, norm, seed = self.eps, self.norm, self.seed
        return [
            ("apgd-ce", APGDCE(eps=eps, norm=norm, steps=5, seed=seed)),
            ("apgd-t", APGDT(eps=eps, norm=norm, steps=10, n_target_classes=3, seed=seed)),
            ("fab-t", FABT(eps=eps, norm=norm, steps=10, n_target_classes=3, seed=seed)),
            ("square", Square(eps=eps, norm=norm, queries=200, seed=seed)),
        ]


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.05), ("l2", 0.5)])
def test_run_reports_a_consistent_story(
    digits: tuple[nn.Module, Tensor, Tensor], norm: AutoAttackNorm, eps: float
) -> None:
    model, x, y = digits
    result = CheapCascade(eps=eps, norm=norm).run(model, x, y)
    assert isinstance(result, CascadeResult)
    check_threat_model(x, result.x_adv, eps, norm)
    names = ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert list(result.robust_after) == names == list(result.seconds_per_attack)
    after = [result.clean_accuracy, *result.robust_after.values()]
    assert all(b <= a for a, b in itertools.pairwise(after)), after
    assert after[1] < after[0]  # APGD-CE breaks some points
    pred = predictions(model, result.x_adv)
    found = result.found_by
    assert len(found) == len(x)
    for i, by in enumerate(found):
        if by is None:  # robust: the clean point, still classified correctly
            assert pred[i] == y[i] and torch.equal(result.x_adv[i], x[i])
        else:
            assert pred[i] != y[i], f"point {i} said to be broken by {by} is not misclassified"
    # The robust accuracy after each attack is what found_by says.
    for k, name in enumerate(names):
        broken = sum(by in ("clean", *names[: k + 1]) for by in found)
        assert result.robust_after[name] == pytest.approx(1 - broken / len(x))
    assert result.robust_after["square"] == pytest.approx(accuracy(model, result.x_adv, y))


def test_custom_with_one_attack_is_that_attack(digits: tuple[nn.Module, Tensor, Tensor]) -> None:
    model, x, y = digits
    x, y = x[:100], y[:100]
    cascade = Cascade(eps=0.1, version="custom", attacks=("apgd-ce",), seed=2)
    result = cascade.run(model, x, y)
    alone = APGDCE(eps=0.1, restarts=5, seed=2)(model, x, y)  # the reference's custom settings
    broken = predictions(model, alone) != y
    assert [by is not None for by in result.found_by] == broken.tolist()
    assert torch.equal(result.x_adv[broken], alone[broken])
    assert result.robust_after["apgd-ce"] == pytest.approx(accuracy(model, alone, y))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_standard_at_a_large_eps_breaks_everything(
    digits: tuple[nn.Module, Tensor, Tensor], norm: AutoAttackNorm
) -> None:
    model, x, y = digits
    cascade = Cascade(eps=GENEROUS[norm], norm=norm)
    outcome = attack_batch(model, cascade, x, y)  # the evaluator's threat-model checks
    assert float(outcome.success.float().mean()) >= 0.99
    result = cascade.run(model, x, y)
    assert result.robust_after["square"] <= 0.01
    assert torch.equal(result.x_adv, outcome.x_adv)


def test_rand_version_is_deterministic_on_a_randomized_model(
    digits: tuple[nn.Module, Tensor, Tensor],
) -> None:
    model, x, y = digits
    noisy = NoisyModel(model)
    cascade = Cascade(eps=0.3, version="rand", seed=4)
    state = torch.random.get_rng_state()
    first = cascade.run(noisy, x[:32], y[:32])
    assert torch.equal(torch.random.get_rng_state(), state)
    second = cascade.run(noisy, x[:32], y[:32])
    assert torch.equal(first.x_adv, second.x_adv) and first.found_by == second.found_by
    assert first.robust_after["apgd-dlr"] <= 0.1


class Recording:
    """An attack that records the batch size it is given and delegates to ``inner``."""

    def __init__(self, inner: Attack, sizes: list[int]) -> None:
        self.inner, self.sizes = inner, sizes

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        self.sizes.append(len(x))
        return self.inner(model, x, y)


@pytest.mark.parametrize("eps", [0.05, 2.0])
def test_points_per_attack_counts_the_survivors_each_attack_got(
    digits: tuple[nn.Module, Tensor, Tensor], eps: float
) -> None:
    model, x, y = digits
    sizes: list[int] = []

    class Recorded(Cascade):
        def members(self) -> list[tuple[str, Attack]]:
            return [
                (name, Recording(attack, sizes))  # type: ignore[misc]
                for name, attack in [
                    ("fgsm", ATTACKS.get("fgsm")(eps=self.eps)),
                    ("apgd-ce", APGDCE(eps=self.eps, steps=5)),
                    ("apgd-t", APGDT(eps=self.eps, steps=5, n_target_classes=3)),
                ]
            ]

    result = Recorded(eps=eps).run(model, x, y)
    assert list(result.points_per_attack) == ["fgsm", "apgd-ce", "apgd-t"]
    # Each attack got exactly the points robust after the one before it (none, once none
    # was left: then it is not called at all).
    before = [result.clean_accuracy, *result.robust_after.values()][:-1]
    expected = [round(a * len(x)) for a in before]
    assert list(result.points_per_attack.values()) == expected
    assert sizes == [n for n in expected if n]
    if eps > 1:
        assert expected[-1] == 0  # everything broke before the last attack: it never ran


def test_standard_cascade_refuses_non_images_before_its_first_stage() -> None:
    """Square, the last stage, cannot take (N, C, L) signals: the cascade must say so before
    APGD and FAB spend minutes on them."""
    calls = []
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 10))
    model.register_forward_pre_hook(lambda module, inputs: calls.append(1))
    x, y = torch.rand(4, 3, 4), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        Cascade(eps=0.1).run(model.eval(), x, y)
    assert not calls
