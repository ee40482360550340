"""The Attack contract, checked on every registered attack through its public interface only.

For each attack that takes an ``eps``, in each norm it accepts, on a tiny seeded CNN and 1x8x8
and 3x8x8 inputs: the output is inside the eps ball (up to float rounding) and inside [0, 1];
the same seed gives the same output; shape, dtype and device are kept; an empty batch works;
the model's parameters, buffers and their ``.grad`` are untouched and the model is left in the
mode it was in. Minimal-norm attacks at ``eps=inf`` get the contract of an unbounded attack.
Budgets are cut through constructor arguments, so a new or rewritten attack (native Square,
FAB-T) is covered as soon as it is registered.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import robcomp.models
from robcomp.attacks import ATTACKS, Attack
from robcomp.evaluate import check_threat_model

EPS = {"linf": 0.1, "l2": 0.5, "l1": 2.0}
NORMS = ("linf", "l2", "l1")
SHAPES = [(1, 8, 8), (3, 8, 8)]
N_POINTS = 6
NUM_CLASSES = 5
# Small budgets, applied to whichever of these fields an attack has.
CHEAP: dict[str, Any] = {
    "steps": 4,
    "restarts": 1,
    "n_target_classes": 2,
    "queries": 40,
    "binary_search_steps": 2,
    "eot_iter": 1,
}
# The cascade's members have fixed budgets (the standard ones are tested in test_cascade.py);
# two cheap members keep it a cascade.
CASCADE = {"version": "custom", "attacks": ("fgsm", "pgd")}


def fields(name: str) -> dict[str, dataclasses.Field[Any]]:
    cls = ATTACKS.get(name)
    if not dataclasses.is_dataclass(cls):
        return {}
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def unbounded_by_default(name: str) -> bool:
    field = fields(name).get("eps")
    return field is not None and field.default == math.inf


def skip_reason(name: str) -> str | None:
    if "eps" not in fields(name):
        return "takes no eps"
    if "manifold" in fields(name):
        return "a manifold attack: needs a generative model, covered by tests/test_manifold.py"
    return None


def build_any(name: str, eps: float = 0.1) -> Attack:
    """The attack in the first norm it supports."""
    for norm in NORMS:
        try:
            return build(name, norm, eps)
        except pytest.skip.Exception:
            continue
    raise AssertionError(f"{name} supports none of {NORMS}")


def build(name: str, norm: str, eps: float, seed: int = 0) -> Attack:
    """The attack with cheap settings, or pytest.skip if it does not support ``norm``."""
    known = fields(name)
    options: dict[str, Any] = {k: v for k, v in CHEAP.items() if k in known}
    if name == "autoattack":
        options = dict(CASCADE)
    options["seed"] = seed
    try:
        return ATTACKS.get(name)(eps=eps, norm=norm, **options)  # type: ignore[no-any-return]
    except ValueError as error:
        if "norm" in str(error):
            pytest.skip(f"{name} does not support {norm}")
        raise


CASES = [
    pytest.param(name, marks=pytest.mark.skip(reason=reason) if reason else ())
    for name in ATTACKS.names()
    for reason in [skip_reason(name)]
]
UNBOUNDED = [name for name in ATTACKS.names() if unbounded_by_default(name)]


def tiny_model(shape: tuple[int, ...]) -> nn.Module:
    torch.manual_seed(0)
    model = robcomp.models.create("tiny_cnn", NUM_CLASSES, shape)
    return model.eval()  # parameters require grad, as a freshly built model's do


def tiny_data(model: nn.Module, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Seeded inputs, labelled with the model's predictions except the last point, which the
    model misclassifies (so every attack meets a point it must not need to attack)."""
    x = torch.rand((N_POINTS, *shape), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    y[-1] = (y[-1] + 1) % NUM_CLASSES
    return x, y


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name, p in model.named_parameters():
        assert p.grad is not None
        state[f"{name}.grad"] = p.grad.clone()
    return state


@pytest.mark.parametrize("shape", SHAPES, ids=["1x8x8", "3x8x8"])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", CASES)
def test_bounded_contract(name: str, norm: str, shape: tuple[int, ...]) -> None:
    eps = EPS[norm]
    attack = build(name, norm, eps, seed=3)
    model = tiny_model(shape)
    for p in model.parameters():  # a stale gradient the attack must neither use up nor zero
        p.grad = torch.randn_like(p)
    before = snapshot(model)
    x, y = tiny_data(model, shape)
    x_before = x.clone()

    x_adv = attack(model, x, y)

    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and x_adv.device == x.device
    check_threat_model(x, x_adv, eps, norm, where=attack.label())  # the ball (float rounding
    # tolerance only) and [0, 1]
    assert torch.equal(x, x_before), "the attack modified its input"
    after = snapshot(model)
    for key, value in before.items():
        assert torch.equal(after[key], value), f"the attack changed the model's {key}"
    assert all(p.requires_grad for p in model.parameters())
    assert not model.training and not any(m.training for m in model.modules())
    again = build(name, norm, eps, seed=3)(model, x, y)
    assert torch.equal(again, x_adv), "not deterministic under a fixed seed"


@pytest.mark.parametrize("name", CASES)
def test_empty_batch(name: str) -> None:
    attack = build_any(name)
    model = tiny_model((1, 8, 8))
    x, y = torch.rand(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)
    x_adv = attack(model, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and x_adv.device == x.device


@pytest.mark.parametrize("name", CASES)
def test_leaves_a_training_model_in_training_mode(name: str) -> None:
    # Attacking a model in train mode is the caller's mistake (BatchNorm statistics move), but
    # the attack must not silently switch the model to eval for the rest of the program.
    attack = build_any(name)
    model = tiny_model((1, 8, 8))
    x, y = tiny_data(model, (1, 8, 8))
    model.train()
    attack(model, x, y)
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("name", UNBOUNDED)
def test_unbounded_contract(name: str) -> None:
    # eps=inf: a minimal-norm attack returns its minimal adversarial examples. Each point it
    # changes is misclassified, and a point the model already misclassifies is left alone.
    attack: Attack = ATTACKS.get(name)(**{k: v for k, v in CHEAP.items() if k in fields(name)})
    assert attack.eps == math.inf
    model = tiny_model((1, 8, 8))
    x, y = tiny_data(model, (1, 8, 8))
    x_adv = attack(model, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    check_threat_model(x, x_adv, math.inf, attack.norm, where=attack.label())
    changed = (x_adv != x).flatten(1).any(1)
    with torch.no_grad():
        wrong = model(x_adv).argmax(1) != y
    assert bool(wrong[changed].all()), "a changed point is not adversarial"
    assert not bool(changed[-1]), "a point the model already misclassifies was changed"
    assert torch.equal(attack(model, x, y), x_adv), "not deterministic under a fixed seed"
