"""The Attack protocol and the attack registry."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from robcomp.registry import Registry

ATTACKS: Registry[Any] = Registry("attack")


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

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor: ...

    def label(self) -> str:
        """A short name for tables, e.g. ``pgd10-linf``."""
        ...
