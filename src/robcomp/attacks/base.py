"""The Attack protocol and the attack registry."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from robcomp.registry import Registry


@runtime_checkable
class Attack(Protocol):
    """``attack(model, x, y) -> x_adv``: inputs in [0, 1], ``eps`` in pixel units of the norm.

    The attack does not police itself: the evaluator checks that every ``x_adv`` is inside the
    eps ball and inside [0, 1], and runs it with the model in eval mode and parameters frozen.
    """

    @property
    def eps(self) -> float: ...

    @property
    def norm(self) -> str: ...

    @property
    def uses_gradients(self) -> bool:
        """Whether the attack needs the model's gradients; False for score-based and noise
        attacks (Square, salt-and-pepper), which a model without gradients cannot mask and
        which the gradient-masking checklist compares with the gradient attacks."""
        ...

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor: ...

    def label(self) -> str:
        """A short name for tables, e.g. ``pgd10-linf``."""
        ...


# An attack class (a frozen dataclass) or a function building one from its fields.
AttackFactory = Callable[..., Attack]
ATTACKS: Registry[AttackFactory] = Registry("attack")


def check_eps(eps: float, attack: str, *, unbounded: bool = False) -> None:
    """Reject an eps no threat model has: negative, NaN, or infinite for a bounded attack."""
    if not eps >= 0 or (math.isinf(eps) and not unbounded):
        allowed = "a number >= 0 (or inf, unbounded)" if unbounded else "a finite number >= 0"
        raise ValueError(f"{attack}: eps must be {allowed}, got {eps}")


def check_positive(obj: Any, *names: str, strict: bool = True) -> None:
    """Each named field of ``obj`` must be a finite number > 0 (``strict``) or >= 0."""
    for name in names:
        value = getattr(obj, name)
        ok = math.isfinite(value) and (value > 0 if strict else value >= 0)
        if not ok:
            bound = "> 0" if strict else ">= 0"
            raise ValueError(f"{name} must be a finite number {bound}, got {value}")


# Third-party libraries some attacks wrap, with the pip requirement that provides each (robcomp
# is installed from a checkout, so "pip install robcomp[...]" would name no real package).
LIBRARIES = {"foolbox": "foolbox==3.3.4"}


def missing_library(attack: Any) -> str | None:
    """A one-line message if ``attack`` (or a member of a cascade) needs a library that is not
    installed, else None; checked when the experiment is loaded, before any cell runs."""
    needed = list(getattr(attack, "requires", ()))
    members = getattr(attack, "members", None)
    if callable(members):
        for _, member in members():
            needed += getattr(member, "requires", ())
    for module in dict.fromkeys(needed):
        if importlib.util.find_spec(module) is None:
            requirement = LIBRARIES.get(module, module)
            return (
                f"the {attack.label()} attack needs {module}, which is not installed; "
                f"install it with: pip install '{requirement}' (or pip install -e . in the "
                "robcomp checkout, which installs it)"
            )
    return None


@contextmanager
def parameters_frozen(model: nn.Module) -> Iterator[None]:
    """Turn off parameter gradients inside, restoring each flag afterwards.

    The evaluator already freezes them; library attacks that call ``.backward()`` (Foolbox's)
    would otherwise accumulate ``.grad`` into the caller's model when used on their own.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
