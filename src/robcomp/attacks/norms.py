"""Threat models as three small operations: random start, steepest-ascent direction, projection.

As in Foolbox 3, a norm is all an iterative attack needs to know about its threat model.
"""

from __future__ import annotations

import math
from typing import Literal, Protocol

import torch
from torch import Tensor

NormName = Literal["linf", "l2", "l1"]


def _flat(t: Tensor) -> Tensor:
    # flatten, not reshape(len(t), -1): the -1 is ambiguous for an empty batch
    return t.flatten(1)


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
        # Drawn on the CPU generator (seeded, device-independent), then moved to x's device.
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype)
        return ((2 * u - 1) * eps).to(x.device)

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
        return (direction * _per_sample(radius, x)).to(x.device)

    def ascent(self, grad: Tensor) -> Tensor:
        return grad / _per_sample(self.measure(grad).clamp_min(1e-12), grad)

    def project(self, delta: Tensor, eps: float) -> Tensor:
        norms = self.measure(delta)
        factor = torch.where(norms > eps, eps / norms.clamp_min(1e-12), torch.ones_like(norms))
        return delta * _per_sample(factor, delta)


class L1:
    """The L1 threat model, for sparse perturbations.

    * ``random_start`` is uniform in the L1 ball (the cross-polytope).
    * ``ascent`` is the sparse step of SLIDE, the "sparse L1 descent" of Tramèr & Boneh 2019
      ("Adversarial Training and Robustness for Multiple Perturbations"): the sign of the gradient
      on its ``top_fraction`` largest coordinates (at least one), scaled to unit L1 norm. The exact
      L1 steepest-ascent direction moves one coordinate only, which stalls as soon as that pixel
      hits the [0, 1] box; spreading the step over the top coordinates is the usual compromise.
      PGD additionally drops coordinates pinned at a box face (:func:`box_feasible`), as Foolbox's
      SLIDE (``SparseL1DescentAttack``) and Croce & Hein 2021 ("Mind the box: l1-APGD") do.
    * ``project`` is the exact Euclidean projection onto the L1 ball, the sort-based algorithm of
      Duchi et al. 2008 ("Efficient Projections onto the l1-Ball for Learning in High
      Dimensions"), O(d log d) per sample. It ignores the box; clamping ``x + delta`` to [0, 1]
      afterwards only shrinks coordinates, so the result stays in the ball (it is not the exact
      projection onto ball-and-box of Croce & Hein 2021).
    """

    name = "l1"
    top_fraction = 0.01  # SLIDE's 99th-percentile threshold (also Foolbox's default)

    def measure(self, delta: Tensor) -> Tensor:
        return _flat(delta).abs().sum(dim=1)

    def random_start(self, x: Tensor, eps: float, generator: torch.Generator) -> Tensor:
        # d + 1 exponential spacings normalised by their sum are a uniform point of the simplex;
        # dropping the slack coordinate gives a uniform point of {w >= 0, sum(w) <= 1}, and
        # independent random signs make it uniform in the L1 ball.
        n, d = len(x), x[0].numel()
        spacings = torch.empty(n, d + 1, dtype=torch.float64).exponential_(generator=generator)
        w = spacings[:, :d] / spacings.sum(dim=1, keepdim=True)  # (B, d), sum(w) < 1
        signs = torch.randint(0, 2, (n, d), generator=generator, dtype=torch.int8) * 2 - 1
        return (signs * w * eps).to(dtype=x.dtype, device=x.device).reshape(x.shape)

    def ascent(self, grad: Tensor) -> Tensor:
        g = _flat(grad)  # (B, d)
        k = max(1, math.ceil(self.top_fraction * g.shape[1]))
        top = g.abs().topk(k, dim=1).indices  # (B, k)
        direction = torch.zeros_like(g).scatter_(1, top, g.gather(1, top).sign())
        return (direction / k).reshape(grad.shape)

    def project(self, delta: Tensor, eps: float) -> Tensor:
        if math.isinf(eps):
            return delta
        if eps <= 0:
            return torch.zeros_like(delta)
        v = _flat(delta)
        # float64 where the device has it: the cumulative sums over d coordinates would
        # otherwise round the result's norm a few ulps past eps.
        work = v if v.device.type == "mps" else v.double()
        magnitude = work.abs()  # (B, d)
        outside = magnitude.sum(dim=1) > eps
        if not bool(outside.any()):
            return delta
        mu = magnitude.sort(dim=1, descending=True).values  # (B, d)
        cumsum = mu.cumsum(dim=1)
        j = torch.arange(1, v.shape[1] + 1, device=v.device, dtype=work.dtype)
        # rho = the largest j with mu_j > (cumsum_j - eps) / j; j = 1 always qualifies (eps > 0).
        rho = ((mu * j > cumsum - eps) * j).amax(dim=1).long()  # (B,), 1-based
        theta = (cumsum.gather(1, (rho - 1).unsqueeze(1)).squeeze(1) - eps) / rho  # (B,)
        shrunk = work.sign() * (magnitude - theta.unsqueeze(1)).clamp_min(0.0)
        projected = torch.where(outside.unsqueeze(1), shrunk, work)
        return projected.to(delta.dtype).reshape(delta.shape)


def box_feasible(grad: Tensor, x: Tensor, low: float = 0.0, high: float = 1.0) -> Tensor:
    """Zero the gradient where an ascent step would push ``x`` out of ``[low, high]``.

    Used by sparse (L1) steps, which spend their whole budget on a few coordinates: a coordinate
    already at a box face whose gradient points outward would absorb the step and be clamped back.
    """
    blocked = ((x <= low) & (grad < 0)) | ((x >= high) & (grad > 0))
    return grad.masked_fill(blocked, 0.0)


NORMS: dict[str, Norm] = {"linf": Linf(), "l2": L2(), "l1": L1()}


def get_norm(name: str) -> Norm:
    try:
        return NORMS[name]
    except KeyError:
        raise ValueError(f"unknown norm {name!r}; choose from {', '.join(NORMS)}") from None
