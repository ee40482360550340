"""The leaderboard: one row per finished cell, cost and robustness side by side."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from rich.console import Group
from rich.table import Table

from robcomp.experiments.store import ATTACKED_CLEAN_ACCURACY, Metric, ResultStore, RunRow
from robcomp.experiments.transfer import TRANSFER_METRIC
from robcomp.experiments.worst import WORST
from robcomp.report.columns import (
    COLUMNS,
    Column,
    Kind,
    columns_of,
    metric_column,
    points,
    value,
)
from robcomp.report.format import human_count, ms, ordered_keys, pct, pct_interval

EFFICIENCY = ("compression_rate", "params", "nonzero_params", "size_bytes", "sparse_bytes", "macs")
CLEAN = metric_column("clean_accuracy")
ATTACKED_CLEAN = metric_column(ATTACKED_CLEAN_ACCURACY)
VAL = metric_column("val_accuracy")


def _finetune_label(finetune: dict[str, Any] | None) -> str:
    """``pgd-at x16`` (objective and epochs) of a cell's fine-tuning, ``-`` when there is none,
    so rows that differ only in how they were fine-tuned can be told apart."""
    if not finetune:
        return "-"
    objective = finetune.get("objective") or {}
    return f"{objective.get('name', 'ce')} x{finetune.get('epochs', '?')}"


def _identity(run: RunRow) -> dict[str, Any]:
    """The columns that say which cell a row is (leaderboard and ``shifts.csv`` alike)."""
    cfg = run.config
    return {
        "cell_id": run.cell_id,
        "experiment": run.experiment,
        "data": cfg["data"]["name"],
        "model": cfg["model"]["name"],
        "compress": run.info.get("compressor", cfg["compress"]["name"]),
        "method": cfg["compress"]["name"],
        "sparsity": cfg["compress"].get("sparsity"),
        # a string in info says why fine-tuning was skipped (int8 models cannot be trained)
        "finetune": "skipped"
        if isinstance(run.info.get("finetune"), str)
        else _finetune_label(cfg.get("finetune")),
        "seed": cfg["seed"],
        **{f"grid:{k}": v for k, v in run.grid_values.items()},
    }


def masking_checks(info: dict[str, Any]) -> dict[str, bool]:
    """The gradient-masking checks a cell ran and whether each was raised, from its info's
    ``diagnostics`` records (its metrics are named by these checks)."""
    return {
        str(d["check"]): bool(d.get("raised"))
        for d in info.get("diagnostics") or []
        if isinstance(d, dict) and "check" in d
    }


def _row(run: RunRow) -> dict[str, Any]:
    """A cell's leaderboard row: its flat columns (the rendering) and, under ``columns``,
    their typed descriptions with the points each value was measured on."""
    row = _identity(run)
    typed: dict[Column, int | None] = {}

    def put(column: Column, value: Any, n: int | None) -> None:
        row[column.label()] = value
        typed[column] = n

    checks = masking_checks(run.info)
    if checks:
        row["masking_flags"] = ",".join(sorted(c for c, up in checks.items() if up)) or "none"
        row["masking"] = run.info.get("masking")
    # Metrics of shifted splits (the same names, keyed by shift and severity) have columns of
    # their own (:func:`_shift_columns`): they must never overwrite the test split's.
    unshifted = [m for m in run.metrics if not m.shift]
    for m in unshifted:
        attack = Column(Kind.ROBUST, attack=m.attack, norm=m.norm, eps=m.eps)
        if m.name == "robust_accuracy":
            put(attack, m.value, m.n)
        elif m.name == "mean_norm" and math.isinf(m.eps):
            # an unbounded minimal-norm attack: its mean norm is the average minimal perturbation
            put(Column(Kind.MIN_NORM, attack=m.attack, norm=m.norm, eps=m.eps), m.value, m.n)
        elif not (m.attack or m.source or m.name in checks):
            if m.n is None:
                row[m.name] = m.value
            else:
                put(metric_column(m.name), m.value, m.n)
    if run.info.get("gradient_free"):
        row["gradient_free"] = run.info["gradient_free"]
    # after the attack columns: per threat model, the points no attack of it broke
    worst = [
        (Column(Kind.WORST, attack=m.attack, norm=m.norm, eps=m.eps), m)
        for m in unshifted
        if m.name == WORST
    ]
    for column, m in worst:
        put(column, m.value, m.n)
    for column, m in _shift_columns(run.metrics, taken=set(row)):
        put(column, m.value, m.n)
    primary = _primary(run.info, [c for c, _ in worst])
    row["primary_threat_model"] = primary.label() if primary else None
    row[WORST] = value(row, primary) if primary else None
    row["seconds"] = run.seconds
    row[COLUMNS] = [column.record(n) for column, n in typed.items()]
    return row


def _primary(info: dict[str, Any], worst: list[Column]) -> Column | None:
    """The worst-case column of the primary threat model the runner recorded (the first
    bounded one of the suite), by its norm and eps."""
    primary = (info.get("worst_case") or {}).get("primary")
    if not primary:
        return None
    wanted = (str(primary["norm"]), float(primary["eps"]))
    return next((c for c in worst if (c.norm, c.eps) == wanted), None)


def _shift_columns(metrics: list[Metric], taken: set[str]) -> list[tuple[Column, Metric]]:
    """Leaderboard columns of the shifted splits: each shift's summary (``mce``,
    ``mean_corruption_accuracy``) under its own name, and clean accuracy on every split without
    a grade (a target domain, ``adv-on``) as ``acc:<split>``. Graded splits (a corruption at
    severity 1-5) are too many for a row; they and every attacked shifted split are in
    ``shifts.csv`` (:func:`shift_rows`).

    A summary name two shifts of the cell share, or one a test-split column already has, is
    qualified by the shift's label (``mce:<label>``), so no value replaces another."""
    summaries: dict[str, list[Metric]] = {}
    accuracies: list[tuple[Column, Metric]] = []
    for m in metrics:
        if not m.shift or m.attack:
            continue
        if m.name == "clean_accuracy":
            if m.severity == 0:
                accuracies.append((Column(Kind.SHIFT_ACCURACY, shift=m.shift), m))
        elif m.name != ATTACKED_CLEAN_ACCURACY:
            summaries.setdefault(m.name, []).append(m)
    out = []
    for name, found in summaries.items():
        plain = len(found) == 1 and name not in taken
        for m in found:
            out.append((Column(Kind.SHIFT_SUMMARY, name=name, shift="" if plain else m.shift), m))
    return out + accuracies


def _source_name(data: Any) -> str:
    """The source domain of a cell's ``data`` spec: the wrapped source of ``{name: domain,
    source: ...}`` and of an ``imagefolder`` (the same rule as the ``domains`` shift)."""
    spec = {"name": data} if isinstance(data, str) else dict(data)
    if spec.get("name") == "domain" and spec.get("source") is not None:
        spec = {"name": spec["source"]} if isinstance(spec["source"], str) else spec["source"]
    if spec.get("name") == "imagefolder" and spec.get("source"):
        return str(spec["source"])
    return str(spec.get("name"))


# Metrics of an attack on a shifted split that shifts.csv keeps, by the column they go to.
_SHIFT_ATTACK_METRICS = ("robust_accuracy", WORST)


def _attacked(run: RunRow) -> dict[tuple[str, int], dict[str, float | None]]:
    """Per shifted split ``(split, severity)``: its robust-accuracy columns (``pgd@0.03``),
    the average minimal perturbation of unbounded attacks (``min_norm:<attack>``) and the
    clean accuracy on the attacked points (``attacked_clean_accuracy``)."""
    out: dict[tuple[str, int], dict[str, float | None]] = {}
    for m in run.metrics:
        if not m.shift:
            continue
        cells = out.setdefault((m.shift, m.severity), {})
        kind = Kind.ROBUST if m.name == "robust_accuracy" else Kind.WORST
        if m.name == ATTACKED_CLEAN_ACCURACY:
            cells[ATTACKED_CLEAN.label()] = m.value
        elif m.attack and m.name in _SHIFT_ATTACK_METRICS:
            cells[Column(kind, attack=m.attack, norm=m.norm, eps=m.eps).label()] = m.value
        elif m.attack and m.name == "mean_norm" and math.isinf(m.eps):
            cells[Column(Kind.MIN_NORM, attack=m.attack, norm=m.norm, eps=m.eps).label()] = m.value
    return {split: cells for split, cells in out.items() if cells}


def _split_records(run: RunRow) -> list[tuple[str, dict[str, Any]]]:
    """``(shift label, record)`` of every shifted split of the cell: the runner's
    ``info["shifts"]`` records, then any shifted clean accuracy stored without one (label and
    family unknown)."""
    records = [
        (label, dict(record))
        for label, rows in (run.info.get("shifts") or {}).items()
        for record in rows or []
    ]
    known = {(r["shift"], int(r["severity"])) for _, r in records}
    for m in run.metrics:
        stored = m.shift and not m.attack and m.name == "clean_accuracy"
        if stored and (m.shift, m.severity) not in known:
            records.append(("", {"shift": m.shift, "severity": m.severity, "accuracy": m.value}))
    return records


def shift_rows(runs: list[RunRow]) -> list[dict[str, Any]]:
    """Long format, one row per (finished cell, shifted split): the cell's identity and
    compression rate, then ``shift`` (the shift's label, e.g. ``corruptions[...]-cifar``),
    ``split`` (``fog``, ``usps``, ``adv-on``), ``severity`` (0 = ungraded), ``family``, ``n``
    points, the cell's ``accuracy`` and its dense baseline's ``baseline_accuracy`` on it, and,
    with ``evaluate.attack_shifted``, robust accuracy per attack (``pgd@0.03``)."""
    out = []
    for run in runs:
        identity = _identity(run)
        identity["source"] = _source_name(run.config["data"])
        identity["compression_rate"] = next(
            (m.value for m in run.metrics if m.name == "compression_rate" and not m.shift), None
        )
        attacked = _attacked(run)
        for label, record in _split_records(run):
            split, severity = str(record["shift"]), int(record["severity"])
            out.append(
                {
                    **identity,
                    "shift": label,
                    "split": split,
                    "severity": severity,
                    "family": record.get("family", ""),
                    "n": record.get("n"),
                    "accuracy": record.get("accuracy"),
                    "baseline_accuracy": record.get("baseline_accuracy"),
                    **attacked.get((split, severity), {}),
                }
            )
    return out


def transfer_rows(runs: list[RunRow]) -> list[dict[str, Any]]:
    """One row per stored transfer entry (``transfer.csv``): the target cell (its identity
    columns), the source (a cell id or ``checkpoint:<folder>@<hash>``), the attack, eps, the
    number of points and the target's accuracy on the source's examples."""
    return [
        {
            **_identity(run),
            "source": m.source,
            "attack": m.attack,
            "eps": m.eps,
            "n": m.n,
            "accuracy": m.value,
        }
        for run in runs
        for m in run.metrics
        if m.name == TRANSFER_METRIC
    ]


def leaderboard_rows(store: ResultStore) -> list[dict[str, Any]]:
    """Finished cells, most robust first: by the per-point worst case at the primary threat
    model (the first bounded one of the suites; the most common one when experiments differ),
    then clean accuracy. Rows without it come last."""
    rows = [_row(r) for r in store.runs()]
    primaries = Counter(r["primary_threat_model"] for r in rows if r["primary_threat_model"])
    primary = primaries.most_common(1)[0][0] if primaries else None

    def score(row: dict[str, Any]) -> tuple[float, float]:
        worst = row.get(primary) if primary else None
        return (-1.0 if worst is None else worst, row.get("clean_accuracy") or 0.0)

    return sorted(rows, key=score, reverse=True)


def spreadsheet_row(row: dict[str, Any]) -> dict[str, Any]:
    """A leaderboard row for ``leaderboard.csv``: its flat columns only (the typed ones are a
    list, kept in ``leaderboard.json``)."""
    return {k: v for k, v in row.items() if k != COLUMNS}


def attack_columns(rows: list[dict[str, Any]]) -> list[Column]:
    """The rows' attack columns, robust accuracy per attack then the per-point worst cases,
    in the order they first appear."""
    return columns_of(rows, Kind.ROBUST, Kind.WORST)


def latency_columns(rows: list[dict[str, Any]]) -> list[str]:
    return ordered_keys(rows, lambda k: k.startswith("latency_ms_b"))


def _via(info: list[dict[str, Any]] | dict[str, Any] | None) -> str:
    """For models attacked without their own gradients: the route that broke most points."""
    if not info:
        return "-"
    found: dict[str, int] = {}
    # a record per attack; stores before schema 5 keyed them by the attack's column
    for breakdown in info.values() if isinstance(info, dict) else info:
        for route, count in breakdown["found_by"].items():
            found[route] = found.get(route, 0) + count
    total = sum(found.values())
    if not total:
        return "none"
    top = max(found, key=lambda k: found[k])
    return f"{top} {100 * found[top] / total:.0f}%"


def _flags(value: str | None) -> str:
    if value is None:
        return "-"
    return "ok" if value == "none" else f"[bold red]{value}[/]"


TableColumn = tuple[str, list[str], bool]  # (header, cells, numeric)


def _cost_columns(rows: list[dict[str, Any]]) -> list[TableColumn]:
    return [
        ("compr %", [pct(r.get("compression_rate")) for r in rows], True),
        *(  # a pruner's rate over the Conv/Linear weights (proximal-l0), next to compr %
            [("wt sparse %", [pct(r.get("weight_sparsity")) for r in rows], True)]
            if any(r.get("weight_sparsity") is not None for r in rows)
            else []
        ),
        ("nonzero", [human_count(r.get("nonzero_params")) for r in rows], True),
        ("size", [human_count(r.get("size_bytes")) + "B" for r in rows], True),
        ("MACs", [human_count(r.get("macs")) for r in rows], True),
        *(
            (f"ms b{k.removeprefix('latency_ms_b')}", [ms(r.get(k)) for r in rows], True)
            for k in latency_columns(rows)
        ),
        *(  # a timing means little without the threads it used and the load it ran under
            (header, [ms(r.get(key)) for r in rows], True)
            for header, key in (("threads", "threads"), ("load", "load_1min"))
            if latency_columns(rows) and any(key in r for r in rows)
        ),
    ]


def _accuracy_column(header: list[str], column: Column, rows: list[dict[str, Any]]) -> TableColumn:
    """Accuracy in % with its 95 % interval below it (in whole percents: a terminal is
    narrow); ``n`` under the header when every row measured it on the same number of points,
    else in each cell (no interval where n is unknown)."""
    counts = {points(r, column) for r in rows if value(r, column) is not None}
    shared = counts.pop() if len(counts) == 1 else None
    if shared is not None:
        header = [*header, f"n={shared}"]
    cells = [
        pct_interval(value(r, column), points(r, column), with_n=shared is None, digits=0, sep="\n")
        for r in rows
    ]
    return ("\n".join(header), cells, True)


def _attack_column(column: Column, rows: list[dict[str, Any]]) -> TableColumn:
    """Robust accuracy in % under a bounded attack; for an unbounded (eps=inf) minimal-norm
    attack, the mean norm of its perturbations: the average minimal perturbation."""
    if not column.bounded:
        norms = Column(Kind.MIN_NORM, attack=column.attack, norm=column.norm, eps=column.eps)
        values = [value(r, norms) for r in rows]
        return (f"{column.attack}\navg min\nnorm", [ms(v) for v in values], True)
    return _accuracy_column(column.headers(), column, rows)


def _robustness_columns(rows: list[dict[str, Any]]) -> list[TableColumn]:
    columns: list[TableColumn] = [
        _accuracy_column(["clean"], CLEAN, rows),
        *(
            [_accuracy_column(["clean on", "attacked"], ATTACKED_CLEAN, rows)]
            if any(value(r, ATTACKED_CLEAN) is not None for r in rows)
            else []
        ),
        *(_attack_column(c, rows) for c in attack_columns(rows)),
    ]
    columns += _shift_table_columns(rows)
    if any("masking_flags" in r for r in rows):
        columns.append(("masking?", [_flags(r.get("masking_flags")) for r in rows], False))
    if any(r.get("gradient_free") for r in rows):
        columns.append(("via", [_via(r.get("gradient_free")) for r in rows], False))
    return columns


# Shift summaries the robustness table shows, by header (the CSV and JSON keep every one).
SHIFT_SUMMARIES = {
    "mean_corruption_accuracy": "corr\nacc",
    "mce": "mCE",
    "relative_mce": "rel\nmCE",
    "combined_accuracy": "clean+\nadv-on",
}


def shift_summaries(rows: list[dict[str, Any]], name: str) -> list[Column]:
    """The columns of the shift summary ``name`` (``mce``, or one per shift when qualified)."""
    return [c for c in columns_of(rows, Kind.SHIFT_SUMMARY) if c.name == name]


def _shift_table_columns(rows: list[dict[str, Any]]) -> list[TableColumn]:
    """Shift summaries (mean corruption accuracy, mCE and relative mCE, in %), the source
    validation accuracy and the accuracy on each ungraded shifted split (``on usps``), when
    any row has them."""
    columns: list[TableColumn] = []
    for name, header in SHIFT_SUMMARIES.items():
        for c in shift_summaries(rows, name):
            qualified = header + (f"\n{c.shift}" if c.shift else "")
            columns.append((qualified, [pct(value(r, c)) for r in rows], True))
    splits = columns_of(rows, Kind.SHIFT_ACCURACY)
    if splits and any(value(r, VAL) is not None for r in rows):
        columns.append(_accuracy_column(["val"], VAL, rows))
    columns += [_accuracy_column(["on", c.shift], c, rows) for c in splits]
    return columns


def grid_value(value: Any) -> str:
    """A grid value as a short cell: ``trades beta=6.0 eps=0.1`` for a component spec."""
    if isinstance(value, dict) and "name" in value:
        rest = " ".join(f"{k}={grid_value(v)}" for k, v in value.items() if k != "name")
        return f"{value['name']} {rest}".strip()
    if isinstance(value, list):
        return ", ".join(map(grid_value, value))
    return str(value)


def _table(title: str, caption: str, rows: list[dict[str, Any]], body: list[TableColumn]) -> Table:
    """Name columns (grid values, data, model, compress) then ``body``. Columns whose value is
    the same in every row (one model, one dataset) move into the caption."""
    # A grid over whole ``compress`` sections is shown by the compress column (its label).
    grid_keys = [
        k
        for k in (rows[0] if rows else {})
        if k.startswith("grid:") and k.split(",")[0] != "grid:compress"
    ]
    columns: list[TableColumn] = [
        *(
            (k.removeprefix("grid:"), [grid_value(r.get(k)) for r in rows], False)
            for k in grid_keys
        ),
        *(
            (k, [str(r.get(k, "-")) for r in rows], False)
            for k in ("data", "model", "compress", "finetune")
        ),
        *body,
    ]
    keep = ("grid", "masking", "compress")
    shown = [c for c in columns if len(rows) < 2 or len(set(c[1])) > 1 or c[0].startswith(keep)]
    same = [  # headers are folded over lines; the caption has them on one
        f"{' '.join(h.split())}={' '.join(cells[0].split())}"
        for h, cells, _ in columns
        if (h, cells, _) not in shown and cells and cells[0] != "-"
    ]
    table = Table(title=title, caption=caption + ("; all rows: " + ", ".join(same) if same else ""))
    for header, cells, numeric in shown:
        table.add_column(  # words of a cell are never folded (an interval may wrap under
            header,  # its accuracy in a narrow terminal); long headers are
            justify="right" if numeric else "left",
            overflow="fold",
            min_width=max((len(word) for cell in cells for word in cell.split()), default=1),
        )
    for i in range(len(rows)):
        table.add_row(*(cells[i] for _, cells, _ in shown))
    return table


def leaderboard_table(rows: list[dict[str, Any]], title: str = "robcomp leaderboard") -> Group:
    """Two rich tables over the same rows, so each fits a terminal: what each cell costs, and
    how robust it stays (accuracies in %). The CSV and JSON keep every column."""
    caption = (
        "accuracy in %: clean on the test split, under attack on its first evaluate.limit points"
    )
    if columns_of(rows, Kind.METRIC):  # n recorded (schema 5): intervals are shown
        caption += (
            " (clean on attacked: clean accuracy on those points), each with its 95 % Wilson "
            "interval on n points"
        )
    if columns_of(rows, Kind.WORST):
        caption += (
            "; worst: points no attack of that norm and eps broke; rows ordered by it at "
            "the first threat model"
        )
    if columns_of(rows, Kind.SHIFT_SUMMARY, Kind.SHIFT_ACCURACY):
        caption += (
            "; corr acc: mean over corruptions and severities; mCE, rel mCE: corruption error "
            "against the cell's dense baseline (Hendrycks & Dietterich 2019), 100 = as "
            "the baseline; val: source validation; on X: clean accuracy on shifted split X "
            "(every split: shifts.csv)"
        )
    if any(r.get("gradient_free") for r in rows):
        caption += (
            "; via: for models without gradients (int8), robust accuracy is the worst case over "
            "bpda (gradients of the fake-quant twin), transfer (from the fp32 model) and "
            "black-box (Square); the route that broke most points"
        )
    return Group(
        _table(
            f"{title}: cost",
            "compr %: parameters removed; wt sparse %: Conv/Linear weights removed, as a pruner "
            "counts its sparsity; size: the saved model; ms bN: median ms per forward "
            "pass on N images",
            rows,
            _cost_columns(rows),
        ),
        _table(f"{title}: robustness", caption, rows, _robustness_columns(rows)),
    )
