"""The native Square Attack: threat model, determinism, the exact speed levers, and its
sampling distributions and success rate against the authors' code (pyautoattack)."""

from __future__ import annotations

import statistics
import sys

import pytest
import torch
from torch import Tensor, nn

import robcomp.attacks.square as square_module
from robcomp.attacks.square import Square, _corners, eta, p_schedule, square_side
from robcomp.evaluate import check_threat_model

try:
    from pyautoattack.square import SquareAttack
except ImportError:
    SquareAttack = None
needs_reference = pytest.mark.skipif(SquareAttack is None, reason="pip install pyautoattack")

EPS = {"linf": 0.1, "l2": 0.5}


@pytest.fixture(scope="module")
def digits(
    frozen_digits_cnn: tuple[nn.Module, Tensor, Tensor],
) -> tuple[nn.Module, Tensor, Tensor]:
    return frozen_digits_cnn


class Recorder(nn.Module):
    """Wraps a model and keeps every batch it is asked about."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.batches: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        self.batches.append(x.clone())
        return self.model(x)

    @property
    def rows(self) -> int:
        return sum(len(b) for b in self.batches)


class Constant(nn.Module):
    """Always predicts class 0 with margin 1: no proposal is ever better than another."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tensor([1.0, 0.0]).expand(len(x), 2)


class NoSkip(Square):
    """The same attack with every proposal sent to the model."""

    _skip_noops = False


def broken(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x).argmax(1) != y


# --- contract ----------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_threat_model_determinism_and_seeds(
    digits: tuple[nn.Module, Tensor, Tensor], norm: str
) -> None:
    model, x, y = digits
    x, y = x[:64], y[:64]
    x_before = x.clone()
    attack = Square(eps=EPS[norm], norm=norm, queries=100, seed=3)  # type: ignore[arg-type]
    x_adv = attack(model, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    check_threat_model(x, x_adv, EPS[norm], norm, where=attack.label())
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert torch.equal(x, x_before), "the attack modified its input"
    assert broken(model, x_adv, y).sum() > broken(model, x, y).sum()
    assert torch.equal(attack(model, x, y), x_adv), "not deterministic under a fixed seed"
    other = Square(eps=EPS[norm], norm=norm, queries=100, seed=4)(model, x, y)  # type: ignore[arg-type]
    assert not torch.equal(other, x_adv)


def test_linf_output_is_within_eps_up_to_the_rounding_of_x_plus_eps(
    digits: tuple[nn.Module, Tensor, Tensor],
) -> None:
    model, x, y = digits
    x_adv = Square(eps=0.1, queries=100)(model, x, y)
    assert float((x_adv - x).abs().amax()) <= 0.1 + 1e-7


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_misclassified_and_robust_points_come_back_unchanged(
    digits: tuple[nn.Module, Tensor, Tensor], norm: str
) -> None:
    model, x, y = digits
    result = Square(eps=EPS[norm] / 4, norm=norm, queries=50).run(model, x, y)  # type: ignore[arg-type]
    clean_wrong = broken(model, x, y)
    assert clean_wrong.any() and not result.broken.all()
    unchanged = clean_wrong | ~result.broken
    assert torch.equal(result.x_adv[unchanged], x[unchanged])
    assert not result.broken[clean_wrong].any()
    assert torch.equal(broken(model, result.x_adv, y), clean_wrong | result.broken)
    assert (result.queries[clean_wrong] == 0).all()


def test_empty_batch_and_bad_inputs(digits: tuple[nn.Module, Tensor, Tensor]) -> None:
    model, x, y = digits
    assert Square(eps=0.1)(model, x[:0], y[:0]).shape == (0, 1, 8, 8)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        Square(eps=0.1)(model, torch.rand(4, 64), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 5 x 5"):
        Square(eps=0.1, norm="l2")(Constant(), torch.rand(2, 1, 4, 4), torch.zeros(2).long())


def test_runs_without_the_official_code(
    digits: tuple[nn.Module, Tensor, Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, x, y = digits
    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # any import of it fails
    monkeypatch.setitem(sys.modules, "pyautoattack.square", None)
    assert Square(eps=0.1, queries=10)(model, x[:8], y[:8]).shape == (8, 1, 8, 8)
    assert not getattr(Square, "requires", ())


def test_leaves_the_global_rng_alone(digits: tuple[nn.Module, Tensor, Tensor]) -> None:
    model, x, y = digits
    state = torch.random.get_rng_state()
    Square(eps=0.1, queries=20, norm="l2")(model, x[:16], y[:16])
    assert torch.equal(torch.random.get_rng_state(), state)


# --- the speed levers are exact ----------------------------------------------------------------


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_skipping_no_op_proposals_changes_nothing_but_the_model_calls(
    digits: tuple[nn.Module, Tensor, Tensor], norm: str
) -> None:
    model, x, y = digits
    x, y = x[:64], y[:64]
    eps = EPS[norm] / 2
    fast, slow = Recorder(model), Recorder(model)
    ours = Square(eps=eps, norm=norm, queries=150, seed=1).run(fast, x, y)  # type: ignore[arg-type]
    plain = NoSkip(eps=eps, norm=norm, queries=150, seed=1).run(slow, x, y)  # type: ignore[arg-type]
    assert torch.equal(ours.x_adv, plain.x_adv) and torch.equal(ours.broken, plain.broken)
    assert torch.equal(ours.queries, plain.queries) and plain.skipped == 0
    assert slow.rows - fast.rows == ours.skipped
    if norm == "linf":
        assert ours.skipped > 0.05 * int(ours.queries.sum())  # Linf proposals often repeat


def test_a_proposal_equal_to_the_best_point_never_reaches_the_model() -> None:
    # A constant model accepts no proposal, so the best point stays the start (the second row
    # the model sees). With 1 x 1 squares half the proposals equal it: queries the model need
    # not answer, which the authors' code sends anyway.
    torch.manual_seed(0)
    x, y = torch.rand(1, 1, 4, 4), torch.zeros(1, dtype=torch.long)
    attack = Square(eps=0.1, p_init=0.05, queries=60)  # 1 x 1 squares from the start
    model = Recorder(Constant())
    attack(model, x, y)
    start, proposals = model.batches[1], model.batches[2:]
    assert all(not torch.equal(p, start) for p in proposals)
    assert len(proposals) < 60
    result = attack.run(model, x, y)
    assert len(proposals) + result.skipped == 60
    assert int(result.queries[0]) == 61  # the start plus one per iteration, skipped or not
    assert square_side(0.05, (1, 4, 4), "linf") == 1


def test_broken_points_leave_the_batch() -> None:
    # Point 0 (pixels 0.3) breaks at any perturbation, point 1 (pixels 0.7) never breaks.
    class BreaksDark(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            # The clean images are constant; a 0.05 perturbation keeps the mean within 0.05.
            clean = x.mean(dim=(1, 2, 3), keepdim=True).round(decimals=1)
            moved = (x - clean).abs().amax((1, 2, 3))
            dark = clean.flatten() < 0.5
            return torch.stack([torch.ones(len(x)), torch.where(dark, 2 * (moved > 0), 0.0)], 1)

    x = torch.cat([torch.full((1, 1, 6, 6), 0.3), torch.full((1, 1, 6, 6), 0.7)])
    model = Recorder(BreaksDark())
    result = Square(eps=0.05, queries=30).run(model, x, torch.zeros(2, dtype=torch.long))
    assert [len(b) for b in model.batches[:2]] == [2, 2]  # the clean check and the start
    assert all(len(b) <= 1 and float(b.mean()) > 0.5 for b in model.batches[2:])
    assert result.broken.tolist() == [True, False] and result.queries.tolist() == [1, 31]
    assert torch.equal(result.x_adv[0], model.batches[1][0])  # its start broke it


def test_compacting_every_few_iterations_freezes_broken_points(
    digits: tuple[nn.Module, Tensor, Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    # What an accelerator does: broken points stay in the batch up to 4 more iterations,
    # where the acceptance mask must keep their first misclassified proposal.
    model, x, y = digits
    x, y = x[:64], y[:64]
    every_step = NoSkip(eps=0.1, queries=60).run(model, x, y)
    monkeypatch.setattr(square_module, "_compaction_period", lambda device: 5)
    model = Recorder(model)
    result = NoSkip(eps=0.1, queries=60).run(model, x, y)
    check_threat_model(x, result.x_adv, 0.1, "linf")
    assert torch.equal(broken(model, result.x_adv, y), broken(model, x, y) | result.broken)
    # The starts are drawn before any compaction: the same points break there.
    assert torch.equal(result.queries == 1, every_step.queries == 1)
    assert result.broken.sum() > (result.queries == 1).sum()  # some break during the run
    # Each broken point returns the proposal that broke it: the one the model saw in the
    # call its query count points at (call 1 is the start, call k + 2 iteration k).
    for i in result.broken.nonzero().flatten().tolist():
        batch = model.batches[int(result.queries[i])]
        assert any(torch.equal(row, result.x_adv[i]) for row in batch)
    # Rows sent to the model: the broken points' too, until the next compaction.
    iterations = [len(b) for b in model.batches[2:]]
    assert sum(iterations) > int(result.queries.sum()) - int((result.queries > 0).sum())


# --- the sampling distributions of the authors' code -------------------------------------------


@needs_reference
def test_p_schedule_is_the_official_one() -> None:
    official = SquareAttack(Constant(), n_queries=10000, resc_schedule=False)
    assert all(p_schedule(0.8, it) == official.p_selection(it) for it in range(10001))


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (1, 28, 28), (3, 7, 9)])
def test_square_side_follows_the_official_formula(shape: tuple[int, int, int]) -> None:
    # The authors' code: s = int(round(sqrt(p * n_features / c))), at least 1 (Linf) or 3 and
    # odd (L2), then at most min(h, w).
    c, h, w = shape
    for it in range(0, 10001, 7):
        p = p_schedule(0.8, it)
        raw = round((p * (c * h * w) / c) ** 0.5)
        assert square_side(p, shape, "linf") == min(max(raw, 1), h, w)
        l2 = max(raw, 3)
        assert square_side(p, shape, "l2") == min(l2 + 1 if l2 % 2 == 0 else l2, h, w)


@needs_reference
@pytest.mark.parametrize("s", [1, 2, 3, 5, 6, 7, 10])
def test_eta_is_the_official_window(s: int) -> None:
    official = SquareAttack(Constant(), norm="L2", device=torch.device("cpu"))
    theirs = official.eta(s).double()  # transposed at random: compare both orientations
    ours = eta(s)
    assert torch.allclose(ours, theirs, atol=1e-6) or torch.allclose(ours.T, theirs, atol=1e-6)
    assert float(ours.norm()) == pytest.approx(1.0)


@needs_reference
def test_square_positions_have_the_official_support_and_are_uniform() -> None:
    h, s, draws = 8, 3, 20000
    official = SquareAttack(Constant())
    torch.manual_seed(0)
    theirs = torch.cat([official.random_int(0, h - s) for _ in range(2000)])
    generator = torch.Generator().manual_seed(0)
    ours = _corners(draws, s, h, generator)
    assert set(ours.tolist()) == set(theirs.tolist()) == set(range(h - s))
    counts = torch.bincount(ours, minlength=h - s).double()
    expected = draws / (h - s)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.5  # the 0.999 quantile of chi^2 with 4 degrees of freedom is 18.5
    # A square as large as the image has one position.
    assert set(_corners(100, h, h, generator).tolist()) == {0}


def test_linf_start_and_proposals_have_the_official_shape() -> None:
    # Pixels at 0.5 and a constant model: nothing is clipped and nothing is accepted, so each
    # proposal is the start with one s x s square set to x +- eps, one sign per channel.
    c, h, w, eps, queries = 3, 8, 8, 0.1, 120
    x = torch.full((1, c, h, w), 0.5)
    model = Recorder(Constant())
    NoSkip(eps=eps, queries=queries).run(model, x, torch.zeros(1, dtype=torch.long))
    start = (model.batches[1][0] - 0.5) / eps
    assert torch.allclose(start.abs(), torch.ones_like(start))
    assert torch.equal(start, start[:, :1].expand(c, h, w))  # vertical stripes
    assert len({tuple(start[k, 0].sign().tolist()) for k in range(c)}) > 1  # per channel
    last_reached = False
    for it, batch in enumerate(model.batches[2:]):
        proposal = (batch[0] - 0.5) / eps
        s = square_side(p_schedule(0.8, it), (c, h, w), "linf")
        moved = proposal != start
        rows, cols = torch.nonzero(moved.any(0), as_tuple=True)
        if len(rows) == 0:  # the square already held the drawn signs
            continue
        # What moved fits in one s x s square, and each channel moved to one sign.
        assert int(rows.max() - rows.min()) < s and int(cols.max() - cols.min()) < s
        for k in range(c):
            assert len(set(proposal[k][moved[k]].tolist())) <= 1
        # As in the authors' code, a square smaller than the image never reaches its last
        # row or column.
        if s < h:
            assert int(rows.max()) < h - 1 and int(cols.max()) < w - 1
        last_reached |= int(rows.max()) == h - 2
    assert last_reached
    assert len(model.batches) == 2 + queries


def test_l2_proposals_keep_norm_eps_when_nothing_is_clipped() -> None:
    x, eps = torch.full((2, 3, 10, 10), 0.5), 0.3
    model = Recorder(Constant())
    NoSkip(eps=eps, norm="l2", queries=40).run(model, x, torch.zeros(2, dtype=torch.long))
    for batch in model.batches[1:]:
        norms = (batch - 0.5).flatten(1).norm(dim=1)
        assert torch.allclose(norms, torch.full_like(norms, eps), rtol=1e-5)


# --- the same success rate as the authors' code ------------------------------------------------


def official_square(
    model: nn.Module, x: Tensor, y: Tensor, norm: str, eps: float, queries: int, seed: int
) -> Tensor:
    """pyautoattack's SquareAttack with AutoAttack's settings, seeded as AutoAttack seeds it."""
    assert SquareAttack is not None
    with torch.random.fork_rng():
        attack = SquareAttack(
            model,
            norm={"linf": "Linf", "l2": "L2"}[norm],
            n_queries=queries,
            eps=eps,
            p_init=0.8,
            n_restarts=1,
            seed=seed,
            verbose=False,
            targeted=False,
            loss="margin",
            resc_schedule=False,
            device=x.device,
        )
        with torch.no_grad():
            return attack.perturb(x, y)


@pytest.mark.slow
@needs_reference
@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.05), ("l2", 0.3)])
def test_breaks_as_many_points_as_the_official_code(
    digits: tuple[nn.Module, Tensor, Tensor], norm: str, eps: float
) -> None:
    # 200 digits, 300 queries: Square breaks ~25 of ~190 correctly classified points. Over
    # four seeds each, the mean numbers of points broken must differ by at most the official's
    # own range over its seeds plus 2 points (the standard error of a mean of four counts whose
    # seed-to-seed standard deviation is ~1.5 is ~0.75; two such means differ by ~1 at 1 sigma).
    model, x, y = digits
    seeds = range(4)
    ours = [
        int(broken(model, Square(eps=eps, norm=norm, queries=300, seed=s)(model, x, y), y).sum())  # type: ignore[arg-type]
        for s in seeds
    ]
    theirs = [
        int(broken(model, official_square(model, x, y, norm, eps, 300, s), y).sum()) for s in seeds
    ]
    clean = int(broken(model, x, y).sum())
    assert min(theirs) > clean and max(theirs) < len(x)  # some but not all points break
    gap = abs(statistics.mean(ours) - statistics.mean(theirs))
    assert gap <= max(theirs) - min(theirs) + 2, (ours, theirs)
