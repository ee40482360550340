"""What adversarial training costs on this CPU: ``python bench/train.py``.

Writes bench/results/train.json and prints it. Times the real training loop
(:func:`robcomp.train.fit`, one epoch of a few batches) of a CIFAR ResNet-20 on random
CIFAR-shaped tensors, per batch of 128, for three objectives side by side:

- ``ce``: natural training (one forward and backward pass per batch);
- ``fast_at``: Fast-AT / FGSM-RS (Wong et al. 2020), one extra forward-backward for the attack;
- ``pgd10_at``: PGD-AT with 10 steps (Madry et al. 2018), ten extra forward-backward passes.

The objectives are timed in interleaved rounds, so a noisy neighbour slows them alike; the
headline ratios (``pgd10_over_fast_at`` and ``*_over_ce``) are ratios of medians over rounds.
Expect ``pgd10_over_fast_at`` near (10 a + t) / (a + t), about 4-5, where t is a training step
and a an attack step: a forward pass and the input gradient only, since the attack freezes the
parameters (about two thirds of t). ``cifar10_epoch_seconds`` extrapolates to the 391 batches
of one CIFAR-10 epoch. The load average before and after is recorded, since other processes on a
shared machine move absolute times a lot. Speed does not depend on the data, hence random tensors.

Options: ``--threads N`` (default: torch's), ``--rounds R`` (default 3), ``--batches B`` per
round (default 1), ``--batch-size`` (default 128), ``--budget`` (default 180: no round starts
that would end past it, so a loaded machine runs fewer rounds), ``--quick`` (1 round of 1 batch,
batch 64).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robcomp.data.base import DataSplits, Split
from robcomp.models import create
from robcomp.train import TrainConfig, fit

IN_SHAPE = (3, 32, 32)
CIFAR10_TRAIN = 50_000
RESULTS = Path(__file__).parent / "results" / "train.json"
OBJECTIVES: dict[str, dict[str, Any]] = {
    "ce": {"name": "ce"},
    "fast_at": {"name": "fast-at", "eps": 8 / 255},
    "pgd10_at": {"name": "pgd-at", "eps": 8 / 255, "step": 2 / 255, "steps": 10},
}


def fake_cifar(n: int) -> DataSplits:
    """``n`` random CIFAR-shaped training images; no validation split (nothing to select)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, *IN_SHAPE), dtype=torch.uint8, generator=g)
    y = torch.arange(n) % 10
    train, empty = Split(x, y), Split(x[:0], y[:0])
    names = tuple(str(c) for c in range(10))
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    return DataSplits("random-cifar", train, empty, empty, 10, names, mean, std)


def seconds_per_batch(
    model: nn.Module, data: DataSplits, objective: dict[str, Any], bs: int
) -> float:
    """Wall time of one ``fit`` epoch over ``data``, divided by its number of batches."""
    cfg = TrainConfig(
        epochs=1, batch_size=bs, lr=0.01, schedule="constant", keep_best=False, objective=objective
    )
    start = time.perf_counter()
    fit(model, data, cfg, seed=0, description="bench")
    return (time.perf_counter() - start) / math.ceil(len(data.train) / bs)


def time_objectives(
    rounds: int, batches: int, bs: int, budget: float
) -> dict[str, dict[str, float]]:
    """Median and min seconds per batch over interleaved rounds, after a small warm-up batch
    each. Rounds stop early (after the first) when the next would overrun ``budget`` seconds."""
    start = time.perf_counter()
    torch.manual_seed(0)
    models = {k: create("resnet20", 10, IN_SHAPE) for k in OBJECTIVES}
    warm_data, data = fake_cifar(16), fake_cifar(bs * batches)
    for key, objective in OBJECTIVES.items():  # first calls allocate and pick kernels
        seconds_per_batch(models[key], warm_data, objective, 16)
    samples: dict[str, list[float]] = {k: [] for k in OBJECTIVES}
    for _ in range(rounds):
        round_start = time.perf_counter()
        for key, objective in OBJECTIVES.items():
            samples[key].append(seconds_per_batch(models[key], data, objective, bs))
        now = time.perf_counter()
        if now - start + (now - round_start) > budget:
            break
    return {
        key: {
            "median_seconds_per_batch": statistics.median(v),
            "min_seconds_per_batch": min(v),
            "rounds": len(v),
        }
        for key, v in samples.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=1, help="batches per round")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="1 round of 1 batch of 64")
    parser.add_argument(
        "--budget", type=float, default=180.0, help="seconds after which no round is started"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.rounds, args.batches, args.batch_size = 1, 1, 64
    start = time.perf_counter()
    out: dict[str, Any] = {
        "model": "resnet20",
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "batches_per_round": args.batches,
        "budget_seconds": args.budget,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_before": os.getloadavg(),
        "objectives": OBJECTIVES,
    }
    timings = time_objectives(args.rounds, args.batches, args.batch_size, args.budget)
    epoch_batches = math.ceil(CIFAR10_TRAIN / args.batch_size)
    for entry in timings.values():
        entry["cifar10_epoch_seconds"] = entry["median_seconds_per_batch"] * epoch_batches
    out["timings"] = timings
    median = {k: v["median_seconds_per_batch"] for k, v in timings.items()}
    fastest = {k: v["min_seconds_per_batch"] for k, v in timings.items()}
    out["pgd10_over_fast_at"] = median["pgd10_at"] / median["fast_at"]
    out["pgd10_over_ce"] = median["pgd10_at"] / median["ce"]
    out["fast_at_over_ce"] = median["fast_at"] / median["ce"]
    # from the fastest round of each: less sensitive to a neighbour's load spikes
    out["pgd10_over_fast_at_from_min"] = fastest["pgd10_at"] / fastest["fast_at"]
    out["load_average_after"] = os.getloadavg()
    out["seconds"] = time.perf_counter() - start
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
