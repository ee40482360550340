"""Attacking models without useful gradients: BPDA / straight-through, transfer, black-box.

An int8 model, or any model with a non-differentiable layer (an input quantizer, a rounding
step), gives zero or meaningless input gradients, so a gradient attack on it fails and its
robust accuracy looks high: gradient masking, not robustness (Athalye et al. 2018; Shen et al.
saw it on their int8 models). The remedy is to keep the real model's forward pass and take
gradients from a differentiable twin (BPDA), and to add attacks that need no gradients.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from robcomp.attacks.base import Attack
from robcomp.attacks.pgd import PGD
from robcomp.attacks.square import Square
from robcomp.data.base import Split
from robcomp.evaluate.adversarial import AttackResult, attack_batch, attack_mode
from robcomp.models.capabilities import GradientFree


class _ValueOfFirstGradOfSecond(torch.autograd.Function):
    """Returns ``exact`` bit for bit; sends the incoming gradient to ``surrogate``."""

    @staticmethod
    def forward(ctx: Any, exact: Tensor, surrogate: Tensor) -> Tensor:
        return exact.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor]:
        return None, grad


class StraightThrough(nn.Module):
    """Forward in ``real``, backward through ``twin`` (Athalye et al. 2018, BPDA).

    The output equals ``real(x)`` exactly, so attacks are scored on the real model, while the
    gradient is that of ``twin(x)``: a fake-quant model for an int8 one, or the same network
    with its non-differentiable layer replaced by the identity.
    """

    def __init__(self, real: nn.Module, twin: nn.Module) -> None:
        super().__init__()
        self.real = real
        self.twin = twin
        # Evaluation wrapper: never switch an int8 model (which refuses training mode) to train.
        self.train(False)

    def forward(self, x: Tensor) -> Tensor:
        surrogate = self.twin(x)
        with torch.no_grad():
            exact = self.real(x)
        out: Tensor = _ValueOfFirstGradOfSecond.apply(exact, surrogate)
        return out


class IdentityGradient(nn.Module):
    """Wrap a non-differentiable layer: forward ``layer(x)``, backward as the identity (BPDA)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return x + (self.layer(x) - x).detach()


@dataclass(frozen=True)
class RouteOutcome:
    """One attack route scored on the real model, per point of a split.

    Attributes:
        robust: (n,) True where the point is classified correctly and the route's attack failed.
        clean: (n,) True where the point is classified correctly without attack.
        norms: (n,) perturbation norm in the attack's norm (0 for points not attacked).
        x_adv: (n, ...) the adversarial inputs (the clean input for points not attacked).
        seconds: wall-clock time of the route.
    """

    robust: Tensor
    clean: Tensor
    norms: Tensor
    x_adv: Tensor
    seconds: float


def run_route(
    model: nn.Module, attacked: nn.Module, attack: Attack, split: Split, batch_size: int = 256
) -> RouteOutcome:
    """Attack ``attacked`` with ``attack`` and score each adversarial point on ``model``.

    ``attacked`` is what the attack sees: ``StraightThrough(model, twin)`` for BPDA, a surrogate
    such as the fp32 model for a transfer attack, or ``model`` itself for a black-box attack.
    Points ``model`` already misclassifies are not attacked; every adversarial batch is checked
    against the threat model.
    """
    robust, clean, norms, x_advs = [], [], [], []
    start = time.perf_counter()
    for x, y in split.batches(batch_size):
        with attack_mode(model), torch.no_grad():
            ok = model(x).argmax(1) == y
        still, dist, x_adv = ok.clone(), torch.zeros(len(y), device=x.device), x.clone()
        if ok.any():
            outcome = attack_batch(attacked, attack, x[ok], y[ok])
            with attack_mode(model), torch.no_grad():
                still[ok] = model(outcome.x_adv).argmax(1) == y[ok]
            dist[ok], x_adv[ok] = outcome.norms.float(), outcome.x_adv
        robust.append(still)
        clean.append(ok)
        norms.append(dist)
        x_advs.append(x_adv)
    return RouteOutcome(
        robust=torch.cat(robust),
        clean=torch.cat(clean),
        norms=torch.cat(norms),
        x_adv=torch.cat(x_advs),
        seconds=time.perf_counter() - start,
    )


@dataclass(frozen=True)
class WorstCase:
    """Per-point worst case over several attack routes on the same model and threat model.

    Attributes:
        robust_accuracy: fraction of points no route broke (and classified correctly).
        per_attack: robust accuracy of each route alone.
        found_by: for each point, the first route (in the given order) that broke it; None if
            robust, ``"clean"`` if misclassified without attack.
        strongest: the route with the lowest robust accuracy alone.
        norms: for each point, the perturbation norm of the route that broke it first (nan if
            none did).
        seconds: total time of all routes.
    """

    robust_accuracy: float
    per_attack: dict[str, float]
    found_by: list[str | None]
    strongest: str
    norms: list[float]
    seconds: float

    def found_counts(self) -> dict[str, int]:
        """How many points each route broke first (misclassified clean points excluded)."""
        counts = dict.fromkeys(self.per_attack, 0)
        for name in self.found_by:
            if name is not None and name != "clean":
                counts[name] += 1
        return counts


def combine(outcomes: Mapping[str, RouteOutcome]) -> WorstCase:
    """The per-point worst case over routes run on the same points (see :func:`run_route`)."""
    if not outcomes:
        raise ValueError("worst case over no attack routes")
    first = next(iter(outcomes.values()))
    n = len(first.robust)
    found: list[str | None] = [None if ok else "clean" for ok in first.clean.tolist()]
    norms = [float("nan")] * n
    for name, outcome in outcomes.items():
        for i, ok in enumerate(outcome.robust.tolist()):
            if not ok and found[i] is None:
                found[i], norms[i] = name, float(outcome.norms[i])
    per_attack = {k: float(o.robust.float().mean()) for k, o in outcomes.items()}
    return WorstCase(
        robust_accuracy=sum(f is None for f in found) / max(n, 1),
        per_attack=per_attack,
        found_by=found,
        strongest=min(per_attack, key=lambda k: per_attack[k]),
        norms=norms,
        seconds=sum(o.seconds for o in outcomes.values()),
    )


def worst_case(
    model: nn.Module,
    attacks: Mapping[str, tuple[nn.Module, Attack]],
    split: Split,
    batch_size: int = 256,
) -> WorstCase:
    """Run every ``(attacked_model, attack)`` route (see :func:`run_route`), scored on ``model``,
    and take the per-point worst case."""
    return combine(
        {
            name: run_route(model, attacked, attack, split, batch_size)
            for name, (attacked, attack) in attacks.items()
        }
    )


def evaluate_without_gradients(
    model: nn.Module,
    twin: nn.Module,
    attack: Attack,
    split: Split,
    *,
    surrogate: nn.Module | None = None,
    black_box: Attack | None = None,
    batch_size: int = 256,
    cache: dict[tuple[str, str, float], RouteOutcome] | None = None,
) -> tuple[AttackResult, WorstCase]:
    """Robust accuracy of a model without useful gradients (an int8 model; any model with a
    non-differentiable layer), as the per-point worst case over three routes:

    - ``bpda``: ``attack`` through :class:`StraightThrough` (forward in ``model``, gradients
      from ``twin``);
    - ``transfer``: ``attack`` on ``surrogate`` (e.g. the fp32 model), scored on ``model``;
    - ``black-box``: a gradient-free attack (e.g. Square at its full query budget) on ``model``
      itself, at the same threat model. Its outcome is stored in ``cache`` under
      (label, norm, eps) so that several gradient attacks at one threat model share one run.

    Returns the result under ``attack``'s label and the breakdown (which route found what).
    """
    if black_box is not None and (black_box.norm, black_box.eps) != (attack.norm, attack.eps):
        raise ValueError(
            f"black-box attack {black_box.label()} ({black_box.norm}, eps={black_box.eps}) must "
            f"share the threat model of {attack.label()} ({attack.norm}, eps={attack.eps})"
        )
    routes = {"bpda": run_route(model, StraightThrough(model, twin), attack, split, batch_size)}
    if surrogate is not None:
        routes["transfer"] = run_route(model, surrogate, attack, split, batch_size)
    if black_box is not None:
        key = (black_box.label(), black_box.norm, float(black_box.eps))
        cache = {} if cache is None else cache
        if key not in cache:
            cache[key] = run_route(model, model, black_box, split, batch_size)
        routes["black-box"] = cache[key]
    worst = combine(routes)
    broken = [v for v in worst.norms if v == v]  # nan marks points no route broke
    result = AttackResult(
        attack=attack.label(),
        norm=attack.norm,
        eps=float(attack.eps),
        n=len(split),
        clean_accuracy=float(routes["bpda"].clean.float().mean()),
        robust_accuracy=worst.robust_accuracy,
        mean_norm=statistics.fmean(broken) if broken else float("nan"),
        median_norm=statistics.median(broken) if broken else float("nan"),
        seconds=worst.seconds,
        robust=torch.tensor([f is None for f in worst.found_by], dtype=torch.bool),
    )
    return result, worst


def black_box_for(
    attack: Attack, queries: int, seed: int, in_shape: tuple[int, ...]
) -> Attack | None:
    """The gradient-free attack that joins BPDA and transfer at ``attack``'s threat model:
    Square (Andriushchenko et al. 2020) with ``queries`` queries.

    None for norms Square lacks, and for inputs that are not images (``in_shape`` other than
    ``(C, H, W)``, e.g. 1-D signals): its perturbations are squares over two spatial axes.
    Such models are then attacked through BPDA and transfer only.
    """
    if attack.norm not in ("linf", "l2") or len(in_shape) != 3:
        return None
    return Square(eps=attack.eps, norm=attack.norm, queries=queries, seed=seed)  # type: ignore[arg-type]


@torch.no_grad()
def twin_agreement(model: GradientFree, x: Tensor, batch_size: int = 512) -> float:
    """Fraction of inputs on which ``model`` and its differentiable twin predict the same class."""
    same = 0
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        same += int((model(xb).argmax(1) == model.twin(xb).argmax(1)).sum())
    return same / max(len(x), 1)


def twin_agreements(
    model: GradientFree, x: Tensor, y: Tensor, *, norm: str, eps: float, steps: int = 10
) -> dict[str, float]:
    """How often ``model`` and the twin whose gradients attack it agree, on clean points
    (``clean``) and on PGD points crafted on the twin (``adv``): BPDA is only as strong as
    this agreement."""
    with attack_mode(model.twin):
        x_adv = PGD(eps=eps, norm=norm, steps=steps)(model.twin, x, y)  # type: ignore[arg-type]
    return {"clean": twin_agreement(model, x), "adv": twin_agreement(model, x_adv)}
