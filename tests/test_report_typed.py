"""Typed results from the evaluator to the report: metrics carry their attack, norm, eps, shift
and the points n as fields; the report's columns are typed and their headers only rendered
(never parsed back), accuracies show n and a 95 % interval, and clean accuracy is also
measured on the points the attacks ran on."""

from __future__ import annotations

import ast
import io
import re
from pathlib import Path

import pytest
from rich.console import Console

from robcomp.experiments import load_experiment, run_experiment
from robcomp.experiments.store import ATTACKED_CLEAN_ACCURACY, STORE_NAME, Metric, ResultStore
from robcomp.report.columns import Column, Kind
from robcomp.report.format import interval, pct, pct_interval, wilson_interval
from robcomp.report.html import write_html
from robcomp.report.tables import attack_columns, leaderboard_rows, leaderboard_table

SRC = Path(__file__).resolve().parents[1] / "src" / "robcomp"

# --- no string keys built in one place and parsed in another --------------------------------

# the old string keys' prefixes, and the methods that parsed them back
KEY_PREFIXES = {"flag:", "acc:", "route_accuracy:", "min_norm:", "worst-", "@inf"}
PARSERS = {"partition", "rpartition", "split", "rsplit", "startswith", "endswith", "removeprefix"}


def _parses_a_key(node: ast.AST) -> bool:
    """``k.rpartition("@")``, ``k.startswith("acc:")``, ``"@" in k`` and the like."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        args = [a.value for a in node.args if isinstance(a, ast.Constant)]
        at = node.func.attr in ("partition", "rpartition") and "@" in args
        return at or (node.func.attr in PARSERS and any(a in KEY_PREFIXES for a in args))
    if isinstance(node, ast.Compare) and isinstance(node.left, ast.Constant):
        return node.left.value == "@" and isinstance(node.ops[0], ast.In | ast.NotIn)
    return False


def test_no_module_parses_metric_keys_back() -> None:
    found = [
        f"{path.relative_to(SRC)}:{node.lineno}"
        for path in sorted(SRC.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if _parses_a_key(node)
    ]
    assert found == []


def test_no_module_builds_flag_or_route_metric_names() -> None:
    """The masking checks and the gradient-free routes are fields, not name prefixes (the
    store's migration of older stores names the old prefix once, in SQL)."""
    built = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value for v in node.values if isinstance(v, ast.Constant))
                if any(p in text for p in ("flag:", "route_accuracy:")):
                    built.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert built == []


# --- a report whose labels contain "@" and ":" ----------------------------------------------

ODD_ATTACK = "pgd@v2:fast-linf"  # a user's attack label with both separators
ODD_SPLIT = "usps@2020:v1"  # a target domain named with both


def _odd_store(path: Path, n: int | None) -> ResultStore:
    store = ResultStore(path)
    metrics = [
        Metric("clean_accuracy", 0.9, n=None if n is None else 4 * n),
        Metric(ATTACKED_CLEAN_ACCURACY, 0.875, n=n),
        Metric("robust_accuracy", 0.5, ODD_ATTACK, 0.1, n=n, norm="linf"),
        Metric("robust_accuracy", 0.25, "ddn@2-l2", float("inf"), n=n, norm="l2"),
        Metric("mean_norm", 1.5, "ddn@2-l2", float("inf"), n=n, norm="l2"),
        Metric("worst_robust_accuracy", 0.5, "worst-linf", 0.1, n=n, norm="linf"),
        Metric("clean_accuracy", 0.7, shift=ODD_SPLIT, n=n),
        Metric("zero_gradients", 1.0),
    ]
    store.record(
        cell_id="c1", experiment="e", grid_values={}, metrics=metrics, seconds=1.0,
        config={"data": {"name": "digits"}, "model": {"name": "m"},
                "compress": {"name": "none"}, "seed": 0},
        info={"worst_case": {"primary": {"norm": "linf", "eps": 0.1}},
              "diagnostics": [{"check": "zero_gradients", "raised": True, "value": 1.0,
                               "message": "m"}]},
    )  # fmt: skip
    return store


def _text(rows: list[dict[str, object]]) -> str:
    console = Console(file=io.StringIO(), width=400, record=True, color_system=None)
    console.print(leaderboard_table(rows))
    return console.export_text(styles=False)


def test_labels_with_at_signs_and_colons_render_as_their_own_columns(tmp_path: Path) -> None:
    (row,) = leaderboard_rows(_odd_store(tmp_path / "s.sqlite", n=200))
    assert attack_columns([row]) == [
        Column(Kind.ROBUST, attack=ODD_ATTACK, norm="linf", eps=0.1),
        Column(Kind.ROBUST, attack="ddn@2-l2", norm="l2", eps=float("inf")),
        Column(Kind.WORST, attack="worst-linf", norm="linf", eps=0.1),
    ]  # the shifted split is no attack, whatever its name holds
    assert row[f"{ODD_ATTACK}@0.1"] == 0.5 and row[f"acc:{ODD_SPLIT}"] == 0.7
    assert row["primary_threat_model"] == "worst-linf@0.1" and row["masking_flags"] == (
        "zero_gradients"
    )
    assert "zero_gradients" not in row  # a check is not a plain column
    text = _text([row])
    assert "pgd@v2:fast" in text and "avg min" in text and ODD_SPLIT in text
    assert "1.5" in text  # the unbounded attack's average minimal perturbation


def test_html_headers_keep_the_labels_whole(tmp_path: Path) -> None:
    _odd_store(tmp_path / "s.sqlite", n=200)
    page = write_html(tmp_path / "s.sqlite", tmp_path / "report").read_text()
    robustness = page.split('id="robustness"')[1].split("</table>")[0]
    headers = [
        re.sub(r"<[^>]+>", "", h).strip() for h in re.findall(r"<th.*?</th>", robustness, re.S)
    ]
    assert f"{ODD_ATTACK}@0.1 %" in headers and f"on {ODD_SPLIT} %" in headers
    assert "ddn@2-l2 avg min norm" in headers and "worst linf@0.1 %" in headers
    assert not any(h.startswith(("acc:", "usps")) for h in headers)


# --- n and the 95 % interval ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [  # Wilson score intervals (Wilson 1927; Newcombe 1998, Table I)
        (50, 100, 0.4038, 0.5962),
        (0, 10, 0.0, 0.2775),
        (10, 10, 0.7225, 1.0),
        (81, 263, 0.2553, 0.3662),
    ],
)
def test_wilson_interval_on_known_counts(k: int, n: int, low: float, high: float) -> None:
    got = wilson_interval(k / n, n)
    assert got == pytest.approx((low, high), abs=1e-4)


def test_missing_values_and_unknown_n_show_no_interval() -> None:
    assert pct(None) == pct(float("nan")) == "-"
    assert interval(0.5, None) == "" and interval(None, 100) == ""
    assert pct_interval(0.5, None) == "50.0"
    assert pct_interval(0.5, 100) == "50.0 (40.4-59.6) n=100"
    assert pct_interval(0.5, 100, with_n=False, digits=0, sep="\n") == "50.0\n(40-60)"
    with pytest.raises(ValueError, match="n=0"):
        wilson_interval(0.5, 0)


def test_tables_show_n_and_the_interval_beside_each_accuracy(tmp_path: Path) -> None:
    (row,) = leaderboard_rows(_odd_store(tmp_path / "s.sqlite", n=200))
    text = _text([row])
    low, high = wilson_interval(0.5, 200)
    # the terminal's interval is in whole percents, under the accuracy
    assert f"({100 * low:.0f}-{100 * high:.0f})" in text and "n=200" in text
    assert "n=800" in text  # clean accuracy on the whole test split
    assert "clean on" in text and "87.5" in text  # clean on the attacked points
    page = write_html(tmp_path / "s.sqlite", tmp_path / "report").read_text()
    assert f"50.0 ({100 * low:.1f}-{100 * high:.1f}, n=200)" in page


def test_a_store_without_n_shows_plain_percentages(tmp_path: Path) -> None:
    (row,) = leaderboard_rows(_odd_store(tmp_path / "s.sqlite", n=None))
    text = _text([row])
    body = [line for line in text.splitlines() if "│" in line]  # the tables' rows
    assert any("50.0" in line for line in body)
    assert not any("n=" in line or "(" in line for line in body)
    assert "n=" not in text.split("robustness")[1].split("accuracy in %")[0]  # nor headers


# --- clean accuracy on the attacked points, from a real run ---------------------------------


def test_a_run_records_clean_accuracy_on_the_attacked_points_with_n(tmp_path: Path) -> None:
    limit = 24
    raw = {
        "name": "subset",
        "data": {"name": "digits", "train_limit": 200},
        "model": {"name": "tiny_mlp"},
        "train": {"epochs": 1, "lr": 0.05, "batch_size": 64},
        "compress": {"name": "magnitude", "sparsity": 0.5},
        "evaluate": {"attacks": [{"name": "fgsm", "eps": 0.1}], "limit": limit,
                     "diagnostics": False},
    }  # fmt: skip
    run_experiment(load_experiment(raw), tmp_path)
    (run,) = ResultStore(tmp_path / STORE_NAME).runs()
    by_name = {m.name: m for m in run.metrics if not m.attack}
    subset, clean = by_name[ATTACKED_CLEAN_ACCURACY], by_name["clean_accuracy"]
    assert subset.n == limit and clean.n is not None and clean.n > limit
    robust = next(m for m in run.metrics if m.name == "robust_accuracy")
    assert (robust.n, robust.norm, robust.eps) == (limit, "linf", 0.1)
    assert robust.value is not None and subset.value is not None
    assert robust.value <= subset.value  # robust points are among the correctly classified
    (row,) = leaderboard_rows(ResultStore(tmp_path / STORE_NAME))
    assert row[ATTACKED_CLEAN_ACCURACY] == subset.value
