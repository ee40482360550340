"""The report folder: leaderboard CSV and JSON, the robustness plot and telemetry figures."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from robcomp.experiments.store import ResultStore
from robcomp.report import plots
from robcomp.report.tables import leaderboard_rows


@dataclass(frozen=True)
class ReportFiles:
    folder: Path
    csv: Path
    json: Path
    plot: Path | None
    figures: tuple[Path, ...] = ()  # training curves, weight histograms, kept per layer

    def paths(self) -> list[Path]:
        return [self.csv, self.json, *([self.plot] if self.plot else []), *self.figures]


def write_report(store_path: str | Path, folder: str | Path) -> ReportFiles:
    """Write ``leaderboard.csv``, ``leaderboard.json``, the robustness plot and the telemetry
    figures (training curves, weight histograms, kept fraction per layer) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    store = ResultStore(store_path)
    rows = leaderboard_rows(store)
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    csv_path, json_path = folder / "leaderboard.csv", folder / "leaderboard.json"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
    json_path.write_text(json.dumps(rows, indent=2, default=str))
    plot = plots.plot_robustness_vs_compression(rows, folder / "robustness_vs_compression.png")
    runs = store.runs()
    figures = (
        plots.plot_training(runs, folder / "training_curves.png"),
        plots.plot_weights(runs, folder / "weights.png"),
        plots.plot_kept_per_layer(runs, folder / "kept_per_layer.png"),
    )
    return ReportFiles(
        folder=folder, csv=csv_path, json=json_path, plot=plot,
        figures=tuple(f for f in figures if f is not None),
    )  # fmt: skip
