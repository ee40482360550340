"""The compressed-model cache: compress and fine-tune once per configuration, evaluate many times.

Cells that differ only in their evaluation (an attack added to a finished grid) share the
compressed, fine-tuned model, kept under ``OUT/cache/compressed-<key>/`` with the key a hash of
(baseline key, compress, finetune). An entry is its weights (safetensors), the compressor's
record and fine-tuning history (JSON), the structure it needs and the logits of a few probe
points; a ``complete`` marker is written last, so an interrupted write is never read.

Nothing is unpickled. The model is rebuilt from a *skeleton*: the compressor's own
``skeleton(baseline, data)`` when it has one (a distilled student's architecture), else a copy
of the baseline whose Conv, Linear and BatchNorm layers are resized to the saved shapes (what
filter pruning does). The weights are then loaded strictly and the probe logits must come out
bit for bit the same, both before an entry is written and when it is read; a model that cannot
be rebuilt that way (an int8 graph, low-bit quantizer wrappers) is not cached, and the log
says why.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd

from robcomp.compress import Record
from robcomp.config import config_hash, to_dict
from robcomp.data.base import DataSplits
from robcomp.experiments.spec import CellConfig

log = logging.getLogger(__name__)

WEIGHTS, PROBE, INFO, COMPLETE = "model.safetensors", "probe.safetensors", "info.json", "complete"
PROBE_POINTS = 16

# (model, record, fine-tuning history or the reason it was skipped)
Compressed = tuple[nn.Module, Record, Any]


class NotRebuildable(Exception):
    """The compressed model's structure cannot be rebuilt without unpickling it."""


def compressed_key(cfg: CellConfig) -> str:
    """Hash of what produces a cell's compressed, fine-tuned model (with the cell's VAE, which
    an on-manifold training objective draws its examples from)."""
    full = cfg.canonical()
    parts = {
        "baseline": cfg.baseline_key(),
        "compress": full["compress"],
        "finetune": full["finetune"],
    }
    if "vae" in full:
        parts["vae"] = full["vae"]
    return config_hash(parts)


def compressed_model(
    cfg: CellConfig,
    compressor: Any,
    baseline: nn.Module,
    data: DataSplits,
    cache: Path,
    produce: Callable[[], Compressed],
) -> Compressed:
    """The cell's compressed and fine-tuned model, from ``cache`` when an earlier cell with the
    same baseline, compressor and fine-tuning made it; else ``produce()``, then cached."""
    folder = cache / f"compressed-{compressed_key(cfg)}"
    probe = data.test.head(PROBE_POINTS).tensors()[0]
    if (folder / COMPLETE).is_file():
        try:
            hit = _load(folder, compressor, baseline, data, probe)
            log.info("compressed model %s from cache", folder.name)
            return hit
        except Exception as err:  # a damaged or foreign entry: compress again, never guess
            log.warning("cache %s unusable (%r); compressing again", folder.name, err)
            shutil.rmtree(folder, ignore_errors=True)
    model, record, finetune = produce()
    try:
        _save(folder, model, record, finetune, _skeleton(compressor, baseline, data), probe)
    except NotRebuildable as err:
        log.info("%s: compressed model not cached: %s", compressor.label(), err)
    except Exception as err:  # the cache only saves time: a failure to fill it fails no cell
        log.warning("%s: compressed model not cached: %r", compressor.label(), err)
    return model, record, finetune


# ----------------------------------------------------------------------------- rebuild


def _structure(model: nn.Module) -> list[list[str]]:
    """Every module's name and class: what a state dict alone does not pin down."""
    return [[name, type(m).__qualname__] for name, m in model.named_modules()]


def _skeleton(
    compressor: Any, baseline: nn.Module, data: DataSplits
) -> Callable[[Mapping[str, Tensor]], nn.Module]:
    """A function from a state dict to an untrained model of its structure."""
    own = getattr(compressor, "skeleton", None)
    if own is not None:
        return lambda _state: own(baseline, data)
    return lambda state: _resized(copy.deepcopy(baseline), state)


def _resized(model: nn.Module, state: Mapping[str, Tensor]) -> nn.Module:
    """``model`` with its Conv, Linear and BatchNorm layers resized to the shapes in ``state``
    (channels removed by filter pruning); other layers must already fit."""
    for prefix, module in model.named_modules():
        tensors = {**dict(module.named_parameters(recurse=False)),
                   **dict(module.named_buffers(recurse=False))}  # fmt: skip
        changed = {
            name: state[key].shape
            for name, t in tensors.items()
            if (key := f"{prefix}.{name}" if prefix else name) in state
            and t is not None
            and state[key].shape != t.shape
        }
        if changed:
            _resize(module, changed, prefix)
    return model


def _resize(module: nn.Module, shapes: Mapping[str, torch.Size], where: str) -> None:
    for name, shape in shapes.items():
        old = getattr(module, name)
        new = torch.zeros(shape, dtype=old.dtype, device=old.device)
        if isinstance(old, nn.Parameter):
            setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            setattr(module, name, new)  # a registered buffer stays one
    weight = getattr(module, "weight", None)
    if isinstance(module, _ConvNd) and weight is not None:
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        if module.groups > 1 and not depthwise:
            raise NotRebuildable(f"{where}: a grouped convolution changed shape")
        module.out_channels = int(weight.shape[0])
        module.in_channels = int(weight.shape[0] if depthwise else weight.shape[1])
        module.groups = module.in_channels if depthwise else 1
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = (int(s) for s in module.weight.shape)
    elif isinstance(module, _NormBase):
        module.num_features = int(next(iter(shapes.values()))[0])
    else:
        raise NotRebuildable(f"{where} ({type(module).__name__}) changed shape")


def _rebuild(
    skeleton: Callable[[Mapping[str, Tensor]], nn.Module],
    state: Mapping[str, Tensor],
    structure: list[list[str]],
) -> nn.Module:
    model = skeleton(state)
    if _structure(model) != structure:
        extra = {kind for _, kind in structure} - {kind for _, kind in _structure(model)}
        kinds = sorted(kind for kind in extra if "<" not in kind)  # not generated classes
        raise NotRebuildable(
            "its structure differs from what can be rebuilt"
            + (f" (it holds {', '.join(kinds)})" if kinds else "")
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise NotRebuildable(f"its weights do not fit the rebuilt structure: {err}") from None
    return model.eval()


@torch.no_grad()
def _logits(model: nn.Module, x: Tensor) -> Tensor:
    was_training = model.training
    model.eval()
    device = next(itertools.chain(model.parameters(), model.buffers()), x).device
    try:
        return model(x.to(device)).detach().cpu().clone()
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------- disk


def _save(
    folder: Path,
    model: nn.Module,
    record: Record,
    finetune: Any,
    skeleton: Callable[[Mapping[str, Tensor]], nn.Module],
    probe: Tensor,
) -> None:
    """Write an entry, after checking that it reloads into the same outputs."""
    try:
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    except (AttributeError, RuntimeError) as err:
        raise NotRebuildable(f"no plain state dict ({err})") from None
    if not all(isinstance(v, Tensor) for v in state.values()):
        raise NotRebuildable("its state holds objects other than tensors")
    structure = _structure(model)
    rebuilt = _rebuild(skeleton, state, structure)  # first: cheap, and fails fast for int8
    logits = _logits(model, probe)
    if not torch.equal(_logits(rebuilt, probe), logits):
        raise NotRebuildable("the rebuilt model's outputs differ from the compressed model's")
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Written aside and renamed into place, so parallel cells never see half an entry.
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        save_file(state, str(tmp / WEIGHTS))
        save_file({"logits": logits}, str(tmp / PROBE))
        info = {"structure": structure, "record": to_dict(record), "finetune": finetune}
        (tmp / INFO).write_text(json.dumps(info, default=str))
        (tmp / COMPLETE).write_text("")  # last: its presence marks a complete entry
        os.rename(tmp, folder)
    except OSError:
        if not (folder / COMPLETE).is_file():  # another cell finishing first is fine
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load(
    folder: Path, compressor: Any, baseline: nn.Module, data: DataSplits, probe: Tensor
) -> Compressed:
    info = json.loads((folder / INFO).read_text())
    state = load_file(str(folder / WEIGHTS))
    model = _rebuild(_skeleton(compressor, baseline, data), state, info["structure"])
    if not torch.equal(_logits(model, probe), load_file(str(folder / PROBE))["logits"]):
        raise NotRebuildable("the reloaded model's outputs differ from the cached ones")
    return model, Record(**info["record"]), info["finetune"]


def own_callables(cfg: CellConfig) -> frozenset[str]:
    """The ``module:callable`` names the cell's own model configuration writes: the user's code,
    so a baseline robcomp built from them may be rebuilt from its cached spec with them."""
    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, Mapping):
            name = node.get("name")
            if isinstance(name, str) and ":" in name:
                names.add(name)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(to_dict(cfg.model))
    return frozenset(names)
