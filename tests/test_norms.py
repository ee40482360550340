"""Property tests for robcomp.attacks.norms: random start, ascent direction, projection."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import brentq, minimize

from robcomp.attacks.norms import L1, NORMS, box_feasible, get_norm

settings.register_profile(
    "robcomp-norms", deadline=None, derandomize=True, database=None, max_examples=60
)
PROFILE = settings.get_profile("robcomp-norms")

NAMES = sorted(NORMS)  # ["l1", "l2", "linf"]
# float32 rounding: a projected perturbation may exceed eps by a few ulps, never more.
REL, ABS = 1e-5, 1e-6


@st.composite
def batches(draw: st.DrawFn, max_dim: int = 12) -> torch.Tensor:
    """A (B, 1, d) float32 batch of perturbations: Gaussian, optionally rounded (ties, zeros)."""
    b = draw(st.integers(1, 4))
    d = draw(st.integers(1, max_dim))
    seed = draw(st.integers(0, 2**31))
    scale = draw(st.sampled_from([1e-3, 0.1, 1.0, 3.0]))
    values = torch.randn(b, 1, d, generator=torch.Generator().manual_seed(seed)) * scale
    if draw(st.booleans()):
        values = (values * 2).round() / 2  # many exact zeros and ties
    return values


eps_values = st.floats(0.01, 5.0, allow_nan=False)


def within(norms: torch.Tensor, eps: float) -> bool:
    return bool((norms <= eps * (1 + REL) + ABS).all())


@pytest.mark.parametrize("name", NAMES)
@PROFILE
@given(delta=batches(), eps=eps_values)
def test_projection_is_in_ball_and_idempotent(name: str, delta: torch.Tensor, eps: float) -> None:
    norm = get_norm(name)
    projected = norm.project(delta, eps)
    assert projected.shape == delta.shape and projected.dtype == delta.dtype
    assert within(norm.measure(projected), eps)
    again = norm.project(projected, eps)
    torch.testing.assert_close(again, projected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
@PROFILE
@given(delta=batches(), eps=eps_values, shrink=st.floats(0.0, 0.999))
def test_projection_keeps_points_inside_the_ball(
    name: str, delta: torch.Tensor, eps: float, shrink: float
) -> None:
    norm = get_norm(name)
    lengths = norm.measure(delta).clamp_min(1e-12)
    inside = delta * (shrink * eps / lengths).reshape(-1, 1, 1)
    assert within(norm.measure(inside), eps)
    strictly = norm.measure(inside) <= eps
    torch.testing.assert_close(
        norm.project(inside, eps)[strictly], inside[strictly], rtol=0.0, atol=0.0
    )


@pytest.mark.parametrize("name", NAMES)
@PROFILE
@given(b=st.integers(1, 8), d=st.integers(1, 64), eps=eps_values, seed=st.integers(0, 2**31))
def test_random_start_is_inside_the_ball(name: str, b: int, d: int, eps: float, seed: int) -> None:
    norm = get_norm(name)
    x = torch.rand(b, 1, d)
    start = norm.random_start(x, eps, torch.Generator().manual_seed(seed))
    assert start.shape == x.shape and start.dtype == x.dtype
    assert within(norm.measure(start), eps)


def _soft_threshold_projection(v: np.ndarray, eps: float) -> np.ndarray:
    """The projection as soft-thresholding at the theta >= 0 where ||w||_1 = eps, found by
    root-finding (brentq) instead of sorting."""
    magnitude = np.abs(v)
    if magnitude.sum() <= eps:
        return v
    theta = brentq(lambda t: np.maximum(magnitude - t, 0).sum() - eps, 0.0, magnitude.max())
    return np.sign(v) * np.maximum(magnitude - theta, 0)


def _qp_objective(v: np.ndarray, eps: float) -> float:
    """min ||w - v||^2 s.t. ||w||_1 <= eps by a generic solver (SLSQP, w = p - n, p, n >= 0)."""
    d = len(v)
    result = minimize(
        lambda z: float(np.sum((z[:d] - z[d:] - v) ** 2)),
        np.zeros(2 * d),
        jac=lambda z: np.concatenate([2 * (z[:d] - z[d:] - v), -2 * (z[:d] - z[d:] - v)]),
        method="SLSQP",
        bounds=[(0, None)] * (2 * d),
        constraints=[{"type": "ineq", "fun": lambda z: eps - z.sum()}],
        options={"ftol": 1e-12, "maxiter": 500},
    )
    assert result.x.sum() <= eps + 1e-6
    return float(result.fun)


@PROFILE
@given(
    v=st.lists(st.floats(-2.0, 2.0, allow_nan=False), min_size=1, max_size=6),
    eps=st.floats(0.05, 3.0),
)
def test_l1_projection_matches_scipy(v: list[float], eps: float) -> None:
    """Duchi et al.'s sort-based projection equals the root-finding answer, and no generic QP
    solver finds a closer point of the ball."""
    array = np.array(v)
    ours = L1().project(torch.tensor([v], dtype=torch.float64), eps)[0].numpy()
    np.testing.assert_allclose(ours, _soft_threshold_projection(array, eps), atol=1e-9)
    assert np.abs(ours).sum() <= eps + 1e-9
    assert float(np.sum((ours - array) ** 2)) <= _qp_objective(array, eps) + 1e-7


@PROFILE
@given(delta=batches(max_dim=200), eps=eps_values)
def test_l1_projection_satisfies_the_optimality_condition(delta: torch.Tensor, eps: float) -> None:
    """w is the projection of v onto the convex ball C iff <v - w, z - w> <= 0 for all z in C.

    The left side is linear in z, so its maximum over the L1 ball is at a vertex +-eps e_i:
    the condition is eps * ||v - w||_inf <= <v - w, w>.
    """
    v = delta.double().reshape(len(delta), -1)
    w = L1().project(v, eps)
    r = v - w
    lhs = eps * r.abs().amax(dim=1)
    rhs = (r * w).sum(dim=1)
    assert bool((lhs <= rhs + 1e-9).all())
    outside = v.abs().sum(dim=1) > eps
    torch.testing.assert_close(
        w.abs().sum(dim=1)[outside], torch.full_like(lhs, eps)[outside], rtol=1e-9, atol=1e-9
    )


def test_l1_projection_edge_cases() -> None:
    v = torch.tensor([[3.0, -1.0, 0.5]])
    assert torch.equal(L1().project(v, 0.0), torch.zeros_like(v))
    assert torch.equal(L1().project(v, math.inf), v)
    torch.testing.assert_close(L1().project(v, 1.0), torch.tensor([[1.0, 0.0, 0.0]]))
    # ties: two equal coordinates share the budget
    torch.testing.assert_close(
        L1().project(torch.tensor([[2.0, -2.0]]), 1.0), torch.tensor([[0.5, -0.5]])
    )


def test_l1_random_start_is_uniform_in_the_ball() -> None:
    """For the uniform distribution on the d-dim L1 ball, P(||w||_1 <= r eps) = r^d, so
    E ||w||_1 / eps = d / (d + 1); coordinates are sign-symmetric."""
    d, n = 4, 20000
    start = L1().random_start(torch.zeros(n, 1, d), 2.0, torch.Generator().manual_seed(0))
    radius = start.abs().sum(dim=(1, 2)) / 2.0
    assert abs(float(radius.mean()) - d / (d + 1)) < 0.01
    assert abs(float((radius <= 0.5).float().mean()) - 0.5**d) < 0.01
    assert abs(float((start > 0).float().mean()) - 0.5) < 0.01


@PROFILE
@given(delta=batches(max_dim=300))
def test_l1_ascent_is_a_sparse_unit_step_along_the_gradient(delta: torch.Tensor) -> None:
    grad = delta
    step = L1().ascent(grad)
    g, s = grad.reshape(len(grad), -1), step.reshape(len(step), -1)
    k = max(1, math.ceil(L1.top_fraction * g.shape[1]))
    assert bool(((s != 0).sum(dim=1) <= k).all())
    full = (g != 0).sum(dim=1) >= k
    torch.testing.assert_close(s.abs().sum(dim=1)[full], torch.ones(int(full.sum())))
    assert bool(((s * g).sum(dim=1) >= 0).all())
    # the step's coordinates are among the largest |g|
    threshold = g.abs().topk(k, dim=1).values[:, -1:]
    assert bool((g.abs()[s != 0] >= threshold.expand_as(g)[s != 0]).all())


def test_box_feasible_drops_only_outward_coordinates_at_a_face() -> None:
    x = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.5, 0.5])
    grad = torch.tensor([-1.0, 1.0, 1.0, -1.0, -1.0, 1.0])
    expected = torch.tensor([0.0, 1.0, 0.0, -1.0, -1.0, 1.0])
    assert torch.equal(box_feasible(grad, x), expected)


def test_get_norm_names_the_choices() -> None:
    with pytest.raises(ValueError, match="linf, l2, l1"):
        get_norm("l3")
