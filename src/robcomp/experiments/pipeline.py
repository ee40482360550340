"""The one pipeline: a model variant's evaluation, from its uncompressed baseline to its numbers.

A *variant* is a baseline model (built and trained, loaded from the cache, or handed over by a
user) compressed by one compressor and fine-tuned, then scored: clean accuracy, every attack of
the suite (gradient attacks on a model without gradients go the BPDA/transfer/black-box way),
the shift suite against the dense baseline (mCE), the gradient-masking checklist, and its cost
(the compressor's record, latency). :func:`evaluate_variant` is that life, typed in
(:class:`Variant`) and typed out (:class:`VariantResult`); every door calls it:

- ``robcomp run``, once per cell (:func:`robcomp.experiments.runner.run_cell`);
- ``robcomp.evaluate_model`` and ``robcomp.compress_model`` (:mod:`robcomp.api`);
- ``robcomp evaluate`` (the CLI), on a saved or foreign model.

What differs between models (no gradients, no training, kernels on one device) is asked once,
of the model (:func:`robcomp.models.capabilities`), and passed on.
"""

from __future__ import annotations

import copy
import logging
import math
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from robcomp.attacks import Attack
from robcomp.attacks.cascade import Cascade
from robcomp.attacks.manifold import (
    ManifoldSource,
    is_latent,
    needs_manifold,
    resolve_manifold,
    using_manifold,
)
from robcomp.compress import COMPRESSORS, Record, finalize, latency, measure
from robcomp.config import build_component, to_dict
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
from robcomp.evaluate.stages import Stage, autoattack_breakdown
from robcomp.experiments.cache import compressed_model
from robcomp.experiments.shifts import baseline_scores, build_shifts, shifted_splits
from robcomp.experiments.shifts import scores as shift_scores
from robcomp.experiments.spec import CellConfig
from robcomp.experiments.store import ATTACKED_CLEAN_ACCURACY, Metric
from robcomp.experiments.telemetry import model_telemetry
from robcomp.experiments.threads import load_1min
from robcomp.experiments.worst import record_worst_case
from robcomp.models import (
    Capabilities,
    GradientFree,
    attack_form,
    capabilities,
    gradient_form,
    model_device,
)
from robcomp.train import fit

log = logging.getLogger(__name__)

# The uncompressed model and what produced it (training history, test accuracy; None for a
# model handed over as it is).
Baseline = tuple[nn.Module, dict[str, Any] | None]


@dataclass(frozen=True, kw_only=True)
class Variant:
    """One variant to evaluate.

    Attributes:
        config: the cell's configuration: the evaluation suite (``evaluate``), fine-tuning,
            seed, and the compressor (``compress``) unless ``compressor`` is given.
        baseline: the uncompressed model, or a function that builds or loads it (called
            inside the variant's generative-model scope, which on-manifold training needs).
        cache: the artifacts folder: compressed models (with ``reuse``), shifted test sets,
            the generative model of on-manifold components.
        folder: the variant's own folder (per-point verdicts, on-manifold examples).
        compressor: a compressor object; None builds ``config.compress``.
        reuse: read and fill the compressed-model cache (the runner); False compresses afresh.
    """

    config: CellConfig
    baseline: nn.Module | Callable[[], Baseline]
    cache: Path
    folder: Path
    compressor: Any = None
    reuse: bool = True


@dataclass(frozen=True, kw_only=True)
class CellInfo:
    """What a variant's evaluation records besides its metrics: ``history.json`` and the
    store's ``info`` column hold :meth:`as_json` (the report reads those keys)."""

    data: str
    device: str
    compressor: str
    record: dict[str, Any]
    baseline: dict[str, Any] | None
    finetune: dict[str, Any] | str | None  # the fine-tuning history, or why it was skipped
    diagnostics: list[dict[str, Any]]
    masking: str | None
    gradient_free: list[dict[str, Any]] | None  # per gradient attack: the routes' outcome
    worst_case: dict[str, Any] | None
    shifts: dict[str, list[dict[str, Any]]] | None
    telemetry: dict[str, Any]
    environment: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        """The record as the JSON object ``history.json`` and the store hold."""
        return asdict(self)


@dataclass
class Evaluation:
    """What the attacks of a variant produced."""

    metrics: list[Metric] = field(default_factory=list)
    attacks: list[Attack] = field(default_factory=list)
    results: list[AttackResult] = field(default_factory=list)  # one per attack, in order
    routes: list[dict[str, Any]] = field(default_factory=list)  # gradient-free breakdown
    clean_accuracy: float = math.nan  # on the whole test split
    # per attack index: an AutoAttack cascade's per-stage account
    stages: dict[int, list[Stage]] = field(default_factory=dict)


@dataclass(frozen=True)
class VariantResult:
    """A variant's numbers (the store's metrics, in the runner's order), its typed record and
    its attacks' results (for tables that show points, clean accuracy and stages per attack)."""

    metrics: list[Metric]
    info: CellInfo
    evaluation: Evaluation


@dataclass(frozen=True)
class Prepared:
    """A variant's model ready for its evaluation.

    Attributes:
        model: compressed and fine-tuned, on its device (the form whose cost is timed).
        attacked: the form attacks call (an int8 model's eager form).
        caps: what ``model`` can do, asked once.
        data: the data on ``attacked``'s device.
        baseline: the uncompressed model on that device (the dense reference of shifts).
        surrogate: the differentiable form of the baseline (transfer attacks start there).
        baseline_info: what produced the baseline (training history), None if handed over.
        compressor: the compressor object.
        record: the compressor's account of the cost.
        finetune: the fine-tuning history, why it was skipped, or None.
    """

    model: nn.Module
    attacked: nn.Module
    caps: Capabilities
    data: DataSplits
    baseline: nn.Module
    surrogate: nn.Module
    baseline_info: dict[str, Any] | None
    compressor: Any
    record: Record
    finetune: Any


def evaluate_variant(variant: Variant, data: DataSplits) -> VariantResult:
    """A variant's life: build or load the baseline, compress, fine-tune, attack, shift, cost.

    Args:
        variant: what to evaluate and where its artifacts go.
        data: the data, on the device the variant should run on (a model whose kernels run
            elsewhere takes its data there).

    Returns:
        the metrics (cost, latency, clean and robust accuracy, worst case, shifts, flags), the
        typed record of the run and the attacks' results.
    """
    cfg = variant.config
    with using_manifold(cell_manifold(cfg, data, variant.cache)):
        p = prepare_variant(variant, data)
        evaluation = _evaluate(cfg, p.attacked, p.data, p.surrogate, p.caps)
        _save_manifold_examples(cfg, p.attacked, p.data, variant.folder)
        shift_metrics, shifts = _shift_metrics(cfg, p, variant.cache, evaluation.clean_accuracy)
        shift_metrics += _reconstruction_metrics(cfg, p.attacked, p.data, p.baseline)
    flag_metrics, flags = _diagnostics(cfg, p.attacked, p.data, evaluation, p.caps)
    worst_metrics, worst_case = record_worst_case(evaluation.results, variant.folder)
    metrics = (
        _efficiency_metrics(p.record, p.baseline, p.data)
        + _latency_metrics(cfg, p.model, p.data)
        + _twin_agreement(p.model, p.data, cfg, p.caps)
        + evaluation.metrics
        + worst_metrics
        + shift_metrics
        + flag_metrics
    )
    info = CellInfo(
        data=p.data.summary(),
        device=str(p.data.device),
        compressor=p.compressor.label(),
        record=to_dict(p.record),
        baseline=p.baseline_info,
        finetune=p.finetune,
        diagnostics=flags,
        masking=summarize([Flag(**f) for f in flags]) if flags else None,
        gradient_free=evaluation.routes or None,
        worst_case=worst_case,
        shifts=shifts or None,
        telemetry=model_telemetry(p.model, p.baseline),
        environment=_environment(p.data.device),
    )
    return VariantResult(metrics=metrics, info=info, evaluation=evaluation)


def prepare_variant(variant: Variant, data: DataSplits) -> Prepared:
    """The variant's baseline, compressed (from the cache with ``reuse``) and fine-tuned, on
    the device it runs on. Call it inside :func:`cell_manifold`'s scope, as
    :func:`evaluate_variant` does."""
    cfg = variant.config
    given = variant.baseline
    baseline, baseline_info = (given, None) if isinstance(given, nn.Module) else given()
    compressor = variant.compressor or build_component(COMPRESSORS, cfg.compress, "compress")

    def produce() -> tuple[nn.Module, Record, Any]:
        return compress_and_finetune(cfg, compressor, baseline, data)

    if variant.reuse:
        model, record, finetune = compressed_model(
            cfg, compressor, baseline, data, variant.cache, produce=produce
        )
    else:
        model, record, finetune = produce()
    caps = capabilities(model)
    model = model if caps.pinned else model.to(data.device)
    # Attacks call the model on many batch shapes; an int8 model would compile each.
    attacked = attack_form(model, caps)
    # A model that runs on one device only (int8: the CPU) is evaluated there, with its
    # baseline (a copy when it lives elsewhere: the caller's model is never moved).
    data = data.to(model_device(attacked))
    base = _on(baseline, data.device)
    return Prepared(
        model=model, attacked=attacked, caps=caps, data=data, baseline=base,
        surrogate=gradient_form(base, capabilities(base)), baseline_info=baseline_info,
        compressor=compressor, record=record, finetune=finetune,
    )  # fmt: skip


def compress_and_finetune(
    cfg: CellConfig, compressor: Any, baseline: nn.Module, data: DataSplits
) -> tuple[nn.Module, Record, Any]:
    """Compress the baseline and fine-tune the result; returns (model, record, fine-tuning
    history, or the reason it was skipped, or None)."""
    model, record = compressor(baseline, data)
    finetune, skipped = None, None
    if cfg.finetune is not None and cfg.finetune.epochs > 0:
        if capabilities(model).trainable:
            finetune = fit(model, data, cfg.finetune, seed=cfg.seed, description="fine-tune")
        else:
            skipped = f"{compressor.label()} models cannot be trained; fine-tune skipped"
            log.info(skipped)
    return finalize(model), record, finetune.as_dict() if finetune else skipped


def cell_manifold(cfg: CellConfig, data: DataSplits, cache: Path) -> ManifoldSource:
    """The cell's generative model for on-manifold attacks, objectives and test sets (the
    data's own generator, else the VAE of the cell's ``vae`` section), built (or read from
    ``cache``) only when one of them first asks for it."""
    return lambda: manifold_for(cfg.data, data, cfg.seed, cache / "manifold", cfg.vae_spec())


def _on(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` on ``device``: itself when it is there, else a moved copy (never mutate an
    argument)."""
    return model if model_device(model) == device else copy.deepcopy(model).to(device)


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


def _evaluate(
    cfg: CellConfig, model: nn.Module, data: DataSplits, surrogate: nn.Module, caps: Capabilities
) -> Evaluation:
    """Clean accuracy, then every attack of the suite on the first ``limit`` test points.

    A model without useful gradients (int8) has each gradient attack evaluated as the worst
    case over BPDA through its twin, transfer from ``surrogate`` (the fp32 baseline) and a
    full-budget Square at the same threat model.
    """
    spec = cfg.evaluate
    clean = accuracy(model, data.test, spec.batch_size)
    out = _attack_suite(cfg, model, data.test.head(spec.limit), surrogate, caps)
    out.metrics.insert(0, Metric("clean_accuracy", clean, n=len(data.test)))
    out.clean_accuracy = clean
    return out


def _attack_suite(
    cfg: CellConfig, model: nn.Module, points: Split, surrogate: nn.Module, caps: Capabilities
) -> Evaluation:
    """Every attack of the suite on ``points`` (the test split's first ``limit``, or a
    shifted split's), and the clean accuracy on those same points
    (:data:`ATTACKED_CLEAN_ACCURACY`), which robust accuracy is to be read against."""
    spec = cfg.evaluate
    out = Evaluation()
    cache: dict[tuple[str, str, float], RouteOutcome] = {}
    for attack in spec.build_attacks():
        if not attack.uses_gradients or caps.gradients:
            if isinstance(attack, Cascade):  # AutoAttack: what each stage did, as fra31 prints
                result, out.stages[len(out.results)] = autoattack_breakdown(
                    model, attack, points, spec.batch_size
                )
            else:
                result = evaluate_attack(model, attack, points, spec.batch_size)
        else:
            twin = gradient_form(model, caps)
            result, worst = evaluate_without_gradients(
                model, twin, attack, points, surrogate=surrogate,
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
    cfg: CellConfig, p: Prepared, cache: Path, clean_accuracy: float
) -> tuple[list[Metric], dict[str, Any]]:
    """Clean accuracy on every shifted split of the suite (and the attacks with
    ``attack_shifted``), each shift's summary against the dense baseline (mCE), and the
    accuracy on the validation split (a domain shift's source-validation accuracy).
    ``clean_accuracy`` is the model's on the unshifted test split, already measured."""
    spec = cfg.evaluate
    if not spec.shifts:
        return [], {}
    model, data, baseline = p.attacked, p.data, p.baseline
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
            suite = _attack_suite(cfg, model, points, p.surrogate, p.caps)
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


def _twin_agreement(
    model: nn.Module, data: DataSplits, cfg: CellConfig, caps: Capabilities
) -> list[Metric]:
    """How often a model without gradients and the twin whose gradients attack it agree, on
    clean test points and on PGD points crafted on the twin (at the suite's first L-inf eps)."""
    if caps.gradients:
        return []
    x, y = data.test.head(cfg.evaluate.diagnostics_points).tensors()
    attacks = cfg.evaluate.build_attacks()
    norm, eps = probe_threat_model(((a.norm, a.eps) for a in attacks), norms=("linf",))
    agree = twin_agreements(cast(GradientFree, model), x, y, norm=norm, eps=eps)
    return [
        Metric("twin_agreement_clean", agree["clean"]),
        Metric("twin_agreement_adv", agree["adv"]),
    ]


def _diagnostics(
    cfg: CellConfig, model: nn.Module, data: DataSplits, evaluation: Evaluation, caps: Capabilities
) -> tuple[list[Metric], list[dict[str, Any]]]:
    """The gradient-masking checklist at the threat model of the first gradient attack."""
    if not cfg.evaluate.diagnostics:
        return [], []
    if not caps.gradients:  # the checklist probes the gradients attacks use
        model = StraightThrough(model, gradient_form(model, caps))
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


def _environment(device: torch.device) -> dict[str, Any]:
    """Where and with what the cell ran, for the report (numbers depend on versions)."""
    return {
        "robcomp": metadata.version("robcomp"), "python": platform.python_version(),
        "torch": torch.__version__, "host": platform.node(), "device": str(device),
        "threads": torch.get_num_threads(),
    }  # fmt: skip
