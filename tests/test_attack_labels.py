"""Attack labels identify the configuration: a metric is keyed by (cell, name, label, eps)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

import pytest

from robcomp.attacks import ATTACKS
from robcomp.attacks.presets import preset_attacks, preset_names
from robcomp.config import ConfigError, fields_of
from robcomp.experiments.spec import EvaluateSpec

STRINGS = ("linf", "l2", "l1", "standard", "rand", "custom", "logits", "crossentropy", "EN", "L1")


def _bases(name: str) -> list[Any]:
    """Valid starting points: the defaults, and for the cascade also its custom version (whose
    ``attacks`` can only change there)."""
    cls = ATTACKS.get(name)
    bases = [cls(eps=0.1)]
    if name == "autoattack":
        bases.append(cls(eps=0.1, version="custom", attacks=("apgd-ce",)))
    return bases


def _candidates(value: Any) -> list[Any]:
    """Other values of the same kind, some of which the attack accepts."""
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value + 2]
    if isinstance(value, float):
        return [value * 0.5, value + 0.5, 0.01]
    if value is None:
        return [0.01, 1]
    if isinstance(value, str):
        return [s for s in STRINGS if s != value]
    if isinstance(value, tuple):
        return [("apgd-ce", "square"), ("apgd-dlr",)]
    raise AssertionError(f"no candidate values for {value!r}")


def _settings(name: str) -> list[str]:
    """The configuration fields (a run-time field, such as a generative model, is none)."""
    cls = ATTACKS.get(name)
    assert isinstance(cls, type)
    return [name for name in fields_of(cls) if name != "eps"]


CASES = [(name, setting) for name in ATTACKS.names() for setting in _settings(name)]


@pytest.mark.parametrize(("name", "setting"), CASES, ids=[f"{n}.{s}" for n, s in CASES])
def test_changing_any_setting_but_eps_changes_the_label(name: str, setting: str) -> None:
    labels: dict[str, Any] = {}
    for base in _bases(name):
        labels.setdefault(base.label(), base)
        current = getattr(base, setting)
        for value in (v for v in _candidates(current) if v != current):
            try:
                variant = dataclasses.replace(base, **{setting: value})
            except (ValueError, TypeError):
                continue  # a value this attack rejects
            label = variant.label()
            clash = labels.get(label, variant)
            assert clash == variant, f"{variant} and {clash} share the label {label}"
            labels[label] = variant
    if len(labels) == len(_bases(name)):  # nothing else was accepted: a one-value setting
        hint = typing.get_type_hints(ATTACKS.get(name))[setting]
        assert typing.get_origin(hint) is Literal and len(typing.get_args(hint)) == 1, (
            f"no valid other value of {name}.{setting} was tried"
        )


@pytest.mark.parametrize("name", ATTACKS.names())
def test_eps_is_not_part_of_the_label(name: str) -> None:
    cls = ATTACKS.get(name)
    assert cls(eps=0.1).label() == cls(eps=0.2).label()


def test_defaults_keep_the_short_forms_and_settings_are_spelled_out() -> None:
    pgd, square = ATTACKS.get("pgd"), ATTACKS.get("square")
    assert pgd(eps=0.1, steps=20).label() == "pgd20-linf"
    assert pgd(eps=0.1, steps=20, restarts=5, step_size=0.01).label() == "pgd20-linf-s0.01-r5"
    assert pgd(eps=0.1, random_start=False).label() == "pgd10-linf-no-random-start"
    assert square(eps=0.1, p_init=0.3).label() == "square5000-linf-p_init=0.3"
    assert ATTACKS.get("apgd-ce")(eps=0.1, restarts=5).label() == "apgd-ce100-linf-r5"
    # two step sizes that round alike still get two labels
    assert pgd(eps=0.1, step_size=0.01).label() != pgd(eps=0.1, step_size=0.0100001).label()
    assert pgd(eps=0.1, step_size=2 / 255).label() == "pgd10-linf-s2/255"
    assert pgd(eps=0.1, step_size=2 / 255 + 1e-12).label() != "pgd10-linf-s2/255"


def test_two_attacks_with_one_label_and_eps_are_a_config_error_naming_both() -> None:
    spec = EvaluateSpec(
        attacks=(
            {"name": "pgd", "eps": 0.1, "steps": 20},
            {"name": "fgsm", "eps": 0.1},
            {"name": "pgd", "eps": [0.05, 0.1], "steps": 20, "restarts": 1},
        )
    )
    with pytest.raises(ConfigError) as err:
        spec.build_attacks()
    message = str(err.value)
    assert "pgd20-linf" in message and "attacks[0]" in message and "attacks[3]" in message
    # another eps or another setting is another metric
    EvaluateSpec(
        attacks=(
            {"name": "pgd", "eps": [0.05, 0.1], "steps": 20},
            {"name": "pgd", "eps": 0.1, "steps": 20, "restarts": 5},
        )
    ).build_attacks()


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_builds_with_distinct_labels(preset: str) -> None:
    attacks = EvaluateSpec(preset=preset).build_attacks()
    assert len({(a.label(), a.eps) for a in attacks}) == len(preset_attacks(preset))
