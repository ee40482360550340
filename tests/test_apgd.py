"""APGD (apgd-ce, apgd-dlr, apgd-t): the attack contract, the paper's schedule and losses, and
agreement with the authors' implementation (pyautoattack, the fra31/auto-attack code)."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from torch import Tensor, nn

import robcomp.data
import robcomp.models
import robcomp.train
from robcomp.attacks import ATTACKS, PGD, apgd
from robcomp.attacks.apgd import (
    APGDCE,
    APGDDLR,
    APGDT,
    AutoAttackNorm,
    checkpoints,
    dlr_loss,
    targeted_dlr_loss,
)
from robcomp.attacks.norms import get_norm
from robcomp.evaluate import check_threat_model

N_POINTS = 200
GENEROUS = {"linf": 0.3, "l2": 3.0}
# Our APGD-T and the authors' on the same model, points, eps and iterations: robust accuracies
# may differ by at most 2 points, and so may the share of points one breaks and the other does
# not. (The untargeted APGDs must agree on every point, see
# test_breaks_exactly_the_points_the_official_apgd_breaks.)
CROSS_CHECK_TOLERANCE = 0.02


@pytest.fixture(scope="module")
def digits(
    frozen_digits_cnn: tuple[nn.Module, Tensor, Tensor],
) -> tuple[nn.Module, Tensor, Tensor]:
    model, x, y = frozen_digits_cnn
    return model, x[:N_POINTS], y[:N_POINTS]


def robust_accuracy(model: nn.Module, x_adv: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(x_adv).argmax(1) == y).float().mean())


def assert_agree(model: nn.Module, ours: Tensor, theirs: Tensor, y: Tensor) -> None:
    with torch.no_grad():
        ours_robust = model(ours).argmax(1) == y
        theirs_robust = model(theirs).argmax(1) == y
    gap = abs(float(ours_robust.float().mean()) - float(theirs_robust.float().mean()))
    assert gap <= CROSS_CHECK_TOLERANCE, f"robust accuracy differs by {gap:.3f}"
    disagree = float((ours_robust != theirs_robust).float().mean())
    assert disagree <= CROSS_CHECK_TOLERANCE, f"{disagree:.3f} of the points disagree"


# --- the schedule and the losses -------------------------------------------------------------


def test_checkpoints_are_the_papers_for_100_steps() -> None:
    # p_j = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 of 100 iterations.
    assert [w for w, _ in checkpoints(100)] == [22, 41, 57, 70, 80, 87, 93, 99]
    assert [k for _, k in checkpoints(100)] == [22, 19, 16, 13, 10, 7, 6, 6]


@pytest.mark.parametrize("steps", [1, 5, 10, 20, 37, 100, 1000])
def test_checkpoint_windows_shrink_to_six_percent(steps: int) -> None:
    points = checkpoints(steps)
    windows = [k for _, k in points]
    assert windows == sorted(windows, reverse=True)
    assert min(windows) >= max(int(0.06 * steps), 1)
    assert all(b - a == k for (a, _), (b, k) in itertools.pairwise(points))
    assert points[-1][0] <= steps


def test_dlr_is_positive_exactly_when_misclassified_and_scale_invariant() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 10, generator=gen)
    y = torch.randint(0, 10, (64,), generator=gen)
    loss = dlr_loss(logits, y, y)
    assert torch.equal(loss > 0, logits.argmax(1) != y)
    # Invariant to shifting and positive rescaling of the logits (the point of DLR).
    torch.testing.assert_close(dlr_loss(3.0 * logits + 7.0, y, y), loss, rtol=1e-4, atol=1e-4)
    target = (y + 1) % 10
    t_loss = targeted_dlr_loss(logits, y, target)
    z = logits.gather(1, torch.stack([y, target], 1))
    assert torch.equal(t_loss > 0, z[:, 1] > z[:, 0])
    torch.testing.assert_close(
        targeted_dlr_loss(2.0 * logits - 1.0, y, target), t_loss, rtol=1e-4, atol=1e-4
    )


# --- the contract, per registered name --------------------------------------------------------

NAMES = ["apgd-ce", "apgd-dlr", "apgd-t"]


@pytest.mark.parametrize("name", NAMES)
def test_registered_and_constructible_from_eps_alone(name: str) -> None:
    cls = ATTACKS.get(name)
    attack = cls(eps=0.1)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert {"eps", "norm", "seed", "steps", "restarts", "eot_iter"} <= set(fields)
    assert (attack.steps, attack.restarts, attack.eot_iter, attack.rho) == (100, 1, 1, 0.75)
    assert isinstance(attack.label(), str) and attack.label().startswith(name)
    assert cls.__doc__ is not None and "Croce & Hein 2020" in cls.__doc__
    with pytest.raises(dataclasses.FrozenInstanceError):
        attack.eps = 0.2
    with pytest.raises(ValueError, match="linf, l2"):
        cls(eps=0.1, norm="l1")
    with pytest.raises(ValueError):
        cls(eps=-1.0)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("name", NAMES)
def test_contract(digits: tuple[nn.Module, Tensor, Tensor], name: str, norm: str) -> None:
    model, x, y = digits
    x, y = x[:64], y[:64]
    eps = GENEROUS[norm]
    options = {"n_target_classes": 3} if name == "apgd-t" else {}
    attack = ATTACKS.get(name)(eps=eps, norm=norm, steps=10, seed=3, **options)
    x_before = x.clone()
    x_adv = attack(model, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    check_threat_model(x, x_adv, eps, norm, where=attack.label())
    assert torch.equal(x, x_before), "the attack modified its input"
    clean = robust_accuracy(model, x, y)
    assert clean > 0.85
    assert robust_accuracy(model, x_adv, y) < 0.1
    assert torch.equal(attack(model, x, y), x_adv), "not deterministic under a fixed seed"


def test_points_already_misclassified_are_returned_unchanged(
    digits: tuple[nn.Module, Tensor, Tensor],
) -> None:
    model, x, y = digits
    wrong = (y + 1) % 10  # every point is "misclassified" against these labels
    x_adv = APGDCE(eps=0.1, steps=5)(model, x[:32], wrong[:32])
    assert torch.equal(x_adv, x[:32])


def test_too_few_classes_is_a_clear_error() -> None:
    model = robcomp.models.create("tiny_mlp", 3, (1, 8, 8)).eval()
    x, y = torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="at least 4 classes"):
        APGDT(eps=0.1, steps=2)(model, x, y)
    APGDDLR(eps=0.1, steps=2)(model, x, y)  # 3 classes are enough for untargeted DLR


# --- restarts, EOT, seeds --------------------------------------------------------------------


def test_restarts_only_reattack_unbroken_points(digits: tuple[nn.Module, Tensor, Tensor]) -> None:
    model, x, y = digits
    one = APGDCE(eps=0.05, steps=10, restarts=1)(model, x, y)
    three = APGDCE(eps=0.05, steps=10, restarts=3)(model, x, y)
    with torch.no_grad():
        broken_once = model(one).argmax(1) != y
    # Restart 1 is the same run, and the points it broke are never touched again.
    assert torch.equal(three[broken_once], one[broken_once])
    assert robust_accuracy(model, three, y) <= robust_accuracy(model, one, y)


def test_eot_on_a_deterministic_model_changes_nothing(
    digits: tuple[nn.Module, Tensor, Tensor],
) -> None:
    # The mean of 2 identical gradients is exactly the gradient, so the runs must coincide.
    model, x, y = digits
    x, y = x[:64], y[:64]
    plain = APGDDLR(eps=0.05, steps=8)(model, x, y)
    assert torch.equal(APGDDLR(eps=0.05, steps=8, eot_iter=2)(model, x, y), plain)


class NoisyModel(nn.Module):
    """A randomized defence: Gaussian noise on the input, drawn from the global generator."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x + 0.05 * torch.randn_like(x))


def test_eot_is_deterministic_on_a_randomized_model_and_restores_the_global_rng(
    digits: tuple[nn.Module, Tensor, Tensor],
) -> None:
    model, x, y = digits
    noisy = NoisyModel(model)
    attack = APGDCE(eps=0.05, steps=5, eot_iter=4, seed=1)
    state = torch.random.get_rng_state()
    first = attack(noisy, x[:32], y[:32])
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(attack(noisy, x[:32], y[:32]), first)


def test_different_seeds_give_different_starts(digits: tuple[nn.Module, Tensor, Tensor]) -> None:
    model, x, y = digits
    a = APGDCE(eps=0.02, steps=2, seed=0)(model, x[:32], y[:32])
    b = APGDCE(eps=0.02, steps=2, seed=1)(model, x[:32], y[:32])
    assert not torch.equal(a, b)


# --- strength: against our PGD and the authors' APGD ----------------------------------------


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.05), ("linf", 0.1), ("l2", 0.5)])
def test_at_least_as_strong_as_pgd10(
    digits: tuple[nn.Module, Tensor, Tensor], norm: AutoAttackNorm, eps: float
) -> None:
    model, x, y = digits
    pgd = robust_accuracy(model, PGD(eps=eps, norm=norm, steps=10)(model, x, y), y)
    apgd = robust_accuracy(model, APGDCE(eps=eps, norm=norm, steps=20)(model, x, y), y)
    assert apgd <= pgd + 0.01, f"APGD-CE {apgd:.3f} vs PGD-10 {pgd:.3f}"


REFERENCE_NORM = {"linf": "Linf", "l2": "L2"}
CROSS_CHECK_STEPS = 20


@pytest.mark.filterwarnings("ignore:there are .* points with zero gradient")
@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.05), ("linf", 0.1), ("l2", 0.5)])
@pytest.mark.slow
def test_targeted_matches_the_official_apgd_t(
    digits: tuple[nn.Module, Tensor, Tensor], norm: AutoAttackNorm, eps: float
) -> None:
    autopgd = pytest.importorskip("pyautoattack.autopgd_base", exc_type=ImportError)
    model, x, y = digits
    targets = 9  # AutoAttack's standard setting
    attack = APGDT(eps=eps, norm=norm, steps=CROSS_CHECK_STEPS, n_target_classes=targets)
    ours = attack(model, x, y)
    reference = autopgd.APGDAttack_targeted(
        model, n_iter=CROSS_CHECK_STEPS, norm=REFERENCE_NORM[norm], n_restarts=1, eps=eps,
        seed=0, n_target_classes=targets, device=x.device,
    )  # fmt: skip
    with torch.random.fork_rng():
        theirs = reference.perturb(x, y)
    assert_agree(model, ours, theirs, y)


@pytest.mark.filterwarnings("ignore:there are .* points with zero gradient")
@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.05), ("linf", 0.1), ("l2", 0.5)])
@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_breaks_exactly_the_points_the_official_apgd_breaks(
    digits: tuple[nn.Module, Tensor, Tensor], loss: str, norm: AutoAttackNorm, eps: float
) -> None:
    # Same starts, same schedule: the same verdict on every point, although ours stops
    # iterating on a point once it is broken and the official code does not.
    autopgd = pytest.importorskip("pyautoattack.autopgd_base", exc_type=ImportError)
    model, x, y = digits
    cls = APGDCE if loss == "ce" else APGDDLR
    ours = cls(eps=eps, norm=norm, steps=CROSS_CHECK_STEPS, seed=0)(model, x, y)
    reference = autopgd.APGDAttack(
        model, n_iter=CROSS_CHECK_STEPS, norm=REFERENCE_NORM[norm], n_restarts=1, eps=eps,
        seed=0, loss=loss, device=x.device,
    )  # fmt: skip
    with torch.random.fork_rng():  # the reference reseeds the global generator
        theirs = reference.perturb(x, y)
    with torch.no_grad():
        ours_robust, theirs_robust = model(ours).argmax(1) == y, model(theirs).argmax(1) == y
    assert 0 < int(ours_robust.sum()) < len(y), "a case where nothing or everything breaks"
    assert torch.equal(ours_robust, theirs_robust)


# --- dropping broken points -------------------------------------------------------------------


def test_no_iteration_is_spent_on_a_broken_point(
    digits: tuple[nn.Module, Tensor, Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, x, y = digits
    sizes: list[int] = []
    broken: list[int] = []
    gradient = apgd._APGD._gradient

    def counting(self: apgd._APGD, *args: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        loss, logits, grad = gradient(self, *args)
        sizes.append(len(logits))
        broken.append(int((logits.argmax(1) != args[2]).sum()))
        return loss, logits, grad

    monkeypatch.setattr(apgd._APGD, "_gradient", counting)
    APGDCE(eps=0.05, steps=20)(model, x, y)
    assert sum(broken[:-1]) > 0
    # Each gradient pass attacks exactly the points the previous one left unbroken.
    assert sizes[1:] == [n - b for n, b in zip(sizes[:-1], broken[:-1])]


@pytest.mark.parametrize("name", NAMES)
def test_dropping_broken_points_changes_no_result(
    digits: tuple[nn.Module, Tensor, Tensor], monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    model, x, y = digits
    options = {"n_target_classes": 3} if name == "apgd-t" else {}
    attack = ATTACKS.get(name)(eps=0.05, steps=20, restarts=2, **options)
    compacted = attack(model, x, y)
    monkeypatch.setattr(apgd, "_compaction_period", lambda device: attack.steps + 1)
    kept = attack(model, x, y)  # every point iterates to the end
    with torch.no_grad():
        robust, robust_kept = model(compacted).argmax(1) == y, model(kept).argmax(1) == y
    assert 0 < int(robust.sum()) < len(y)
    assert torch.equal(robust, robust_kept)
    # Unbroken points ended on the same highest-loss iterate. (A broken point may differ:
    # without compaction it keeps the last misclassified iterate, with it the first.)
    assert torch.equal(compacted[robust], kept[robust])


# --- APGD-T: retiring points across targets ---------------------------------------------------


class Recorder:
    """Wraps APGD's private passes and runs to record what each one was given."""

    def __init__(self, x: Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
        self.x = x
        self.runs: list[dict[str, Tensor]] = []  # per run: attacked and broken positions in x
        self.passes: list[list[tuple[int, int]]] = []  # per run: (rows, broken) of each pass
        run, gradient, evaluate = apgd._APGD._run, apgd._APGD._gradient, apgd._APGD._evaluate

        def recording_run(attack: apgd._APGD, model: nn.Module, x: Tensor, *args: object,
                          **kwargs: object) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
            self.passes.append([])
            points, found, loss = run(attack, model, x, *args, **kwargs)  # type: ignore[arg-type]
            at = self.positions(x)
            self.runs.append({"attacked": at, "broken": at[found]})
            return points, found, loss

        def counted(inner, attack, model, x_adv, y, target):  # type: ignore[no-untyped-def]
            out = inner(attack, model, x_adv, y, target)
            self.passes[-1].append((len(y), int((out[1].argmax(1) != y).sum())))
            return out

        monkeypatch.setattr(apgd._APGD, "_run", recording_run)
        monkeypatch.setattr(apgd._APGD, "_gradient", lambda *a: counted(gradient, *a))
        monkeypatch.setattr(apgd._APGD, "_evaluate", lambda *a: counted(evaluate, *a))

    def positions(self, rows: Tensor) -> Tensor:
        """Where each row of ``rows`` (clean inputs) is in ``x``."""
        same = (rows[:, None] == self.x[None]).flatten(2).all(2)
        assert bool((same.sum(1) == 1).all())
        return same.int().argmax(1)


def test_apgd_t_never_attacks_a_broken_point_again(
    digits: tuple[nn.Module, Tensor, Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, x, y = digits
    recorder = Recorder(x, monkeypatch)
    x_adv = APGDT(eps=0.05, steps=10, n_target_classes=4, restarts=2)(model, x, y)
    runs = recorder.runs
    assert len(runs) == 8  # 4 targets x 2 restarts, each still had points to attack
    with torch.no_grad():
        todo = model(x).argmax(1) == y
    for k, run in enumerate(runs):
        # Each run gets exactly the points correct on the clean input and unbroken so far.
        assert sorted(run["attacked"].tolist()) == todo.nonzero().squeeze(1).tolist(), k
        todo[run["broken"]] = False
    assert sum(len(run["broken"]) for run in runs[2:]) > 0, "later targets broke nothing"
    with torch.no_grad():
        assert torch.equal(model(x_adv).argmax(1) == y, todo)


def test_apgd_t_drops_broken_points_inside_each_run(
    digits: tuple[nn.Module, Tensor, Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, x, y = digits
    recorder = Recorder(x, monkeypatch)
    rows: list[int] = []
    hook = model.register_forward_hook(lambda module, args, out: rows.append(len(args[0])))
    try:
        APGDT(eps=0.05, steps=10, n_target_classes=3)(model, x, y)
    finally:
        hook.remove()
    assert sum(b for passes in recorder.passes for _, b in passes[:-1]) > 0
    for passes, run in zip(recorder.passes, recorder.runs, strict=True):
        # The start pass sees every attacked point; each later pass only the points the
        # passes before it left unbroken; a run that breaks all its points stops early.
        assert passes[0][0] == len(run["attacked"])
        assert [n for n, _ in passes[1:]] == [n - b for n, b in passes[:-1]]
        assert len(passes) <= 10 + 1
    # The model saw the clean batch once (for the targets), then exactly these passes.
    assert rows == [len(x)] + [n for passes in recorder.passes for n, _ in passes]


@pytest.mark.parametrize("momentum", [1.0, apgd.MOMENTUM])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_in_place_step_is_bitwise_the_plain_update(norm: AutoAttackNorm, momentum: float) -> None:
    # The step is computed in place for speed; it must round exactly like the plain expression
    # (the authors' order of operations), or verdicts could drift from the official ones.
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 8, 8, generator=gen)
    eps = 0.1 if norm == "linf" else 0.5
    attack = APGDCE(eps=eps, norm=norm)
    norm_ = get_norm(norm)
    lo, hi = (x - eps).clamp_min(0.0), (x + eps).clamp_max(1.0)
    x_prev = attack._project(x, lo, hi, x + 0.1 * torch.randn(x.shape, generator=gen), norm_)
    x_adv = x_prev if momentum == 1.0 else attack._project(x, lo, hi, x_prev + 0.05, norm_)
    grad = torch.randn(x.shape, generator=gen)
    eta = torch.rand(16, 1, 1, 1, generator=gen) * eps
    state = apgd._RunState(
        **{f.name: None for f in dataclasses.fields(apgd._RunState)}  # type: ignore[arg-type]
        | {"x": x, "lo": lo, "hi": hi, "x_adv": x_adv, "x_prev": x_prev, "grad": grad, "eta": eta}
    )
    z = attack._project(x, lo, hi, x_adv + eta * norm_.ascent(grad), norm_)
    v = x_adv + momentum * (z - x_adv) + (1.0 - momentum) * (x_adv - x_prev)
    expected = attack._project(x, lo, hi, v, norm_)
    before = [t.clone() for t in (x_adv, x_prev, grad)]
    assert torch.equal(attack._step(state, momentum, norm_), expected)
    assert all(torch.equal(a, b) for a, b in zip(before, (x_adv, x_prev, grad), strict=True))
