"""The committed simulation rows of Kwon & Lee's Table 2 (bench/kwon2021-onmanifold-simulation.yaml)
show the paper's direction: at 90 % and 95 % of the weights removed, MC-AT(on) is as accurate as
MC(regular) on clean data and far more accurate on the adv-on set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

RESULTS = (
    Path(__file__).parents[1]
    / "docs"
    / "results"
    / "kwon2021-onmanifold-simulation"
    / "leaderboard.json"
)


def _row(rows: list[dict[str, Any]], objective: str, sparsity: float) -> dict[str, Any]:
    label = f"proximal-l0-{sparsity:g}"  # global allocation; layer's label ends in -layer
    (row,) = (
        r
        for r in rows
        if r["grid:compress.objective"]["name"] == objective and r["compress"] == label
    )
    return row


@pytest.mark.parametrize("sparsity", [0.9, 0.95])
def test_mc_at_on_keeps_clean_accuracy_and_gains_on_adv_on(sparsity: float) -> None:
    rows = json.loads(RESULTS.read_text())
    regular, on = _row(rows, "ce", sparsity), _row(rows, "mc-at-on", sparsity)
    assert on["clean_accuracy"] >= regular["clean_accuracy"] - 0.03
    assert on["acc:adv-on"] >= regular["acc:adv-on"] + 0.20
    for row in (regular, on):  # the rate is the weights removed, as the paper counts it
        assert sparsity <= row["weight_sparsity"] < sparsity + 0.01
        assert row["compression_rate"] == pytest.approx(sparsity, abs=0.01)
