"""Plots people would rather look at than read."""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from robcomp.experiments.store import RunRow
from robcomp.report.columns import Column, Kind
from robcomp.report.tables import attack_columns, grid_value

log = logging.getLogger(__name__)

_RATE = re.compile(r"-[0-9.]+p?$")  # the rate at the end of a compressor label: -0.9, -2450p


# Grid axes along a method's line (the x axis is the compression rate they set), or that name
# the method itself (the line's label already does).
RATE_AXES = {"sparsity", "ratio", "target_params", "sensitivity", "bits"}


def _rate_axis(key: str) -> bool:
    axis = key.removeprefix("grid:")
    if axis == "compress" or axis.startswith("compress,"):
        return True
    return axis.startswith("compress.") and axis.removeprefix("compress.") in RATE_AXES


def variant_label(compress: Any, finetune: Any) -> str:
    """A compression variant as figures name it: the compressor's label and its fine-tuning
    (``magnitude-global-0.8 + ce x1``); a model whose fine-tuning was skipped because it
    cannot be trained (int8) reads ``int8 (no fine-tuning)``."""
    if finetune in ("-", None):
        return str(compress)
    if finetune == "skipped":
        return f"{compress} (no fine-tuning)"
    return f"{compress} + {finetune}"


def _group_key(row: dict[str, Any]) -> str:
    # Cells of one compression method (its label without the rate, e.g. magnitude-global) and
    # one fine-tuning that differ only in the rate form one line; any other grid axis splits
    # lines.
    grid = {k: v for k, v in row.items() if k.startswith("grid:") and not _rate_axis(k)}
    method = _RATE.sub("", str(row["compress"]))
    return ", ".join(
        [
            str(row["model"]),
            variant_label(method, row.get("finetune", "-")),
            *(f"{k[5:]}={grid_value(v)}" for k, v in grid.items()),
        ]
    )


def _color(i: int) -> str:
    """The i-th colour of matplotlib's default cycle (for things that are not variants)."""
    return f"C{i % 10}"


def variant_colors(rows: list[dict[str, Any]]) -> dict[str, str]:
    """One colour per compression variant (a line of the robustness plot,
    :func:`_group_key`), the same in every figure of a report: each figure passes all the
    report's rows and the variants take colours in sorted order, so neither a figure's own
    subset of cells nor its order shifts them (matplotlib's cycle restarts per axes)."""
    variants = sorted({_group_key(r) for r in rows})
    if len(variants) <= 10:
        return {v: f"C{i}" for i, v in enumerate(variants)}
    from matplotlib import colormaps, colors

    tab20 = colormaps["tab20"]
    return {v: colors.to_hex(tab20(i % 20)) for i, v in enumerate(variants)}


def cell_colors(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Each cell's (``cell_id``'s) variant colour (:func:`variant_colors`)."""
    palette = variant_colors(rows)
    return {r["cell_id"]: palette[_group_key(r)] for r in rows}


_LINESTYLES = ("-", "--", ":", "-.")


def _styles(
    owners: dict[str, str | None], colors: dict[str, str] | None
) -> dict[str, dict[str, str]]:
    """``color`` and ``linestyle`` per line label: the colour of the cell that owns the line
    (``owners``: label -> cell id; grey for lines no cell owns, such as a shared baseline's
    training), and a new line style for each further line of the same colour. Without
    ``colors`` (a figure drawn on its own), each owner takes the next colour of the cycle."""
    if colors is None:
        distinct = dict.fromkeys(o for o in owners.values() if o is not None)
        colors = {o: _color(i) for i, o in enumerate(distinct)}
    seen: Counter[str] = Counter()
    out = {}
    for label, owner in owners.items():
        color = colors.get(owner or "", "0.35")
        out[label] = {"color": color, "linestyle": _LINESTYLES[seen[color] % len(_LINESTYLES)]}
        seen[color] += 1
    return out


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
    measures = ["clean_accuracy", *(c.label() for c in attack_columns(rows) if c.bounded)]
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[_group_key(row)].append(row)
    cols = min(3, len(measures))
    nrows = -(-len(measures) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    palette = variant_colors(rows)
    for ax, measure in zip(axes.flat, measures):
        for label, members in groups.items():
            pts = sorted(
                (100 * (r.get("compression_rate") or 0.0), 100 * r[measure])
                for r in members
                if r.get(measure) is not None
            )
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label, color=palette[label])
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


def _training_curves(
    runs: list[RunRow], owners: dict[str, str | None] | None = None
) -> dict[str, list[dict[str, float]]]:
    """Per-epoch records by stage: each distinct baseline once, then each cell's compressor's
    own training (robust pruning, distillation) and its fine-tuning, labelled by every grid
    axis that varies (the compressor's label already names its own settings). ``owners``, when
    given, receives each curve's cell id (``None`` for a baseline, which cells share)."""
    curves: dict[str, list[dict[str, float]]] = {}
    owners = {} if owners is None else owners
    varying = _varying_axes(runs)
    baseline_axes = [k for k in varying if k.split(".")[0] in _BASELINE_AXES]
    cell_axes = [k for k in varying if not k.startswith("compress")]
    for run in runs:
        objective = run.config["train"].get("objective", {}).get("name", "ce")
        baseline = (run.info.get("baseline") or {}).get("history", {}).get("epochs")
        if baseline:
            label = f"train {run.config['model']['name']} ({objective})"
            curves.setdefault(label + _axes_suffix(run, baseline_axes), baseline)
            owners.setdefault(label + _axes_suffix(run, baseline_axes), None)
        compressor = run.info.get("compressor", run.cell_id[:8]) + _axes_suffix(run, cell_axes)
        details = (run.info.get("record") or {}).get("details") or {}
        curves.update(_stage_histories(compressor, details.get("history")))
        if isinstance(details.get("retrain"), dict):
            curves.update(_stage_histories(f"{compressor} retrain", details["retrain"]))
        finetune = run.info.get("finetune")
        if isinstance(finetune, dict) and finetune.get("epochs"):
            tuned = (run.config.get("finetune") or {}).get("objective", {}).get("name", "ce")
            curves[f"fine-tune {compressor} ({tuned})"] = finetune["epochs"]
        owners.update({label: run.cell_id for label in curves if label not in owners})
    return curves


def plot_training(
    runs: list[RunRow], path: Path, colors: dict[str, str] | None = None
) -> Path | None:
    """Per-epoch loss and accuracy of every training stage (with ``train.monitor``, also the
    adversarial loss and accuracy on validation points: Marshall's adversarial-loss curves).
    ``colors``: each cell's colour (:func:`cell_colors`); a cell's stages take its colour, the
    shared baselines grey."""
    owners: dict[str, str | None] = {}
    curves = _training_curves(runs, owners)
    styles = _styles(owners, colors)
    measures = [m for m in CURVES if any(m in e for c in curves.values() for e in c)]
    if not measures:
        return None
    plt = _pyplot()
    cols = min(3, len(measures))
    nrows = -(-len(measures) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    for ax, measure in zip(axes.flat, measures):
        for label, epochs in curves.items():
            pts = [(e["epoch"], e[measure]) for e in epochs if measure in e]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=label, **styles[label])
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


def plot_kept_per_layer(
    runs: list[RunRow], path: Path, colors: dict[str, str] | None = None
) -> Path | None:
    """Fraction of each layer's weights that compression kept, one line per cell, in its
    variant's colour (``colors``: :func:`cell_colors`)."""
    cells = [r for r in runs if (r.info.get("telemetry") or {}).get("kept_per_layer")]
    cells = [r for r in cells if min(r.info["telemetry"]["kept_per_layer"].values()) < 1.0]
    if not cells:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    layers: list[str] = []
    styles = _styles({r.cell_id: r.cell_id for r in cells}, colors)
    for run in cells:
        kept = run.info["telemetry"]["kept_per_layer"]
        layers = layers if len(layers) >= len(kept) else list(kept)
        ax.plot(range(len(kept)), list(kept.values()), marker="o", label=run.info["compressor"],
                **styles[run.cell_id])  # fmt: skip
    ax.set_xticks(range(len(layers)), layers, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("fraction of weights kept")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Kept fraction per layer")
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------- distribution shifts

# Corruption families in the order of Hendrycks & Dietterich (2019); others follow by name.
FAMILIES = ("noise", "blur", "weather", "digital")


def cell_label(row: dict[str, Any], skip: tuple[str, ...] = ()) -> str:
    """A line per compressed model: ``_group_key`` with the compressor's full label (its rate
    included), leaving out grid axes that start with any of ``skip`` (averaged over)."""
    grid = {
        k: v
        for k, v in row.items()
        if k.startswith("grid:") and not _rate_axis(k) and not (skip and k[5:].startswith(skip))
    }
    return ", ".join(
        [
            str(row.get("model")),
            variant_label(row.get("compress"), row.get("finetune", "-")),
            *(f"{k[5:]}={grid_value(v)}" for k, v in grid.items()),
        ]
    )


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _families(shifts: list[dict[str, Any]]) -> list[str]:
    found = {r["family"] or "other" for r in shifts if r["severity"] > 0}
    return [f for f in FAMILIES if f in found] + sorted(found - set(FAMILIES))


Curve = list[tuple[int, float]]  # (severity, accuracy as a fraction), severity 0 = clean


def severity_curves(
    rows: list[dict[str, Any]], shifts: list[dict[str, Any]]
) -> dict[str, dict[str, Curve]]:
    """Per corruption family, per compressed model (:func:`cell_label`): mean accuracy at each
    severity over the family's corruptions (and over cells sharing a label), with severity 0
    the mean clean accuracy of those cells on the unshifted test split (``rows``)."""
    clean = {r["cell_id"]: r.get("clean_accuracy") for r in rows}
    graded = [r for r in shifts if r["severity"] > 0 and r["accuracy"] is not None]
    out: dict[str, dict[str, Curve]] = {}
    for family in _families(graded):
        members: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in graded:
            if (r["family"] or "other") == family:
                members[cell_label(r)].append(r)
        curves: dict[str, Curve] = {}
        for label, found in members.items():
            by_severity: dict[int, list[float]] = defaultdict(list)
            for r in found:
                by_severity[r["severity"]].append(r["accuracy"])
            cells = dict.fromkeys(r["cell_id"] for r in found)
            by_severity[0] = [v for c in cells if (v := clean.get(c)) is not None]
            curves[label] = sorted((s, _mean(v)) for s, v in by_severity.items() if v)
        out[family] = curves
    return out


def plot_accuracy_vs_severity(
    rows: list[dict[str, Any]], shifts: list[dict[str, Any]], path: Path
) -> Path | None:
    """Accuracy against corruption severity (0 = the clean test split), one panel per
    corruption family (the mean over its corruptions), one line per compressed model: how
    fast each compression loses accuracy as the corruption grows (Hendrycks & Dietterich
    2019). ``None`` without graded shifted splits."""
    panels = severity_curves(rows, shifts)
    if not panels:
        return None
    plt = _pyplot()
    labels = list(dict.fromkeys(label for curves in panels.values() for label in curves))
    owner = {cell_label(r): r["cell_id"] for r in shifts}  # cells of one label: one variant
    styles = _styles({label: owner.get(label) for label in labels}, cell_colors(rows))
    cols = min(4, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.8 * cols, 3.2 * nrows), squeeze=False)
    for ax, (family, curves) in zip(axes.flat, panels.items()):
        for label, pts in curves.items():
            severities, accs = zip(*pts)
            ax.plot(severities, [100 * a for a in accs], marker="o", label=label,
                    **styles[label])  # fmt: skip
        ax.set_title(family, fontsize=10)
        ax.set_xlabel("severity (0 = clean)")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle("Accuracy vs corruption severity (mean over each family's corruptions)")
    _legend_below(fig, axes, 3.2 * nrows)
    return _save(fig, path)


# Grid axes a domain heatmap averages over or draws as its rows, not as separate panels.
_AVERAGED = ("seed", "data")


def domain_matrix(
    rows: list[dict[str, Any]], domain: list[dict[str, Any]], label: str
) -> tuple[list[str], list[str], dict[tuple[str, str], float]]:
    """Sources, targets (the sources first, so the diagonal lines up) and mean accuracy per
    (source, target) of the cells of one method (``label``, :func:`cell_label` without the
    data and seed axes), from ``domain``, shift rows of family ``domain``; the diagonal is
    source-validation accuracy (the test split's when the cell has no validation split)."""
    own = {r["cell_id"]: r for r in rows}
    members = [r for r in domain if cell_label(r, skip=_AVERAGED) == label]
    values: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in members:
        if r["accuracy"] is not None:
            values[(r["source"], r["split"])].append(r["accuracy"])
    for cell_id, source in dict((r["cell_id"], r["source"]) for r in members).items():
        row = own.get(cell_id, {})
        diagonal = row.get("val_accuracy")
        diagonal = row.get("clean_accuracy") if diagonal is None else diagonal
        if diagonal is not None:
            values[(source, source)].append(diagonal)
    sources = list(dict.fromkeys(r["source"] for r in members))
    targets = sources + [t for t in dict.fromkeys(r["split"] for r in members) if t not in sources]
    return sources, targets, {k: _mean(v) for k, v in values.items()}


def _accuracy_panel(
    ax: Any,
    matrix: Any,
    sources: list[str],
    targets: list[str],
    title: str,
    *,
    first_column: bool,
) -> None:
    """One source x target accuracy matrix, every entry written in %, a source scored on
    itself (same name on both axes) in bold; NaN entries (not measured) stay blank."""
    ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            if not np.isnan(value):
                color = "black" if value > 0.6 else "white"
                own = sources[i] == targets[j]
                ax.text(j, i, f"{100 * value:.1f}", ha="center", va="center", fontsize=8,
                        color=color, fontweight="bold" if own else "normal")  # fmt: skip
    ax.set_xticks(range(len(targets)), targets, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(sources)), sources, fontsize=8)
    ax.set_xlabel("target")
    ax.set_ylabel("source" if first_column else "")
    ax.set_title(title, fontsize=9)


def plot_domain_heatmap(
    rows: list[dict[str, Any]], shifts: list[dict[str, Any]], path: Path
) -> Path | None:
    """Source x target accuracy (%) per compression method, the protocol of Shen et al.
    (2024): a row per source domain the grid trained on, a column per domain it was scored
    on; the diagonal is source-validation accuracy. Seeds are averaged. ``None`` without
    splits of family ``domain``."""
    domain = [r for r in shifts if r["family"] == "domain"]
    if not domain:
        return None
    plt = _pyplot()
    labels = list(dict.fromkeys(cell_label(r, skip=_AVERAGED) for r in domain))
    grids = [domain_matrix(rows, domain, label) for label in labels]
    width = max(len(t) for _, t, _ in grids)
    height = max(len(s) for s, _, _ in grids)
    cols = min(3, len(labels))
    nrows = -(-len(labels) // cols)
    size = (0.9 * width + 1.4, 0.6 * height + 1.6)
    fig, axes = plt.subplots(nrows, cols, figsize=(size[0] * cols, size[1] * nrows), squeeze=False)
    for ax, label, (sources, targets, acc) in zip(axes.flat, labels, grids):
        matrix = [[acc.get((s, t), float("nan")) for t in targets] for s in sources]
        _accuracy_panel(ax, matrix, sources, targets, label, first_column=ax in axes[:, 0])
    for ax in list(axes.flat)[len(labels) :]:
        ax.axis("off")
    # every cell is annotated, so no colour bar
    fig.suptitle("Accuracy (%) across domains (diagonal: source validation)")
    fig.tight_layout()
    return _save(fig, path)


MCE_MEASURES = {
    "mce": "mCE (%)",
    "relative_mce": "relative mCE (%)",
}


def plot_mce_vs_compression(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """mCE and relative mCE (both against each cell's own dense baseline, so 100 % is the
    baseline) against compression rate, one line per compression method as in the
    robustness plot. ``None`` when no row has an mCE."""
    measures = [m for m in MCE_MEASURES if any(r.get(m) is not None for r in rows)]
    if "mce" not in measures:
        return None
    plt = _pyplot()
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[_group_key(row)].append(row)
    fig, axes = plt.subplots(1, len(measures), figsize=(4.6 * len(measures), 3.4), squeeze=False)
    palette = variant_colors(rows)
    for ax, measure in zip(axes.flat, measures):
        for label, members in groups.items():
            pts = sorted(
                (100 * (r.get("compression_rate") or 0.0), 100 * r[measure])
                for r in members
                if r.get(measure) is not None
            )
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label, color=palette[label])
        ax.axhline(100, color="0.5", linestyle="--", linewidth=1)  # the dense baseline
        ax.set_title(MCE_MEASURES[measure], fontsize=10)
        ax.set_xlabel("compression rate (% of parameters removed)")
        ax.set_ylabel(MCE_MEASURES[measure])
        ax.grid(alpha=0.3)
    fig.suptitle("Corruption error vs compression rate (100 % = dense baseline)")
    _legend_below(fig, axes, 3.4)
    return _save(fig, path)


MANIFOLD_EXAMPLES = "manifold_examples.npz"
"""The file of on-manifold adversarial examples a cell may leave in its folder
(``<run>/cells/<cell_id>/manifold_examples.npz``), drawn by :func:`plot_manifold_examples`.

The contract (written with ``numpy.savez``; read with ``allow_pickle=False``, so no object
arrays):

- ``x``: the original test inputs, float32 in [0, 1] (or uint8 in [0, 255]), shape (N, C, H, W)
  for images (C = 1 grey or 3 RGB) or (N, C, L) for 1-D signals (C channels of length L).
- ``x_adv``: their on-manifold adversarial examples (Kwon & Lee 2021), the same shape and dtype.
- ``y``: (N,) integer true labels.
- ``y_adv``: (N,) integer labels the attacked model (the dense baseline the ``adv-on`` set was
  built against) predicts on ``x_adv``.
- ``classes`` (optional): (K,) class names (a unicode array), for titles.

A few examples (8 is plenty) are enough. Cells with the same arrays (one baseline's set) are
drawn once.
"""


@dataclass(frozen=True)
class ManifoldExamples:
    """The arrays of a :data:`MANIFOLD_EXAMPLES` file, checked against its contract."""

    x: np.ndarray
    x_adv: np.ndarray
    y: np.ndarray
    y_adv: np.ndarray
    classes: tuple[str, ...] = ()

    def name(self, label: int) -> str:
        return self.classes[label] if 0 <= label < len(self.classes) else str(label)


def load_manifold_examples(path: Path) -> ManifoldExamples:
    """The examples in ``path``; ``ValueError`` naming the broken part of the contract."""
    with np.load(path, allow_pickle=False) as f:
        missing = [k for k in ("x", "x_adv", "y", "y_adv") if k not in f.files]
        if missing:
            raise ValueError(f"{path}: missing arrays {missing}; it has {sorted(f.files)}")
        x, x_adv, y, y_adv = (np.asarray(f[k]) for k in ("x", "x_adv", "y", "y_adv"))
        classes = tuple(str(c) for c in f["classes"]) if "classes" in f.files else ()
    if x.ndim not in (3, 4) or x.shape != x_adv.shape:
        raise ValueError(
            f"{path}: x {x.shape} and x_adv {x_adv.shape} must have one shape, (N, C, H, W) "
            "or (N, C, L)"
        )
    if y.shape != (len(x),) or y_adv.shape != (len(x),):
        raise ValueError(f"{path}: y {y.shape} and y_adv {y_adv.shape} must both be ({len(x)},)")
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    return ManifoldExamples(
        x=x.astype(np.float32) / scale, x_adv=x_adv.astype(np.float32) / scale,
        y=y.astype(np.int64), y_adv=y_adv.astype(np.int64), classes=classes,
    )  # fmt: skip


def manifold_example_sets(
    folders: Mapping[str, Path], labels: dict[str, str], max_sets: int
) -> list[tuple[str, ManifoldExamples]]:
    """Up to ``max_sets`` distinct example sets of the cells in ``labels`` (cell id -> line
    label), in that order, read from their ``folders`` (cell id -> cell folder); a file that
    breaks the contract is logged and skipped."""
    found: dict[bytes, tuple[str, ManifoldExamples]] = {}
    for cell_id, label in labels.items():
        path = folders[cell_id] / MANIFOLD_EXAMPLES if cell_id in folders else None
        if len(found) >= max_sets or path is None or not path.is_file():
            continue
        try:
            examples = load_manifold_examples(path)
        except (ValueError, OSError) as err:
            log.warning("skipping on-manifold examples: %s", err)
            continue
        digest = hashlib.sha1(examples.x_adv.tobytes() + examples.x.tobytes()).digest()
        found.setdefault(digest, (label, examples))
    return list(found.values())


def _show(ax: Any, x: np.ndarray, other: np.ndarray | None = None) -> None:
    """An image (C, H, W) in grey or RGB, or a signal (C, L) as one trace per channel (up to
    3), with ``other`` (the original) dashed behind it for comparison."""
    if x.ndim == 3:
        ax.imshow(x[0] if x.shape[0] != 3 else x.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    for c in range(min(3, x.shape[0])):
        if other is not None:
            ax.plot(other[c], color=_color(c), linestyle="--", linewidth=0.8, alpha=0.6)
        ax.plot(x[c], color=_color(c), linewidth=1.0)
    ax.set_xticks([])
    ax.tick_params(labelsize=6)


def plot_manifold_examples(
    folders: Mapping[str, Path],
    labels: dict[str, str],
    path: Path,
    max_sets: int = 3,
    per_set: int = 8,
) -> Path | None:
    """Originals beside their on-manifold adversarial examples (Kwon & Lee 2021): for each
    distinct example set (:data:`MANIFOLD_EXAMPLES` in a cell's folder, ``folders``: cell
    id -> folder) a row of
    originals with their labels and a row of adversarials with the predicted label; signals
    are traces (the adversarial solid, the original dashed). ``None`` when no cell has one."""
    sets = manifold_example_sets(folders, labels, max_sets)
    if not sets:
        return None
    plt = _pyplot()
    cols = min(per_set, max(len(e.x) for _, e in sets))
    tall = 1.6 if any(e.x.ndim == 3 for _, e in sets) else 1.4  # traces need a little more
    fig, axes = plt.subplots(
        2 * len(sets), cols, figsize=(1.5 * cols + 0.6, tall * 2 * len(sets) + 0.6),
        squeeze=False,
    )  # fmt: skip
    for k, (label, ex) in enumerate(sets):
        for j in range(cols):
            top, bottom = axes[2 * k, j], axes[2 * k + 1, j]
            if j >= len(ex.x):
                top.axis("off")
                bottom.axis("off")
                continue
            _show(top, ex.x[j])
            _show(bottom, ex.x_adv[j], ex.x[j] if ex.x.ndim == 3 else None)
            top.set_title(f"y={ex.name(int(ex.y[j]))}", fontsize=8)
            bottom.set_title(f"pred {ex.name(int(ex.y_adv[j]))}", fontsize=8, color="C3")
        axes[2 * k, 0].set_ylabel(f"{label}\noriginal", fontsize=7)
        axes[2 * k + 1, 0].set_ylabel("on-manifold", fontsize=7)
    fig.suptitle("On-manifold adversarial examples (top: original, bottom: adversarial)")
    fig.tight_layout()
    return _save(fig, path)


def transfer_matrices(
    transfer: list[dict[str, Any]], labels: dict[str, str]
) -> dict[str, tuple[list[str], list[str], list[list[float]]]]:
    """Per attack and eps (``pgd5-linf@0.1``): source names, target names (the cells among
    the sources first, so the diagonal lines up) and the accuracy matrix (NaN where nothing
    is stored), from :func:`~robcomp.report.tables.transfer_rows`. A cell is named by
    ``labels`` (its :func:`cell_label`), a checkpoint by the source label the store holds
    (``checkpoint:<folder>@<content hash>``), shown whole rather than parsed apart."""

    def name(source: str) -> str:
        return labels.get(source, source)

    out: dict[str, tuple[list[str], list[str], list[list[float]]]] = {}

    def panel_of(r: dict[str, Any]) -> str:
        return Column(Kind.ROBUST, attack=r["attack"], eps=r["eps"]).label()

    for panel in dict.fromkeys(map(panel_of, transfer)):
        rows = [r for r in transfer if panel_of(r) == panel]
        named = list(dict.fromkeys(r["source"] for r in rows))
        cells = list(dict.fromkeys(r["cell_id"] for r in rows))
        # the cells among the sources first, in both lists, so their diagonal lines up
        sources = [s for s in named if s in cells] + [s for s in named if s not in cells]
        targets = [s for s in sources if s in cells] + [c for c in cells if c not in sources]
        acc = {(r["source"], r["cell_id"]): r["accuracy"] for r in rows}
        matrix = [[_or_nan(acc.get((s, t))) for t in targets] for s in sources]
        out[panel] = ([name(s) for s in sources], [name(t) for t in targets], matrix)
    return out


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def transfer_labels(rows: list[dict[str, Any]]) -> dict[str, str]:
    """A short name per cell for the transfer heatmap: its model and compression variant
    (``tiny_cnn, magnitude-global-0.8``, the names ``evaluate.transfer.sources`` takes), with
    the fine-tuning when any, and the cell id's start where two cells would share a name."""
    names = {
        r["cell_id"]: f"{r.get('model')}, {variant_label(r.get('compress'), r.get('finetune'))}"
        for r in rows
    }
    counts = Counter(names.values())
    return {c: n if counts[n] == 1 else f"{n} [{c[:6]}]" for c, n in names.items()}


def plot_transfer_heatmap(
    transfer: list[dict[str, Any]], labels: dict[str, str], path: Path
) -> Path | None:
    """Accuracy (%) of each target (column) on adversarial examples crafted on each source
    (row), one panel per attack and eps: Marshall (2020), Algorithm 3 over the grid. A source
    cell's diagonal entry is its own white-box robust accuracy. ``None`` without entries."""
    if not transfer:
        return None
    plt = _pyplot()
    matrices = transfer_matrices(transfer, labels)
    width = max(len(t) for _, t, _ in matrices.values())
    height = max(len(s) for s, _, _ in matrices.values())
    longest = max(len(name) for s, t, _ in matrices.values() for name in s + t)
    cols = min(2, len(matrices))
    nrows = -(-len(matrices) // cols)
    # room for the names: rotated under the columns, beside the rows
    size = (1.1 * width + 1.6 + 0.07 * longest, 0.6 * height + 1.6 + 0.05 * longest)
    fig, axes = plt.subplots(nrows, cols, figsize=(size[0] * cols, size[1] * nrows), squeeze=False)
    for ax, (panel, (sources, targets, matrix)) in zip(axes.flat, matrices.items()):
        _accuracy_panel(ax, matrix, sources, targets, panel, first_column=ax in axes[:, 0])
    for ax in list(axes.flat)[len(matrices) :]:
        ax.axis("off")
    # every cell is annotated, so no colour bar
    fig.suptitle("Accuracy (%) on transferred adversarial examples (diagonal: white-box)")
    fig.tight_layout()
    return _save(fig, path)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    # The image is the box around everything drawn (``bbox_inches="tight"``): a title or
    # legend wider than the panels (one narrow panel under a long title) is never clipped.
    fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.1)
    fig.clf()
    _pyplot().close(fig)
    return path
