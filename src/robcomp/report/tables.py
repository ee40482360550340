"""The leaderboard: one row per finished cell, cost and robustness side by side."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from rich.console import Group
from rich.table import Table

from robcomp.experiments.store import Metric, ResultStore, RunRow
from robcomp.experiments.transfer import TRANSFER_METRIC
from robcomp.experiments.worst import WORST

EFFICIENCY = ("compression_rate", "params", "nonzero_params", "size_bytes", "sparse_bytes", "macs")


def attack_column(attack: str, eps: float) -> str:
    return f"{attack}@{eps:.4g}"


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


def _row(run: RunRow) -> dict[str, Any]:
    row = _identity(run)
    # Metrics of shifted splits (the same names, keyed by shift and severity) have columns of
    # their own (:func:`_shift_columns`): they must never overwrite the test split's.
    unshifted = [m for m in run.metrics if not m.shift]
    worst: dict[str, float | None] = {}
    flags = sorted(
        m.name.removeprefix("flag:") for m in unshifted if m.name.startswith("flag:") and m.value
    )
    if any(m.name.startswith("flag:") for m in unshifted):
        row["masking_flags"] = ",".join(flags) or "none"
        row["masking"] = run.info.get("masking")
    for m in unshifted:
        if m.name == "robust_accuracy":
            row[attack_column(m.attack, m.eps)] = m.value
        elif m.name == WORST:
            worst[attack_column(m.attack, m.eps)] = m.value
        elif m.name == "mean_norm" and math.isinf(m.eps):
            # an unbounded minimal-norm attack: its mean norm is the average minimal perturbation
            row[f"min_norm:{m.attack}"] = m.value
        elif not m.attack and not m.name.startswith("flag:"):
            row[m.name] = m.value
    if run.info.get("gradient_free"):
        row["gradient_free"] = run.info["gradient_free"]
    # after the attack columns: per threat model, the points no attack of it broke
    row.update(worst)
    row.update(_shift_columns(run.metrics, taken=set(row)))
    primary = (run.info.get("worst_case") or {}).get("primary")
    row["primary_threat_model"] = (
        attack_column(f"worst-{primary['norm']}", primary["eps"]) if primary else None
    )
    row[WORST] = worst.get(row["primary_threat_model"] or "")
    row["seconds"] = run.seconds
    return row


def shift_column(split: str) -> str:
    """The leaderboard column of clean accuracy on an ungraded shifted split (``acc:usps``)."""
    return f"acc:{split}"


def _shift_columns(metrics: list[Metric], taken: set[str]) -> dict[str, float | None]:
    """Leaderboard columns of the shifted splits: each shift's summary (``mce``,
    ``mean_corruption_accuracy``) under its own name, and clean accuracy on every split without
    a grade (a target domain, ``adv-on``) as ``acc:<split>``. Graded splits (a corruption at
    severity 1-5) are too many for a row; they and every attacked shifted split are in
    ``shifts.csv`` (:func:`shift_rows`).

    A summary name two shifts of the cell share, or one a test-split column already has, is
    qualified by the shift's label (``mce:<label>``), so no value replaces another."""
    summaries: dict[str, list[Metric]] = {}
    out: dict[str, float | None] = {}
    for m in metrics:
        if not m.shift or m.attack:
            continue
        if m.name == "clean_accuracy":
            if m.severity == 0:
                out[shift_column(m.shift)] = m.value
        else:
            summaries.setdefault(m.name, []).append(m)
    for name, found in summaries.items():
        plain = len(found) == 1 and name not in taken
        for m in found:
            out[name if plain else f"{name}:{m.shift}"] = m.value
    return dict(sorted(out.items(), key=lambda kv: kv[0].startswith("acc:")))


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
    """Per shifted split ``(split, severity)``: its robust-accuracy columns (``pgd@0.03``) and
    the average minimal perturbation of unbounded attacks (``min_norm:<attack>``)."""
    out: dict[tuple[str, int], dict[str, float | None]] = {}
    for m in run.metrics:
        if not (m.shift and m.attack):
            continue
        cells = out.setdefault((m.shift, m.severity), {})
        if m.name in _SHIFT_ATTACK_METRICS:
            cells[attack_column(m.attack, m.eps)] = m.value
        elif m.name == "mean_norm" and math.isinf(m.eps):
            cells[f"min_norm:{m.attack}"] = m.value
    return out


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


def attack_columns(rows: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        seen.update({k: None for k in row if "@" in k})
    return list(seen)


def _pct(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.1f}"


def human_count(value: Any) -> str:
    """``1.44k``, ``22.33M``: a count for people; ``-`` when missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.2f}{unit}"
    return str(int(value))


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value:.3g}"


def latency_columns(rows: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        seen.update({k: None for k in row if k.startswith("latency_ms_b")})
    return list(seen)


def _via(info: dict[str, Any] | None) -> str:
    """For models attacked without their own gradients: the route that broke most points."""
    if not info:
        return "-"
    found: dict[str, int] = {}
    for breakdown in info.values():
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


Column = tuple[str, list[str], bool]  # (header, cells, numeric)


def _cost_columns(rows: list[dict[str, Any]]) -> list[Column]:
    return [
        ("compr %", [_pct(r.get("compression_rate")) for r in rows], True),
        *(  # a pruner's rate over the Conv/Linear weights (proximal-l0), next to compr %
            [("wt sparse %", [_pct(r.get("weight_sparsity")) for r in rows], True)]
            if any(r.get("weight_sparsity") is not None for r in rows)
            else []
        ),
        ("nonzero", [human_count(r.get("nonzero_params")) for r in rows], True),
        ("size", [human_count(r.get("size_bytes")) + "B" for r in rows], True),
        ("MACs", [human_count(r.get("macs")) for r in rows], True),
        *(
            (f"ms b{k.removeprefix('latency_ms_b')}", [_ms(r.get(k)) for r in rows], True)
            for k in latency_columns(rows)
        ),
        *(  # a timing means little without the threads it used and the load it ran under
            (header, [_ms(r.get(key)) for r in rows], True)
            for header, key in (("threads", "threads"), ("load", "load_1min"))
            if latency_columns(rows) and any(key in r for r in rows)
        ),
    ]


def _attack_column(column: str, rows: list[dict[str, Any]]) -> Column:
    """Robust accuracy in % under a bounded attack; for an unbounded (eps=inf) minimal-norm
    attack, the mean norm of its perturbations: the average minimal perturbation."""
    attack, _, eps = column.rpartition("@")
    if eps == "inf":
        values = [r.get(f"min_norm:{attack}") for r in rows]
        return (f"{attack}\navg min\nnorm", [_ms(v) for v in values], True)
    return (
        "\n".join(column.replace("@", "-").rsplit("-", 2)),
        [_pct(r.get(column)) for r in rows],
        True,
    )


def _robustness_columns(rows: list[dict[str, Any]]) -> list[Column]:
    columns: list[Column] = [
        ("clean", [_pct(r.get("clean_accuracy")) for r in rows], True),
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


def _keys(rows: list[dict[str, Any]], keep: Any) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        seen.update({k: None for k in row if keep(k)})
    return list(seen)


def _shift_table_columns(rows: list[dict[str, Any]]) -> list[Column]:
    """Shift summaries (mean corruption accuracy, mCE and relative mCE, in %), the source
    validation accuracy and the accuracy on each ungraded shifted split (``on usps``), when
    any row has them."""
    columns: list[Column] = []
    for name, header in SHIFT_SUMMARIES.items():
        for key in _keys(rows, lambda k, n=name: k == n or k.startswith(f"{n}:")):
            label = key.partition(":")[2]
            columns.append(
                (header + (f"\n{label}" if label else ""), [_pct(r.get(key)) for r in rows], True)
            )
    splits = _keys(rows, lambda k: k.startswith("acc:"))
    if splits and any(r.get("val_accuracy") is not None for r in rows):
        columns.append(("val", [_pct(r.get("val_accuracy")) for r in rows], True))
    columns += [(f"on\n{k[4:]}", [_pct(r.get(k)) for r in rows], True) for k in splits]
    return columns


def grid_value(value: Any) -> str:
    """A grid value as a short cell: ``trades beta=6.0 eps=0.1`` for a component spec."""
    if isinstance(value, dict) and "name" in value:
        rest = " ".join(f"{k}={grid_value(v)}" for k, v in value.items() if k != "name")
        return f"{value['name']} {rest}".strip()
    if isinstance(value, list):
        return ", ".join(map(grid_value, value))
    return str(value)


def _table(title: str, caption: str, rows: list[dict[str, Any]], body: list[Column]) -> Table:
    """Name columns (grid values, data, model, compress) then ``body``. Columns whose value is
    the same in every row (one model, one dataset) move into the caption."""
    # A grid over whole ``compress`` sections is shown by the compress column (its label).
    grid_keys = [
        k
        for k in (rows[0] if rows else {})
        if k.startswith("grid:") and k.split(",")[0] != "grid:compress"
    ]
    columns: list[Column] = [
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
        f"{' '.join(h.split())}={cells[0]}"
        for h, cells, _ in columns
        if (h, cells, _) not in shown and cells and cells[0] != "-"
    ]
    table = Table(title=title, caption=caption + ("; all rows: " + ", ".join(same) if same else ""))
    for header, cells, numeric in shown:
        table.add_column(  # cells are never folded; long headers are
            header,
            justify="right" if numeric else "left",
            overflow="fold",
            min_width=max(map(len, cells), default=1),
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
    if any(k.startswith("worst-") for k in attack_columns(rows)):
        caption += (
            "; worst: points no attack of that norm and eps broke; rows ordered by it at "
            "the first threat model"
        )
    if any(k.partition(":")[0] in SHIFT_SUMMARIES or k.startswith("acc:") for r in rows for k in r):
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
