"""The self-contained HTML report: one file that opens without a network.

The answer comes first (which compression keeps the most robustness per byte, per threat model
and per shift, and the Pareto front: the most robust model at each size), then trade-off figures
on every cost axis, the cost and robustness tables (sortable by a click on a header), the
per-point worst case, shift results, every figure of the report folder, gradient-masking flags,
per-cell details and the run's environment. Figures are inlined as data URIs; the only script
is a few lines of inline JavaScript that sort tables and switch the cost axis.
"""

from __future__ import annotations

import base64
import importlib.metadata
import logging
import math
import os
import platform
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import yaml

from robcomp.experiments.store import ResultStore, RunRow
from robcomp.report import plots
from robcomp.report.columns import Column, Kind, columns_of, points
from robcomp.report.columns import value as column_value
from robcomp.report.format import human_bytes, human_count, interval, pct
from robcomp.report.format import missing as _missing
from robcomp.report.format import ms as _ms
from robcomp.report.tables import (
    ATTACKED_CLEAN,
    CLEAN,
    SHIFT_SUMMARIES,
    attack_columns,
    latency_columns,
    masking_checks,
    shift_rows,
    shift_summaries,
)

log = logging.getLogger(__name__)

HTML_NAME = "report.html"


# ---------------------------------------------------------------------------- what is compared


@dataclass(frozen=True)
class Measure:
    """A robustness column of the leaderboard the summary ranks models by."""

    key: str
    label: str
    kind: str  # "threat model", "shift" or "clean"
    higher_is_better: bool = True


@dataclass(frozen=True)
class CostAxis:
    """A cost column: what a model costs in bytes, parameters, compute or time."""

    key: str
    label: str
    fmt: Callable[[Any], str]
    lower_is_smaller: bool = True  # False for the fraction of parameters removed
    scale: float = 1.0  # plotted value = column value * scale


def cost_axes(rows: list[dict[str, Any]]) -> list[CostAxis]:
    """Every cost axis with a value in at least one row, bytes on disk first (the default):
    parameters removed alone puts int8 (none removed, a quarter of the bytes) at zero."""
    axes = [
        CostAxis("size_bytes", "bytes on disk (saved model)", human_bytes),
        CostAxis("sparse_bytes", "bytes stored sparse (nonzeros + indices)", human_bytes),
        CostAxis("compression_rate", "parameters removed (%)", pct, False, 100.0),
        CostAxis("macs", "MACs per image", human_count),
        # the smallest batch's latency (one image, as a deployed model answers)
        *(
            CostAxis(k, f"latency, batch {k.removeprefix('latency_ms_b')} (ms)", _ms)
            for k in latency_columns(rows)[:1]
        ),
    ]
    return [a for a in axes if any(not _missing(r.get(a.key)) for r in rows)]


def summary_measures(rows: list[dict[str, Any]]) -> list[Measure]:
    """The primary threat model's per-point worst case first, then the other threat models
    (bounded attacks when no worst case was recorded), the shift summaries (mean corruption
    accuracy, mCE) and the accuracy on every ungraded shifted split (a target domain)."""
    primary = Counter(r["primary_threat_model"] for r in rows if r.get("primary_threat_model"))
    columns = [c for c in attack_columns(rows) if c.bounded]
    worst = [c for c in columns if c.kind is Kind.WORST] or columns
    if primary:
        first = primary.most_common(1)[0][0]  # the label of the primary worst-case column
        worst = sorted(worst, key=lambda c: c.label() != first)
    out = [Measure(c.label(), f"robust accuracy, {c.threat()}", "threat model") for c in worst]
    for name, lower in (("mean_corruption_accuracy", False), ("mce", True)):
        for c in shift_summaries(rows, name):
            label = " ".join(SHIFT_SUMMARIES[name].split())
            shift = f" ({c.shift})" if c.shift else ""
            out.append(Measure(c.label(), label + shift, "shift", not lower))
    out += [
        Measure(c.label(), f"accuracy on {c.shift}", "shift")
        for c in columns_of(rows, Kind.SHIFT_ACCURACY)
    ]
    return [m for m in out if sum(not _missing(r.get(m.key)) for r in rows) > 0]


def pareto_front(
    points: Sequence[tuple[str, float, float]],
    *,
    cost_lower_is_smaller: bool = True,
    higher_is_better: bool = True,
) -> list[str]:
    """Ids of the Pareto front of ``(id, cost, value)`` points, smallest first: each is the
    best model at its size, i.e. strictly better than every smaller one (ties in cost keep the
    better value)."""
    sign_c = 1.0 if cost_lower_is_smaller else -1.0
    sign_v = 1.0 if higher_is_better else -1.0
    ordered = sorted(points, key=lambda p: (sign_c * p[1], -sign_v * p[2]))
    front, best = [], -math.inf
    for pid, _, value in ordered:
        if sign_v * value > best:
            front.append(pid)
            best = sign_v * value
    return front


# ---------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class Cell:
    text: str
    sort: str = ""  # the raw value the table sorts by ('' sorts last)
    cls: str = ""
    title: str = ""


@dataclass(frozen=True)
class HtmlTable:
    id: str
    caption: str
    headers: tuple[tuple[str, str], ...]  # (text, tooltip)
    rows: tuple[tuple[Cell, ...], ...]


def _num(value: Any, fmt: Callable[[Any], str], cls: str = "num") -> Cell:
    return Cell(fmt(value), "" if _missing(value) else repr(float(value)), cls)


def _column(key: str, fmt: Callable[[Any], str]) -> Callable[[dict[str, Any]], Cell]:
    return lambda row: _num(row.get(key), fmt)


def _accuracy(column: Column) -> Callable[[dict[str, Any]], Cell]:
    """An accuracy in % with its 95 % Wilson interval and the points it was measured on, when
    the store recorded them (sorted by the accuracy)."""

    def cell(row: dict[str, Any]) -> Cell:
        found, n = column_value(row, column), points(row, column)
        band = interval(found, n)
        text = f"{pct(found)} ({band}, n={n})" if band else pct(found)
        title = f"95 % Wilson interval {band} on n={n} points" if band else ""
        return Cell(text, "" if _missing(found) else repr(float(found)), "num", title)

    return cell


def _text(value: Any, title: str = "") -> Cell:
    text = "-" if value is None else str(value)
    return Cell(text, text, "", title)


def short_labels(rows: list[dict[str, Any]]) -> dict[str, str]:
    """A name per cell id: :func:`plots.cell_label` without the parts every row shares (one
    model, one fine-tuning), and the cell id's start where two rows would share a name."""
    parts = {r["cell_id"]: plots.cell_label(r).split(", ") for r in rows}
    lengths = {len(p) for p in parts.values()}
    if len(rows) > 1 and len(lengths) == 1:
        n = lengths.pop()
        varying = [i for i in range(n) if len({p[i] for p in parts.values()}) > 1]
        parts = {c: [p[i] for i in varying] or p for c, p in parts.items()}
    labels = {c: ", ".join(p) for c, p in parts.items()}
    counts = Counter(labels.values())
    return {c: lab if counts[lab] == 1 else f"{lab} [{c[:6]}]" for c, lab in labels.items()}


def cost_table(rows: list[dict[str, Any]], labels: dict[str, str]) -> HtmlTable:
    dense = _dense_bytes(rows)
    columns: list[tuple[str, str, Callable[[dict[str, Any]], Cell]]] = [
        ("model", "the compressed model (its compressor and fine-tuning)",
         lambda r: _text(labels[r["cell_id"]], r["cell_id"])),
        ("params removed %", "fraction of the dense model's parameters that are zero or gone",
         lambda r: _num(r.get("compression_rate"), pct)),
        ("params", "parameters", lambda r: _num(r.get("params"), human_count)),
        ("nonzero", "nonzero parameters", lambda r: _num(r.get("nonzero_params"), human_count)),
        ("bytes", "the saved model on disk", lambda r: _num(r.get("size_bytes"), human_bytes)),
        ("% of dense bytes", "bytes on disk over the largest model's (the dense one)",
         lambda r: _num(_ratio(r.get("size_bytes"), dense), pct)),
        ("sparse bytes", "nonzeros and their indices in a sparse format",
         lambda r: _num(r.get("sparse_bytes"), human_bytes)),
        ("MACs", "multiply-accumulates per image", lambda r: _num(r.get("macs"), human_count)),
        *(
            (f"ms b{k.removeprefix('latency_ms_b')}", "median ms per forward pass on a batch",
             _column(k, _ms))
            for k in latency_columns(rows)
        ),
        ("threads", "intra-op threads of the timing", lambda r: _num(r.get("threads"), _ms)),
        ("load", "1-minute load average when timed", lambda r: _num(r.get("load_1min"), _ms)),
        ("cell s", "seconds the cell took", lambda r: _num(r.get("seconds"), _ms)),
    ]  # fmt: skip
    return _build("cost", "What each model costs. Click a header to sort.", rows, columns)


def _ratio(value: Any, total: float | None) -> float | None:
    return None if _missing(value) or not total else float(value) / total


def _dense_bytes(rows: list[dict[str, Any]]) -> float | None:
    sizes = [r["size_bytes"] for r in rows if not _missing(r.get("size_bytes"))]
    return max(sizes) if sizes else None


def robustness_table(rows: list[dict[str, Any]], labels: dict[str, str]) -> HtmlTable:
    columns: list[tuple[str, str, Callable[[dict[str, Any]], Cell]]] = [
        ("model", "", lambda r: _text(labels[r["cell_id"]], r["cell_id"])),
        ("clean %", "accuracy on the test split", _accuracy(CLEAN)),
        ("clean on attacked %", "accuracy on the points the attacks ran on",
         _accuracy(ATTACKED_CLEAN)),
    ]  # fmt: skip
    for c in attack_columns(rows):
        if not c.bounded:
            norms = Column(Kind.MIN_NORM, attack=c.attack, norm=c.norm, eps=c.eps)
            columns.append((f"{c.attack} avg min norm", "the average minimal perturbation",
                            _column(norms.label(), _ms)))  # fmt: skip
        else:
            head = f"worst {c.norm or c.attack}" if c.kind is Kind.WORST else c.attack
            columns.append((f"{head}@{c.eps:.4g} %", f"robust accuracy, {c.threat()}",
                            _accuracy(c)))  # fmt: skip
    for name, header in SHIFT_SUMMARIES.items():
        for c in shift_summaries(rows, name):
            head = " ".join(header.split()) + (f" {c.shift}" if c.shift else "")
            columns.append((head + " %", name, _column(c.label(), pct)))
    for c in columns_of(rows, Kind.SHIFT_ACCURACY):
        columns.append((f"on {c.shift} %", "clean accuracy on this shifted split",
                        _accuracy(c)))  # fmt: skip
    if any("masking_flags" in r for r in rows):
        columns.append(("masking flags", "raised gradient-masking checks", _flag_cell))
    caption = (
        "Accuracy in %: clean on the test split, under attack on its first evaluate.limit "
        "points (clean on attacked: clean accuracy on those same points); worst case: points "
        "no attack of that norm and eps broke. In brackets the 95 % Wilson interval and the "
        "points n, where the store recorded n. Click a header to sort."
    )
    return _build("robustness", caption, rows, columns)


def _flag_cell(row: dict[str, Any]) -> Cell:
    flags = row.get("masking_flags")
    if flags is None:
        return _text("-")
    if flags == "none":
        return Cell("ok", "ok", "ok")
    return Cell(flags, flags, "bad", str(row.get("masking") or ""))


def _build(
    table_id: str,
    caption: str,
    rows: list[dict[str, Any]],
    columns: Sequence[tuple[str, str, Callable[[dict[str, Any]], Cell]]],
) -> HtmlTable:
    cells = [[fn(r) for _, _, fn in columns] for r in rows]
    # a column with no value in any row says nothing
    keep = [i for i in range(len(columns)) if i == 0 or any(c[i].sort for c in cells)]
    return HtmlTable(
        id=table_id,
        caption=caption,
        headers=tuple((columns[i][0], columns[i][1]) for i in keep),
        rows=tuple(tuple(c[i] for i in keep) for c in cells),
    )


def worst_case_table(runs: list[RunRow], labels: dict[str, str]) -> HtmlTable | None:
    """Per threat model (norm, eps): the points no attack of it broke, beside the strongest
    single attack, so the gain of taking the worst case per point shows."""
    cases = {r.cell_id: (r.info.get("worst_case") or {}).get("threat_models") or [] for r in runs}
    models = list(dict.fromkeys((t["norm"], t["eps"]) for ts in cases.values() for t in ts))
    if not models:
        return None
    headers: list[tuple[str, str]] = [("model", "")]
    for norm, eps in models:
        headers += [
            (f"{norm} eps={eps:g} worst %", "points no attack of this threat model broke"),
            (f"{norm} eps={eps:g} strongest single", "the single attack with the lowest accuracy"),
        ]
    body = []
    for run in runs:
        if run.cell_id not in labels:
            continue
        found = {(t["norm"], t["eps"]): t for t in cases[run.cell_id]}
        singles = _single_attacks(run)
        row = [_text(labels[run.cell_id], run.cell_id)]
        for norm, eps in models:
            t = found.get((norm, eps))
            row.append(_num(t.get("robust_accuracy") if t else None, pct))
            best = min(
                (
                    (singles[(a, eps)], a)
                    for a in (t or {}).get("attacks", [])
                    if (a, eps) in singles
                ),
                default=None,
            )
            row.append(_text(f"{best[1]} {pct(best[0])}" if best else None))
        body.append(tuple(row))
    caption = (
        "Per-point worst case per threat model: a point counts as robust only if every attack "
        "of that norm and eps failed on it; beside it the strongest single attack."
    )
    return HtmlTable("worst-case", caption, tuple(headers), tuple(body))


def _single_attacks(run: RunRow) -> dict[tuple[str, float], float]:
    return {
        (m.attack, m.eps): m.value
        for m in run.metrics
        if m.name == "robust_accuracy" and not m.shift and m.value is not None
    }


def shift_notes(runs: list[RunRow]) -> dict[str, str]:
    """Per shift label, what its shifts say about fitting the cells' data (a shift with a
    ``data_note``, such as corruptions with another dataset's constants), for its table."""
    from robcomp.config import build_component
    from robcomp.data.shifts import SHIFTS

    notes: dict[str, dict[str, None]] = defaultdict(dict)
    for run in runs:
        data = str((run.config.get("data") or {}).get("name", "?"))
        specs = (run.config.get("evaluate") or {}).get("shifts") or []
        for i, spec in enumerate(specs):
            shift = build_component(SHIFTS, spec, f"evaluate.shifts[{i}]")
            note = getattr(shift, "data_note", None)
            if note is not None and (text := note(data)):
                notes[shift.label()][text] = None
    return {label: " ".join(texts) for label, texts in notes.items()}


def shift_tables(
    shifted: list[dict[str, Any]], labels: dict[str, str]
) -> list[tuple[str, HtmlTable]]:
    """Per shift label: a row per shifted split (split, severity, family, points), a column
    per model with its accuracy, and the dense baseline's when every cell shares it."""
    by_label: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in shifted:
        if r["cell_id"] in labels:
            by_label[r["shift"] or "(unlabelled)"].append(r)
    out = []
    for n, (label, members) in enumerate(by_label.items()):
        cells = list(dict.fromkeys(r["cell_id"] for r in members))
        splits: dict[tuple[str, int], dict[str, dict[str, Any]]] = defaultdict(dict)
        for r in members:
            splits[(r["split"], r["severity"])][r["cell_id"]] = r
        headers = [("split", ""), ("severity", "0 = ungraded"), ("family", ""), ("n", "points")]
        headers += [(labels[c], c) for c in cells] + [("dense baseline", "")]
        body = []
        for (split, severity), found in splits.items():
            first = next(iter(found.values()))
            baselines = {r.get("baseline_accuracy") for r in found.values()}
            body.append(
                (
                    _text(split),
                    _num(severity, str),
                    _text(first.get("family") or "-"),
                    _num(first.get("n"), human_count),
                    *(_num((found.get(c) or {}).get("accuracy"), pct) for c in cells),
                    _num(baselines.pop() if len(baselines) == 1 else None, pct),
                )
            )
        caption = f"Accuracy (%) on every split of {label}."
        out.append((label, HtmlTable(f"shift-{n}", caption, tuple(headers), tuple(body))))
    return out


# ---------------------------------------------------------------------------- the summary


@dataclass(frozen=True)
class Answer:
    """The ranking of one measure: most per byte, the Pareto front by bytes, the best."""

    measure: Measure
    per_byte: str  # "int8: 68.5 % in 6.4 kB (10.8 % per kB)" or "" for a lower-is-better one
    front: list[str]
    best: str


def answers(rows: list[dict[str, Any]], labels: dict[str, str]) -> list[Answer]:
    out = []
    for m in summary_measures(rows):
        pts = [
            (r["cell_id"], float(r["size_bytes"]), float(r[m.key]))
            for r in rows
            if not _missing(r.get(m.key)) and not _missing(r.get("size_bytes"))
        ]
        values = {r["cell_id"]: float(r[m.key]) for r in rows if not _missing(r.get(m.key))}
        if not values:
            continue
        pick = max if m.higher_is_better else min
        best_id = pick(values, key=lambda c: values[c])
        sizes = {c: s for c, s, _ in pts}
        per_byte = ""
        if pts and m.higher_is_better:
            unit, scale = ("MB", 1e6) if max(sizes.values()) >= 1e6 else ("kB", 1e3)
            top = max(pts, key=lambda p: p[2] / p[1] if p[1] else 0.0)
            density = 100 * top[2] / (top[1] / scale)
            per_byte = (
                f"{labels[top[0]]}: {pct(top[2])} % in {human_bytes(top[1])} "
                f"({density:.3g} points per {unit})"
            )
        front = pareto_front(pts, higher_is_better=m.higher_is_better)
        out.append(
            Answer(
                measure=m,
                per_byte=per_byte,
                front=[f"{labels[c]} ({human_bytes(sizes[c])}, {pct(values[c])} %)" for c in front],
                best=f"{labels[best_id]} ({pct(values[best_id])} %)",
            )
        )
    return out


def headline(found: list[Answer]) -> str:
    """The answer in one sentence: the first measure's (the primary threat model's) most
    robust model per byte and its Pareto front."""
    if not found:
        return ""
    first = found[0]
    front = " -> ".join(first.front)
    most = f"{first.per_byte.partition(':')[0]} keeps the most per byte; " if first.per_byte else ""
    return f"{first.measure.label}: {most}the Pareto front by bytes is {front}."


# ---------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class Figure:
    title: str
    caption: str
    uri: str  # a data: URI
    axis: str = ""  # the cost axis a trade-off figure is drawn on


FIGURE_CAPTIONS = {
    "robustness_vs_compression": "Clean and robust accuracy against the fraction of "
    "parameters removed, one line per compression method.",
    "training_curves": "Loss and accuracy per epoch of every training stage.",
    "weights": "Histogram of the compressed model's nonzero weights over the dense model's.",
    "kept_per_layer": "Fraction of each layer's weights that compression kept.",
    "accuracy_vs_severity": "Accuracy against corruption severity, one panel per family.",
    "domain_heatmap": "Accuracy across domains (rows: source, columns: target).",
    "mce_vs_compression": "mCE against compression rate (100 % = the dense baseline).",
    "on_manifold_examples": "Originals beside their on-manifold adversarial examples.",
    "transfer_heatmap": "Accuracy on adversarial examples crafted on another model (rows: "
    "source, columns: target; diagonal: the source's own white-box accuracy).",
}


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def folder_figures(paths: Sequence[Path]) -> list[Figure]:
    mimes = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg"}
    out = []
    for path in paths:
        mime = mimes.get(path.suffix.lower())
        if mime and path.is_file():
            title = path.stem.replace("_", " ")
            caption = FIGURE_CAPTIONS.get(path.stem, "") + f" ({path.name} in the report folder)"
            out.append(Figure(title, caption.strip(), data_uri(path.read_bytes(), mime)))
    return out


def tradeoff_figures(
    rows: list[dict[str, Any]], labels: dict[str, str], max_panels: int = 6
) -> list[Figure]:
    """One SVG per cost axis: each summary measure against the cost, a colour per compression
    method, the Pareto front drawn as a step line through its models (named on the plot)."""
    measures = summary_measures(rows)[:max_panels]
    if not measures or not rows:
        return []
    out = []
    for axis in cost_axes(rows):
        svg = _tradeoff_svg(rows, labels, axis, measures)
        caption = (
            f"Robustness against {axis.label}; the dashed line is the Pareto front (the most "
            "robust model at each cost), its models are named."
        )
        out.append(Figure(f"trade-off: {axis.label}", caption, data_uri(svg, "image/svg+xml"),
                          axis.key))  # fmt: skip
    return out


def _tradeoff_svg(
    rows: list[dict[str, Any]], labels: dict[str, str], axis: CostAxis, measures: list[Measure]
) -> bytes:
    plt = plots._pyplot()
    groups = list(dict.fromkeys(plots._group_key(r) for r in rows))
    cols = min(3, len(measures))
    nrows = -(-len(measures) // cols)
    with plt.rc_context({"svg.fonttype": "none", "svg.hashsalt": "robcomp"}):
        fig, axes = plt.subplots(nrows, cols, figsize=(4.4 * cols, 3.5 * nrows), squeeze=False)
        for ax, m in zip(axes.flat, measures):
            _tradeoff_panel(ax, rows, labels, axis, m, groups)
        for ax in list(axes.flat)[len(measures) :]:
            ax.axis("off")
        fig.suptitle(f"Robustness vs {axis.label}")
        plots._legend_below(fig, axes, 3.5 * nrows)
        buffer = BytesIO()
        fig.savefig(buffer, format="svg", metadata={"Date": None}, bbox_inches="tight")
        plt.close(fig)
    return buffer.getvalue()


def _tradeoff_panel(
    ax: Any,
    rows: list[dict[str, Any]],
    labels: dict[str, str],
    axis: CostAxis,
    measure: Measure,
    groups: list[str],
) -> None:
    pts = [
        (r["cell_id"], axis.scale * float(r[axis.key]), 100 * float(r[measure.key]))
        for r in rows
        if not _missing(r.get(axis.key)) and not _missing(r.get(measure.key))
    ]
    group = {r["cell_id"]: plots._group_key(r) for r in rows}
    palette = plots.variant_colors(rows)  # the colours of every other figure
    for name in groups:
        mine = [(x, y) for c, x, y in pts if group[c] == name]
        if mine:
            ax.scatter(*zip(*mine), color=palette[name], label=name, zorder=3)
    front = pareto_front(
        pts, cost_lower_is_smaller=axis.lower_is_smaller, higher_is_better=measure.higher_is_better
    )
    where = {c: (x, y) for c, x, y in pts}
    if front:
        xs, ys = zip(*(where[c] for c in front))
        ax.plot(xs, ys, drawstyle="steps-post", color="0.2", linestyle="--", linewidth=1,
                label="Pareto front", zorder=2)  # fmt: skip
        for c in front:
            ax.annotate(labels[c], where[c], textcoords="offset points", xytext=(4, 4), fontsize=7)
    values = [x for _, x, _ in pts if x > 0]
    if axis.lower_is_smaller and values and max(values) / min(values) > 20:
        ax.set_xscale("log")  # bytes and MACs of a zoo span orders of magnitude
        ax.minorticks_off()  # unlabelled minor ticks cost most of the drawing time
    ax.set_xlabel(axis.label, fontsize=8)
    ax.set_ylabel(measure.label.split(",")[0] + " (%)", fontsize=8)
    ax.set_title(measure.label, fontsize=9)
    ax.grid(alpha=0.3)


# ---------------------------------------------------------------------------- masking flags

# What each check of robcomp.evaluate.diagnostics means when raised, and what to do about it.
CHECK_GUIDE: dict[str, tuple[str, str]] = {
    "zero_gradients": (
        "Many points have an exactly zero input gradient, so gradient attacks cannot move them.",
        "Attack a differentiable twin (BPDA) or add a black-box attack (Square) to the suite.",
    ),
    "unbounded_attack": (
        "An attack allowed to change the whole input still leaves points correct: the attack "
        "does not reach the decision boundary.",
        "Treat every robust accuracy of this model as suspect; check the attack and its steps, "
        "and try a black-box attack.",
    ),
    "steps_converged": (
        "Ten times more PGD steps lower robust accuracy a lot: the short attack has not converged.",
        "Raise the attacks' steps (or use APGD) until more steps stop helping.",
    ),
    "randomness": (
        "The logits change between identical forward passes: the model is randomized.",
        "Attack it with EOT (autoattack version 'rand') before trusting its numbers.",
    ),
    "monotone_in_eps": (
        "Robust accuracy rises with a larger eps, which a working attack never allows.",
        "Raise the steps or restarts of the attack; the model may be masking gradients.",
    ),
    "black_box_weaker": (
        "A black-box or transfer attack beats the white-box one: gradients mislead it.",
        "Take the worst case over white- and black-box attacks (the worst-case columns do) and "
        "look for gradient masking.",
    ),
}


@dataclass(frozen=True)
class FlagSection:
    table: HtmlTable
    guide: list[tuple[str, str, str, int]]  # (check, meaning, what to do, cells raised)
    raised: list[tuple[str, str]]  # (model, message)


def flag_section(runs: list[RunRow], labels: dict[str, str]) -> FlagSection | None:
    flags = {r.cell_id: masking_checks(r.info) for r in runs if r.cell_id in labels}
    checks = list(dict.fromkeys(c for f in flags.values() for c in f))
    if not checks:
        return None
    messages = {
        (r.cell_id, d.get("check")): str(d.get("message", ""))
        for r in runs
        for d in r.info.get("diagnostics") or []
        if isinstance(d, dict)
    }
    body, raised = [], []
    for cell_id, found in flags.items():
        row = [_text(labels[cell_id], cell_id)]
        for check in checks:
            value = found.get(check)
            title = messages.get((cell_id, check), "")
            if value is None:
                row.append(_text("-"))
            elif value:
                row.append(Cell("raised", "1", "bad", title))
                raised.append((labels[cell_id], title or check))
            else:
                row.append(Cell("ok", "0", "ok", title))
        body.append(tuple(row))
    guide = [
        (c, *CHECK_GUIDE.get(c, ("(no description)", "")),
         sum(bool(f.get(c)) for f in flags.values()))
        for c in checks
    ]  # fmt: skip
    caption = (
        "Gradient-masking checks per model (Carlini et al. 2019): hover a cell for its message."
    )
    table = HtmlTable("masking", caption, (("model", ""), *((c, "") for c in checks)), tuple(body))
    return FlagSection(table, guide, raised)


# ---------------------------------------------------------------------------- per cell


@dataclass(frozen=True)
class CellDetails:
    cell_id: str
    label: str
    status: str
    config_yaml: str
    record_yaml: str
    masking: str
    error: str
    curves: list[tuple[str, HtmlTable]] = field(default_factory=list)


CURVE_COLUMNS = ("epoch", *plots.CURVES, "lr", "seconds")


def cell_details(runs: list[RunRow], labels: dict[str, str]) -> list[CellDetails]:
    out = []
    for run in runs:
        label = labels.get(run.cell_id, str(run.info.get("compressor") or run.cell_id))
        curves = []
        for n, (stage, epochs) in enumerate(_stages(run)):
            cols = [c for c in CURVE_COLUMNS if any(c in e for e in epochs)]
            body = tuple(tuple(_num(e.get(c), _curve_fmt(c)) for c in cols) for e in epochs)
            headers = tuple((c, "") for c in cols)
            curves.append((stage, HtmlTable(f"curve-{run.cell_id}-{n}", "", headers, body)))
        record = run.info.get("record")
        out.append(
            CellDetails(
                cell_id=run.cell_id,
                label=label,
                status=run.status,
                config_yaml=yaml.safe_dump(run.config, sort_keys=False),
                record_yaml=yaml.safe_dump(record, sort_keys=False) if record else "",
                masking=str(run.info.get("masking") or ""),
                error=run.error or "",
                curves=curves,
            )
        )
    return out


def _curve_fmt(column: str) -> Callable[[Any], str]:
    if column == "epoch":
        return lambda v: "-" if _missing(v) else str(int(v))
    if column.endswith("accuracy"):
        return pct
    return (lambda v: "-" if _missing(v) else f"{v:.4g}") if column in ("loss", "lr") else _ms


def _stages(run: RunRow) -> list[tuple[str, list[dict[str, Any]]]]:
    baseline = ((run.info.get("baseline") or {}).get("history") or {}).get("epochs")
    finetune = run.info.get("finetune")
    stages = [("baseline training", baseline)]
    if isinstance(finetune, dict):
        stages.append(("fine-tuning", finetune.get("epochs")))
    return [(s, e) for s, e in stages if isinstance(e, list) and e]


# ---------------------------------------------------------------------------- environment


def stored_environment(runs: list[RunRow]) -> list[tuple[str, str]]:
    """What the store recorded while the cells ran: devices, threads, load, data, time, and an
    ``environment`` record in a cell's info when the runner wrote one."""

    def counted(values: list[Any]) -> str:
        counts = Counter(str(v) for v in values if v is not None)
        return ", ".join(f"{v} ({n} cells)" for v, n in counts.most_common()) or "not recorded"

    def metric(run: RunRow, name: str) -> float | None:
        return next((m.value for m in run.metrics if m.name == name and not m.shift), None)

    loads = [v for r in runs if (v := metric(r, "load_1min")) is not None]
    seconds = [r.seconds for r in runs if r.seconds is not None]
    out = [
        ("cells", f"{len(runs)}: {counted([r.status for r in runs])}"),
        ("device", counted([r.info.get("device") for r in runs])),
        ("threads (timing)", counted([_whole(metric(r, "threads")) for r in runs])),
        ("threads (config)", counted([r.config.get("threads") or "auto" for r in runs])),
        ("load, 1 min", f"{min(loads):.2f} to {max(loads):.2f}" if loads else "not recorded"),
        ("data", counted([r.info.get("data") for r in runs])),
        ("cell time", f"{sum(seconds):.1f} s in total, {max(seconds):.1f} s the longest"
         if seconds else "not recorded"),
    ]  # fmt: skip
    for run in runs:
        env = run.info.get("environment")
        if isinstance(env, dict):
            out += [(f"{k} (cell {run.cell_id[:8]})", str(v)) for k, v in env.items()]
            break
    return out


def _whole(value: float | None) -> int | float | None:
    return int(value) if value is not None and float(value).is_integer() else value


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def process_environment() -> list[tuple[str, str]]:
    """The machine and packages of the process writing the report (which may not be the one
    that ran the cells)."""
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return [
        ("written", time.strftime("%Y-%m-%d %H:%M:%S %z")),
        ("python", platform.python_version()),
        *((p, _version(p)) for p in ("robcomp", "torch", "torchvision", "numpy")),
        ("platform", platform.platform()),
        ("processor", platform.machine()),
        ("CPU cores", str(os.cpu_count())),
        ("torch threads", str(torch.get_num_threads())),
        ("CUDA device", cuda),
        ("load, 1 min", f"{load[0]:.2f}" if load else "unknown"),
    ]


# ---------------------------------------------------------------------------- the page


def report_context(
    store: str | Path, figures: Sequence[Path] = (), title: str = "robcomp report"
) -> dict[str, Any]:
    """Everything the template shows, read from the store (a path or URL) and ``figures``
    (image files to inline)."""
    from robcomp.report.tables import leaderboard_rows

    results = ResultStore(store, read_only=True)
    rows = leaderboard_rows(results)
    every = results.runs(status=None)
    done = [r for r in every if r.status == "done"]
    labels = short_labels(rows)
    shifted = shift_rows(done)
    axes = cost_axes(rows)
    found = answers(rows, labels)
    return {
        "title": title,
        "experiments": sorted({r.experiment for r in every}),
        "n_done": len(done),
        "n_failed": sum(r.status == "failed" for r in every),
        "answers": found,
        "headline": headline(found),
        "primary": next(
            (r["primary_threat_model"] for r in rows if r.get("primary_threat_model")), None
        ),
        "axes": axes,
        "default_axis": "size_bytes" if any(a.key == "size_bytes" for a in axes) else "",
        "tradeoffs": tradeoff_figures(rows, labels),
        "cost": cost_table(rows, labels) if rows else None,
        "robustness": robustness_table(rows, labels) if rows else None,
        "worst_case": worst_case_table(done, labels),
        "shifts": shift_tables(shifted, labels),
        "shift_notes": shift_notes(done),
        "figures": folder_figures(figures),
        "flags": flag_section(done, labels),
        "cells": cell_details(every, labels),
        "stored_env": stored_environment(every),
        "process_env": process_environment(),
    }


def render_html(context: dict[str, Any]) -> str:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("robcomp.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template("report.html.j2").render(**context)


def write_html(
    store: str | Path, folder: str | Path, figures: Sequence[Path] | None = None
) -> Path:
    """Write ``report.html`` into ``folder``: one file, every figure inlined, viewable without
    a network. ``figures`` are the image files to inline (default: the PNGs in ``folder``,
    sorted by name)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if figures is None:
        figures = sorted(folder.glob("*.png"))
    page = render_html(report_context(store, figures))
    path = folder / HTML_NAME
    path.write_text(page, encoding="utf-8")
    log.info("wrote %s (%d kB)", path, len(page) // 1000)
    return path


__all__ = ["HTML_NAME", "pareto_front", "render_html", "report_context", "write_html"]
