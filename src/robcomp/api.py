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
import os
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
from robcomp.compress import COMPRESSORS, Record, uses_training_data
from robcomp.config import (
    ConfigError,
    build,
    build_component,
    parse_data_spec,
    parse_spec,
    to_dict,
)
from robcomp.data.base import (
    DataSplits,
    Split,
    check_inputs,
    check_splits,
    hold_out,
    require_training_split,
)
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
    "as_inputs",
    "as_model",
    "as_splits",
    "autoattack_breakdown",
    "check_training_data",
    "compress_model",
    "data_spec_of",
    "evaluate_model",
    "model_from_weights",
    "parse_spec",
    "with_normalization",
]

log = logging.getLogger(__name__)

Data = DataSplits | str | os.PathLike[str] | Mapping[str, Any] | tuple[Tensor, Tensor]
Model = nn.Module | str
ComponentSpec = str | Mapping[str, Any]
COLUMNS = ("variant", "metric", "attack", "norm", "eps", "shift", "severity", "value", "n")


def evaluate_model(
    model: Model,
    data: Data,
    *,
    weights: str | Path | None = None,
    holdout: int | None = None,
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
            Normalize layer, as every robcomp model is). Never modified. Or a model name as
            the CLI's ``--model`` takes it (``"resnet20"``, ``"torchvision:resnet18"``,
            ``"timm:..."``, ``"module:callable"``), built for the data's classes and input
            shape, with ``weights`` loaded (see :func:`as_model`).
        data: a :class:`~robcomp.data.DataSplits`, a dataset name (``"digits"``), a spec as
            the CLI's ``--data`` takes it (``"npz:path=test.npz,split=test"``) or as a mapping,
            a path to an ``.npz`` file, or ``(x, y)`` tensors used as the test set (see
            :func:`as_splits`). Compressors that calibrate or fine-tune read the training
            split only; data without one is refused unless ``holdout`` is given.
        weights: a weights file (safetensors or a PyTorch state dict) for a model name.
        holdout: for data without a training split (a test set): move this many random test
            points to the training split, where int8/activation calibration and fine-tuning
            read them; they are scored for no variant, so calibration never sees a scored point.
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
        diagnostics: run the gradient-masking checklist (a metric per check, 1 if raised).
        latency_batch_sizes: time one forward pass on batches of these sizes.
        seed: seeds the evaluation (attacks, shifts) as a cell's seed does.
        as_frame: a pandas DataFrame (True), a list of dicts (False), or a DataFrame when
            pandas is installed (None).

    Returns:
        One row per number, columns ``variant`` (the compressor's label), ``metric``,
        ``attack``, ``norm`` and ``eps`` (``""`` and 0 when no attack), ``shift`` and
        ``severity`` (``""`` and 0 on the test split itself), ``value`` and ``n`` (the points
        it was measured on, None where not counted): the store's own layout.
    """
    model, splits = as_inputs(model, data, weights=weights, mean=mean, std=std, seed=seed)
    if holdout is not None:
        splits = _held_out(splits, holdout, seed)
    cfg = _config(splits, data_spec_of(data, splits), attacks, shifts, finetune, seed,
                  limit=limit, shift_limit=shift_limit, batch_size=batch_size,
                  diagnostics=diagnostics,
                  latency_batch_sizes=tuple(latency_batch_sizes))  # fmt: skip
    variants = [build_component(COMPRESSORS, "none", "compress")]
    variants += [_compressor(c, f"compress[{i}]") for i, c in enumerate(compress)]
    check_training_data(splits, variants[1:], cfg, _HOLDOUT_HINT)
    splits = splits.to(model_device(model))
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
    model: Model,
    method: ComponentSpec | Any,
    *,
    data: Data,
    weights: str | Path | None = None,
    finetune: Mapping[str, Any] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    seed: int = 0,
    **fields: Any,
) -> tuple[nn.Module, Record]:
    """Compress ``model`` with one compressor (and fine-tune it); ``model`` is not modified.

    Args:
        model: a classifier taking inputs in [0, 1], or a model name; see
            :func:`evaluate_model` for ``model``, ``weights``, ``mean``, ``std`` and ``data``.
        method: a compressor name (``robcomp list compressors``), a spec, or a compressor.
        data: what the compressor calibrates or fine-tunes on: its training split (data
            without one is refused for such compressors, with a ConfigError).
        finetune: training settings for fine-tuning, e.g. ``{"epochs": 3, "lr": 0.01}``.
        seed: seeds fine-tuning.
        **fields: the compressor's fields, e.g. ``sparsity=0.5``.

    Returns:
        (the compressed model with its masks made permanent, the compressor's
        :class:`~robcomp.compress.Record`: parameters, nonzeros, bits, bytes, MACs, seconds).
    """
    model, splits = as_inputs(model, data, weights=weights, mean=mean, std=std, seed=seed)
    if isinstance(method, str | Mapping):
        spec = parse_spec(method) if isinstance(method, str) else dict(method)
        compressor = _compressor({**spec, **fields}, "method")
    elif fields:
        raise ValueError(f"fields {sorted(fields)} apply to a compressor name or spec, not to "
                         f"the compressor object {method!r}")  # fmt: skip
    else:
        compressor = method
    cfg = build(CellConfig, {"seed": seed, "finetune": finetune}, "compress_model")
    check_training_data(splits, [compressor], cfg)
    splits = splits.to(model_device(model))
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


def as_inputs(
    model: Model,
    data: Data,
    *,
    weights: str | Path | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    seed: int = 0,
) -> tuple[nn.Module, DataSplits]:
    """The model and the data in any form :func:`evaluate_model` takes, as a module and
    splits: the data first when the model is a name (it is built for the data's classes and
    input shape), the model first when the data is ``(x, y)`` (its outputs count the
    classes)."""
    if isinstance(model, nn.Module):
        if weights is not None:
            raise ConfigError("weights: applies to a model name; load them into your module")
        net = with_normalization(model, mean, std)
        return net, as_splits(data, net, seed)
    splits = as_splits(data, None, seed)
    return as_model(model, splits, weights=weights, mean=mean, std=std, seed=seed), splits


def as_model(
    model: Model,
    data: DataSplits,
    *,
    weights: str | Path | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    options: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> nn.Module:
    """``model`` as a module: a module as it is (behind a Normalize layer when ``mean`` and
    ``std`` are given); a name as the CLI's ``--model`` takes it (registered, ``timm:``,
    ``torchvision:``, ``module:callable``) built by the experiment runner's factory for
    ``data``'s classes and input shape, seeded, with ``weights`` loaded (they need ``mean``
    and ``std`` unless the model brings its own statistics; without weights the model is
    an untrained initialisation, for compressors that train it).
    """
    if isinstance(model, nn.Module):
        return with_normalization(model, mean, std)
    if not isinstance(model, str):
        raise TypeError(f"model must be a torch module or a model name, got {type(model).__name__}")
    if weights is None:
        log.warning("model %r without weights=: an untrained (seeded) initialisation", model)
    return _named_model(model, weights, data, mean, std, options, seed)


def as_splits(data: Data, model: nn.Module | None = None, seed: int = 0) -> DataSplits:
    """``data`` as splits, in any form the CLI's ``--data`` takes and a few more.

    - :class:`~robcomp.data.DataSplits`: as it is.
    - a dataset name (``"mnist"``), a CLI spec (``"npz:path=test.npz,split=test"``), a YAML
      mapping in a string, or a spec mapping (``{"name": "npz", ...}``): loaded by
      :func:`robcomp.data.get` (see :func:`robcomp.config.parse_data_spec`).
    - a path (``str`` ending in ``.npz``, or :class:`~pathlib.Path`): ``npz:path=PATH``.
    - ``(x, y)`` tensors or arrays, or ``{"x": x, "y": y}``: a test set, with empty train and
      validation splits; the class count from ``model``'s output, else from the labels.
    """
    if isinstance(data, DataSplits):
        return data
    if isinstance(data, str | os.PathLike):
        spec = parse_data_spec(data if isinstance(data, str) else Path(data))
        return datasets.get(spec, seed=seed)
    if isinstance(data, Mapping) and "name" not in data and {"x", "y"} <= data.keys():
        return _tensor_splits(data["x"], data["y"], model)
    if isinstance(data, Mapping):
        return datasets.get(dict(data), seed=seed)
    if isinstance(data, tuple | list) and len(data) == 2:
        x, y = data
        return _tensor_splits(x, y, model)
    raise TypeError(
        f"data must be DataSplits, a dataset name, spec or .npz path, or (x, y) tensors; got "
        f"{type(data).__name__}"
    )


def data_spec_of(data: Data, splits: DataSplits) -> dict[str, Any]:
    """The dataset spec a cell records for ``data``: the parsed spec of a name, string or
    path; an in-memory dataset keeps only its name."""
    if isinstance(data, str | os.PathLike):
        spec = parse_data_spec(data if isinstance(data, str) else Path(data))
        return {"name": spec} if isinstance(spec, str) else spec
    if isinstance(data, Mapping) and "name" in data:
        return dict(data)
    return {"name": splits.name}


_HOLDOUT_HINT = (
    ", or holdout=N to move N random test points to the training split (they are then not scored)"
)


def check_training_data(
    splits: DataSplits, compressors: Sequence[Any], cfg: CellConfig, hint: str = ""
) -> None:
    """Refuse, before anything runs, compressors that calibrate or train (and fine-tuning)
    on data without a training split.

    Raises:
        ConfigError: naming the compressor, the missing split and what to give instead.
    """
    users = [c.label() for c in compressors if uses_training_data(c)]
    if compressors and cfg.finetune is not None and cfg.finetune.epochs > 0:
        users.append("fine-tuning")
    if users:
        require_training_split(splits, " and ".join(users), hint)


def _held_out(splits: DataSplits, n: int, seed: int) -> DataSplits:
    held = hold_out(splits, n, seed)
    log.warning(
        "%s: %d random test points held out as the training split (calibration, fine-tuning); "
        "every variant is scored on the other %d", splits.name, n, len(held.test),
    )  # fmt: skip
    return held


def _tensor_splits(x: Any, y: Any, model: nn.Module | None) -> DataSplits:
    x = torch.as_tensor(x).detach().cpu()
    y = torch.as_tensor(y).detach().cpu().long()
    check_inputs(x, "data: x")
    if model is not None:
        with torch.no_grad():
            num_classes = int(model(x[:1].float().to(model_device(model))).shape[1])
    else:  # a model built by name: the labels are all there is to count the classes by
        num_classes = max(int(y.max()) + 1, 2)
        log.info("data (x, y): %d classes, from the largest label", num_classes)
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
    data_spec: Mapping[str, Any],
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
    raw = {
        "seed": seed,
        "data": dict(data_spec),
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
        "norm": metric.norm,
        "eps": metric.eps,
        "shift": metric.shift,
        "severity": metric.severity,
        "value": math.nan if value is None else float(value),
        "n": metric.n,
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
    return _named_model(name, weights, data, mean, std, options, seed)


def _named_model(
    name: str,
    weights: str | Path | None,
    data: DataSplits,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    options: Mapping[str, Any] | None,
    seed: int,
) -> Classifier:
    """The experiment runner's model factory, as a cell with ``train.epochs: 0`` uses it."""
    raw = {
        "seed": seed,
        "model": {"name": name, "weights": None if weights is None else str(weights),
                  "mean": mean, "std": std, "options": dict(options or {})},
        "train": {"epochs": 0},
    }  # fmt: skip
    cfg = build(CellConfig, raw, "model")
    model, _ = build_model(cfg, data)
    return model.eval()
