"""Running one cell: data -> model -> train (cached) -> compress -> fine-tune -> evaluate.

A cell is a pure function of its configuration: it reads the shared baseline cache and writes
only its own folder, and it returns its results instead of writing the store, so any executor
(a local loop, a Ray cluster) can run it.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
import traceback
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import yaml
from torch import nn

from robcomp import data as datasets
from robcomp.attacks import Attack
from robcomp.attacks.manifold import (
    ManifoldSource,
    is_latent,
    needs_manifold,
    resolve_manifold,
    using_manifold,
)
from robcomp.compress import COMPRESSORS, Record, finalize, latency, measure
from robcomp.compress.efficiency import count_macs
from robcomp.config import ConfigError, build_component, to_dict
from robcomp.data.base import DataSplits, Split
from robcomp.data.shifts import shift_summary
from robcomp.evaluate import AttackResult, accuracy, evaluate_attack
from robcomp.evaluate.bpda import (
    RouteOutcome,
    StraightThrough,
    WorstCase,
    black_box_for,
    evaluate_without_gradients,
    twin_agreements,
)
from robcomp.evaluate.diagnostics import Flag, diagnose, probe_threat_model, summarize
from robcomp.evaluate.manifold import manifold_examples, manifold_for, reconstruction_split
from robcomp.experiments.cache import compressed_model, own_callables
from robcomp.experiments.shifts import baseline_scores, build_shifts, shifted_splits
from robcomp.experiments.shifts import scores as shift_scores
from robcomp.experiments.spec import Cell, CellConfig
from robcomp.experiments.store import ATTACKED_CLEAN_ACCURACY, Metric
from robcomp.experiments.telemetry import model_telemetry
from robcomp.experiments.threads import choose_threads, intra_op_threads, load_1min
from robcomp.experiments.worst import record_worst_case
from robcomp.models import (
    Classifier,
    GradientFree,
    checkpoint_trust,
    create,
    factory_for,
    load_checkpoint,
    load_weights,
    model_device,
    normalizes_inputs,
    resolve_device,
    save_checkpoint,
    statistics_for,
)
from robcomp.models.base import code_origin, code_paths
from robcomp.train import fit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CellResult:
    """Everything a cell produced, ready for the store."""

    cell_id: str
    experiment: str
    config: dict[str, Any]
    grid_values: dict[str, Any]
    metrics: list[Metric] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None


def build_model(cfg: CellConfig, data: DataSplits) -> tuple[Classifier, dict[str, Any]]:
    """The untrained (or pretrained-weights) model of a cell and its checkpoint spec."""
    channels = data.in_shape[0]
    if not len(data.train) and cfg.train.epochs > 0:  # fit would silently train on nothing
        raise ConfigError(
            f"data {data.name!r} is a test set only (no training split): it cannot train a "
            "model; set train.epochs: 0 and model.weights to evaluate a trained one"
        )
    # Models that normalize their own inputs (an ensemble's members do) get the identity in
    # front, since a second Normalize would normalize twice, unless the file says otherwise.
    # Pretrained weights bring the statistics they were trained with.
    with code_paths(cfg.model.code_path):
        factory = factory_for(cfg.model.name)
    identity = ((0.0,) * channels, (1.0,) * channels) if normalizes_inputs(factory) else None
    own = identity or statistics_for(factory, cfg.model.options, channels)
    if cfg.model.weights and own is None and (cfg.model.mean is None or cfg.model.std is None):
        _missing_statistics(cfg.model.weights, channels)
    mean, std = own or (data.mean, data.std)
    spec: dict[str, Any] = {
        "name": cfg.model.name,
        "num_classes": data.num_classes,
        "in_shape": list(data.in_shape),
        "mean": list(cfg.model.mean or mean),
        "std": list(cfg.model.std or std),
        "options": dict(cfg.model.options),
    }
    if origin := code_origin(cfg.model.name):  # so loading the checkpoint finds the code
        spec["code_path"] = origin
    if data.input_scale is not None:
        # Inputs scaled by the training file's statistics (sensor signals): whoever loads the
        # checkpoint must scale new inputs the same way.
        spec["input_scale"] = data.input_scale
    torch.manual_seed(cfg.seed)  # weight initialisation is part of the cell's determinism
    model = create(
        spec["name"], spec["num_classes"], spec["in_shape"],
        mean=spec["mean"], std=spec["std"], **spec["options"],
    )  # fmt: skip
    if cfg.model.weights:
        load_weights(model, cfg.model.weights)
    return model, spec


def _missing_statistics(weights: str, channels: int) -> NoReturn:
    """Foreign weights expect the normalization they were trained with; the training data's
    statistics would be a silent guess (a published MNIST net at 99.48 % scored 97.07 %)."""
    zeros, ones = [0] * channels, [1] * channels
    raise ValueError(
        f"model.weights {weights}: set model.mean and model.std to the per-channel statistics "
        f"these weights were trained with (one value per channel), or mean: {zeros}, std: "
        f"{ones} if they were trained on unnormalized [0, 1] inputs (CLI: --mean/--std)"
    )


def trained_baseline(
    cfg: CellConfig, data: DataSplits, cache: Path
) -> tuple[nn.Module, dict[str, Any]]:
    """The trained uncompressed model, from the cache when an earlier cell produced it, on the
    data's device."""
    folder = cache / f"baseline-{cfg.baseline_key()}"
    if (folder / "history.json").is_file():
        # Its spec came from the cell's own model config, so the callables that names are trusted.
        model, _ = load_checkpoint(folder, trust_code=own_callables(cfg))
        log.info("baseline %s from cache", folder.name)
        return model.to(data.device), json.loads((folder / "history.json").read_text())
    model, spec = build_model(cfg, data)
    model.to(data.device)
    history = fit(model, data, cfg.train, seed=cfg.seed, description="train baseline")
    save_checkpoint(model, folder, spec)
    info = {"history": history.as_dict(), "test_accuracy": accuracy(model, data.test)}
    # history.json is written last: its presence marks a complete cache entry.
    (folder / "history.json").write_text(json.dumps(info, indent=2))
    return model, info


def _efficiency_metrics(record: Record, base: nn.Module, data: DataSplits) -> list[Metric]:
    """The compressor's own account of the cost (packed bits for quantized weights, int8
    tensors without their fp32 copies), against the dense baseline."""
    base_eff = measure(base, data.in_shape)
    return [
        Metric("params", record.params),
        Metric("nonzero_params", record.nonzero_params),
        Metric("compression_rate", 1.0 - record.nonzero_params / base_eff.nonzero_params),
        Metric("bits", record.bits),
        Metric("size_bytes", record.size_bytes),
        Metric("size_ratio", record.size_bytes / base_eff.size_bytes),
        Metric("sparse_bytes", record.sparse_bytes),
        Metric("macs", record.macs),
        # a pruner's own account of its rate (proximal-l0: Conv/Linear weights removed), next
        # to compression_rate (every parameter, biases and BatchNorm included)
        *(
            [Metric("weight_sparsity", float(record.details["weight_sparsity"]))]
            if isinstance(record.details.get("weight_sparsity"), float)
            else []
        ),
    ]


def _latency_metrics(cfg: CellConfig, model: nn.Module, data: DataSplits) -> list[Metric]:
    """Marshall's Algorithms 4 and 5: median time of one forward pass on 1 and N images."""
    metrics = []
    for batch_size in cfg.evaluate.latency_batch_sizes:
        result = latency(model, data.in_shape, batch_size, repeats=cfg.evaluate.latency_repeats)
        metrics.append(Metric(f"latency_ms_b{batch_size}", result.median_ms))
    if cfg.evaluate.latency_batch_sizes:
        # Timings are only comparable under the same threads and load: other processes on
        # the cores make a tiny model's forward pass many times slower.
        metrics.append(Metric("threads", torch.get_num_threads()))
        metrics.append(Metric("load_1min", load_1min()))
    return metrics


def _attack_metrics(result: AttackResult) -> list[Metric]:
    attack = Metric("", None, result.attack, result.eps, n=result.n, norm=result.norm)
    return [
        replace(attack, name="robust_accuracy", value=result.robust_accuracy),
        replace(attack, name="mean_norm", value=result.mean_norm),
        replace(attack, name="median_norm", value=result.median_norm),
        replace(attack, name="attack_seconds", value=result.seconds),
    ]


@dataclass
class Evaluation:
    """What the attacks of a cell produced."""

    metrics: list[Metric] = field(default_factory=list)
    attacks: list[Attack] = field(default_factory=list)
    results: list[AttackResult] = field(default_factory=list)  # one per attack, in order
    routes: list[dict[str, Any]] = field(default_factory=list)  # gradient-free breakdown
    clean_accuracy: float = math.nan  # on the whole test split


def _evaluate(
    cfg: CellConfig, model: nn.Module, data: DataSplits, surrogate: nn.Module
) -> Evaluation:
    """Clean accuracy, then every attack of the suite on the first ``limit`` test points.

    A :class:`~robcomp.models.GradientFree` model (int8) has no useful gradients of its own:
    each gradient attack is evaluated as the worst case over BPDA through its twin, transfer
    from ``surrogate`` (the fp32 baseline) and a full-budget Square at the same threat model.
    """
    spec = cfg.evaluate
    clean = accuracy(model, data.test, spec.batch_size)
    out = _attack_suite(cfg, model, data.test.head(spec.limit), surrogate)
    out.metrics.insert(0, Metric("clean_accuracy", clean, n=len(data.test)))
    out.clean_accuracy = clean
    return out


def _attack_suite(
    cfg: CellConfig, model: nn.Module, points: Split, surrogate: nn.Module
) -> Evaluation:
    """Every attack of the suite on ``points`` (the test split's first ``limit``, or a
    shifted split's), and the clean accuracy on those same points
    (:data:`ATTACKED_CLEAN_ACCURACY`), which robust accuracy is to be read against."""
    spec = cfg.evaluate
    out = Evaluation()
    cache: dict[tuple[str, str, float], RouteOutcome] = {}
    for attack in spec.build_attacks():
        if not (attack.uses_gradients and isinstance(model, GradientFree)):
            result = evaluate_attack(model, attack, points, spec.batch_size)
        else:
            result, worst = evaluate_without_gradients(
                model, model.twin, attack, points, surrogate=surrogate,
                black_box=black_box_for(
                    attack, spec.black_box_queries, cfg.seed, tuple(points.x.shape[1:])
                ),
                batch_size=spec.batch_size, cache=cache,
            )  # fmt: skip
            out.routes.append(_route_info(result, worst))
            out.metrics += [  # the route is where the adversarial examples were crafted
                Metric("route_accuracy", value, result.attack, result.eps, source=route,
                       n=result.n, norm=result.norm)
                for route, value in worst.per_attack.items()
            ]  # fmt: skip
        out.attacks.append(attack)
        out.results.append(result)
        out.metrics += _attack_metrics(result)
    if out.results:  # every attack of the suite ran on the same points
        first = out.results[0]
        out.metrics.insert(0, Metric(ATTACKED_CLEAN_ACCURACY, first.clean_accuracy, n=first.n))
    return out


def _shift_metrics(
    cfg: CellConfig,
    model: nn.Module,
    data: DataSplits,
    baseline: nn.Module,
    cache: Path,
    clean_accuracy: float,
) -> tuple[list[Metric], dict[str, Any]]:
    """Clean accuracy on every shifted split of the suite (and the attacks with
    ``attack_shifted``), each shift's summary against the dense baseline (mCE), and the
    accuracy on the validation split (a domain shift's source-validation accuracy).
    ``clean_accuracy`` is the model's on the unshifted test split, already measured."""
    spec = cfg.evaluate
    if not spec.shifts:
        return [], {}
    metrics = (
        [Metric("val_accuracy", accuracy(model, data.val, spec.batch_size), n=len(data.val))]
        if len(data.val)
        else []
    )
    clean = (clean_accuracy, accuracy(baseline, data.test, spec.batch_size))
    info: dict[str, Any] = {}
    for shift in build_shifts(cfg):
        splits = shifted_splits(cfg, shift, data, baseline, cache)
        ours = shift_scores(model, splits, spec.batch_size)
        dense = baseline_scores(cfg, shift, splits, baseline, cache)
        sizes = {(s.shift, s.severity): len(s.split) for s in splits}
        metrics += [
            Metric("clean_accuracy", acc, shift=name, severity=severity, n=sizes[(name, severity)])
            for (name, severity), acc in ours.items()
        ]
        metrics += [
            Metric(name, value, shift=shift.label())
            for name, value in shift_summary(shift, ours, dense, clean, sizes).items()
        ]
        for s in splits if spec.attack_shifted else []:
            if not len(s.split):
                continue
            points = s.split.head(spec.limit).to(data.device)
            suite = _attack_suite(cfg, model, points, surrogate=baseline)
            metrics += [replace(m, shift=s.shift, severity=s.severity) for m in suite.metrics]
        info[shift.label()] = [
            {"shift": s.shift, "severity": s.severity, "family": s.family, "n": len(s.split),
             "accuracy": ours[(s.shift, s.severity)],
             "baseline_accuracy": dense[(s.shift, s.severity)]}
            for s in splits
        ]  # fmt: skip
    return metrics, info


def _save_manifold_examples(
    cfg: CellConfig, model: nn.Module, data: DataSplits, folder: Path
) -> None:
    """A few on-manifold adversarials of the suite's first latent-space attack beside their
    originals, for the report's figure (``manifold_examples.npz``)."""
    attack = next((a for a in cfg.evaluate.build_attacks() if is_latent(a)), None)
    if attack is None:
        return
    examples = manifold_examples(model, attack, data.test.head(cfg.evaluate.limit or 200))
    if examples is not None:
        np.savez(folder / "manifold_examples.npz", classes=np.array(data.classes), **examples)


def _reconstruction_metrics(
    cfg: CellConfig, model: nn.Module, data: DataSplits, baseline: nn.Module
) -> list[Metric]:
    """How the dense baseline (``vae_recon_accuracy``) and the model (``recon_accuracy``)
    classify the test points' reconstructions ``decode(encode(x))``, for a cell whose
    on-manifold components use a generative model but have no ``manifold-sets`` shift to
    report it (that shift records both, on its own test points)."""
    shifts = build_shifts(cfg) if cfg.evaluate.shifts else []
    if not cfg.uses_manifold() or any(needs_manifold(s) for s in shifts):
        return []
    recon = reconstruction_split(resolve_manifold(None, "reconstruction accuracy"), data.test)
    batch = cfg.evaluate.batch_size
    return [
        Metric("vae_recon_accuracy", accuracy(baseline, recon, batch)),
        Metric("recon_accuracy", accuracy(model, recon, batch)),
    ]


def _route_info(result: AttackResult, worst: WorstCase) -> dict[str, Any]:
    return {
        "attack": result.attack,
        "norm": result.norm,
        "eps": result.eps,
        "per_route": worst.per_attack,
        "found_by": worst.found_counts(),
        "strongest": worst.strongest,
        "robust_accuracy": worst.robust_accuracy,
    }


def _twin_agreement(model: nn.Module, data: DataSplits, cfg: CellConfig) -> list[Metric]:
    """How often a gradient-free model and the twin whose gradients attack it agree, on clean
    test points and on PGD points crafted on the twin (at the suite's first L-inf eps)."""
    if not isinstance(model, GradientFree):
        return []
    x, y = data.test.head(cfg.evaluate.diagnostics_points).tensors()
    attacks = cfg.evaluate.build_attacks()
    norm, eps = probe_threat_model(((a.norm, a.eps) for a in attacks), norms=("linf",))
    agree = twin_agreements(model, x, y, norm=norm, eps=eps)
    return [
        Metric("twin_agreement_clean", agree["clean"]),
        Metric("twin_agreement_adv", agree["adv"]),
    ]


def _diagnostics(
    cfg: CellConfig, model: nn.Module, data: DataSplits, evaluation: Evaluation
) -> tuple[list[Metric], list[dict[str, Any]]]:
    """The gradient-masking checklist at the threat model of the first gradient attack."""
    if not cfg.evaluate.diagnostics:
        return [], []
    if isinstance(model, GradientFree):  # the checklist probes the gradients attacks use
        model = StraightThrough(model, model.twin)
    pairs = list(zip(evaluation.attacks, evaluation.results, strict=True))
    norm, eps = probe_threat_model((r.norm, r.eps) for a, r in pairs if a.uses_gradients)
    same_threat = [(a, r) for a, r in pairs if (r.norm, r.eps) == (norm, eps)]
    first = next((r for a, r in same_threat if a.uses_gradients), None)
    same_attack = [
        r for r in evaluation.results if first and (r.attack, r.norm) == (first.attack, norm)
    ]
    black_box = {r.attack: r.robust_accuracy for a, r in same_threat if not a.uses_gradients}
    gradient = [r.robust_accuracy for a, r in same_threat if a.uses_gradients]
    x, y = data.test.head(cfg.evaluate.diagnostics_points).tensors()
    flags = diagnose(
        model, x, y, norm=norm, eps=eps,
        robust_by_eps={r.eps: r.robust_accuracy for r in same_attack} or None,
        black_box=black_box or None,
        white_box=min(gradient) if gradient else None,
    )  # fmt: skip
    # one metric per check, named by it; the report tells checks by the info's records
    metrics = [Metric(f.check, float(f.raised)) for f in flags]
    return metrics, [to_dict(f) for f in flags]


def compress_and_finetune(
    cfg: CellConfig, compressor: Any, baseline: nn.Module, data: DataSplits
) -> tuple[nn.Module, Record, Any]:
    """Compress the baseline and fine-tune the result; returns (model, record, fine-tuning
    history, or the reason it was skipped, or None)."""
    model, record = compressor(baseline, data)
    finetune, skipped = None, None
    if cfg.finetune is not None and cfg.finetune.epochs > 0:
        if not isinstance(model, GradientFree):
            finetune = fit(model, data, cfg.finetune, seed=cfg.seed, description="fine-tune")
        else:
            skipped = f"{compressor.label()} models cannot be trained; fine-tune skipped"
            log.info(skipped)
    return finalize(model), record, finetune.as_dict() if finetune else skipped


def run_cell(cell: Cell, workdir: Path) -> CellResult:
    """Run one cell; errors are caught and returned so one bad cell never stops a grid.

    Checkpoints the cell loads may import the code their spec names only if its config says
    ``trust_code: true``. The cell picks its own intra-op threads; the caller's are restored.
    """
    with checkpoint_trust(cell.config.trust_code), intra_op_threads(torch.get_num_threads()):
        return _run_cell(cell, workdir)


def _cell_manifold(cfg: CellConfig, data: DataSplits, cache: Path) -> ManifoldSource:
    """The cell's generative model for on-manifold attacks, objectives and test sets (the
    data's own generator, else the VAE of the cell's ``vae`` section), built (or read from
    ``cache``) only when one of them first asks for it."""
    return lambda: manifold_for(cfg.data, data, cfg.seed, cache / "manifold", cfg.vae_spec())


def _environment(device: torch.device) -> dict[str, Any]:
    """Where and with what the cell ran, for the report (numbers depend on versions)."""
    return {
        "robcomp": metadata.version("robcomp"), "python": platform.python_version(),
        "torch": torch.__version__, "host": platform.node(), "device": str(device),
        "threads": torch.get_num_threads(),
    }  # fmt: skip


def _macs_per_image(cfg: CellConfig, data: DataSplits) -> int:
    """Multiply-accumulates per image of the cell's model, built untrained on the CPU (cheap)."""
    model, _ = build_model(cfg, data)
    return count_macs(model, data.in_shape)


def _place(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` on ``device``; a gradient-free (int8) model stays where its kernels run."""
    return model if isinstance(model, GradientFree) else model.to(device)


def cell_model(cfg: CellConfig, cache: Path) -> tuple[nn.Module, DataSplits]:
    """A finished cell's model as its evaluation attacked it (compressed and fine-tuned; an
    int8 model's eager form) and its data on that model's device, for work that needs several
    cells' models at once (transfer attacks).

    The model comes from the caches the cell filled in ``cache`` (trained baseline, compressed
    model), bit for bit the one the cell evaluated; a model the compressed cache cannot hold
    (int8) is compressed again from the cached baseline, deterministically under the cell's
    seed. Call it inside the cell's :func:`checkpoint_trust` and threads, as :func:`run_cell`.
    """
    data = datasets.get(cfg.data, seed=cfg.seed).to(resolve_device(cfg.device))
    with using_manifold(_cell_manifold(cfg, data, cache)):
        baseline, _ = trained_baseline(cfg, data, cache)
        compressor = build_component(COMPRESSORS, cfg.compress, "compress")
        model, _, _ = compressed_model(
            cfg, compressor, baseline, data, cache,
            produce=lambda: compress_and_finetune(cfg, compressor, baseline, data),
        )  # fmt: skip
    model = _place(model, data.device)
    attacked = model.eager() if isinstance(model, GradientFree) else model
    return attacked, data.to(model_device(attacked))


def cell_threads(cfg: CellConfig, data: DataSplits) -> int:
    """The intra-op threads :func:`run_cell` gives the cell (the same threads give the same
    floating-point sums, so a model scored again reproduces the cell's numbers)."""
    return choose_threads(
        cfg.threads, None if cfg.threads is not None else _macs_per_image(cfg, data)
    )


def _run_cell(cell: Cell, workdir: Path) -> CellResult:
    cfg, start = cell.config, time.perf_counter()
    config = to_dict(cfg)
    common = {
        "cell_id": cell.cell_id,
        "experiment": cfg.name,
        "config": config,
        "grid_values": cell.grid_values,
    }
    folder = workdir / "cells" / cell.cell_id
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        # The one place data moves; every model follows the data's device.
        data = datasets.get(cfg.data, seed=cfg.seed).to(resolve_device(cfg.device))
        macs = None if cfg.threads is not None else _macs_per_image(cfg, data)
        torch.set_num_threads(choose_threads(cfg.threads, macs))
        with using_manifold(_cell_manifold(cfg, data, workdir / "cache")):
            baseline, baseline_info = trained_baseline(cfg, data, workdir / "cache")
            compressor = build_component(COMPRESSORS, cfg.compress, "compress")
            model, record, finetune = compressed_model(
                cfg, compressor, baseline, data, workdir / "cache",
                produce=lambda: compress_and_finetune(cfg, compressor, baseline, data),
            )  # fmt: skip
            model = _place(model, data.device)
            # Attacks call the model on many batch shapes; an int8 model would compile each.
            attacked = model.eager() if isinstance(model, GradientFree) else model
            # A model that runs on the CPU only (int8) is evaluated there, with its surrogate.
            data = data.to(model_device(attacked))
            baseline.to(data.device)
            evaluation = _evaluate(cfg, attacked, data, surrogate=baseline)
            _save_manifold_examples(cfg, attacked, data, folder)
            shift_metrics, shifts = _shift_metrics(
                cfg, attacked, data, baseline, workdir / "cache", evaluation.clean_accuracy
            )
            shift_metrics += _reconstruction_metrics(cfg, attacked, data, baseline)
        flag_metrics, flags = _diagnostics(cfg, attacked, data, evaluation)
        worst_metrics, worst_case = record_worst_case(evaluation.results, folder)
        metrics = (
            _efficiency_metrics(record, baseline, data)
            + _latency_metrics(cfg, model, data)
            + _twin_agreement(model, data, cfg)
            + evaluation.metrics
            + worst_metrics
            + shift_metrics
            + flag_metrics
        )
        info = {
            "data": data.summary(),
            "device": str(data.device),
            "compressor": compressor.label(),
            "record": to_dict(record),
            "baseline": baseline_info,
            "finetune": finetune,
            "diagnostics": flags,
            "masking": summarize([Flag(**f) for f in flags]) if flags else None,
            "gradient_free": evaluation.routes or None,
            "worst_case": worst_case,
            "shifts": shifts or None,
            "telemetry": model_telemetry(model, baseline),
            "environment": _environment(data.device),
        }
        (folder / "history.json").write_text(json.dumps(info, indent=2, default=str))
        seconds = time.perf_counter() - start
        return CellResult(**common, metrics=metrics, info=info, seconds=seconds)
    except Exception as err:  # recorded as a failed cell; KeyboardInterrupt still stops the run
        log.exception("cell %s failed", cell.cell_id)
        error = f"{type(err).__name__}: {err}\n{traceback.format_exc()}"
        return CellResult(**common, seconds=time.perf_counter() - start, error=error)
