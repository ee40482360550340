"""One call for people who already have a model: evaluate it (and compressed variants of it)
under attacks and shifts, or compress it.

```python
import robcomp
table = robcomp.evaluate_model(
    model, "digits",
    attacks=["pgd:eps=0.1,steps=10"], shifts=[{"name": "corruptions", "severities": [3]}],
    compress=["magnitude:sparsity=0.5", {"name": "int8"}],
)
pruned, record = robcomp.compress_model(model, "l1-filter", ratio=0.5, data="digits")
```

Both go through the pipeline ``robcomp run`` uses for each cell
(:func:`robcomp.experiments.pipeline.evaluate_variant`: the attack suite, the gradient-free
route for int8 models, the shift suite with mCE, the compressor's cost record), so the numbers
are the ones ``robcomp run`` stores for the same settings.

Why ``compress_model`` and not ``robcomp.compress``: ``robcomp.compress`` is the package of
compressors, and ``import robcomp.compress`` must keep giving that package; a function of the
same name on ``robcomp`` would be replaced by the package as soon as anything imports it.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robcomp import data as datasets
from robcomp.attacks import ATTACKS, Attack
from robcomp.attacks.base import missing_library
from robcomp.compress import COMPRESSORS, Record
from robcomp.config import ConfigError, build, build_component, parse_override, to_dict
from robcomp.data.base import DataSplits, Split, check_inputs, check_splits
from robcomp.data.shifts import SHIFTS
from robcomp.evaluate.stages import Stage, autoattack_breakdown
from robcomp.experiments.pipeline import Variant, compress_and_finetune, evaluate_variant
from robcomp.experiments.runner import build_model
from robcomp.experiments.spec import CellConfig
from robcomp.experiments.store import Metric
from robcomp.models import Classifier, Normalize, model_device
from robcomp.registry import Registry

__all__ = [
    "COLUMNS",
    "Stage",
    "as_splits",
    "autoattack_breakdown",
    "compress_model",
    "evaluate_model",
    "model_from_weights",
    "parse_spec",
    "with_normalization",
]

log = logging.getLogger(__name__)

Data = DataSplits | str | Mapping[str, Any] | tuple[Tensor, Tensor]
ComponentSpec = str | Mapping[str, Any]
COLUMNS = ("variant", "metric", "attack", "eps", "shift", "severity", "value")


def evaluate_model(
    model: nn.Module,
    data: Data,
    *,
    attacks: Sequence[ComponentSpec | Attack] = (),
    shifts: Sequence[ComponentSpec] = (),
    compress: Sequence[ComponentSpec | Any] = (),
    finetune: Mapping[str, Any] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    limit: int | None = None,
    shift_limit: int | None = None,
    batch_size: int = 256,
    diagnostics: bool = False,
    latency_batch_sizes: Sequence[int] = (),
    seed: int = 0,
    as_frame: bool | None = None,
) -> Any:
    """Clean and robust accuracy, shifted accuracy and cost of ``model`` and of its compressed
    variants, as one tidy table.

    Args:
        model: a classifier taking float inputs in [0, 1] (N, C, H, W) or (N, C, L); pass
            ``mean``/``std`` if it expects normalized inputs (it is then wrapped in a
            Normalize layer, as every robcomp model is). Never modified.
        data: a :class:`~robcomp.data.DataSplits`, a dataset name or spec
            (``{"name": "npz", "path": ..., "split": "test"}``), or ``(x, y)`` tensors used as
            the test set (compressors that calibrate or fine-tune need a dataset with a
            training split).
        attacks: attack specs (``{"name": "pgd", "eps": 8/255}``, or the CLI's
            ``"pgd:eps=8/255,steps=20"``) or registered attack objects.
        shifts: shift specs (``{"name": "corruptions", "severities": [1, 3, 5]}``).
        compress: compressor specs (``"l1-filter:ratio=0.5"``, ``{"name": "int8"}``) or
            compressor objects; the uncompressed model is always the first variant,
            ``none``.
        finetune: training settings (``{"epochs": 3, "lr": 0.01}``) to fine-tune every
            compressed variant with, as ``finetune:`` in an experiment file.
        mean, std: per-channel statistics the model expects its inputs normalized with.
        limit: attack at most this many test points (clean accuracy uses them all).
        shift_limit: shift at most this many test points.
        batch_size: evaluation batch size.
        diagnostics: run the gradient-masking checklist (``flag:*`` metrics).
        latency_batch_sizes: time one forward pass on batches of these sizes.
        seed: seeds the evaluation (attacks, shifts) as a cell's seed does.
        as_frame: a pandas DataFrame (True), a list of dicts (False), or a DataFrame when
            pandas is installed (None).

    Returns:
        One row per number, columns ``variant`` (the compressor's label), ``metric``,
        ``attack`` and ``eps`` (``""`` and 0 when no attack), ``shift`` and ``severity``
        (``""`` and 0 on the test split itself), ``value``: the store's own layout.
    """
    model = with_normalization(model, mean, std)
    splits = as_splits(data, model, seed)
    cfg = _config(splits, data, attacks, shifts, finetune, seed, limit=limit,
                  shift_limit=shift_limit, batch_size=batch_size, diagnostics=diagnostics,
                  latency_batch_sizes=tuple(latency_batch_sizes))  # fmt: skip
    splits = splits.to(model_device(model))
    variants = [build_component(COMPRESSORS, "none", "compress")]
    variants += [_compressor(c, f"compress[{i}]") for i, c in enumerate(compress)]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="robcomp-api-") as tmp:
        for i, compressor in enumerate(variants):
            folder = Path(tmp, f"variant-{i}")
            folder.mkdir()
            variant = Variant(
                # The uncompressed model is scored as it is, never fine-tuned.
                config=cfg if i else replace(cfg, finetune=None),
                baseline=model, compressor=compressor, cache=Path(tmp, "cache"),
                folder=folder, reuse=False,
            )  # fmt: skip
            result = evaluate_variant(variant, splits)
            rows += [_row(compressor.label(), m) for m in result.metrics]
    _log_scored(splits, cfg)
    return _table(rows, as_frame)


def compress_model(
    model: nn.Module,
    method: ComponentSpec | Any,
    *,
    data: Data,
    finetune: Mapping[str, Any] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    seed: int = 0,
    **fields: Any,
) -> tuple[nn.Module, Record]:
    """Compress ``model`` with one compressor (and fine-tune it); ``model`` is not modified.

    Args:
        model: a classifier taking inputs in [0, 1]; see :func:`evaluate_model` for ``mean``,
            ``std`` and ``data``.
        method: a compressor name (``robcomp list compressors``), a spec, or a compressor.
        data: what the compressor calibrates, measures sensitivity or fine-tunes on.
        finetune: training settings for fine-tuning, e.g. ``{"epochs": 3, "lr": 0.01}``.
        seed: seeds fine-tuning.
        **fields: the compressor's fields, e.g. ``sparsity=0.5``.

    Returns:
        (the compressed model with its masks made permanent, the compressor's
        :class:`~robcomp.compress.Record`: parameters, nonzeros, bits, bytes, MACs, seconds).
    """
    model = with_normalization(model, mean, std)
    if isinstance(method, str | Mapping):
        spec = parse_spec(method) if isinstance(method, str) else dict(method)
        compressor = _compressor({**spec, **fields}, "method")
    elif fields:
        raise ValueError(f"fields {sorted(fields)} apply to a compressor name or spec, not to "
                         f"the compressor object {method!r}")  # fmt: skip
    else:
        compressor = method
    splits = as_splits(data, model, seed).to(model_device(model))
    cfg = build(CellConfig, {"seed": seed, "finetune": finetune}, "compress_model")
    compressed, record, _ = compress_and_finetune(cfg, compressor, model, splits)
    return compressed, record


def with_normalization(
    model: nn.Module, mean: Sequence[float] | None, std: Sequence[float] | None
) -> nn.Module:
    """``model`` behind a Normalize layer when statistics are given (a new wrapper; the model
    itself is shared, not copied)."""
    if mean is None and std is None:
        return model
    if mean is None or std is None:
        raise ValueError("pass both mean and std (the statistics the model was trained with)")
    normalize = Normalize(mean, std).to(model_device(model))
    return Classifier(model, normalize)


def as_splits(data: Data, model: nn.Module, seed: int = 0) -> DataSplits:
    """``data`` as splits: as it is, loaded by name or spec, or ``(x, y)`` as a test set
    (empty train and validation splits; the class count from the model's output)."""
    if isinstance(data, DataSplits):
        return data
    if isinstance(data, str | Mapping):
        return datasets.get(data, seed=seed)
    if isinstance(data, tuple) and len(data) == 2:
        x, y = data
        return _tensor_splits(x, y, model)
    raise TypeError(
        f"data must be DataSplits, a dataset name or spec, or (x, y) tensors; got "
        f"{type(data).__name__}"
    )


def _tensor_splits(x: Tensor, y: Tensor, model: nn.Module) -> DataSplits:
    x, y = x.detach().cpu(), y.detach().cpu().long()
    check_inputs(x, "data: x")
    with torch.no_grad():
        num_classes = int(model(x[:1].float().to(model_device(model))).shape[1])
    test = Split(x, y)
    empty = test.take(slice(0, 0))
    channels = int(x.shape[1])
    splits = DataSplits(
        name="tensors", train=empty, val=empty, test=test, num_classes=num_classes,
        classes=tuple(str(i) for i in range(num_classes)),
        mean=(0.0,) * channels, std=(1.0,) * channels,
    )  # fmt: skip
    check_splits(splits, "data (x, y)", test_only=True)
    return splits


def parse_spec(text: str) -> dict[str, Any]:
    """``pgd:eps=8/255,steps=20`` -> ``{"name": "pgd", "eps": "8/255", "steps": 20}``, the
    CLI's syntax; a value may be a YAML list (``attacks=[apgd-ce,apgd-t]``)."""
    name, _, rest = text.partition(":")
    spec: dict[str, Any] = {"name": name.strip()}
    for item in filter(None, (p.strip() for p in _top_level(rest))):
        key, value = parse_override(item)
        spec[key] = value
    return spec


def _top_level(text: str) -> list[str]:
    """``text`` split at the commas outside brackets and braces."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char in "[{") - (char in "]}")
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


def _registered_spec(obj: Any, registry: Registry[Any], where: str) -> dict[str, Any]:
    """The spec that rebuilds a registered component object."""
    for name in registry.names():
        if registry.get(name) is type(obj):
            return {"name": name, **to_dict(obj)}
    raise ConfigError(
        f"{where}: {type(obj).__name__} is not a registered {registry.kind}; register it "
        f"(@{registry.kind.upper()}S.register(name)) or pass a spec"
    )


def _compressor(spec: Any, where: str) -> Any:
    if isinstance(spec, str):
        spec = parse_spec(spec)
    if isinstance(spec, Mapping):
        return build_component(COMPRESSORS, dict(spec), where)
    if callable(spec) and hasattr(spec, "label"):
        return spec
    raise TypeError(f"{where}: expected a compressor name, spec or object, got {spec!r}")


def _config(
    splits: DataSplits,
    data: Data,
    attacks: Sequence[ComponentSpec | Attack],
    shifts: Sequence[ComponentSpec],
    finetune: Mapping[str, Any] | None,
    seed: int,
    **evaluate: Any,
) -> CellConfig:
    """A cell's configuration holding the suite, so the runner's functions read it as theirs."""
    attack_specs = [
        parse_spec(a) if isinstance(a, str) else dict(a) if isinstance(a, Mapping)
        else _registered_spec(a, ATTACKS, f"attacks[{i}]")
        for i, a in enumerate(attacks)
    ]  # fmt: skip
    shift_specs = [parse_spec(s) if isinstance(s, str) else dict(s) for s in shifts]
    # The data spec names the data for shifts that load other domains; in-memory data keeps its
    # own name (the shifted arrays are cached in a folder of this call only).
    data_spec = {"name": splits.name} if not isinstance(data, str | Mapping) else data
    raw = {
        "seed": seed,
        "data": {"name": data_spec} if isinstance(data_spec, str) else dict(data_spec),
        "finetune": dict(finetune) if finetune is not None else None,
        "evaluate": {"attacks": attack_specs, "shifts": shift_specs, **evaluate},
    }
    cfg = build(CellConfig, raw, "evaluate_model")
    for i, attack in enumerate(cfg.evaluate.build_attacks("attacks")):
        if message := missing_library(attack):
            raise ConfigError(f"attacks[{i}]: {message}")
    for i, spec in enumerate(shift_specs):
        build_component(SHIFTS, spec, f"shifts[{i}]")
    return cfg


def _row(variant: str, metric: Metric) -> dict[str, Any]:
    value = metric.value
    return {
        "variant": variant,
        "metric": metric.name,
        "attack": metric.attack,
        "eps": metric.eps,
        "shift": metric.shift,
        "severity": metric.severity,
        "value": math.nan if value is None else float(value),
    }


def _table(rows: list[dict[str, Any]], as_frame: bool | None) -> Any:
    if as_frame is False:
        return rows
    try:
        import pandas as pd
    except ImportError:
        if as_frame:
            raise ImportError("as_frame=True needs pandas: pip install pandas") from None
        return rows
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _log_scored(splits: DataSplits, cfg: CellConfig) -> None:
    n = len(splits.test)
    attacked = min(n, cfg.evaluate.limit or n)
    log.info(
        "scored %s: the test split, %d points (attacks on the first %d)", splits.name, n, attacked
    )


# --- A model from someone else's weights file -------------------------------------------------


def model_from_weights(
    name: str,
    weights: str | Path,
    data: DataSplits,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    options: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> Classifier:
    """``name`` built for ``data`` (class count, input shape) with a foreign weights file
    loaded, exactly as an experiment file's ``model: {name, weights, mean, std, options}``
    with ``train.epochs: 0`` builds it. Without ``mean``/``std`` that is an error, unless the
    model brings its own statistics: the training data's would be a silent guess.
    """
    raw = {
        "seed": seed,
        "model": {"name": name, "weights": str(weights), "mean": mean, "std": std,
                  "options": dict(options or {})},
        "train": {"epochs": 0},
    }  # fmt: skip
    cfg = build(CellConfig, raw, "model")
    model, _ = build_model(cfg, data)
    return model.eval()
