"""Plots people would rather look at than read."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from robcomp.experiments.store import RunRow
from robcomp.report.tables import attack_columns, grid_value

_RATE = re.compile(r"-[0-9.]+p?$")  # the rate at the end of a compressor label: -0.9, -2450p


# Grid axes along a method's line (the x axis is the compression rate they set), or that name
# the method itself (the line's label already does).
RATE_AXES = {"sparsity", "ratio", "target_params", "sensitivity", "bits"}


def _rate_axis(key: str) -> bool:
    axis = key.removeprefix("grid:")
    if axis == "compress" or axis.startswith("compress,"):
        return True
    return axis.startswith("compress.") and axis.removeprefix("compress.") in RATE_AXES


def _group_key(row: dict[str, Any]) -> str:
    # Cells of one compression method (its label without the rate, e.g. magnitude-global) and
    # one fine-tuning that differ only in the rate form one line; any other grid axis splits
    # lines.
    grid = {k: v for k, v in row.items() if k.startswith("grid:") and not _rate_axis(k)}
    method = _RATE.sub("", str(row["compress"]))
    finetune = row.get("finetune", "-")
    return ", ".join(
        [
            row["model"],
            method + ("" if finetune == "-" else f" + {finetune}"),
            *(f"{k[5:]}={grid_value(v)}" for k, v in grid.items()),
        ]
    )


def _color(i: int) -> str:
    """The i-th line's colour, the same in every panel (matplotlib's cycle restarts per axes,
    so a line missing from one panel would shift every colour after it)."""
    return f"C{i % 10}"


def _legend_below(fig: Any, axes: Any, height: float, ncol: int = 3) -> None:
    """A figure legend under the panels: the figure grows by as many rows as the legend needs,
    so the panels keep their ``height`` (inches) however many lines there are."""
    # every line once, from whichever panel has it (not every panel has every line)
    legend = {lab: h for ax in axes.flat for h, lab in zip(*ax.get_legend_handles_labels())}
    handles, labels = list(legend.values()), list(legend)
    # as many columns as fit the figure's width (about 14 characters an inch at 8 pt)
    longest = max((len(lab) for lab in labels), default=1) + 6
    fit = int(fig.get_size_inches()[0] * 14 / longest)
    ncol = max(1, min(ncol, len(labels), fit))
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8)
    extra = 0.15 + 0.2 * -(-len(labels) // ncol)
    fig.set_size_inches(fig.get_size_inches()[0], height + extra)
    fig.tight_layout(rect=(0, extra / (height + extra), 1, 1 - 0.3 / (height + extra)))


def plot_robustness_vs_compression(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Clean and robust accuracy against compression rate, one panel per accuracy measure."""
    if not rows:
        return None
    plt = _pyplot()
    # unbounded attacks (eps=inf) bring every model to ~0 %: nothing to plot
    measures = ["clean_accuracy", *(c for c in attack_columns(rows) if not c.endswith("@inf"))]
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[_group_key(row)].append(row)
    cols = min(3, len(measures))
    nrows = -(-len(measures) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    for ax, measure in zip(axes.flat, measures):
        for i, (label, members) in enumerate(groups.items()):
            pts = sorted(
                (100 * (r.get("compression_rate") or 0.0), 100 * r[measure])
                for r in members
                if r.get(measure) is not None
            )
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label, color=_color(i))
        ax.set_title("clean" if measure == "clean_accuracy" else measure, fontsize=10)
        ax.set_xlabel("compression rate (% of parameters removed)")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(measures) :]:
        ax.axis("off")
    fig.suptitle("Accuracy and robust accuracy vs compression rate")
    _legend_below(fig, axes, 3.4 * nrows)
    return _save(fig, path)


CURVES = {
    "loss": "training loss",
    "train_accuracy": "training accuracy",
    "val_accuracy": "validation accuracy",
    "val_adv_loss": "validation adversarial loss",
    "val_adv_accuracy": "validation adversarial accuracy",
}


def _stage_histories(label: str, history: Any) -> dict[str, list[dict[str, float]]]:
    """The per-epoch records a compressor kept of its own training (``record.details.history``):
    one loop's ``{"epochs": [...]}`` (distill, proximal-l0), stages of them (HYDRA's prune and
    finetune), or a bare list of epoch records (ADMM's)."""
    if isinstance(history, list):
        return {label: history} if history else {}
    if not isinstance(history, dict):
        return {}
    if isinstance(history.get("epochs"), list):
        return {label: history["epochs"]} if history["epochs"] else {}
    stages: dict[str, list[dict[str, float]]] = {}
    for stage, part in history.items():
        stages.update(_stage_histories(f"{label} {stage}", part))
    return stages


# Grid axes that change the trained baseline; the others change only what follows it.
_BASELINE_AXES = ("seed", "data", "model", "train")


def _varying_axes(runs: list[RunRow]) -> list[str]:
    """Grid axes (seed included) whose value differs between runs: each one labels the lines,
    so two seeds or two datasets never share a label and hide each other's curves."""
    axes = dict.fromkeys(k for run in runs for k in run.grid_values)
    return [k for k in axes if len({grid_value(run.grid_values.get(k)) for run in runs}) > 1]


def _axes_suffix(run: RunRow, axes: list[str]) -> str:
    parts = [f"{k}={grid_value(run.grid_values.get(k))}" for k in axes]
    return f" [{', '.join(parts)}]" if parts else ""


def _training_curves(runs: list[RunRow]) -> dict[str, list[dict[str, float]]]:
    """Per-epoch records by stage: each distinct baseline once, then each cell's compressor's
    own training (robust pruning, distillation) and its fine-tuning, labelled by every grid
    axis that varies (the compressor's label already names its own settings)."""
    curves: dict[str, list[dict[str, float]]] = {}
    varying = _varying_axes(runs)
    baseline_axes = [k for k in varying if k.split(".")[0] in _BASELINE_AXES]
    cell_axes = [k for k in varying if not k.startswith("compress")]
    for run in runs:
        objective = run.config["train"].get("objective", {}).get("name", "ce")
        baseline = (run.info.get("baseline") or {}).get("history", {}).get("epochs")
        if baseline:
            label = f"train {run.config['model']['name']} ({objective})"
            curves.setdefault(label + _axes_suffix(run, baseline_axes), baseline)
        compressor = run.info.get("compressor", run.cell_id[:8]) + _axes_suffix(run, cell_axes)
        details = (run.info.get("record") or {}).get("details") or {}
        curves.update(_stage_histories(compressor, details.get("history")))
        if isinstance(details.get("retrain"), dict):
            curves.update(_stage_histories(f"{compressor} retrain", details["retrain"]))
        finetune = run.info.get("finetune")
        if isinstance(finetune, dict) and finetune.get("epochs"):
            tuned = (run.config.get("finetune") or {}).get("objective", {}).get("name", "ce")
            curves[f"fine-tune {compressor} ({tuned})"] = finetune["epochs"]
    return curves


def plot_training(runs: list[RunRow], path: Path) -> Path | None:
    """Per-epoch loss and accuracy of every training stage (with ``train.monitor``, also the
    adversarial loss and accuracy on validation points: Marshall's adversarial-loss curves)."""
    curves = _training_curves(runs)
    measures = [m for m in CURVES if any(m in e for c in curves.values() for e in c)]
    if not measures:
        return None
    plt = _pyplot()
    cols = min(3, len(measures))
    nrows = -(-len(measures) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    for ax, measure in zip(axes.flat, measures):
        for i, (label, epochs) in enumerate(curves.items()):
            pts = [(e["epoch"], e[measure]) for e in epochs if measure in e]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=label, color=_color(i))
        ax.set_title(CURVES[measure], fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(measures) :]:
        ax.axis("off")
    fig.suptitle("Training curves")
    _legend_below(fig, axes, 3.2 * nrows)
    return _save(fig, path)


def plot_weights(runs: list[RunRow], path: Path, max_cells: int = 12) -> Path | None:
    """Histogram of the compressed model's nonzero weights over the dense model's (Marshall's
    Figures 4.1, 4.2), one panel per cell; the title gives the fraction of exact zeros."""
    cells = [r for r in runs if (r.info.get("telemetry") or {}).get("compressed", {}).get("counts")]
    if not cells:
        return None
    plt = _pyplot()
    cells = cells[:max_cells]
    cols = min(4, len(cells))
    nrows = -(-len(cells) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 2.8 * nrows), squeeze=False)
    for ax, run in zip(axes.flat, cells):
        tele = run.info["telemetry"]
        edges = tele["bins"]
        for key, color in (("dense", "0.6"), ("compressed", "C3")):
            hist = tele[key]
            ax.stairs(hist["counts"], edges, color=color, label=key, fill=key == "dense")
        total = sum(tele["compressed"]["counts"]) + tele["compressed"]["zeros"]
        zeros = tele["compressed"]["zeros"] / max(total, 1)
        ax.set_title(f"{run.info.get('compressor', '?')}: {100 * zeros:.0f}% zeros", fontsize=9)
        ax.set_yscale("log")
        ax.set_xlabel("weight")
    for ax in list(axes.flat)[len(cells) :]:
        ax.axis("off")
    fig.suptitle("Nonzero Conv/Linear weights: dense vs compressed")
    _legend_below(fig, axes, 2.8 * nrows, ncol=2)
    return _save(fig, path)


def plot_kept_per_layer(runs: list[RunRow], path: Path) -> Path | None:
    """Fraction of each layer's weights that compression kept, one line per cell."""
    cells = [r for r in runs if (r.info.get("telemetry") or {}).get("kept_per_layer")]
    cells = [r for r in cells if min(r.info["telemetry"]["kept_per_layer"].values()) < 1.0]
    if not cells:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    layers: list[str] = []
    for run in cells:
        kept = run.info["telemetry"]["kept_per_layer"]
        layers = layers if len(layers) >= len(kept) else list(kept)
        ax.plot(range(len(kept)), list(kept.values()), marker="o", label=run.info["compressor"])
    ax.set_xticks(range(len(layers)), layers, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("fraction of weights kept")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Kept fraction per layer")
    fig.tight_layout()
    return _save(fig, path)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    fig.clf()
    _pyplot().close(fig)
    return path
