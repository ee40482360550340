"""Attack labels that identify the configuration.

A metric is stored under (cell, name, attack label, eps), so two attacks with one label would
overwrite each other's numbers: a weaker PGD (fewer restarts, a smaller step) could silently
replace a stronger one. A label is therefore the attack's short name followed by every setting
that differs from the attack's defaults, read from its dataclass fields so that no setting added
later can be forgotten: ``pgd20-linf`` with the defaults, ``pgd20-linf-r5-s0.01`` with five
restarts and step size 0.01. ``eps`` is left out: it is part of the metric's key already.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from robcomp.config import is_runtime

# Settings common enough to earn a short prefix (``-r5`` rather than ``-restarts=5``); the
# APGD labels used ``-r`` and ``-eot`` before this rule, so their default forms are unchanged.
ABBREVIATIONS = {
    "restarts": "r",
    "step_size": "s",
    "eot_iter": "eot",
    "queries": "q",
    "seed": "seed",
}


def _text(value: Any) -> str:
    """A value as label text; floats exactly (``2/255``, else ``repr``: the shortest text that
    round-trips), so two different step sizes never print alike."""
    if value is None:
        return "none"
    if isinstance(value, tuple | list):
        return "+".join(map(_text, value))
    if isinstance(value, float):
        pixels = round(value * 255)  # image budgets are usually whole 8-bit pixel levels
        return f"{pixels}/255" if pixels and pixels / 255 == value else repr(value)
    return str(value)


def _setting(name: str, value: Any) -> str:
    if isinstance(value, bool):
        words = name.replace("_", "-")
        return words if value else f"no-{words}"
    if name in ABBREVIATIONS:
        return f"{ABBREVIATIONS[name]}{_text(value)}"
    return f"{name}={_text(value)}"


def _default(field: dataclasses.Field[Any]) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def settings_label(attack: Any, short: str, shown: Iterable[str] = ()) -> str:
    """``short`` followed by ``-<setting>`` for each field of the dataclass ``attack`` that is not
    at its default, in field order. ``shown`` names the fields ``short`` already spells out
    (``steps`` and ``norm`` in ``pgd10-linf``); ``eps`` never appears."""
    skip = {"eps", *shown}
    parts = [short]
    for field in dataclasses.fields(attack):
        if not field.init or is_runtime(field) or field.name in skip:
            continue
        value = getattr(attack, field.name)
        default = _default(field)
        if default is dataclasses.MISSING or value != default:
            parts.append(_setting(field.name, value))
    return "-".join(parts)
