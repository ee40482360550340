"""Native Square against the official one: ``python bench/square.py`` -> bench/results/square.json.

Two parts, one thread (``torch.set_num_threads(1)``), ours and the official (pyautoattack's
``SquareAttack`` with AutoAttack's settings: margin loss, untargeted, p_init 0.8, no schedule
rescaling, 1 restart) interleaved within each round, medians over rounds:

- ``overhead_*``: seconds per run of ``QUERIES[model]`` iterations on ``POINTS`` points at a
  tiny eps (1e-6, L∞) where nothing breaks, with the labels set to the model's own
  predictions, so both run every iteration on every point. Models: a linear layer on 1x28x28
  (the model costs nothing: ``ms_per_iteration`` is the attack loop's own overhead), robcomp's
  ``small_cnn`` (TRADES' SmallCNN, random weights with the zeroed last layer redrawn) on the
  same images, and ``resnet20`` (3x32x32); real MNIST / CIFAR-10 test images and the
  pretrained ResNet-20 when ROBCOMP_DATA is set, else random. ``ours_noskip`` is ours with
  every proposal sent to the model, which separates the loop from the no-op lever;
  ``noop_fraction`` = the share of iterations answered without the model; ``rows`` = images
  the model evaluated and ``work_ratio`` = official rows / ours, which load does not move (the
  seconds it moves a lot on the shared 2-core machine). Ours queries the model through
  ``robcomp.attacks.queries.query_fn``, so its seconds include robcomp's fast query path where
  it applies.
- ``mnist`` (needs ROBCOMP_DATA): a small_cnn trained for one epoch on 10k real MNIST training
  images (plain training, a few seconds), attacked on the first ``MNIST_POINTS`` test images at
  eps 0.1 L∞ with ``MNIST_QUERIES`` queries, seeds 0..``MNIST_SEEDS - 1`` for both. Reports
  seconds, points broken per seed, per-point verdict mismatches of ours against the official
  at the same seed beside the official's own mismatches between consecutive seeds, and the
  no-op fraction on real images.

``--quick`` shrinks everything to a smoke test (numbers meaningless, nothing written).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from robcomp import data as datasets
from robcomp.attacks.square import Square, SquareResult
from robcomp.models import create, load_weights
from robcomp.train import TrainConfig, fit

OUT = Path(__file__).parent / "results" / "square.json"
CIFAR_MEAN, CIFAR_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
POINTS, ROUNDS = 50, 2
# Iterations per model in the overhead part: the loop alone is cheap, the CNNs are not.
QUERIES = {"linear": 500, "small_cnn": 200, "resnet20": 200}
MNIST_POINTS, MNIST_QUERIES, MNIST_SEEDS, MNIST_EPS = 100, 500, 3, 0.1
TINY_EPS = 1e-6


class Counted(nn.Module):
    """The model, counting the rows it is asked about (the work, which load does not move)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.rows = model, 0

    def forward(self, x: Tensor) -> Tensor:
        self.rows += len(x)
        return self.model(x)


class NoSkip(Square):
    """Ours with every proposal sent to the model."""

    _skip_noops = False


def official(model: nn.Module, x: Tensor, y: Tensor, eps: float, queries: int, seed: int) -> Tensor:
    from pyautoattack.square import SquareAttack

    with torch.random.fork_rng():
        attack = SquareAttack(
            model,
            norm="Linf",
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


def timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def predictions(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x).argmax(1)


def forwarded(result: SquareResult) -> int:
    """Images our Square sent through the model: the clean check, then every query it did not
    skip."""
    return len(result.queries) + int(result.queries.sum()) - result.skipped


def overhead(model: nn.Module, x: Tensor, queries: int, rounds: int) -> dict[str, Any]:
    """Seconds and model rows of ours, ours without the no-op skip, and the official, with
    every query run on every point."""
    y = predictions(model, x)  # every point correct: every point attacked
    counted = Counted(model)
    # Ours gets the model itself, so robcomp's fast query path serves it when it is exact (a
    # counting wrapper would make it fall back to eager); its rows are counted from its own
    # report. The official code runs the model eagerly in any case.
    runs = {
        "ours": lambda: Square(eps=TINY_EPS, queries=queries).run(model, x, y),
        "ours_noskip": lambda: NoSkip(eps=TINY_EPS, queries=queries).run(model, x, y),
        "official": lambda: official(counted, x, y, TINY_EPS, queries, 0),
    }
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    rows: dict[str, int] = {}
    skipped = broken = 0
    for r in range(rounds):
        for name in list(runs) if r % 2 == 0 else list(reversed(runs)):
            counted.rows = 0
            s, out = timed(runs[name])
            seconds[name].append(s)
            rows[name] = counted.rows if name == "official" else forwarded(out)
            if name == "ours":
                skipped = out.skipped
                broken = int(out.broken.sum())
    med = {name: statistics.median(v) for name, v in seconds.items()}
    return {
        "points": len(x),
        "queries": queries,
        "seconds": seconds,
        "ms_per_iteration": {name: 1000 * v / queries for name, v in med.items()},
        "ours_over_official": med["ours"] / med["official"],
        "ours_noskip_over_official": med["ours_noskip"] / med["official"],
        "rows": rows,
        "work_ratio": rows["official"] / rows["ours"],
        "noop_fraction": skipped / (len(x) * queries),
        "broken_ours": broken,  # 0 expected: then both ran every query on every point
    }


def mnist_model(root: str, train_points: int) -> tuple[nn.Module, Tensor, Tensor]:
    splits = datasets.get({"name": "mnist", "root": root})
    torch.manual_seed(0)
    model = create("small_cnn", 10, (1, 28, 28), mean=splits.mean, std=splits.std)
    few = dataclasses.replace(splits, train=splits.train.head(train_points))
    fit(model, few, TrainConfig(epochs=1, lr=0.05, batch_size=64), seed=0)
    model.eval().requires_grad_(False)
    x, y = splits.test.tensors()
    return model, x, y


def mnist(root: str, points: int, queries: int, seeds: int, train_points: int) -> dict[str, Any]:
    trained, x, y = mnist_model(root, train_points)
    model = Counted(trained)
    x, y = x[:points], y[:points]
    ours_s, off_s, ours_broken, off_broken, noop = [], [], [], [], []
    ours_rows, off_rows = [], []
    for seed in range(seeds):
        s, result = timed(
            lambda seed=seed: Square(eps=MNIST_EPS, queries=queries, seed=seed).run(trained, x, y)
        )
        ours_s.append(s)
        ours_rows.append(forwarded(result))
        model.rows = 0
        ours_broken.append(predictions(trained, result.x_adv) != y)
        iteration_queries = int(result.queries.sum()) - int((result.queries > 0).sum())
        noop.append(result.skipped / max(iteration_queries, 1))
        s, x_off = timed(lambda seed=seed: official(model, x, y, MNIST_EPS, queries, seed))
        off_s.append(s)
        off_rows.append(model.rows)
        model.rows = 0
        off_broken.append(predictions(trained, x_off) != y)
    return {
        "points": points,
        "queries": queries,
        "eps": MNIST_EPS,
        "clean_accuracy": float((predictions(trained, x) == y).float().mean()),
        "seconds_ours": ours_s,
        "seconds_official": off_s,
        "ours_over_official": statistics.median(ours_s) / statistics.median(off_s),
        "rows_ours": ours_rows,
        "rows_official": off_rows,
        "work_ratio": sum(off_rows) / sum(ours_rows),
        "broken_ours": [int(b.sum()) for b in ours_broken],
        "broken_official": [int(b.sum()) for b in off_broken],
        "verdict_mismatches_ours_vs_official": [
            int((a != b).sum()) for a, b in zip(ours_broken, off_broken)
        ],
        "verdict_mismatches_official_seed_to_seed": [
            int((a != b).sum()) for a, b in itertools.pairwise(off_broken)
        ],
        "noop_fraction": noop,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = os.environ.get("ROBCOMP_DATA")
    q = 20 if args.quick else 0  # 0: each model's own count
    n = 8 if args.quick else POINTS
    rounds = 1 if args.quick else ROUNDS
    start = time.perf_counter()
    report: dict[str, Any] = {
        "run": {
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "loadavg_start": os.getloadavg(),
        }
    }
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    small = create("small_cnn", 10, (1, 28, 28))
    # TRADES' init zeroes SmallCNN's last layer, so every logit is 0 and every margin 0;
    # redrawn, the margins are positive and nothing breaks at the tiny eps.
    last = [m for m in small.modules() if isinstance(m, nn.Linear)][-1]
    nn.init.normal_(last.weight, std=0.1)
    small.eval().requires_grad_(False)
    x_small = torch.rand(n, 1, 28, 28, generator=g)
    if root:
        x_small = datasets.get({"name": "mnist", "root": root}).test.tensors()[0][:n]
    linear = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10)).eval().requires_grad_(False)
    report["overhead_linear"] = overhead(linear, x_small, q or QUERIES["linear"], rounds + 1)
    report["overhead_small_cnn"] = overhead(small, x_small, q or QUERIES["small_cnn"], rounds)
    torch.manual_seed(0)
    resnet = create("resnet20", 10, (3, 32, 32), mean=CIFAR_MEAN, std=CIFAR_STD)
    x_cifar = torch.rand(n, 3, 32, 32, generator=g)
    if root:
        load_weights(resnet, Path(root, "models", "resnet20-12fca82f.th"))
        arrays = np.load(Path(root, "cifar10-test-first1000.npz"))
        x_cifar = torch.from_numpy(arrays["x"][:n]).permute(0, 3, 1, 2).float().div(255)
    resnet.eval().requires_grad_(False)
    report["overhead_resnet20"] = overhead(
        resnet, x_cifar.contiguous(), q or QUERIES["resnet20"], rounds
    )
    report["overhead_resnet20"]["real"] = bool(root)
    if root:
        report["mnist"] = mnist(
            root,
            8 if args.quick else MNIST_POINTS,
            20 if args.quick else MNIST_QUERIES,
            2 if args.quick else MNIST_SEEDS,
            500 if args.quick else 10_000,
        )
    report["run"]["loadavg_end"] = os.getloadavg()
    report["run"]["wall_s"] = time.perf_counter() - start
    text = json.dumps(report, indent=2)
    print(text)
    if not args.quick:
        OUT.write_text(text + "\n")


if __name__ == "__main__":
    main()
