"""Named evaluation suites: light and heavy attack strengths per dataset.

``shen-light`` / ``shen-heavy`` are the settings of Shen et al. (2024, Tables 4 and 5) on
Office-31 images: very small budgets because their images are 224x224. The per-dataset presets
use the budgets the field reports for each dataset (MNIST 0.1/0.3 L∞; CIFAR 2/255 and 8/255 L∞,
0.25 and 0.5 L2), with the same family of attacks.
"""

from __future__ import annotations

from typing import Any

from robcomp.attacks.base import ATTACKS

Spec = dict[str, Any]


def _suite(linf: float, l2: float, steps: int = 20) -> list[Spec]:
    return [
        {"name": "fgsm", "eps": linf},
        {"name": "pgd", "eps": linf, "steps": steps},
        {"name": "pgd", "norm": "l2", "eps": l2, "steps": steps},
    ]


PRESETS: dict[str, list[Spec]] = {
    "mnist-light": _suite(0.1, 1.0),
    "mnist-heavy": _suite(0.3, 2.0, steps=40),
    "cifar-light": _suite(2 / 255, 0.25),
    "cifar-heavy": _suite(8 / 255, 0.5),
    "digits-light": _suite(0.05, 0.5),
    "digits-heavy": _suite(0.1, 1.0),
}

# Shen et al. Tables 4/5 (light/heavy): attack -> (light eps, heavy eps). Added once the
# corresponding attacks are registered.
SHEN = {
    ("deepfool", "linf"): (0.0003, 0.004),
    ("pgd", "linf"): (0.0003, 0.004),
    ("fgsm", "linf"): (0.0003, 0.004),
    ("cw", "l2"): (0.03, 0.4),
    ("ddn", "l2"): (0.003, 0.24),
    ("ead", "l1"): (1.0, 10.0),
    ("salt-and-pepper", "l2"): (1.0, 15.0),
}


def _shen(strength: int) -> list[Spec]:
    return [
        {"name": name, "norm": norm, "eps": eps[strength]}
        for (name, norm), eps in SHEN.items()
        if name in ATTACKS
    ]


def preset_names() -> list[str]:
    return sorted([*PRESETS, "shen-light", "shen-heavy"])


def preset_attacks(name: str) -> list[Spec]:
    """The attack specs of a named preset."""
    if name == "shen-light":
        return _shen(0)
    if name == "shen-heavy":
        return _shen(1)
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose from {', '.join(preset_names())}")
    return [dict(s) for s in PRESETS[name]]
