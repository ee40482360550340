"""The report folder: leaderboard CSV and JSON, the per-split shift CSV, the transfer CSV, the
robustness plot, telemetry, shift and transfer figures."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robcomp.experiments.store import ResultStore, RunRow
from robcomp.report import plots
from robcomp.report.html import write_html
from robcomp.report.tables import leaderboard_rows, shift_rows, spreadsheet_row, transfer_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportFiles:
    folder: Path
    csv: Path
    json: Path
    plot: Path | None
    figures: tuple[Path, ...] = ()  # training curves, weight histograms, kept per layer, shifts
    shifts: Path | None = None  # shifts.csv, when any cell was scored on shifted data
    transfer: Path | None = None  # transfer.csv, when the experiment had evaluate.transfer
    html: Path | None = None  # report.html, everything above in one self-contained page

    def paths(self) -> list[Path]:
        return [
            self.csv, self.json, *([self.shifts] if self.shifts else []),
            *([self.transfer] if self.transfer else []),
            *([self.plot] if self.plot else []), *self.figures,
            *([self.html] if self.html else []),
        ]  # fmt: skip


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


def write_report(store_path: str | Path, folder: str | Path, html: bool = False) -> ReportFiles:
    """Write ``leaderboard.csv``, ``leaderboard.json``, ``shifts.csv`` (one row per cell and
    shifted split, when there are any), the robustness plot, the telemetry figures (training
    curves, weight histograms, kept fraction per layer) and the shift figures (accuracy vs
    corruption severity, domain heatmap, mCE vs compression, on-manifold examples), and
    ``transfer.csv`` with the transfer heatmap when the store holds transfer attacks, into
    ``folder``. A figure without data is not written.

    The store is opened read-only: a report never changes it. The on-manifold examples are
    read from each cell's folder as the store records it (:func:`cell_folders`; see
    :data:`robcomp.report.plots.MANIFOLD_EXAMPLES`). With ``html``, ``report.html`` is
    written last, every figure inlined (:func:`robcomp.report.html.write_html`)."""
    folder = Path(folder)
    store = ResultStore(store_path, read_only=True)
    folder.mkdir(parents=True, exist_ok=True)
    rows = leaderboard_rows(store)
    csv_path, json_path = folder / "leaderboard.csv", folder / "leaderboard.json"
    _write_csv(csv_path, [spreadsheet_row(r) for r in rows])
    json_path.write_text(json.dumps(rows, indent=2, default=str))
    plot = plots.plot_robustness_vs_compression(rows, folder / "robustness_vs_compression.png")
    runs = store.runs()
    shifted = shift_rows(runs)
    shifts_csv = folder / "shifts.csv" if shifted else None
    if shifts_csv:
        _write_csv(shifts_csv, shifted)
    transferred = transfer_rows(runs)
    transfer_csv = folder / "transfer.csv" if transferred else None
    if transfer_csv:
        _write_csv(transfer_csv, transferred)
    labels = {r["cell_id"]: plots.cell_label(r) for r in rows}
    colors = plots.cell_colors(rows)  # one colour per variant in every figure
    figures = (
        plots.plot_training(runs, folder / "training_curves.png", colors),
        plots.plot_weights(runs, folder / "weights.png"),
        plots.plot_kept_per_layer(runs, folder / "kept_per_layer.png", colors),
        plots.plot_accuracy_vs_severity(rows, shifted, folder / "accuracy_vs_severity.png"),
        plots.plot_domain_heatmap(rows, shifted, folder / "domain_heatmap.png"),
        plots.plot_mce_vs_compression(rows, folder / "mce_vs_compression.png"),
        plots.plot_transfer_heatmap(
            transferred, plots.transfer_labels(rows), folder / "transfer_heatmap.png"
        ),
        plots.plot_manifold_examples(
            cell_folders(store, runs), labels, folder / "on_manifold_examples.png"
        ),
    )
    drawn = tuple(f for f in [plot, *figures] if f is not None)
    page = write_html(store_path, folder, drawn) if html else None
    return ReportFiles(
        folder=folder, csv=csv_path, json=json_path, plot=plot,
        figures=tuple(f for f in figures if f is not None), shifts=shifts_csv,
        transfer=transfer_csv, html=page,
    )  # fmt: skip


def cell_folders(store: ResultStore, runs: list[RunRow]) -> dict[str, Path]:
    """The folder of each cell's files (``cells/<cell_id>/`` in the output folder of the run
    that recorded it, as the store records it) that this machine can read. Cells recorded
    before the store kept that folder are looked for beside a SQLite store's file, where
    `robcomp run` put them; a PostgreSQL store has no such place."""
    folders: dict[str, Path] = {}
    for run in runs:
        root = Path(run.workdir) if run.workdir else (store.path.parent if store.path else None)
        if root is not None and (root / "cells" / run.cell_id).is_dir():
            folders[run.cell_id] = root / "cells" / run.cell_id
    if len(folders) < len(runs):
        log.info(
            "%d of %d cells' folders are not on this machine (another host's run, or a "
            "store without them): their files (on-manifold examples) are left out",
            len(runs) - len(folders), len(runs),
        )  # fmt: skip
    return folders
