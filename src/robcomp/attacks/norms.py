"""Threat models as three small operations: random start, steepest-ascent direction, projection.

As in Foolbox 3, a norm is all an iterative attack needs to know about its threat model.
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch
from torch import Tensor

NormName = Literal["linf", "l2"]


def _flat(t: Tensor) -> Tensor:
    return t.reshape(len(t), -1)


def _per_sample(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a (B,) vector to broadcast over a (B, ...) tensor."""
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


class Norm(Protocol):
    name: str

    def measure(self, delta: Tensor) -> Tensor:
        """Per-sample norm of a perturbation, shape (B,)."""
        ...

    def random_start(self, x: Tensor, eps: float, generator: torch.Generator) -> Tensor:
        """A random perturbation inside the eps ball."""
        ...

    def ascent(self, grad: Tensor) -> Tensor:
        """The unit-norm steepest-ascent direction for this norm."""
        ...

    def project(self, delta: Tensor, eps: float) -> Tensor:
        """The closest perturbation inside the eps ball."""
        ...


class Linf:
    name = "linf"

    def measure(self, delta: Tensor) -> Tensor:
        return _flat(delta).abs().amax(dim=1)

    def random_start(self, x: Tensor, eps: float, generator: torch.Generator) -> Tensor:
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype)
        return (2 * u - 1) * eps

    def ascent(self, grad: Tensor) -> Tensor:
        return grad.sign()

    def project(self, delta: Tensor, eps: float) -> Tensor:
        return delta.clamp(-eps, eps)


class L2:
    name = "l2"

    def measure(self, delta: Tensor) -> Tensor:
        return _flat(delta).norm(p=2, dim=1)

    def random_start(self, x: Tensor, eps: float, generator: torch.Generator) -> Tensor:
        # Uniform in the L2 ball: a Gaussian direction with radius eps * U^(1/d).
        direction = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        direction = direction / _per_sample(self.measure(direction).clamp_min(1e-12), x)
        d = x[0].numel()
        radius = eps * torch.rand(len(x), generator=generator, dtype=x.dtype) ** (1.0 / d)
        return direction * _per_sample(radius, x)

    def ascent(self, grad: Tensor) -> Tensor:
        return grad / _per_sample(self.measure(grad).clamp_min(1e-12), grad)

    def project(self, delta: Tensor, eps: float) -> Tensor:
        norms = self.measure(delta)
        factor = torch.where(norms > eps, eps / norms.clamp_min(1e-12), torch.ones_like(norms))
        return delta * _per_sample(factor, delta)


NORMS: dict[str, Norm] = {"linf": Linf(), "l2": L2()}


def get_norm(name: str) -> Norm:
    try:
        return NORMS[name]
    except KeyError:
        raise ValueError(f"unknown norm {name!r}; choose from {', '.join(NORMS)}") from None
