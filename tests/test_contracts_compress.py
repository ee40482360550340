"""Every registered compressor on every registered zoo model, at the small input shapes the
datasets offer: the cell runs (compress, then clean accuracy and one attack; int8 through its
gradient-free path, as the evaluator runs it), or the experiment is refused before any cell
runs, in one line that names the compressor, the model and what is supported.

The data are tiny and random (seeded), the baseline is not trained, and every compressor's
training is one epoch of one or two batches: what is tested is that nothing crashes, not what
the numbers are. Models are built at small widths where they take a width option.
``ROBCOMP_CONTRACT_ALL=1`` also runs the combinations left out for time (see ``SKIPPED`` and
``MAX_MACS``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from robcomp.attacks import PGD, Square
from robcomp.cli import app
from robcomp.compress import COMPRESSORS, count_macs, count_params
from robcomp.config import ConfigError
from robcomp.evaluate.bpda import black_box_for
from robcomp.experiments import load_experiment
from robcomp.experiments.driver import preflight
from robcomp.experiments.runner import run_cell
from robcomp.models import MODELS, builds_from_files, create, factory_for

# The input shapes the built-in datasets offer, smallest first: gaussians (the on-manifold
# simulation), digits, MNIST / Fashion-MNIST, CIFAR-10 / SVHN, and UCI HAR's 1-D windows.
SHAPES: tuple[tuple[int, ...], ...] = ((1, 4, 4), (1, 8, 8), (1, 28, 28), (3, 32, 32), (9, 128))
CLASSES = 3

# Small widths, where a model takes a width option.
SMALL: dict[str, dict[str, Any]] = {
    "tiny_mlp": {"hidden": 16},
    "har_cnn": {"hidden": 16},
    "resnet18_1d": {"width": 8},
    "mobilenet_v2": {"width_mult": 0.25},
}

# A model runs at the smallest and the largest of its shapes (of each rank) at which one
# forward pass costs at most MAX_MACS multiply-accumulates per image; the shapes between them
# run with ROBCOMP_CONTRACT_ALL=1 (int8 alone costs 2-10 s per model and shape, for its two
# torch.export passes). So do models with more than MAX_PARAMS parameters: each compressor
# copies, scores and saves every weight, seconds per cell.
MAX_MACS = 15_000_000
MAX_PARAMS = 2_000_000

# Registered models left out, each because another registered model runs the same code.
SKIPPED: dict[str, str] = {
    "resnet32": "resnet20's code (CIFAR option-A ResNet), 5 blocks per stage instead of 3",
    "resnet44": "resnet20's code (CIFAR option-A ResNet), 7 blocks per stage instead of 3",
    "resnet56": "resnet20's code (CIFAR option-A ResNet), 9 blocks per stage instead of 3",
    "resnet34": "resnet18's code (torchvision BasicBlock ResNet), 16 blocks instead of 8",
    "wrn_34_10": "wrn_28_4's code (WideResNet) at 46 M parameters instead of 5.8 M",
}

# Combinations a compressor does not support: the file is refused when it loads.
REFUSED: dict[tuple[str, str], str] = {
    ("proximal-l0", "mobilenet_v2"): "not a chain of layers",
    ("proximal-l0", "wrn_28_4"): "not a chain of layers",
    ("proximal-l0", "wrn_34_10"): "not a chain of layers",
    ("proximal-l0", "ensemble"): "not a chain of layers",
}

# One epoch of at most two batches, for every compressor that trains.
EPOCH: dict[str, Any] = {"epochs": 1, "lr": 0.01, "batch_size": 16, "keep_best": False}
FAST: dict[str, dict[str, Any]] = {
    "none": {},
    "magnitude": {"sparsity": 0.5},
    "random": {"sparsity": 0.5},
    "gradual": {"sparsity": 0.5, "steps": 2, "train": EPOCH},
    "l1-filter": {"ratio": 0.5},
    "int8": {"compile": False, "calibration_batches": 1, "batch_size": 8},
    "lowbit": {"bits": 4, "act_bits": 8, "calibration_batches": 1, "batch_size": 8},
    "binary": {"calibration_batches": 1, "batch_size": 8},
    "admm": {"sparsity": 0.5, "admm_epochs": 1, "retrain": EPOCH, "objective": {"name": "ce"}},
    "distill": {"student": "tiny_mlp", "student_options": {"hidden": 8}, "train": EPOCH},
    "hydra": {"sparsity": 0.5, "prune": EPOCH, "finetune": EPOCH, "objective": {"name": "ce"}},
    "proximal-l0": {"sparsity": 0.5, "train": EPOCH},
}
RUN_ALL = os.environ.get("ROBCOMP_CONTRACT_ALL") == "1"


def _built(model: str, shape: tuple[int, ...]) -> torch.nn.Module | None:
    """The model for ``shape`` (on the meta device unless it reads files), None if the model
    refuses that shape (which the file's load refuses too: not a compressor's business)."""
    device = "cpu" if builds_from_files(factory_for(model)) else "meta"
    try:
        with torch.device(device):
            return create(model, CLASSES, shape, **SMALL.get(model, {}))
    except ValueError:
        return None


def _plan() -> list[Any]:
    """(model, shape) pairs, each marked skip with its reason when it is left out."""
    plan = []
    for model in MODELS.names():
        built = {s: m for s in SHAPES if (m := _built(model, s)) is not None}
        for shape, net in built.items():
            reason = SKIPPED.get(model) or _left_out(shape, net, built)
            marks = [pytest.mark.skip(reason=reason)] if reason and not RUN_ALL else []
            label = f"{model}-{'x'.join(map(str, shape))}"
            plan.append(pytest.param(model, shape, marks=marks, id=label))
    return plan


def _left_out(
    shape: tuple[int, ...], net: torch.nn.Module, built: dict[tuple[int, ...], torch.nn.Module]
) -> str | None:
    """Why ``net`` does not run at ``shape``, or None: a model runs at the smallest and the
    largest of its shapes of each rank (images, signals) that cost at most MAX_MACS."""
    if (weights := count_params(net)) > MAX_PARAMS:
        return (
            f"{weights / 1e6:.1f} M parameters (over {MAX_PARAMS / 1e6:.0f} M): seconds per "
            "compressor; run with ROBCOMP_CONTRACT_ALL=1"
        )
    same_rank = [s for s in built if len(s) == len(shape)]
    cheap = [s for s in same_rank if s == same_rank[0] or count_macs(built[s], s) <= MAX_MACS]
    if shape not in cheap:
        macs = count_macs(net, shape)
        return f"{macs / 1e6:.0f} M MACs per image at {shape} (over {MAX_MACS / 1e6:.0f} M)"
    if shape not in (cheap[0], cheap[-1]):
        return f"between {cheap[0]} and {cheap[-1]}, which run"
    return None


def _npz(folder: Path, shape: tuple[int, ...]) -> str:
    path = folder / f"{'x'.join(map(str, shape))}.npz"
    if not path.exists():
        rng = np.random.default_rng(0)
        np.savez(
            path,
            x=rng.random((24, *shape), dtype=np.float32),
            y=np.arange(24) % CLASSES,
            x_test=rng.random((8, *shape), dtype=np.float32),
            y_test=np.arange(8) % CLASSES,
        )
    return str(path)


def _experiment(data: str, shape: tuple[int, ...], model: str, compressor: str) -> dict[str, Any]:
    return {
        "name": "contract",
        "seed": 0,
        "data": {
            "name": "npz",
            "path": data,
            "layout": "ncl" if len(shape) == 2 else "nchw",
            "val_fraction": 0.0,
        },
        "model": {"name": model, "options": SMALL.get(model, {})},
        "train": {"epochs": 0, "batch_size": 16},
        "compress": {"name": compressor, **FAST[compressor]},
        "evaluate": {
            "attacks": [{"name": "pgd", "eps": 0.1, "steps": 2}],
            "limit": 4,
            "batch_size": 16,
            "diagnostics": False,
            "diagnostics_points": 8,
            "black_box_queries": 8,
            "latency_batch_sizes": [],
        },
        "threads": 1,
    }


def test_every_compressor_has_fast_settings() -> None:
    assert set(FAST) == set(COMPRESSORS.names()), "add the new compressor to FAST"
    assert set(SKIPPED) <= set(MODELS.names()) and {m for _, m in REFUSED} <= set(MODELS.names())


@pytest.mark.slow
@pytest.mark.parametrize(("model", "shape"), _plan())
def test_every_compressor_runs_or_is_refused_at_load(
    model: str, shape: tuple[int, ...], tmp_path_factory: pytest.TempPathFactory
) -> None:
    folder = tmp_path_factory.mktemp("contract")
    data = _npz(tmp_path_factory.getbasetemp(), shape)
    failures = []
    for compressor in COMPRESSORS.names():
        experiment = load_experiment(_experiment(data, shape, model, compressor))
        expected = REFUSED.get((compressor, model))
        try:
            preflight(experiment.cells, experiment.source)
        except ConfigError as err:
            message = str(err)
            assert expected is not None, f"{compressor} on {model} {shape} refused: {message}"
            assert "\n" not in message and expected in message
            assert f"compress {compressor!r}" in message and f"model {model!r}" in message
            continue
        assert expected is None, f"{compressor} on {model} {shape} should be refused at load"
        result = run_cell(experiment.cells[0], folder)
        if result.error:
            failures.append(f"{compressor}: {result.error.splitlines()[0]}")
            continue
        values = {m.name: m.value for m in result.metrics if not m.shift}
        for name in ("clean_accuracy", "robust_accuracy"):
            assert 0.0 <= values[name] <= 1.0, (compressor, name, values.get(name))
    assert not failures, f"{model} at {shape}: " + "; ".join(failures)


def test_an_unsupported_combination_is_one_line_before_any_cell(tmp_path: Path) -> None:
    """proximal-l0 groups filters along a chain of layers (or a known ResNet); on MobileNetV2
    it used to train the baseline and then fail the cell."""
    raw = _experiment(_npz(tmp_path, (1, 8, 8)), (1, 8, 8), "mobilenet_v2", "proximal-l0")
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "out")])
    lines = [
        line for line in result.output.splitlines() if line.strip() and " cells -> " not in line
    ]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for words in ("'proximal-l0'", "'mobilenet_v2'", "Supported: chains of Conv/Linear"):
        assert words in result.output
    assert not (tmp_path / "out" / "results.sqlite").exists()  # no cell ran


def test_a_distilled_student_that_cannot_take_the_inputs_is_refused_at_load(
    tmp_path: Path,
) -> None:
    raw = _experiment(_npz(tmp_path, (1, 8, 8)), (1, 8, 8), "tiny_cnn", "distill")
    raw["compress"]["student"], raw["compress"]["student_options"] = "small_cnn", {}
    experiment = load_experiment(raw)
    with pytest.raises(ConfigError, match=r"distill.*student 'small_cnn'.*16x16 pixels"):
        preflight(experiment.cells, experiment.source)


def test_the_black_box_route_attacks_images_only() -> None:
    """Square perturbs squares of pixels; on 1-D signals int8 models are attacked by BPDA and
    transfer (the runner used to crash on them)."""
    pgd = PGD(eps=0.1, steps=2)
    assert isinstance(black_box_for(pgd, 10, 0, (1, 8, 8)), Square)
    assert black_box_for(pgd, 10, 0, (9, 128)) is None
    assert black_box_for(PGD(eps=0.5, norm="l1", steps=2), 10, 0, (1, 8, 8)) is None


def test_every_zoo_model_runs_somewhere() -> None:
    """Each registered model builds at one of the shapes, so the matrix covers it."""
    for model in MODELS.names():
        assert any(_built(model, s) is not None for s in SHAPES), model
