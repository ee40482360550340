"""The worst case is per point and per threat model: a point is robust only if no attack of its
(norm, eps) broke it; threat models are never mixed; the leaderboard orders by it."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console
from torch import Tensor, nn

from robcomp.data.base import Split
from robcomp.evaluate import AttackResult, evaluate_attack
from robcomp.evaluate.worst import load_points, save_points, worst_case_per_threat_model
from robcomp.experiments import STORE_NAME, Metric, ResultStore, load_experiment, run_experiment
from robcomp.report.tables import leaderboard_rows, leaderboard_table


class FirstPixel(nn.Module):
    """Class 1 when the first input is above 0.5, else class 0."""

    def forward(self, x: Tensor) -> Tensor:
        high = x[:, 0:1]
        return torch.cat([0.5 - high, high - 0.5], dim=1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FlipHalf:
    """Crosses the boundary only on points whose second input equals ``parity``: two of these
    with different parities break disjoint halves."""

    eps: float = 0.5
    norm: str = "linf"
    parity: float = 0.0

    def label(self) -> str:
        return f"flip{self.parity:g}-{self.norm}"

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        target = torch.where(y == 1, 0.3, 0.7)
        chosen = x[:, 1] == self.parity
        x_adv = x.clone()
        x_adv[chosen, 0] = target[chosen]
        return x_adv


def _points(n: int = 40) -> Split:
    y = torch.arange(n) % 2
    x = torch.stack([torch.where(y == 1, 0.6, 0.4), (torch.arange(n) // 2 % 2).float()], dim=1)
    return Split(x, y)


def test_two_attacks_breaking_different_halves_leave_no_point_robust() -> None:
    model, split = FirstPixel(), _points()
    results = [evaluate_attack(model, FlipHalf(parity=p), split) for p in (0.0, 1.0)]
    assert [r.robust_accuracy for r in results] == [0.5, 0.5]
    assert min(r.robust_accuracy for r in results) == 0.5  # what the leaderboard used to say
    (worst,) = worst_case_per_threat_model(results)
    assert (worst.norm, worst.eps, worst.attacks) == ("linf", 0.5, ("flip0-linf", "flip1-linf"))
    assert worst.robust_accuracy == 0.0
    # the per-point masks agree with the accuracies they came from
    for r in results:
        assert r.robust.dtype == torch.bool and len(r.robust) == len(split)
        assert r.robust.float().mean().item() == r.robust_accuracy


def _result(attack: str, norm: str, eps: float, robust: list[bool]) -> AttackResult:
    mask = torch.tensor(robust)
    value = float(mask.float().mean())
    return AttackResult(
        attack=attack, norm=norm, eps=eps, n=len(robust), clean_accuracy=1.0,
        robust_accuracy=value, mean_norm=math.nan, median_norm=math.nan, seconds=0.0,
        robust=mask,
    )  # fmt: skip


def test_threat_models_are_never_mixed_and_unbounded_attacks_stay_out() -> None:
    results = [
        _result("pgd10-linf", "linf", 0.1, [True, False, True, True]),
        _result("pgd10-l2", "l2", 0.1, [False, True, True, True]),  # same eps, another norm
        _result("pgd10-linf", "linf", 0.2, [True, True, False, True]),  # same norm, larger eps
        _result("apgd-ce100-linf", "linf", 0.1, [True, True, True, False]),
        _result("ddn100-l2", "l2", math.inf, [False, False, False, False]),
    ]
    worst = {(w.norm, w.eps): w for w in worst_case_per_threat_model(results)}
    assert set(worst) == {("linf", 0.1), ("l2", 0.1), ("linf", 0.2)}
    assert worst["linf", 0.1].robust.tolist() == [True, False, True, False]
    assert worst["linf", 0.1].attacks == ("pgd10-linf", "apgd-ce100-linf")
    assert worst["l2", 0.1].robust.tolist() == [False, True, True, True]
    assert worst["linf", 0.2].robust.tolist() == [True, True, False, True]


def test_points_file_is_compact_and_round_trips(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    masks = [torch.rand(1001, generator=generator) < 0.5 for _ in range(3)]
    results = [_result(f"a{i}", "linf", 0.1 * (i + 1), m.tolist()) for i, m in enumerate(masks)]
    save_points(tmp_path / "points.npz", results)
    loaded = load_points(tmp_path / "points.npz")
    assert list(loaded) == [(f"a{i}", 0.1 * (i + 1)) for i in range(3)]
    for mask, back in zip(masks, loaded.values(), strict=True):
        assert torch.equal(mask, back)
    assert (tmp_path / "points.npz").stat().st_size < 3 * 1001 // 8 + 1500  # about a bit a point


def _cell(store: ResultStore, cell_id: str, per_attack: float, worst: float) -> None:
    store.record(
        cell_id=cell_id, experiment="e", grid_values={},
        config={"data": {"name": "digits"}, "model": {"name": "m"},
                "compress": {"name": cell_id}, "seed": 0},
        metrics=[
            Metric("clean_accuracy", 0.9),
            Metric("robust_accuracy", per_attack, "pgd10-linf", 0.1),
            Metric("robust_accuracy", per_attack, "square5000-linf", 0.1),
            Metric("robust_accuracy", 0.8, "pgd10-l2", 0.5),
            Metric("worst_robust_accuracy", worst, "worst-linf", 0.1, norm="linf"),
            Metric("worst_robust_accuracy", 0.8, "worst-l2", 0.5, norm="l2"),
        ],
        info={"worst_case": {"primary": {"norm": "linf", "eps": 0.1}}}, seconds=1.0,
    )  # fmt: skip


def test_leaderboard_orders_by_the_per_point_worst_case_of_the_primary_threat_model(
    tmp_path: Path,
) -> None:
    store = ResultStore(tmp_path / "store.sqlite")
    # A's attacks each leave 60 % but break different points (20 % survive both);
    # B's attacks leave 50 % and break the same points.
    _cell(store, "a", per_attack=0.6, worst=0.2)
    _cell(store, "b", per_attack=0.5, worst=0.5)
    rows = leaderboard_rows(store)
    assert [r["cell_id"] for r in rows] == ["b", "a"]
    assert rows[1]["worst_robust_accuracy"] == 0.2  # not min(0.6, 0.6), not mixed with l2's 0.8
    assert rows[1]["primary_threat_model"] == "worst-linf@0.1"
    assert rows[1]["worst-l2@0.5"] == 0.8
    console = Console(record=True, width=250)
    console.print(leaderboard_table(rows))
    text = console.export_text()
    assert "worst" in text and "20.0" in text


def _share(mask: Tensor) -> float:
    return int(mask.sum()) / len(mask)


def test_a_cell_stores_the_per_point_worst_case_and_its_points(tmp_path: Path) -> None:
    raw: dict[str, Any] = {
        "name": "tiny",
        "data": {"name": "digits", "train_limit": 300},
        "model": {"name": "tiny_mlp"},
        "train": {"epochs": 2, "lr": 0.05, "batch_size": 64},
        "evaluate": {
            "attacks": [
                {"name": "fgsm", "eps": 0.05},
                {"name": "pgd", "eps": 0.05, "steps": 3},
                {"name": "pgd", "norm": "l2", "eps": 1.0, "steps": 3},
            ],
            "limit": 40,
            "diagnostics": False,
            "latency_batch_sizes": [],
        },
    }
    run_experiment(load_experiment(raw), tmp_path)
    (run,) = ResultStore(tmp_path / STORE_NAME).runs()
    points = load_points(tmp_path / "cells" / run.cell_id / "points.npz")
    assert set(points) == {("fgsm-linf", 0.05), ("pgd3-linf", 0.05), ("pgd3-l2", 1.0)}
    values = {(m.name, m.attack, m.eps): m.value for m in run.metrics}
    linf = points["fgsm-linf", 0.05] & points["pgd3-linf", 0.05]
    assert values["worst_robust_accuracy", "worst-linf", 0.05] == _share(linf)
    assert values["worst_robust_accuracy", "worst-l2", 1.0] == (_share(points["pgd3-l2", 1.0]))
    for (attack, eps), mask in points.items():
        assert values["robust_accuracy", attack, eps] == _share(mask)
    assert run.info["worst_case"]["primary"] == {"norm": "linf", "eps": 0.05}
    (row,) = leaderboard_rows(ResultStore(tmp_path / STORE_NAME))
    assert row["worst_robust_accuracy"] == values["worst_robust_accuracy", "worst-linf", 0.05]


def test_models_without_gradients_keep_the_per_point_worst_case_over_routes() -> None:
    from robcomp.evaluate.bpda import evaluate_without_gradients

    model, split = FirstPixel(), _points()
    result, worst = evaluate_without_gradients(
        model, FirstPixel(), FlipHalf(parity=0.0), split, black_box=FlipHalf(parity=1.0)
    )
    assert worst.per_attack == {"bpda": 0.5, "black-box": 0.5}
    assert result.robust.tolist() == [False] * len(split)
    assert result.robust_accuracy == 0.0


def test_the_store_refuses_two_values_under_one_metric_key(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "store.sqlite")
    metrics = [
        Metric("robust_accuracy", 0.4, "pgd10-linf", 0.1),
        Metric("robust_accuracy", 0.6, "pgd10-linf", 0.1),
    ]
    with pytest.raises(ValueError, match="pgd10-linf"):
        store.record(
            cell_id="c", experiment="e", config={}, grid_values={}, metrics=metrics, info={},
            seconds=0.0,
        )  # fmt: skip
    assert store.runs(status=None) == []  # nothing half-written
