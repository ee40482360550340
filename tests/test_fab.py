"""Native FAB-T: threat model, determinism, work per iteration, and the official code as oracle.

The official code (pyautoattack, fra31/auto-attack) is the cross-check: its box projections
on random inputs, and its per-point verdicts with one restart, where both are deterministic.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import robcomp.attacks.fab
import robcomp.models
from robcomp.attacks.fab import FABT, project_l2, project_linf
from robcomp.evaluate import check_threat_model

try:
    from pyautoattack.fab_projections import projection_l2, projection_linf
    from pyautoattack.fab_pt import FABAttack_PT
except ImportError:
    HAS_REFERENCE = False
else:
    HAS_REFERENCE = True
needs_reference = pytest.mark.skipif(not HAS_REFERENCE, reason="pip install pyautoattack==0.2.0")

GENEROUS = {"linf": 0.3, "l2": 3.0}
# Radii at which the digits CNN keeps some points and loses others to FAB-T.
PARTIAL = {"linf": 0.05, "l2": 0.5}


@pytest.fixture(scope="module")
def digits(
    frozen_digits_cnn: tuple[nn.Module, Tensor, Tensor],
) -> tuple[nn.Module, Tensor, Tensor]:
    return frozen_digits_cnn


def distances(x: Tensor, x_adv: Tensor, norm: str) -> Tensor:
    delta = (x_adv - x).flatten(1)
    return delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)


def broken(model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor, eps: float, norm: str) -> Tensor:
    """(B,) the points whose returned input is misclassified within eps."""
    with torch.no_grad():
        wrong = model(x_adv).argmax(1) != y
    return wrong & (distances(x, x_adv, norm) <= eps * (1 + 1e-6))


class Counting(nn.Module):
    """Wraps a model and counts its forward calls and the rows they carry."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls = 0
        self.rows = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        self.rows += len(x)
        return self.model(x)


# --- the box projections against the authors' ------------------------------------------------


@needs_reference
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dim", [3, 64, 784])
def test_projections_match_the_official_ones(norm: str, dim: int) -> None:
    # Points in the box, normals with exact zeros, offsets from "already on the plane" to
    # "the box does not reach the plane", both signs: every branch of the authors' code.
    g = torch.Generator().manual_seed(dim)
    n = 300
    t = torch.rand(n, dim, generator=g, dtype=torch.float64)
    w = torch.randn(n, dim, generator=g, dtype=torch.float64)
    w[w.abs() < 0.2] = 0.0
    scale = torch.logspace(-3, 2, n, dtype=torch.float64)
    c = torch.randn(n, generator=g, dtype=torch.float64) * scale * w.abs().sum(1) / dim**0.5
    c[:5] = 0.0
    b = (w * t).sum(1) - c
    if norm == "linf":
        ours, official = project_linf, projection_linf
    else:
        ours, official = project_l2, projection_l2
    expected = official(t, w, b)
    got = ours(t, w, (w * t).sum(1) - b)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)
    # Both cases occur: points whose projection lands on the plane, and infeasible ones.
    on_plane = ((w * (t + got)).sum(1) - b).abs() < 1e-9
    assert 0 < int(on_plane.sum()) < n


@pytest.mark.parametrize("project", [project_linf, project_l2])
def test_projection_lands_on_the_plane_inside_the_box(project) -> None:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(1)
    t = torch.rand(50, 20, generator=g, dtype=torch.float64)
    w = torch.randn(50, 20, generator=g, dtype=torch.float64)
    c = 0.1 * torch.randn(50, generator=g, dtype=torch.float64)  # small: every plane reachable
    d = project(t, w, c)
    torch.testing.assert_close((w * d).sum(1), -c, rtol=0, atol=1e-10)
    assert float((t + d).min()) >= -1e-12 and float((t + d).max()) <= 1 + 1e-12


# --- the attack's contract -------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_threat_model_and_effect(digits: tuple[nn.Module, Tensor, Tensor], norm: str) -> None:
    model, x, y = digits
    x, y = x[:32], y[:32]
    eps = GENEROUS[norm]
    x_before = x.clone()
    x_adv = FABT(eps=eps, norm=norm, steps=20, n_target_classes=3)(model, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    check_threat_model(x, x_adv, eps, norm, where="fab-t")
    assert torch.equal(x, x_before), "the attack modified its input"
    assert float(broken(model, x, y, x_adv, eps, norm).float().mean()) > 0.9


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_deterministic_under_a_seed_with_random_restarts(
    digits: tuple[nn.Module, Tensor, Tensor], norm: str
) -> None:
    model, x, y = digits
    x, y = x[:24], y[:24]
    attack = FABT(eps=PARTIAL[norm], norm=norm, steps=10, restarts=3, n_target_classes=2, seed=3)
    state = torch.random.get_rng_state()
    first = attack(model, x, y)
    assert torch.equal(torch.random.get_rng_state(), state), "drew from the global generator"
    torch.manual_seed(123)  # the global generator must not matter
    assert torch.equal(attack(model, x, y), first)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_restarts_start_at_half_eps(norm: str) -> None:
    # The authors start later restarts at distance eps / 2 in a random direction.
    attack = FABT(eps=0.2, norm=norm)
    x = torch.full((64, 1, 4, 4), 0.5)  # far from the box walls: no clipping
    start = attack._random_start(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(distances(x, start, norm), torch.full((64,), 0.1))
    assert len(torch.unique(start.flatten(1), dim=0)) == 64


def test_model_gradients_untouched(digits: tuple[nn.Module, Tensor, Tensor]) -> None:
    model, x, y = digits
    trainable = robcomp.models.create("tiny_cnn", 10, (1, 8, 8))
    trainable.load_state_dict(model.state_dict())
    trainable.eval()  # parameters require grad, as a freshly built model's do
    FABT(eps=0.1, steps=5, n_target_classes=2)(trainable, x[:16], y[:16])
    assert all(p.requires_grad and p.grad is None for p in trainable.parameters())


def test_misclassified_points_are_returned_unchanged(
    digits: tuple[nn.Module, Tensor, Tensor],
) -> None:
    model, x, y = digits
    x, y = x[:32], y[:32]
    with torch.no_grad():
        y = torch.where(torch.arange(32) % 2 == 0, (model(x).argmax(1) + 1) % 10, y)
    x_adv = FABT(eps=GENEROUS["linf"], steps=10, n_target_classes=2)(model, x, y)
    assert torch.equal(x_adv[::2], x[::2])


def test_empty_batch(digits: tuple[nn.Module, Tensor, Tensor]) -> None:
    model, x, y = digits
    out = FABT(eps=0.1)(model, x[:0], y[:0])
    assert out.shape == x[:0].shape


def test_too_few_classes_is_a_clear_error() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 1))
    with pytest.raises(ValueError, match="at least 2 classes"):
        FABT(eps=0.1)(model, torch.rand(3, 1, 2, 2), torch.zeros(3, dtype=torch.long))


def test_validation() -> None:
    with pytest.raises(ValueError, match="linf, l2"):
        FABT(eps=0.1, norm="l1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="alpha_max and beta"):
        FABT(eps=0.1, beta=1.5)
    assert FABT(eps=0.1).label() == "fab-t100-linf"


# --- work per iteration ----------------------------------------------------------------------


def test_two_passes_per_iteration_and_no_per_target_overhead(
    digits: tuple[nn.Module, Tensor, Tensor],
) -> None:
    # Per iteration one gradient pass and one forward-only check, nothing per target or run
    # besides: one forward of the clean batch ranks the targets for all of them. (The
    # official code also runs the model three times more per target.)
    model, x, y = digits
    counting = Counting(model)
    steps, targets = 7, 3
    FABT(eps=1e-6, steps=steps, n_target_classes=targets)(counting, x[:16], y[:16])
    assert counting.calls == 1 + targets * 2 * steps


def test_broken_points_leave_the_batch(digits: tuple[nn.Module, Tensor, Tensor]) -> None:
    # At a generous eps FAB breaks every point within a few of its 100 iterations; the
    # official code keeps all of them in the batch to the end.
    model, x, y = digits
    x, y = x[:32], y[:32]
    counting = Counting(model)
    x_adv = FABT(eps=GENEROUS["linf"], steps=100, n_target_classes=1)(counting, x, y)
    assert bool(broken(model, x, y, x_adv, GENEROUS["linf"], "linf").all())
    assert counting.rows < 0.2 * (2 * 100 * len(x))


def test_retiring_every_few_iterations_keeps_the_verdicts(
    digits: tuple[nn.Module, Tensor, Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    # On an accelerator broken points leave the batch every few iterations: the points broken
    # in between keep iterating, which must change no verdict. Exercised on the CPU here.
    model, x, y = digits
    x, y = x[:48], y[:48]
    attack = FABT(eps=PARTIAL["linf"], steps=30, n_target_classes=3)
    every = broken(model, x, y, attack(model, x, y), attack.eps, "linf")
    monkeypatch.setattr(robcomp.attacks.fab, "_compaction_period", lambda device: 4)
    x_adv = attack(model, x, y)
    check_threat_model(x, x_adv, attack.eps, "linf", where="fab-t")
    assert torch.equal(broken(model, x, y, x_adv, attack.eps, "linf"), every)
    assert 0 < int(every.sum()) < len(x)


# --- same verdicts as the official FAB-T -----------------------------------------------------


def official_fab_t(model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: str) -> Tensor:
    attack = FABAttack_PT(
        model,
        norm={"linf": "Linf", "l2": "L2"}[norm],
        n_restarts=1,
        n_iter=100,
        eps=eps,
        seed=0,
        targeted=True,
        n_target_classes=9,
        device=x.device,
    )
    state = torch.random.get_rng_state()
    try:
        return attack.perturb(x, y)
    finally:
        torch.random.set_rng_state(state)


@needs_reference
@pytest.mark.slow
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_same_verdicts_as_the_official_fab_t(
    digits: tuple[nn.Module, Tensor, Tensor], norm: str
) -> None:
    # AutoAttack's settings (100 steps, 1 restart from the clean point, 9 targets): both are
    # deterministic, so the verdicts agree point by point up to float rounding.
    model, x, y = digits
    x, y = x[:48], y[:48]
    eps = PARTIAL[norm]
    ours = broken(model, x, y, FABT(eps=eps, norm=norm)(model, x, y), eps, norm)
    theirs = broken(model, x, y, official_fab_t(model, x, y, eps, norm), eps, norm)
    assert 0 < int(theirs.sum()) < len(x), "the setting must break some points, not all"
    assert int((ours != theirs).sum()) <= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_same_verdicts_on_cuda(digits: tuple[nn.Module, Tensor, Tensor]) -> None:
    model, x, y = digits
    x, y = x[:48], y[:48]
    attack = FABT(eps=PARTIAL["linf"], steps=30, n_target_classes=3)
    on_cpu = broken(model, x, y, attack(model, x, y), attack.eps, "linf")
    gpu = model.to("cuda")
    try:
        x_adv = attack(gpu, x.cuda(), y.cuda()).cpu()
    finally:
        model.to("cpu")
    check_threat_model(x, x_adv, attack.eps, "linf", where="fab-t cuda")
    assert int((broken(model, x, y, x_adv, attack.eps, "linf") != on_cpu).sum()) <= 1
