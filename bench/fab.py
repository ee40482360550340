"""Native FAB-T against the official one: ``python bench/fab.py`` -> bench/results/fab.json.

Two parts, one thread (``--threads``), the official code being pyautoattack's
``FABAttack_PT`` (fra31/auto-attack) with AutoAttack's FAB-T settings (100 steps, 1 restart,
9 targets) and ours ``robcomp.attacks.FABT`` with the same:

- ``speed``: robcomp's ``small_cnn`` (1x28x28) and ``resnet20`` (3x32x32), seeded random
  weights and inputs, labels the model's own predictions, at L∞ eps ``1e-5``, where no point
  breaks: both run every iteration of every target on every point, so the ratio is the
  per-iteration cost. Ours and the official alternate (``--rounds`` rounds, medians). The
  official runs with the parameters frozen, as robcomp's wrapper ran it
  (``official_s``), and, on ``small_cnn``, with them trainable, as a model straight out of
  training is usually handed to AutoAttack (``official_trainable_s``: its ``.backward()``
  then also computes every parameter's gradient).
- ``verdicts``: the digits ``tiny_cnn`` of the tests (trained here, seeded) on 100 test points
  at eps where FAB-T breaks some points and not others (L∞ 0.05, L2 0.5): per-point verdict
  mismatches between ours and the official (``mismatches``; with one restart from the clean
  point both are deterministic, so the official's own seed-to-seed mismatches are 0 by
  construction), the broken counts and the seconds.
- ``verdicts_cifar`` (needs ``ROBCOMP_DATA``): the same on the pretrained CIFAR-10 ResNet-20
  and the first ``--points`` real test images, L∞ eps 0.5/255.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import robcomp.models
from robcomp import data as datasets
from robcomp.attacks import FABT
from robcomp.train import TrainConfig, fit

RESULTS = Path(__file__).resolve().parent / "results" / "fab.json"
SPEED_EPS = 1e-5
PARTIAL = {"linf": 0.05, "l2": 0.5}


def official(model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: str) -> Tensor:
    from pyautoattack.fab_pt import FABAttack_PT

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
    return attack.perturb(x, y)


def ours(model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: str) -> Tensor:
    return FABT(eps=eps, norm=norm)(model, x, y)  # type: ignore[arg-type]


def timed(run: Callable[[], Tensor]) -> tuple[float, Tensor]:
    start = time.perf_counter()
    out = run()
    return time.perf_counter() - start, out


def broken(model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor, eps: float, norm: str) -> Tensor:
    delta = (x_adv - x).flatten(1)
    dist = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    with torch.no_grad():
        return (model(x_adv).argmax(1) != y) & (dist <= eps * (1 + 1e-6))


def speed(name: str, shape: tuple[int, ...], points: int, rounds: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = robcomp.models.MODELS.get(name)(num_classes=10, in_shape=shape).eval()
    x = torch.rand((points, *shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(1)
    times: dict[str, list[float]] = {"ours_s": [], "official_s": []}
    trainable = name == "small_cnn"
    if trainable:
        times["official_trainable_s"] = []
    for _ in range(rounds):
        model.requires_grad_(False)
        times["official_s"].append(timed(lambda: official(model, x, y, SPEED_EPS, "linf"))[0])
        times["ours_s"].append(timed(lambda: ours(model, x, y, SPEED_EPS, "linf"))[0])
        if trainable:
            model.requires_grad_(True)
            seconds, _ = timed(lambda: official(model, x, y, SPEED_EPS, "linf"))
            times["official_trainable_s"].append(seconds)
            model.zero_grad(set_to_none=True)
    out: dict[str, Any] = {"points": points, "eps": SPEED_EPS, "rounds": rounds}
    out.update({k: round(statistics.median(v), 2) for k, v in times.items()})
    out["speedup_vs_official"] = round(out["official_s"] / out["ours_s"], 2)
    if trainable:
        out["speedup_vs_official_trainable"] = round(out["official_trainable_s"] / out["ours_s"], 2)
    return out


def verdicts(points: int) -> dict[str, Any]:
    digits = datasets.get("digits", seed=0)
    torch.manual_seed(0)
    model = robcomp.models.create("tiny_cnn", 10, (1, 8, 8), mean=digits.mean, std=digits.std)
    fit(model, digits, TrainConfig(epochs=10, lr=0.05, batch_size=64))
    model.eval().requires_grad_(False)
    x, y = digits.test.tensors()
    x, y = x[:points], y[:points]
    out: dict[str, Any] = {"model": "tiny_cnn on digits (the tests' fixture)", "points": points}
    for norm, eps in PARTIAL.items():
        t_off, adv_off = timed(lambda: official(model, x, y, eps, norm))  # noqa: B023
        t_ours, adv_ours = timed(lambda: ours(model, x, y, eps, norm))  # noqa: B023
        b_off, b_ours = (
            broken(model, x, y, adv_off, eps, norm),
            broken(model, x, y, adv_ours, eps, norm),
        )
        out[f"{norm}_eps{eps}"] = {
            "broken_official": int(b_off.sum()),
            "broken_ours": int(b_ours.sum()),
            "mismatches": int((b_off != b_ours).sum()),
            "official_s": round(t_off, 2),
            "ours_s": round(t_ours, 2),
        }
    return out


def verdicts_cifar(points: int) -> dict[str, Any]:
    import os

    import numpy as np

    root = Path(os.environ["ROBCOMP_DATA"])
    arrays = np.load(root / "cifar10-test-first1000.npz")
    x = torch.from_numpy(arrays["x"][:points]).permute(0, 3, 1, 2).float().div(255).contiguous()
    y = torch.from_numpy(arrays["y"][:points]).long()
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    model = robcomp.models.create("resnet20", 10, (3, 32, 32), mean=mean, std=std)
    robcomp.models.load_weights(model, root / "models" / "resnet20-12fca82f.th")
    model.eval().requires_grad_(False)
    eps = 0.5 / 255
    t_off, adv_off = timed(lambda: official(model, x, y, eps, "linf"))
    t_ours, adv_ours = timed(lambda: ours(model, x, y, eps, "linf"))
    b_off, b_ours = (
        broken(model, x, y, adv_off, eps, "linf"),
        broken(model, x, y, adv_ours, eps, "linf"),
    )
    with torch.no_grad():
        clean = int((model(x).argmax(1) == y).sum())
    return {
        "model": "pretrained resnet20, CIFAR-10 test images",
        "points": points,
        "eps": "0.5/255",
        "clean_correct": clean,
        "broken_official": int(b_off.sum()),
        "broken_ours": int(b_ours.sum()),
        "mismatches": int((b_off != b_ours).sum()),
        "official_s": round(t_off, 2),
        "ours_s": round(t_ours, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--points", type=int, default=20)
    parser.add_argument("--only", choices=["speed", "verdicts", "cifar"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    result["threads"] = args.threads
    if args.only in (None, "verdicts"):
        result["verdicts"] = verdicts(100)
    if args.only == "cifar":
        result["verdicts_cifar"] = verdicts_cifar(args.points)
    if args.only in (None, "speed"):
        result["speed"] = {
            "small_cnn": speed("small_cnn", (1, 28, 28), args.points, args.rounds),
            "resnet20": speed("resnet20", (3, 32, 32), args.points, args.rounds),
        }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
