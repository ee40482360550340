"""The report of shifted evaluations: shifted metrics never overwrite the test split's, summaries
and ungraded splits are leaderboard columns, every split is a row of shifts.csv, and each shift
figure is drawn exactly when its data exists. The store is written by hand (no training)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console

from robcomp.experiments.store import Metric, ResultStore
from robcomp.report import write_report
from robcomp.report.plots import (
    MANIFOLD_EXAMPLES,
    cell_label,
    domain_matrix,
    load_manifold_examples,
    manifold_example_sets,
    plot_manifold_examples,
    severity_curves,
)
from robcomp.report.tables import leaderboard_rows, leaderboard_table, shift_rows

CORRUPTIONS = {"gaussian_noise": "noise", "shot_noise": "noise", "fog": "weather"}
LABEL = "corruptions[gaussian_noise+shot_noise+fog]-cifar"
TARGETS = ("usps", "mnist-m")
# cell id -> (compressor, sparsity, compressor label, clean accuracy, compression rate)
CELLS = {
    "dense": ("magnitude", 0.0, "magnitude-0", 0.90, 0.0),
    "mag": ("magnitude", 0.5, "magnitude-0.5", 0.85, 0.5),
    "l1": ("l1-filter", 0.5, "l1-filter-0.5", 0.80, 0.4),
}
PNG = b"\x89PNG\r\n\x1a\n"


def _corrupted(clean: float, name: str, severity: int) -> float:
    """A made-up accuracy that falls with severity, faster for noise."""
    return round(clean - (0.1 if CORRUPTIONS[name] == "noise" else 0.05) * severity, 4)


def _domain(clean: float, target: str) -> float:
    return round(clean - (0.2 if target == "usps" else 0.4), 4)


def _record(store: ResultStore, cell_id: str, *, shifted: bool = True) -> None:
    method, sparsity, label, clean, rate = CELLS[cell_id]
    spec = {"name": method, "sparsity": sparsity}
    metrics = [
        Metric("clean_accuracy", clean),
        Metric("compression_rate", rate),
        Metric("robust_accuracy", clean / 2, "pgd", 0.1),
    ]
    info: dict[str, Any] = {"compressor": label}
    if shifted:
        splits = [
            (name, s, family, _corrupted(clean, name, s), _corrupted(0.9, name, s))
            for name, family in CORRUPTIONS.items()
            for s in (1, 2, 3)
        ]
        domains = [(t, 0, "domain", _domain(clean, t), _domain(0.9, t)) for t in TARGETS]
        metrics += [Metric("clean_accuracy", acc, shift=n, severity=s) for n, s, _, acc, _ in
                    splits + domains]  # fmt: skip
        # attack_shifted: an attack on fog at severity 1, whose value must stay out of the
        # leaderboard's pgd@0.1 column
        metrics.append(Metric("robust_accuracy", 0.01, "pgd", 0.1, shift="fog", severity=1))
        metrics += [
            Metric("val_accuracy", clean + 0.01),
            Metric("mean_corruption_accuracy", clean - 0.1, shift=LABEL),
            Metric("mce", 1.0 + sparsity, shift=LABEL),
            Metric("relative_mce", 1.0 + 2 * sparsity, shift=LABEL),
        ]
        info["shifts"] = {
            LABEL: [
                {"shift": n, "severity": s, "family": f, "n": 100, "accuracy": a,
                 "baseline_accuracy": b}
                for n, s, f, a, b in splits
            ],
            "domains": [
                {"shift": n, "severity": 0, "family": f, "n": 500, "accuracy": a,
                 "baseline_accuracy": b}
                for n, _, f, a, b in domains
            ],
        }  # fmt: skip
    store.record(
        cell_id=cell_id, experiment="shifts",
        config={"data": {"name": "domain", "source": "mnist"}, "model": {"name": "lenet5"},
                "compress": spec, "train": {}, "seed": 0},
        grid_values={"compress": spec}, metrics=metrics, info=info, seconds=1.0,
    )  # fmt: skip


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    store = ResultStore(tmp_path / "results.sqlite")
    for cell_id in CELLS:
        _record(store, cell_id)
    return tmp_path / "results.sqlite"


def _rows(path: Path) -> dict[str, dict[str, Any]]:
    return {r["cell_id"]: r for r in leaderboard_rows(ResultStore(path))}


def test_leaderboard_keeps_the_unshifted_accuracies(store_path: Path) -> None:
    rows = _rows(store_path)
    for cell_id, (_, _, _, clean, _) in CELLS.items():
        # written after the unshifted metrics, the shifted clean accuracies used to replace it
        assert rows[cell_id]["clean_accuracy"] == clean
        assert rows[cell_id]["pgd@0.1"] == clean / 2  # not the attack on fog (0.01)


def test_summaries_and_ungraded_splits_are_columns(store_path: Path) -> None:
    rows = _rows(store_path)
    mag = rows["mag"]
    assert mag["mean_corruption_accuracy"] == pytest.approx(0.75)
    assert mag["mce"] == pytest.approx(1.5)
    assert mag["relative_mce"] == pytest.approx(2.0)
    assert mag["val_accuracy"] == pytest.approx(0.86)
    assert mag["acc:usps"] == pytest.approx(0.65)
    assert mag["acc:mnist-m"] == pytest.approx(0.45)
    # graded splits (a corruption at a severity) are not leaderboard columns
    assert not any("fog" in k or "noise" in k for k in mag)
    text = _rendered(list(rows.values()))
    assert "mCE" in text and "on" in text and "usps" in text
    assert "150.0" in text and "45.0" in text  # mag's mCE and mnist-m accuracy, in %


def _rendered(rows: list[dict[str, Any]]) -> str:
    console = Console(record=True, width=300)
    console.print(leaderboard_table(rows))
    return console.export_text()


def test_a_summary_two_shifts_share_is_qualified_by_the_shift(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "s.sqlite")
    store.record(
        cell_id="c", experiment="e", grid_values={}, info={}, seconds=1.0,
        config={"data": {"name": "digits"}, "model": {"name": "m"},
                "compress": {"name": "none"}, "seed": 0},
        metrics=[Metric("clean_accuracy", 0.9), Metric("mce", 1.1, shift="a"),
                 Metric("mce", 1.3, shift="b")],
    )  # fmt: skip
    (row,) = leaderboard_rows(store)
    assert (row["mce:a"], row["mce:b"]) == (1.1, 1.3) and "mce" not in row


def test_shifts_csv_has_one_row_per_cell_and_split(store_path: Path, tmp_path: Path) -> None:
    files = write_report(store_path, tmp_path / "report")
    assert files.shifts == tmp_path / "report" / "shifts.csv"
    assert files.shifts in files.paths()
    with files.shifts.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(CELLS) * (len(CORRUPTIONS) * 3 + len(TARGETS))
    by_key = {(r["cell_id"], r["split"], r["severity"]): r for r in rows}
    fog = by_key[("l1", "fog", "2")]
    assert fog["shift"] == LABEL and fog["family"] == "weather" and fog["n"] == "100"
    assert float(fog["accuracy"]) == pytest.approx(0.7)
    assert float(fog["baseline_accuracy"]) == pytest.approx(0.8)
    assert (fog["compress"], fog["method"], fog["sparsity"]) == (
        "l1-filter-0.5",
        "l1-filter",
        "0.5",
    )
    assert fog["source"] == "mnist" and float(fog["compression_rate"]) == pytest.approx(0.4)
    usps = by_key[("mag", "usps", "0")]
    assert (usps["shift"], usps["family"], float(usps["accuracy"])) == ("domains", "domain", 0.65)
    # the attack on fog at severity 1 is in its row only
    assert float(by_key[("l1", "fog", "1")]["pgd@0.1"]) == pytest.approx(0.01)
    assert by_key[("l1", "fog", "2")]["pgd@0.1"] == ""


def test_severity_curves_average_each_family(store_path: Path) -> None:
    runs = ResultStore(store_path).runs()
    rows = leaderboard_rows(ResultStore(store_path))
    curves = severity_curves(rows, shift_rows(runs))
    assert list(curves) == ["noise", "weather"]  # the paper's family order
    label = cell_label(next(r for r in rows if r["cell_id"] == "mag"))
    assert "magnitude-0.5" in label
    noise = curves["noise"][label]
    # severity 0 is the unshifted clean accuracy, then the mean over the two noises
    assert noise == [(0, 0.85), (1, pytest.approx(0.75)), (2, pytest.approx(0.65)),
                     (3, pytest.approx(0.55))]  # fmt: skip
    assert curves["weather"][label][-1] == (3, pytest.approx(0.70))


def test_domain_matrix_has_source_validation_on_the_diagonal(store_path: Path) -> None:
    rows = leaderboard_rows(ResultStore(store_path))
    domain = [r for r in shift_rows(ResultStore(store_path).runs()) if r["family"] == "domain"]
    label = cell_label(next(r for r in domain if r["cell_id"] == "dense"), skip=("seed", "data"))
    sources, targets, acc = domain_matrix(rows, domain, label)
    assert sources == ["mnist"] and targets == ["mnist", "usps", "mnist-m"]
    assert acc[("mnist", "mnist")] == pytest.approx(0.91)  # val_accuracy, not clean (0.90)
    assert acc[("mnist", "usps")] == pytest.approx(0.70)


def _png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 5_000 and path.read_bytes()[:8] == PNG


def _examples(shape: tuple[int, ...], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.random(shape, dtype=np.float32)
    n = shape[0]
    return {"x": x, "x_adv": np.clip(x + 0.1, 0, 1), "y": np.arange(n) % 10,
            "y_adv": (np.arange(n) + 1) % 10}  # fmt: skip


def test_each_shift_figure_is_written_when_its_data_exists(
    store_path: Path, tmp_path: Path
) -> None:
    cells = store_path.parent / "cells"
    (cells / "mag").mkdir(parents=True)
    np.savez(cells / "mag" / MANIFOLD_EXAMPLES, **_examples((4, 1, 8, 8)))
    files = write_report(store_path, tmp_path / "report")
    names = {f.name for f in files.figures}
    shift_figures = {
        "accuracy_vs_severity.png", "domain_heatmap.png", "mce_vs_compression.png",
        "on_manifold_examples.png",
    }  # fmt: skip
    assert shift_figures <= names
    assert all(_png(f) for f in files.figures if f.name in shift_figures)


def test_no_shift_figure_or_csv_without_shifted_data(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "results.sqlite")
    for cell_id in CELLS:
        _record(store, cell_id, shifted=False)
    files = write_report(tmp_path / "results.sqlite", tmp_path / "report")
    assert files.shifts is None and not (tmp_path / "report" / "shifts.csv").exists()
    assert files.figures == ()  # no telemetry either in this hand-written store
    written = {p.name for p in (tmp_path / "report").iterdir()}
    assert written == {"leaderboard.csv", "leaderboard.json", "robustness_vs_compression.png"}
    assert not any(k.startswith("acc:") or k == "mce" for r in leaderboard_rows(store) for k in r)


def test_manifold_examples_contract(tmp_path: Path) -> None:
    # two cells with one baseline's set are drawn once; signals (N, C, L) are drawn as traces
    for cell_id, arrays in (
        ("a", _examples((3, 1, 8, 8))), ("b", _examples((3, 1, 8, 8))),
        ("c", _examples((5, 3, 40), seed=1)),
    ):  # fmt: skip
        (tmp_path / cell_id).mkdir()
        np.savez(tmp_path / cell_id / MANIFOLD_EXAMPLES, **arrays)
    rgb = _examples((2, 3, 8, 8))
    rgb["x"] = (rgb["x"] * 255).astype(np.uint8)
    rgb["x_adv"] = (rgb["x_adv"] * 255).astype(np.uint8)
    np.savez(tmp_path / "rgb.npz", classes=np.array(list("0123456789")), **rgb)
    loaded = load_manifold_examples(tmp_path / "rgb.npz")
    assert loaded.x.dtype == np.float32 and loaded.x.min() >= 0.0 and loaded.x.max() <= 1.0
    assert loaded.name(int(loaded.y_adv[0])) == "1"
    folders = {cell_id: tmp_path / cell_id for cell_id in "abcd"}
    out = plot_manifold_examples(folders, {"a": "A", "b": "B", "c": "C"}, tmp_path / "m.png")
    assert out is not None and _png(out)
    sets = manifold_example_sets(folders, {"a": "A", "b": "B", "c": "C"}, max_sets=3)
    assert [label for label, _ in sets] == ["A", "C"]

    broken = _examples((3, 1, 8, 8))
    del broken["y_adv"]
    np.savez(tmp_path / "broken.npz", **broken)
    with pytest.raises(ValueError, match="y_adv"):
        load_manifold_examples(tmp_path / "broken.npz")
    bad_shape = _examples((3, 1, 8, 8)) | {"x_adv": np.zeros((3, 1, 4, 4), np.float32)}
    np.savez(tmp_path / "shape.npz", **bad_shape)
    with pytest.raises(ValueError, match="one shape"):
        load_manifold_examples(tmp_path / "shape.npz")
    # a broken file is skipped with a log line; no cell with examples, no figure
    (tmp_path / "d").mkdir()
    (tmp_path / "broken.npz").rename(tmp_path / "d" / MANIFOLD_EXAMPLES)
    assert plot_manifold_examples(folders, {"d": "D", "x": "X"}, tmp_path / "n.png") is None
    assert not (tmp_path / "n.png").exists()


def _legend_colors(fig: Any) -> dict[str, str]:
    """Each legend entry's colour (lines and scatter points), as hex."""
    from matplotlib.colors import to_hex

    out = {}
    for legend in [*fig.legends, *(ax.get_legend() for ax in fig.axes)]:
        if legend is None:
            continue
        for handle, text in zip(legend.legend_handles, legend.get_texts()):
            color = handle.get_color() if hasattr(handle, "get_color") else None
            if color is None or not isinstance(color, str):
                color = handle.get_facecolor()[0]
            out[text.get_text()] = to_hex(color)
    return out


def test_a_variant_has_one_colour_in_every_figure(
    store_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The robustness and mCE plots draw a line per variant (``magnitude``), the severity plot
    one per compressed model (``magnitude-0.5``): every line of a variant, in every figure,
    has that variant's colour (the two magnitude cells and the l1-filter cell differ)."""
    from robcomp.report import plots

    seen: dict[str, dict[str, str]] = {}
    real_save = plots._save

    def spy(fig: Any, path: Path) -> Path:
        seen[path.name] = _legend_colors(fig)
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", spy)
    write_report(store_path, tmp_path / "report", html=False)
    rows = leaderboard_rows(ResultStore(store_path))
    names = {plots._group_key(r): r["cell_id"] for r in rows} | {
        cell_label(r): r["cell_id"] for r in rows
    }
    variant = {r["cell_id"]: plots._group_key(r) for r in rows}
    colors: dict[str, set[str]] = {}
    for legend in seen.values():
        for label, color in legend.items():
            if label in names:  # a line of one cell, or of its variant
                colors.setdefault(variant[names[label]], set()).add(color)
    figures = {
        "robustness_vs_compression.png",
        "accuracy_vs_severity.png",
        "mce_vs_compression.png",
    }
    assert figures <= set(seen)
    assert len(colors) == 2 and all(len(c) == 1 for c in colors.values()), colors
    assert len(set.union(*colors.values())) == 2


def test_titles_and_legends_are_inside_the_saved_image(
    store_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A figure narrower than its title (one mCE panel under a long title) or its legend is
    saved whole: the image holds the box around every artist."""
    from PIL import Image as PILImage

    from robcomp.report import plots

    drawn: dict[Path, tuple[float, float]] = {}
    real_save = plots._save

    def spy(fig: Any, path: Path) -> Path:
        fig.set_dpi(110)  # the dpi it is saved at: text extents depend on it
        box = fig.get_tightbbox(fig.canvas.get_renderer())  # inches
        drawn[path] = (box.width, box.height)
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", spy)
    rows = [{k: v for k, v in r.items() if k != "relative_mce"} for r in
            leaderboard_rows(ResultStore(store_path))]  # fmt: skip
    assert plots.plot_mce_vs_compression(rows, tmp_path / "mce.png")
    write_report(store_path, tmp_path / "report", html=False)
    assert len(drawn) >= 4
    for path, (width, height) in drawn.items():
        with PILImage.open(path) as image:
            w, h = image.size
        assert w >= 110 * width - 1 and h >= 110 * height - 1, (path.name, (w, h), width, height)


def test_a_model_that_skipped_fine_tuning_is_named_so() -> None:
    """int8 models cannot be trained, so their fine-tuning is skipped: figures call them
    ``int8 (no fine-tuning)``, not ``int8 + skipped``."""
    from robcomp.report.plots import _group_key, transfer_labels

    row = {"cell_id": "c", "model": "tiny_cnn", "compress": "int8", "finetune": "skipped"}
    tuned = {"cell_id": "d", "model": "tiny_cnn", "compress": "magnitude-0.5",
             "finetune": "ce x1"}  # fmt: skip
    for name in (cell_label(row), _group_key(row), transfer_labels([row])["c"]):
        assert name == "tiny_cnn, int8 (no fine-tuning)"
    assert cell_label(tuned) == "tiny_cnn, magnitude-0.5 + ce x1"
    assert transfer_labels([tuned])["d"] == "tiny_cnn, magnitude-0.5 + ce x1"
