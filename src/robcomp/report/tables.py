"""The leaderboard: one row per finished cell, cost and robustness side by side."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from robcomp.experiments.store import ResultStore, RunRow

EFFICIENCY = ("compression_rate", "params", "nonzero_params", "size_bytes", "sparse_bytes", "macs")


def attack_column(attack: str, eps: float) -> str:
    return f"{attack}@{eps:.4g}"


def _row(run: RunRow) -> dict[str, Any]:
    cfg = run.config
    row: dict[str, Any] = {
        "cell_id": run.cell_id,
        "experiment": run.experiment,
        "data": cfg["data"]["name"],
        "model": cfg["model"]["name"],
        "compress": run.info.get("compressor", cfg["compress"]["name"]),
        "sparsity": cfg["compress"].get("sparsity"),
        "seed": cfg["seed"],
        **{f"grid:{k}": v for k, v in run.grid_values.items()},
    }
    robust: list[float] = []
    flags = sorted(
        m.name.removeprefix("flag:") for m in run.metrics if m.name.startswith("flag:") and m.value
    )
    if any(m.name.startswith("flag:") for m in run.metrics):
        row["masking_flags"] = ",".join(flags) or "none"
        row["masking"] = run.info.get("masking")
    for m in run.metrics:
        if m.name == "robust_accuracy":
            row[attack_column(m.attack, m.eps)] = m.value
            if m.value is not None:
                robust.append(m.value)
        elif not m.attack and not m.name.startswith("flag:"):
            row[m.name] = m.value
    row["worst_robust_accuracy"] = min(robust) if robust else None
    row["seconds"] = run.seconds
    return row


def leaderboard_rows(store: ResultStore) -> list[dict[str, Any]]:
    """Finished cells, most robust first (by mean robust accuracy over all attacks)."""
    rows = [_row(r) for r in store.runs()]

    def score(row: dict[str, Any]) -> tuple[float, float]:
        robust = [v for k, v in row.items() if "@" in k and v is not None]
        mean = sum(robust) / len(robust) if robust else -1.0
        return (mean, row.get("clean_accuracy") or 0.0)

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


def _count(value: Any) -> str:
    if value is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.2f}{unit}"
    return str(int(value))


def _flags(value: str | None) -> str:
    if value is None:
        return "-"
    return "ok" if value == "none" else f"[bold red]{value}[/]"


def leaderboard_table(rows: list[dict[str, Any]], title: str = "robcomp leaderboard") -> Table:
    """A rich table: what each cell costs and how robust it stays (accuracies in %).

    Columns whose value is the same in every row (one model, an unchanged dense size) move into
    the caption, so the table stays readable in an 80-column terminal. The CSV keeps everything.
    """
    grid_keys = [k for k in (rows[0] if rows else {}) if k.startswith("grid:")]
    columns: list[tuple[str, list[str], bool]] = [  # (header, cells, numeric)
        *((k.removeprefix("grid:"), [str(r.get(k)) for r in rows], False) for k in grid_keys),
        *((k, [str(r[k]) for r in rows], False) for k in ("data", "model", "compress")),
        ("compr %", [_pct(r.get("compression_rate")) for r in rows], True),
        ("nonzero", [_count(r.get("nonzero_params")) for r in rows], True),
        ("size", [_count(r.get("size_bytes")) + "B" for r in rows], True),
        ("MACs", [_count(r.get("macs")) for r in rows], True),
        ("clean", [_pct(r.get("clean_accuracy")) for r in rows], True),
        *(
            (c.replace("@", " "), [_pct(r.get(c)) for r in rows], True)
            for c in attack_columns(rows)
        ),
    ]
    if any("masking_flags" in r for r in rows):
        columns.append(("masking?", [_flags(r.get("masking_flags")) for r in rows], False))
    keep = ("grid", "masking")
    shown = [c for c in columns if len(rows) < 2 or len(set(c[1])) > 1 or c[0].startswith(keep)]
    same = [f"{h}={cells[0]}" for h, cells, _ in columns if (h, cells, _) not in shown and cells]
    caption = "accuracies in % on the test split; size = dense file"
    table = Table(title=title, caption=caption + ("; all rows: " + ", ".join(same) if same else ""))
    for header, _, numeric in shown:
        table.add_column(header, justify="right" if numeric else "left", overflow="fold")
    for i in range(len(rows)):
        table.add_row(*(cells[i] for _, cells, _ in shown))
    return table


@dataclass(frozen=True)
class ReportFiles:
    folder: Path
    csv: Path
    json: Path
    plot: Path | None


def write_report(store_path: str | Path, folder: str | Path) -> ReportFiles:
    """Write ``leaderboard.csv``, ``leaderboard.json`` and the robustness plot into ``folder``."""
    from robcomp.report.plots import plot_robustness_vs_compression

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = leaderboard_rows(ResultStore(store_path))
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    csv_path, json_path = folder / "leaderboard.csv", folder / "leaderboard.json"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
    json_path.write_text(json.dumps(rows, indent=2, default=str))
    plot = plot_robustness_vs_compression(rows, folder / "robustness_vs_compression.png")
    return ReportFiles(folder=folder, csv=csv_path, json=json_path, plot=plot)
