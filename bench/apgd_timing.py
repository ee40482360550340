"""Time our APGD-CE against the official one and against the bare cost of its gradients.

Three timings on the same model and batch, interleaved over ``repeats`` rounds (so a noisy
neighbour on the machine hurts all three alike), reported as min and median seconds, with the
ratios of the minima:

- ``ours``: ``robcomp.attacks.APGDCE`` with ``steps`` iterations;
- ``official``: ``pyautoattack``'s ``APGDAttack`` (the fra31/auto-attack code), same settings;
- ``floor``: ``steps`` x (one forward + one backward to the input), what any ``steps``-step
  gradient attack must pay. (APGD evaluates one more gradient, at its random start.)

Labels are the model's own predictions, so every point is attacked. Two budgets are timed:
``eps = 0``, where no point can break and every iteration runs on the whole batch (the
per-iteration overhead), and a real ``eps``, where our APGD stops attacking points once they
are broken and the official one keeps iterating on them.

Run: ``python bench/apgd_timing.py [--model resnet20 --batch 128 --steps 20 --threads 2]``;
prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import robcomp.models
from robcomp.attacks import APGDCE
from robcomp.evaluate import attack_mode


def _floor(model: nn.Module, x: Tensor, y: Tensor, passes: int) -> None:
    for _ in range(passes):
        x_in = x.detach().requires_grad_(True)
        loss = F.cross_entropy(model(x_in), y, reduction="sum")
        torch.autograd.grad(loss, x_in)


def _summary(seconds: list[float]) -> dict[str, float]:
    return {"min": min(seconds), "median": statistics.median(seconds)}


def bench_apgd(
    model_name: str = "resnet20",
    batch: int = 128,
    steps: int = 20,
    threads: int = 2,
    repeats: int = 5,
    eps: float = 8 / 255,
    seed: int = 0,
) -> dict[str, Any]:
    """Time APGD-CE (ours, official) and the forward/backward floor; see the module docstring.

    Args:
        model_name: a registered model, built for 10 classes and (3, 32, 32) inputs (CIFAR).
        batch: number of random inputs in [0, 1].
        steps: APGD iterations (and forward/backward passes of the floor).
        threads: torch intra-op threads.
        repeats: timed rounds after one warm-up round.
        eps: the non-zero Linf budget timed besides ``eps = 0``.
        seed: seeds the weights, the inputs and the attacks.

    Returns:
        A JSON-ready dict: the setup, and per budget the min/median seconds of each method and
        the ratios of the minima.
    """
    from pyautoattack.autopgd_base import APGDAttack  # the official code, a bench-only need

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = robcomp.models.create(model_name, 10, (3, 32, 32))
    x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    results: dict[str, Any] = {
        "model": model_name,
        "batch": batch,
        "steps": steps,
        "threads": threads,
        "repeats": repeats,
        "torch": torch.__version__,
    }
    with attack_mode(model):
        with torch.no_grad():
            y = model(x).argmax(1)
        for budget in (0.0, eps):
            ours = APGDCE(eps=budget, steps=steps, seed=seed)
            official = APGDAttack(
                model, n_iter=steps, norm="Linf", n_restarts=1, eps=budget, seed=seed,
                loss="ce", device=x.device,
            )  # fmt: skip

            def run_ours(attack: APGDCE = ours) -> None:
                attack(model, x, y)

            def run_official(attack: Any = official) -> None:
                attack.perturb(x, y)

            def run_floor() -> None:
                _floor(model, x, y, steps)

            methods: dict[str, Callable[[], None]] = {
                "ours": run_ours,
                "official": run_official,
                "floor": run_floor,
            }
            seconds: dict[str, list[float]] = {name: [] for name in methods}
            for round_ in range(repeats + 1):
                for name, run in methods.items():
                    with torch.random.fork_rng():  # the official attack reseeds it
                        start = time.perf_counter()
                        run()
                        elapsed = time.perf_counter() - start
                    if round_:  # round 0 warms up allocators and kernels
                        seconds[name].append(elapsed)
            # Ratios of the minima: a busy machine only ever adds time, so the minimum is the
            # least disturbed estimate (as in timeit); the medians show how noisy it was.
            best = {name: min(s) for name, s in seconds.items()}
            results[f"eps={budget:.6g}"] = {
                **{f"{name}_s": _summary(s) for name, s in seconds.items()},
                "ours_over_official": best["ours"] / best["official"],
                "ours_over_floor": best["ours"] / best["floor"],
                "official_over_floor": best["official"] / best["floor"],
            }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--eps", type=float, default=8 / 255)
    args = parser.parse_args()
    result = bench_apgd(
        model_name=args.model,
        batch=args.batch,
        steps=args.steps,
        threads=args.threads,
        repeats=args.repeats,
        eps=args.eps,
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
