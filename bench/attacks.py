"""Attack speed, side by side in one run: ``python bench/attacks.py`` -> bench/results/attacks.json.

What it measures (issue: attacks and trustworthy evaluation, item 9):

- ``resnet20`` / ``resnet18`` (speed): the floor (``steps`` x one forward + input-gradient
  backward, parameters frozen, eval mode), our PGD, torchattacks' PGD, Foolbox's LinfPGD and
  the official APGD-CE (pyautoattack, the fra31/auto-attack code), each with the same number
  of iterations at eps 8/255, the PGDs with the same step (2.5 eps / steps) and a random start,
  on the same batch. Labels are the model's own predictions, so every implementation attacks
  every point (the official APGD skips points that are misclassified already). Per model:
  ``pgd_over_floor`` = our time / floor and ``pgd_over_fastest_peer`` = our time / the
  fastest peer's, both ratios of medians over rounds (``*_paired``: the median over rounds of
  the ratio within a round). The official APGD pays one gradient more than ``steps`` (at its
  random start) plus a forward pass, so it is slower by construction; it is there because it
  is the implementation AutoAttack numbers come from.
- ``curve``: the robust-accuracy-vs-eps curve (10 eps, 0.5/255 ... 5/255, L∞) from ONE
  minimal-norm run (FMN, L∞, ``fmn_steps`` iterations, then ``minimal_norms``' boundary search
  of ``CURVE_SEARCH_STEPS`` forward passes) against 10 per-eps PGD-20 runs on the same points:
  ``curve_cost_ratio`` = seconds of the 10 PGD runs / seconds of the FMN run with its search,
  and ``curve_max_gap_points`` = the most the curve lies *above* PGD's robust accuracy at any
  eps, in accuracy points (0 if never): the curve is an upper bound on robust accuracy, so a
  curve below PGD-20 is the tighter bound, not an error (``curve_max_abs_gap_points`` counts
  both directions; ``points_pgd_breaks_curve_misses`` and ``points_curve_breaks_pgd_misses``
  count points per eps, without the cancellation of the two). The same FMN run without the
  search is kept for comparison (``*_without_search``). ``--curve-check MODEL START`` repeats
  the part on another pretrained model (resnet20, resnet32) and the 128 test images from
  ``START``, stored under ``curve_checks`` without headline keys.
- ``autoattack`` (issue 18: AutoAttack at 3x): robcomp's standard AutoAttack
  (``Cascade(eps, norm="linf")``: APGD-CE, APGD-T, FAB-T, Square) against the official
  ``pyautoattack.AutoAttack(version="standard").run_standard_evaluation`` (fra31/auto-attack) on
  the same points, seed 0 for both, on one thread (``torch.set_num_threads(1)`` for this part,
  whatever ``--threads`` says), on two models: ``mnist_small_cnn``, TRADES' SmallCNN (Zhang et
  al. 2019) trained here with robcomp's PGD-AT (Madry et al. 2018) at eps 0.3 (a robust model,
  on which every stage runs on most points: the case the issue's goal is about), attacked on the
  first ``autoattack_points`` MNIST test images at eps 0.3; and ``resnet20``, the pretrained
  CIFAR-10 ResNet-20 on the first real CIFAR-10 test images at eps 1/255. The robust model is
  trained once (``RobustMnist``: a natural epoch, then PGD-AT, ``fit``'s robust selection) and
  cached as safetensors under ``bench/cache/`` (gitignored), keyed by its training settings;
  its training time and its clean and PGD-40 accuracies on the MNIST test set are stored under
  ``training``. The runs alternate (official, ours, ours, official: medians over
  ``rounds``); per stage, ours come from ``CascadeResult.seconds_per_attack`` (and
  ``points_per_attack`` when the cascade reports it), the official's from timers wrapped
  around the ``perturb`` methods of the AutoAttack object's four attacks (which they call
  unchanged). ``autoattack_speedup_vs_official`` = official median seconds / ours;
  ``autoattack_gap_points`` = our robust accuracy minus the official's, in points;
  ``autoattack_verdict_mismatches`` counts the points whose verdict (robust or broken) differs
  between ours and the official at seed 0, beside ``autoattack_official_seed_mismatches``
  (the official at seed 0 against seed 1: the variation the randomised stages bring by
  themselves) and ``autoattack_ours_seed_mismatches``. ``autoattack_goal_met``: speed-up >= 3
  and a gap of at most 0.5 points. The headline keys are the robust MNIST model's. The part
  takes 20-30 minutes (the official runs dominate); ``--device cuda`` runs it on the GPU.
  Needs ``ROBCOMP_DATA`` (MNIST, CIFAR-10 images, ResNet-20 weights); skipped without it.
- ``apgd``: our APGD-CE against the official one (pyautoattack's ``APGDAttack``) on the first
  ``APGD_POINTS`` real CIFAR-10 test images with their true labels, pretrained ResNet-20, L∞ eps
  1/255, 100 iterations, 1 restart, seed 0 for both. At this eps most points break within a few
  iterations: ours stops iterating on a point once it is broken, the official code iterates on
  every point to the end. ``apgd_speedup_vs_official`` = official seconds / ours, medians over
  ``apgd_rounds`` interleaved rounds; ``apgd_gap_points`` = our robust accuracy minus the
  official one, in points (the same starts and schedule: 0 expected). ``*_samples`` count the
  images that went through the model (forward passes, each gradient pass included): their
  ratio ``work_ratio`` is the work saved, which the machine's load does not move; the seconds
  it moves a lot: with two OpenMP threads next to other busy processes one run took 10 to 90
  s, with one thread 13-16 s, so the stored numbers come from ``--only apgd --threads 1``
  (the thread count is recorded under ``apgd.run``). Needs ``ROBCOMP_DATA`` (real images and
  weights); skipped without it.

Sizes, chosen so the default run (speed, curve, apgd) takes about 8 minutes with one other
core's worth of load (10 minutes is the limit; more load stretches it, see ``wall_s`` and the
load average); ``autoattack`` runs only when asked for (``--only autoattack``):

- ResNet-20 (pretrained, real CIFAR-10 images when ROBCOMP_DATA is set, else random): batch
  128, PGD-20, as the issue specifies; 4 timed rounds.
- ResNet-18 (torchvision, 3x3 stem, random weights: speed does not depend on the weights):
  batch 128, but 2 iterations instead of 20, and 5 rounds. One of its forward/backward passes
  costs ~3 s on 2 cores (8x ResNet-20's), so five 20-iteration runs per round would take over
  15 minutes on their own. The per-iteration overhead is what the ratios measure; with fewer
  iterations the fixed per-call costs (random start, input checks, final forward passes)
  weigh more, so the 2-step ratios over the floor are upper bounds on the 20-step ones. (With
  3 rounds of 3 iterations, one slow floor round moved the ratio between 1.00 and 1.09 across
  runs; timed alone in 6 alternating rounds, our 3-step PGD took 0.98x the floor.)
- Before the rounds, a warm-up: each implementation once (1 iteration, 2 points) and one
  full-batch floor pass. Within a round the implementations run in turn, in alternating order
  between rounds, so load from other processes hits all of them alike. The machine is shared:
  the load average (``os.getloadavg()``) is recorded at start and end, and two OpenMP threads
  next to a busy process can run several times slower, so seconds move between rounds by
  10-30% (``floor_spread``) and single ratios by several percent; medians of interleaved
  rounds and the paired ratios are the steadiest estimates we can afford here.
- The curve and the AutoAttack runs are long, deterministic amounts of work. The FMN run sits
  between the first and the last five PGD runs, and the AutoAttack rounds alternate their
  order, so a drift in load hits both sides of each ratio alike. The AutoAttack runs get no
  warm-up: one run of either takes minutes, next to which first-call costs vanish.
- ``autoattack``: 50 points per model; 2 rounds on the robust MNIST model (one official run
  there took 183 s at a load average of 2-4 before issue 18), then one more run of each side
  at seed 1 for the seed-to-seed mismatches; the same on ResNet-20 but with 1 round (one
  official run there took 137 s at a load average of 1-2 before issue 18; more rounds would
  take the part past 25 minutes while robcomp's stages are as slow as the official's; see its
  ``note``).

``--quick`` shrinks everything to a smoke test (a minute; numbers meaningless, nothing written).
``--only PART [PART ...]`` runs only those parts (speed, curve, apgd, autoattack) and updates
their keys in the existing bench/results/attacks.json, keeping the other numbers (the default
run keeps the ``autoattack`` numbers too).
``--device cuda`` runs the ``autoattack`` part on the GPU (it stops with a message without one).
``--threads N`` sets torch's intra-op threads (default: min(2, CPUs)).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from robcomp.attacks import ATTACKS, PGD, Cascade
from robcomp.data import DATASETS, DataSplits
from robcomp.evaluate import accuracy, attack_mode
from robcomp.evaluate.curves import minimal_norms, robust_curve
from robcomp.models import Classifier, create, load_weights, save_tensors
from robcomp.train import TrainConfig, fit

EPS = 8 / 255
CIFAR_MEAN, CIFAR_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Steps of 0.5/255: on the undefended ResNet-20 PGD-20 leaves 0% robust from about 3/255 on,
# so a grid of whole /255 steps would compare mostly zeros.
CURVE_EPS = [i / 2 / 255 for i in range(1, 11)]
CURVE_PGD_STEPS = 20
# Binary-search steps that pull FMN's examples back to the boundary (minimal_norms' default).
CURVE_SEARCH_STEPS = 10
PEERS = ("torchattacks_pgd", "foolbox_pgd", "official_apgd_ce")
OUT = Path(__file__).parent / "results" / "attacks.json"
PARTS = ("speed", "curve", "apgd", "autoattack")
# The default run; autoattack takes 20-30 minutes and runs only when named in --only.
DEFAULT_PARTS = ("speed", "curve", "apgd")
# Keys of the former cascade part (ResNet-20 at 8/255, where APGD-CE breaks every point), which
# the autoattack part replaced; dropped from the results file on the next write.
OBSOLETE = ("cascade", "cascade_speedup")
APGD_EPS = 1 / 255
PRETRAINED = {"resnet20": "resnet20-12fca82f.th", "resnet32": "resnet32-d509ac18.th"}

Timings = dict[str, list[float]]


@dataclass(frozen=True)
class RobustMnist:
    """How the bench trains its robust MNIST SmallCNN with robcomp's PGD-AT; the cache key.

    PGD-AT at eps 0.3 from the start stalls near chance on MNIST for longer than this budget
    allows (one epoch on 10,000 images after a natural one: 18 % PGD accuracy, 61 % clean), so
    the training is a curriculum: a natural epoch, then one PGD-AT epoch at each eps of
    ``ramp``, then ``epochs`` at ``eps``, each with PGD's step 2.5 eps / steps (Madry et al.),
    Adam at a constant rate as in Madry et al.'s MNIST model. The inner attack runs in eval mode
    (dropout off), as TRADES' code for this architecture does. The last stage keeps its epoch
    with the best PGD-10 accuracy on 256 validation points (``fit``'s robust selection).
    """

    train_points: int = 10_000
    natural_epochs: int = 1
    ramp: tuple[float, ...] = (0.1, 0.2)
    epochs: int = 2
    eps: float = 0.3
    steps: int = 5
    lr: float = 1e-3
    batch_size: int = 128
    seed: int = 0

    def key(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def objective(self, eps: float) -> dict[str, Any]:
        return {"name": "pgd-at", "eps": eps, "step": 2.5 * eps / self.steps,
                "steps": self.steps, "attack_mode": "eval"}  # fmt: skip


QUICK_MNIST = RobustMnist(train_points=1024, ramp=(), epochs=1)


@dataclass(frozen=True)
class Sizes:
    """How much work each part does; see the module docstring for why these values."""

    # (batch, iterations, timed rounds) of the speed comparison per model.
    speed: dict[str, tuple[int, int, int]] = field(
        default_factory=lambda: {"resnet20": (128, 20, 4), "resnet18": (128, 2, 5)}
    )
    points: int = 128  # points of the curve
    # 10 PGD-20 runs cost 200 gradient passes, so FMN must stay under 40 iterations to be 5x
    # cheaper. On these 128 points with Foolbox's default step (1.0), FMN-30, -35, -40 and -50
    # all gave curves within 2.3 points of PGD-20's on this grid before the boundary search
    # (FMN-20: 6.3 points at 1/255); a step of 10 (the FMN authors' advice for L∞, which helps
    # on digits) was 16-20 points off.
    fmn_steps: int = 35
    apgd_points: int = 500  # real images of the APGD comparison, as in the measurement
    apgd_steps: int = 100
    apgd_rounds: int = 2  # each round: ours and the official once (~15 s and ~70 s)
    autoattack_points: int = 50  # first test images of each model, as in issue 18
    # ResNet-20: one round (see the module docstring); the robust MNIST model, whose numbers
    # are the headline, gets two.
    autoattack_rounds: dict[str, int] = field(
        default_factory=lambda: {"mnist_small_cnn": 2, "resnet20": 1}
    )
    # Seed-1 runs of both sides per model, for the seed-to-seed mismatches.
    autoattack_seed_one: dict[str, bool] = field(
        default_factory=lambda: {"mnist_small_cnn": True, "resnet20": True}
    )
    robust_mnist: RobustMnist = field(default_factory=RobustMnist)


QUICK = Sizes(
    speed={"resnet20": (8, 2, 1), "resnet18": (8, 2, 1)},
    points=8,
    fmn_steps=5,
    apgd_points=16,
    apgd_steps=5,
    apgd_rounds=1,
    autoattack_points=3,
    autoattack_rounds={"mnist_small_cnn": 1, "resnet20": 1},
    autoattack_seed_one={"mnist_small_cnn": True, "resnet20": True},
    robust_mnist=QUICK_MNIST,
)


def interleaved(methods: dict[str, Callable[[], object]], rounds: int) -> Timings:
    """Wall seconds of each method per round, the methods run in turn within each round.

    The order alternates between rounds so that no method always follows the same neighbour.
    """
    seconds: Timings = {name: [] for name in methods}
    for round_ in range(rounds):
        order = list(methods) if round_ % 2 == 0 else list(reversed(methods))
        for name in order:
            seconds[name].append(timed_once(methods[name]))
    return seconds


def timed_once(fn: Callable[[], object]) -> float:
    """Wall seconds of one call, in a forked RNG (the official attacks reseed the global one)."""
    with torch.random.fork_rng():
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start


def load_data(root: str | None, n: int) -> tuple[Tensor, Tensor, bool]:
    """The first ``n`` real CIFAR-10 test images when ``root`` has them, else random ones."""
    if root and Path(root, "cifar10-test-first1000.npz").is_file():
        arrays = np.load(Path(root, "cifar10-test-first1000.npz"))
        x = torch.from_numpy(arrays["x"][:n]).permute(0, 3, 1, 2).float().div(255).contiguous()
        return x, torch.from_numpy(arrays["y"][:n]).long(), True
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g), False


def build_models(
    root: str | None, real: bool, names: tuple[str, ...] = ("resnet20", "resnet18")
) -> dict[str, Classifier]:
    torch.manual_seed(0)
    models = {name: create(name, 10, (3, 32, 32), mean=CIFAR_MEAN, std=CIFAR_STD) for name in names}
    for name, file in PRETRAINED.items():
        if real and root and name in models:
            load_weights(models[name], Path(root, "models", file))
    for model in models.values():
        # Frozen once, for every implementation alike (the peers freeze nothing themselves).
        model.eval().requires_grad_(False)
    return models


def contenders(
    model: nn.Module, x: Tensor, y: Tensor, steps: int
) -> dict[str, Callable[[], object]]:
    """The floor, our PGD and the peers, each configured for ``steps`` iterations at ``EPS``."""
    import foolbox as fb
    import torchattacks
    from pyautoattack.autopgd_base import APGDAttack

    alpha = 2.5 * EPS / steps  # our PGD's default step (Madry et al.), given to every PGD
    ours = PGD(eps=EPS, steps=steps, step_size=alpha)
    ta_pgd = torchattacks.PGD(model, eps=EPS, alpha=alpha, steps=steps, random_start=True)
    fmodel = fb.PyTorchModel(model, bounds=(0, 1))
    fb_pgd = fb.attacks.LinfPGD(steps=steps, abs_stepsize=alpha, random_start=True)
    official = APGDAttack(model, norm="Linf", eps=EPS, n_iter=steps, n_restarts=1, seed=0,
                          loss="ce", device=x.device)  # fmt: skip

    def floor() -> None:
        for _ in range(steps):
            x_in = x.clone().requires_grad_(True)
            loss = F.cross_entropy(model(x_in), y, reduction="sum")
            torch.autograd.grad(loss, x_in)

    return {
        "floor": floor,
        "ours_pgd": lambda: ours(model, x, y),
        "torchattacks_pgd": lambda: ta_pgd(x, y),
        "foolbox_pgd": lambda: fb_pgd(fmodel, x, y, epsilons=EPS),
        "official_apgd_ce": lambda: official.perturb(x, y),
    }


def speed(model: nn.Module, x: Tensor, batch: int, steps: int, rounds: int) -> dict[str, Any]:
    x = x[:batch]
    with attack_mode(model):
        with torch.no_grad():
            y = model(x).argmax(1)  # every point correct: every implementation attacks all
        # Warm-up: imports and first-call paths on 2 points, then the kernels at full size.
        for warm_up in contenders(model, x[:2], y[:2], 1).values():
            timed_once(warm_up)
        contenders(model, x, y, 1)["floor"]()
        seconds = interleaved(contenders(model, x, y, steps), rounds)
    median = {k: statistics.median(v) for k, v in seconds.items()}
    fastest = min(PEERS, key=lambda k: median[k])

    def paired(other: str) -> float:
        return statistics.median(o / f for o, f in zip(seconds["ours_pgd"], seconds[other]))

    return {
        "batch": batch,
        "steps": steps,
        "rounds": rounds,
        "seconds": seconds,
        # Slowest / fastest floor round: how much the machine's load moved the timings.
        "floor_spread": max(seconds["floor"]) / min(seconds["floor"]),
        "median_s": median,
        "pgd_over_floor": median["ours_pgd"] / median["floor"],
        "pgd_over_floor_paired": paired("floor"),
        "fastest_peer": fastest,
        "pgd_over_fastest_peer": median["ours_pgd"] / median[fastest],
        "pgd_over_fastest_peer_paired": paired(fastest),
        "peers_over_floor": {k: median[k] / median["floor"] for k in PEERS},
    }


def robust_accuracy(model: nn.Module, x_adv: Tensor, x: Tensor, y: Tensor) -> float:
    """Share of points classified correctly both clean and attacked (as evaluate_attack counts)."""
    return float(robust_points(model, x_adv, x, y).float().mean())


def robust_points(model: nn.Module, x_adv: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Which points are classified correctly both clean and attacked."""
    with torch.no_grad():
        return (model(x).argmax(1) == y) & (model(x_adv).argmax(1) == y)


def curve(model: nn.Module, x: Tensor, y: Tensor, fmn_steps: int) -> dict[str, Any]:
    pgd_robust: list[Tensor] = []
    norms: dict[str, Tensor] = {}

    def pgd_runs(eps_values: list[float]) -> None:
        for eps in eps_values:
            x_adv = PGD(eps=eps, steps=CURVE_PGD_STEPS)(model, x, y)
            pgd_robust.append(robust_points(model, x_adv, x, y))

    samples: dict[str, int] = {}
    seen = [0]

    def count(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        seen[0] += len(inputs[0])

    def fmn_run(name: str, search_steps: int) -> Callable[[], None]:
        def run() -> None:
            seen[0] = 0
            norms[name] = minimal_norms(model, fmn, x, y, boundary_search_steps=search_steps)
            samples[name] = seen[0]

        return run

    fmn = ATTACKS.get("fmn")(eps=float("inf"), norm="linf", steps=fmn_steps)
    hook = model.register_forward_pre_hook(count)
    try:
        with attack_mode(model):
            # The FMN runs sit between the two halves of the PGD runs: load drift hits both sides.
            per_eps = timed_once(lambda: pgd_runs(CURVE_EPS[:5]))
            plain = timed_once(fmn_run("plain", 0))
            single = timed_once(fmn_run("searched", CURVE_SEARCH_STEPS))
            per_eps += timed_once(lambda: pgd_runs(CURVE_EPS[5:]))
    finally:
        hook.remove()
    pgd_curve = [float(r.float().mean()) for r in pgd_robust]
    fmn_curve = robust_curve(norms["searched"], CURVE_EPS)
    plain_curve = robust_curve(norms["plain"], CURVE_EPS)
    # Per point: broken by PGD but robust on the curve, and the reverse (no cancellation).
    curve_robust = [norms["searched"] > eps for eps in CURVE_EPS]
    missed = [int((c & ~p).sum()) for c, p in zip(curve_robust, pgd_robust, strict=True)]
    extra = [int((p & ~c).sum()) for c, p in zip(curve_robust, pgd_robust, strict=True)]
    gaps = [100 * (a - b) for a, b in zip(fmn_curve, pgd_curve, strict=True)]
    plain_gaps = [100 * (a - b) for a, b in zip(plain_curve, pgd_curve, strict=True)]
    return {
        "n": len(x),
        "eps_x255": [round(e * 255, 2) for e in CURVE_EPS],
        "pgd": f"pgd{CURVE_PGD_STEPS}-linf, step 2.5 eps / {CURVE_PGD_STEPS}, random start",
        "fmn": f"{fmn.label()}, max_stepsize {fmn.max_stepsize}",
        "boundary_search_steps": CURVE_SEARCH_STEPS,
        "pgd_curve": pgd_curve,
        "fmn_curve": fmn_curve,
        "fmn_curve_without_search": plain_curve,
        # Positive: the curve finds fewer adversarials than PGD at that eps.
        "fmn_minus_pgd_points": [round(g, 2) for g in gaps],
        "fmn_without_search_minus_pgd_points": [round(g, 2) for g in plain_gaps],
        "points_pgd_breaks_curve_misses": missed,
        "points_curve_breaks_pgd_misses": extra,
        "per_eps_pgd_s": per_eps,
        "one_fmn_run_s": single,
        "one_fmn_run_without_search_s": plain,
        # Images through the model, which the machine's load does not move: FMN's each with a
        # backward pass, the search's forward only.
        "fmn_samples_without_search": samples["plain"],
        "search_samples": samples["searched"] - samples["plain"],
        "curve_cost_ratio": per_eps / single,
        # How far the one-run curve overstates robust accuracy relative to per-eps PGD: the
        # error that matters for an upper bound. Below PGD, the curve is the tighter bound.
        "curve_max_gap_points": max(0.0, *gaps),
        "curve_max_gap_points_without_search": max(0.0, *plain_gaps),
        "curve_max_abs_gap_points": max(abs(g) for g in gaps),
    }


# The official AutoAttack's attack objects, by the name of the stage each one runs in the
# standard version (its FAB object runs FAB-T there).
OFFICIAL_STAGES = {"apgd-ce": "apgd", "apgd-t": "apgd_targeted", "fab-t": "fab", "square": "square"}


@dataclass
class AutoAttackRun:
    """What one AutoAttack run (ours or the official) found and spent, per stage."""

    robust: list[bool]  # per point: clean-correct and robust to every stage
    stage_s: dict[str, float]
    robust_after: dict[str, float]
    points: dict[str, int] | None  # points each stage attacked (None: not reported)


def ours_autoattack(model: nn.Module, x: Tensor, y: Tensor, eps: float, seed: int) -> AutoAttackRun:
    """robcomp's standard AutoAttack, the thing under test."""
    result = Cascade(eps=eps, norm="linf", seed=seed).run(model, x, y)
    # points_per_attack arrives with issue 18's cascade changes; older cascades lack it.
    points = getattr(result, "points_per_attack", None)
    return AutoAttackRun(
        robust=[found is None for found in result.found_by],
        stage_s=dict(result.seconds_per_attack),
        robust_after=dict(result.robust_after),
        points=dict(points) if points is not None else None,
    )


def official_autoattack(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, seed: int
) -> AutoAttackRun:
    """The official standard AutoAttack, its four attacks' ``perturb`` calls timed."""
    from pyautoattack import AutoAttack

    official = AutoAttack(model, norm="Linf", eps=eps, version="standard", seed=seed,
                          device=x.device)  # fmt: skip
    stage_s = dict.fromkeys(OFFICIAL_STAGES, 0.0)
    calls: dict[str, list[tuple[Tensor, Tensor]]] = {stage: [] for stage in OFFICIAL_STAGES}
    for stage, attribute in OFFICIAL_STAGES.items():
        attack = getattr(official, attribute)
        attack.perturb = timed_stage(attack.perturb, stage, stage_s, calls[stage], x.device)
    x_adv = official.run_standard_evaluation(x, y, batch_size=len(x))[0]
    # Robust accuracy after each stage, from what each stage returned (counted after the run,
    # so the counting costs the official nothing).
    with torch.no_grad():
        left = int((model(x).argmax(1) == y).sum())
        robust_after = {}
        for stage, seen in calls.items():
            left -= sum(int((model(adv).argmax(1) != labels).sum()) for adv, labels in seen)
            robust_after[stage] = left / len(x)
    return AutoAttackRun(
        robust=robust_points(model, x_adv, x, y).tolist(),
        stage_s=stage_s,
        robust_after=robust_after,
        points={stage: sum(len(labels) for _, labels in seen) for stage, seen in calls.items()},
    )


def timed_stage(
    perturb: Callable[[Tensor, Tensor], Tensor],
    stage: str,
    seconds: dict[str, float],
    calls: list[tuple[Tensor, Tensor]],
    device: torch.device,
) -> Callable[[Tensor, Tensor], Tensor]:
    """``perturb`` unchanged, its wall time added to ``seconds[stage]`` and its output kept."""

    def run(x: Tensor, y: Tensor) -> Tensor:
        start = time.perf_counter()
        adv = perturb(x, y)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds[stage] += time.perf_counter() - start
        calls.append((adv, y))
        return adv

    return run


def autoattack_vs_official(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, rounds: int, seed_one: bool = True
) -> dict[str, Any]:
    """Ours against the official standard AutoAttack on the same points; see the docstring.

    ``seed_one``: also run both at seed 1, for the seed-to-seed mismatches (None without).
    """
    runs: dict[str, list[AutoAttackRun]] = {"official": [], "ours": []}
    attacks = {"official": official_autoattack, "ours": ours_autoattack}

    def method(name: str, seed: int) -> Callable[[], None]:
        def run() -> None:
            runs[name].append(attacks[name](model, x, y, eps, seed))
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)

        return run

    with attack_mode(model):
        with torch.no_grad():
            clean = float((model(x).argmax(1) == y).float().mean())
        # official first: the order official, ours, ours, official over two rounds
        seconds = interleaved({name: method(name, 0) for name in runs}, rounds)
        other = {name: attacks[name](model, x, y, eps, 1) for name in runs} if seed_one else {}
    median = {name: statistics.median(v) for name, v in seconds.items()}
    first = {name: v[0] for name, v in runs.items()}
    robust = {name: sum(run.robust) / len(x) for name, run in first.items()}
    gap = 100 * (robust["ours"] - robust["official"])
    speedup = median["official"] / median["ours"]
    seeds = seed_mismatches(first, other, len(x))
    return {
        "n": len(x),
        "eps": eps,
        "rounds": rounds,
        "clean_accuracy": clean,
        "seconds": seconds,
        "median_s": median,
        "ours_robust_accuracy": robust["ours"],
        "official_robust_accuracy": robust["official"],
        # Every run of a side at seed 0 gave the same verdicts.
        "deterministic": all(r.robust == first[k].robust for k, v in runs.items() for r in v),
        "stages": stage_rows(runs),
        "ours_points_per_stage": first["ours"].points,
        "autoattack_speedup_vs_official": speedup,
        "autoattack_gap_points": gap,
        "autoattack_verdict_mismatches": mismatches(first["ours"], first["official"]),
        **seeds,
        "autoattack_goal_met": speedup >= 3 and abs(gap) <= 0.5,
    }


def seed_mismatches(
    first: dict[str, AutoAttackRun], other: dict[str, AutoAttackRun], n: int
) -> dict[str, Any]:
    """Verdicts that differ between seeds 0 and 1 of each side (None when seed 1 did not run)."""
    if not other:
        keys = ("autoattack_official_seed_mismatches", "autoattack_ours_seed_mismatches")
        return {**dict.fromkeys(keys), "seed_1_robust_accuracy": None}
    return {
        "autoattack_official_seed_mismatches": mismatches(first["official"], other["official"]),
        "autoattack_ours_seed_mismatches": mismatches(first["ours"], other["ours"]),
        "seed_1_robust_accuracy": {k: sum(r.robust) / n for k, r in other.items()},
    }


def mismatches(a: AutoAttackRun, b: AutoAttackRun) -> int:
    """Points whose verdict (robust or broken) differs between two runs."""
    return sum(p != q for p, q in zip(a.robust, b.robust, strict=True))


def stage_rows(runs: dict[str, list[AutoAttackRun]]) -> list[dict[str, Any]]:
    """One row per stage: median seconds of both sides, points attacked, robust accuracy after."""
    rows = []
    for stage in OFFICIAL_STAGES:
        row: dict[str, Any] = {"stage": stage}
        for name, side in runs.items():
            row[f"{name}_s"] = statistics.median(r.stage_s.get(stage, 0.0) for r in side)
            row[f"{name}_robust_after"] = side[0].robust_after.get(stage)
            points = side[0].points
            row[f"{name}_points"] = points.get(stage, 0) if points is not None else None
        ran = row["official_s"] > 0 and row["ours_s"] > 0  # a skipped stage has no ratio
        row["speedup"] = row["official_s"] / row["ours_s"] if ran else None
        rows.append(row)
    return rows


ROBUST_CHECK_POINTS = 1000  # first MNIST test images of the stored PGD-40 check
CACHE = Path(__file__).parent / "cache"


def mnist_splits(root: str, settings: RobustMnist) -> DataSplits:
    dataset = DATASETS.get("mnist")(root=root, train_limit=settings.train_points)
    splits: DataSplits = dataset.load(seed=settings.seed)
    return splits


def robust_mnist(root: str, settings: RobustMnist) -> tuple[Classifier, dict[str, Any]]:
    """The robust SmallCNN, from the cache, else trained (and cached); with its training record."""
    weights = CACHE / f"small_cnn-pgd-at-{settings.key()}.safetensors"
    record_file = weights.with_suffix(".json")
    model = create("small_cnn", 10, (1, 28, 28))
    if weights.is_file() and record_file.is_file():
        load_weights(model, weights)
        record = json.loads(record_file.read_text())
        return model.eval().requires_grad_(False), {**record, "cached": True}
    data = mnist_splits(root, settings)
    common: dict[str, Any] = {
        "batch_size": settings.batch_size,
        "optimizer": "adam",
        "lr": settings.lr,
        "weight_decay": 0.0,
        "schedule": "constant",
    }
    start = time.perf_counter()
    stages = [(settings.natural_epochs, {"name": "ce"}, "last")]
    stages += [(1, settings.objective(eps), "last") for eps in settings.ramp]
    stages += [(settings.epochs, settings.objective(settings.eps), "robust")]
    epochs: list[dict[str, Any]] = []
    for i, (count, objective, select) in enumerate(stages):
        config = TrainConfig(epochs=count, objective=objective, select=select, **common)
        # A seed per stage: each stage sees the training points in a new order.
        history = fit(model, data, config, seed=settings.seed + i, description=objective["name"])
        epochs += [{"eps": objective.get("eps", 0.0), **keep(e)} for e in history.epochs]
    seconds = time.perf_counter() - start
    model.eval().requires_grad_(False)
    record = {
        "model": "small_cnn",
        "settings": dataclasses.asdict(settings),
        "objective": settings.objective(settings.eps),
        "training_s": seconds,
        "training_threads": torch.get_num_threads(),
        "last_stage_best_epoch": history.best_epoch,
        "epochs": epochs,
        **robust_check(model, data),
    }
    save_tensors(weights, model.state_dict())
    record_file.write_text(json.dumps(record, indent=2) + "\n")
    return model, {**record, "cached": False}


def keep(epoch: dict[str, Any]) -> dict[str, Any]:
    """The parts of an epoch's record worth storing."""
    names = ("epoch", "val_accuracy", "val_adv_accuracy", "seconds")
    return {k: v for k, v in epoch.items() if k in names}


def robust_check(model: nn.Module, data: DataSplits) -> dict[str, Any]:
    """Clean accuracy on the whole MNIST test set, PGD-40 accuracy on its first images."""
    x, y = data.test.take(slice(0, ROBUST_CHECK_POINTS)).tensors()
    pgd = PGD(eps=0.3, steps=40)
    with attack_mode(model):
        robust = robust_accuracy(model, pgd(model, x, y), x, y)
    return {
        "test_clean_accuracy": accuracy(model, data.test),
        "pgd_check": f"{pgd.label()} (step 2.5 eps / 40, random start), first {len(x)} test images",
        "test_pgd40_robust_accuracy": robust,
    }


def apgd_vs_official(
    model: nn.Module, x: Tensor, y: Tensor, steps: int, rounds: int
) -> dict[str, Any]:
    """Our APGD-CE against the official one on the same real images; see the module docstring."""
    from pyautoattack.autopgd_base import APGDAttack

    ours = ATTACKS.get("apgd-ce")(eps=APGD_EPS, steps=steps, restarts=1, seed=0)
    official = APGDAttack(model, norm="Linf", eps=APGD_EPS, n_iter=steps, n_restarts=1, seed=0,
                          loss="ce", device=x.device)  # fmt: skip
    outputs: dict[str, list[Tensor]] = {"ours": [], "official": []}
    samples: dict[str, list[int]] = {"ours": [], "official": []}
    seen = [0]

    def count(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        seen[0] += len(inputs[0])

    def counted(name: str, attack: Callable[[], Tensor]) -> Callable[[], None]:
        def run() -> None:
            seen[0] = 0
            outputs[name].append(attack())
            samples[name].append(seen[0])

        return run

    hook = model.register_forward_pre_hook(count)
    try:
        with attack_mode(model):
            ours(model, x[:2], y[:2])  # warm-up: first-call paths
            methods = {
                "ours": counted("ours", lambda: ours(model, x, y)),
                "official": counted("official", lambda: official.perturb(x, y)),
            }
            seconds = interleaved(methods, rounds)
    finally:
        hook.remove()
    median = {k: statistics.median(v) for k, v in seconds.items()}
    robust = {k: robust_accuracy(model, v[0], x, y) for k, v in outputs.items()}
    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).float().mean())
    return {
        "n": len(x),
        "eps": APGD_EPS,
        "steps": steps,
        "rounds": rounds,
        "attack": ours.label(),
        "clean_accuracy": clean,
        "seconds": seconds,
        "ours_robust_accuracy": robust["ours"],
        "official_robust_accuracy": robust["official"],
        "deterministic": all(torch.equal(o, v[0]) for v in outputs.values() for o in v),
        "ours_samples": samples["ours"][0],
        "official_samples": samples["official"][0],
        # The work saved, independent of the machine's load; the speed-up is what it buys.
        "work_ratio": samples["official"][0] / samples["ours"][0],
        "apgd_speedup_vs_official": median["official"] / median["ours"],
        "apgd_speedup_paired": statistics.median(
            o / f for o, f in zip(seconds["official"], seconds["ours"], strict=True)
        ),
        "apgd_gap_points": 100 * (robust["ours"] - robust["official"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--quick", action="store_true", help="tiny smoke run, numbers meaningless")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=PARTS,
        default=list(DEFAULT_PARTS),
        help="run only these parts; their keys update the existing results file "
        f"(default: {' '.join(DEFAULT_PARTS)})",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="device of the autoattack part (the other parts run on the CPU); its numbers go "
        "under autoattack_cuda, without headline keys",
    )
    parser.add_argument(
        "--curve-check",
        nargs=2,
        metavar=("MODEL", "START"),
        help="run the curve part on another pretrained model (resnet20, resnet32) and the test "
        "images from index START on, stored under curve_checks.MODEL@START (no headline keys)",
    )
    args = parser.parse_args()
    if args.curve_check and (args.curve_check[0] not in PRETRAINED or args.only != ["curve"]):
        parser.error(f"--curve-check needs --only curve and a model in {sorted(PRETRAINED)}")
    if args.device == "cuda" and args.only != ["autoattack"]:
        parser.error("--device cuda applies to the autoattack part only: add --only autoattack")
    sizes = QUICK if args.quick else Sizes()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    wall_start = time.perf_counter()
    root = os.environ.get("ROBCOMP_DATA")
    if args.curve_check:
        report = curve_check(sizes, root, args.curve_check[0], int(args.curve_check[1]))
    else:
        report = run_parts(set(args.only), sizes, root, args.device)
    context: dict[str, Any] = {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_start": load_start,
        "load_end": os.getloadavg(),
        "wall_s": time.perf_counter() - wall_start,
    }
    old = json.loads(OUT.read_text()) if OUT.is_file() else {}
    for key in OBSOLETE:
        old.pop(key, None)
    # Curve checks on other models accumulate, one --curve-check run each.
    new_checks = report.pop("curve_checks", {})
    for value in new_checks.values():
        value["run"] = context
    checks = {**old.get("curve_checks", {}), **new_checks}
    if set(args.only) == set(DEFAULT_PARTS):
        # A default run rewrites the file, keeping only the numbers of the parts it skips.
        kept = {k: v for k, v in old.items() if k.startswith("autoattack")}
        report = {"eps": EPS, **context, **report, **kept}
    else:  # the other parts' numbers stay, each part carries the context it ran in
        for value in report.values():
            if isinstance(value, dict):
                value["run"] = context
        report = {**old, **report}
    if checks:
        report["curve_checks"] = checks
    if not args.quick:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if not isinstance(v, dict)}, indent=2))


def run_parts(parts: set[str], sizes: Sizes, root: str | None, device: str) -> dict[str, Any]:
    """Run the chosen parts; their results and headline keys (see the module docstring)."""
    n = max(sizes.points, *(b for b, _, _ in sizes.speed.values()))
    x, y, real = load_data(root, max(n, sizes.apgd_points) if "apgd" in parts else n)
    models = build_models(root, real)
    report: dict[str, Any] = {"real_data": real}
    if "speed" in parts:
        for name, (batch, steps, rounds) in sizes.speed.items():
            report[name] = speed(models[name], x, batch, steps, rounds)
            print(f"{name}: {json.dumps(report[name], indent=1)}", flush=True)
        # Headline: the worse of the two models, so a target counts as met only if both do.
        for key in ("pgd_over_floor", "pgd_over_fastest_peer"):
            report[key] = max(report[name][key] for name in sizes.speed)
    points = x[: sizes.points], y[: sizes.points]
    if "curve" in parts:
        report["curve"] = curve(models["resnet20"], *points, sizes.fmn_steps)
        print(f"curve: {json.dumps(report['curve'], indent=1)}", flush=True)
        for key in ("curve_cost_ratio", "curve_max_gap_points"):
            report[key] = report["curve"][key]
    if "apgd" in parts and not real:
        print("apgd: skipped, it needs the real images and weights (set ROBCOMP_DATA)")
    elif "apgd" in parts:
        some = x[: sizes.apgd_points], y[: sizes.apgd_points]
        report["apgd"] = apgd_vs_official(
            models["resnet20"], *some, sizes.apgd_steps, sizes.apgd_rounds
        )
        print(f"apgd: {json.dumps(report['apgd'], indent=1)}", flush=True)
        for key in ("apgd_speedup_vs_official", "apgd_gap_points"):
            report[key] = report["apgd"][key]
    if "autoattack" in parts:
        report.update(autoattack_part(sizes, root, device))
    return report


def autoattack_part(sizes: Sizes, root: str | None, device: str) -> dict[str, Any]:
    """The ``autoattack`` part (see the module docstring): its dict and headline keys."""
    if not root:
        print("autoattack: skipped, it needs MNIST, CIFAR-10 images and weights (set ROBCOMP_DATA)")
        return {}
    if device == "cuda" and not torch.cuda.is_available():
        print("autoattack: skipped, --device cuda was asked for but CUDA is not available")
        return {}
    threads = torch.get_num_threads()
    model, training = robust_mnist(root, sizes.robust_mnist)  # trained at --threads when new
    n = sizes.autoattack_points
    rounds = sizes.autoattack_rounds
    torch.set_num_threads(1)
    try:
        x, y = mnist_splits(root, sizes.robust_mnist).test.take(slice(0, n)).tensors()
        mnist = autoattack_vs_official(model.to(device), x.to(device), y.to(device), 0.3,
                                       rounds["mnist_small_cnn"],
                                       sizes.autoattack_seed_one["mnist_small_cnn"])  # fmt: skip
        mnist["training"] = training
        print(f"autoattack mnist_small_cnn: {json.dumps(mnist, indent=1)}", flush=True)
        x, y, _ = load_data(root, n)
        resnet = build_models(root, True, ("resnet20",))["resnet20"].to(device)
        cifar = autoattack_vs_official(resnet, x.to(device), y.to(device), APGD_EPS,
                                       rounds["resnet20"],
                                       sizes.autoattack_seed_one["resnet20"])  # fmt: skip
        if rounds["resnet20"] < rounds["mnist_small_cnn"] or not cifar["seed_1_robust_accuracy"]:
            cifar["note"] = (
                f"{rounds['resnet20']} round(s) against {rounds['mnist_small_cnn']} on the MNIST "
                f"model, seed-1 runs: {sizes.autoattack_seed_one['resnet20']}; to keep the part "
                "under about 25 minutes"
            )
        print(f"autoattack resnet20: {json.dumps(cifar, indent=1)}", flush=True)
    finally:
        torch.set_num_threads(threads)
    part = {"threads": 1, "device": device, "mnist_small_cnn": mnist, "resnet20": cifar}
    if device == "cuda":
        return {"autoattack_cuda": part}
    headline = {k: v for k, v in mnist.items() if k.startswith("autoattack_")}
    return {"autoattack": part, **headline}


def curve_check(sizes: Sizes, root: str | None, name: str, start: int) -> dict[str, Any]:
    """The curve part on another pretrained model and other test images (real data only)."""
    x, y, real = load_data(root, start + sizes.points)
    if not real:
        raise SystemExit("--curve-check needs the real images and weights (set ROBCOMP_DATA)")
    model = build_models(root, real, (name,))[name]
    result = curve(model, x[start:], y[start:], sizes.fmn_steps)
    result["model"], result["first_image"] = name, start
    print(f"curve check: {json.dumps(result, indent=1)}", flush=True)
    return {"curve_checks": {f"{name}@{start}": result}}


if __name__ == "__main__":
    main()
