"""Plots people would rather look at than read."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from robcomp.report.tables import attack_columns


def _group_key(row: dict[str, Any]) -> str:
    # Cells of one compression method that differ only in its rate form one line; any other
    # grid axis splits lines.
    grid = {k: v for k, v in row.items() if k.startswith("grid:") and "compress" not in k}
    method = row.get("method", row["compress"])
    return ", ".join([row["model"], method, *(f"{k[5:]}={v}" for k, v in grid.items())])


def plot_robustness_vs_compression(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Clean and robust accuracy against compression rate, one panel per accuracy measure."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    measures = ["clean_accuracy", *attack_columns(rows)]
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[_group_key(row)].append(row)
    cols = min(3, len(measures))
    nrows = -(-len(measures) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    for ax, measure in zip(axes.flat, measures):
        for label, members in groups.items():
            pts = sorted(
                (100 * (r.get("compression_rate") or 0.0), 100 * r[measure])
                for r in members
                if r.get(measure) is not None
            )
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_title("clean" if measure == "clean_accuracy" else measure, fontsize=10)
        ax.set_xlabel("compression rate (% of parameters removed)")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(measures) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=8)
    fig.suptitle("Accuracy and robust accuracy vs compression rate")
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
