"""Checkpoints: safetensors weights plus a JSON spec of the architecture.

Loading someone else's file is a security boundary: we read safetensors, or a PyTorch file with
``torch.load(..., weights_only=True)``, which refuses to unpickle arbitrary objects, and a
spec may name registered models only. A ``module:callable`` in a spec would be imported, which
runs its code; that needs the user's explicit trust (``--trust-code``, ``trust_code: true``,
:func:`checkpoint_trust`), or a caller that knows where the name came from (the runner's own
baseline cache, whose names come from the user's experiment file).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from robcomp.models.base import Classifier, UntrustedCodeError, code_paths, code_trust, create

WEIGHTS = "model.safetensors"
SPEC = "spec.json"
_STATE_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")

Trust = bool | Collection[str]
# What checkpoints loaded without an explicit ``trust_code`` may import: nothing by default.
_CHECKPOINT_TRUST: ContextVar[Trust] = ContextVar("robcomp_checkpoint_trust", default=False)


@contextmanager
def checkpoint_trust(trust: Trust) -> Iterator[None]:
    """Within the block, checkpoints loaded without ``trust_code`` may import ``module:callable``
    models as ``trust`` allows: True (any, the user's ``--trust-code``), False or a set of names.
    """
    token = _CHECKPOINT_TRUST.set(trust)
    try:
        yield
    finally:
        _CHECKPOINT_TRUST.reset(token)


def save_tensors(
    path: str | Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``tensors`` to the safetensors file ``path`` atomically: written aside in the same
    folder and renamed into place, so a concurrent reader or a killed run never sees half a
    file. Tensors are saved as contiguous CPU copies (safetensors refuses strided views and
    tensors that share memory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata=dict(metadata) if metadata is not None else None)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(model: nn.Module, folder: str | Path, spec: Mapping[str, Any]) -> Path:
    """Write ``model.safetensors`` and ``spec.json`` into ``folder`` atomically.

    ``spec`` holds what :func:`load_checkpoint` needs to rebuild the architecture: ``name``,
    ``num_classes``, ``in_shape``, ``mean``, ``std``, any model ``options`` and, for a
    ``module:callable`` model, the ``code_path`` folder its code is imported from.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        save_file(state, os.path.join(tmp, WEIGHTS))
        Path(tmp, SPEC).write_text(json.dumps(dict(spec), indent=2, sort_keys=True))
        os.replace(os.path.join(tmp, WEIGHTS), folder / WEIGHTS)
        os.replace(os.path.join(tmp, SPEC), folder / SPEC)
    return folder


def load_checkpoint(
    folder: str | Path, *, trust_code: Trust | None = None
) -> tuple[Classifier, dict[str, Any]]:
    """Rebuild a model saved by :func:`save_checkpoint`; returns (model in eval mode, spec).

    Args:
        folder: the checkpoint folder.
        trust_code: which ``module:callable`` names its spec may import: True (any), False
            (registered models only) or a set of names; None (default) takes the enclosing
            :func:`checkpoint_trust`, which is False unless the user opted in.

    Raises:
        UntrustedCodeError: the spec names a callable that ``trust_code`` does not allow;
            nothing of it was imported.
    """
    folder = Path(folder)
    spec_path, weights_path = folder / SPEC, folder / WEIGHTS
    if not spec_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(
            f"{folder}: not a robcomp checkpoint (expected {SPEC} and {WEIGHTS}); "
            "train one with `robcomp train`"
        )
    spec = _read_spec(spec_path)
    trust = _CHECKPOINT_TRUST.get() if trust_code is None else trust_code
    try:
        # Nested checkpoints (an ensemble's members) are built inside this block, so they can
        # never be trusted more than this one. A trusted callable is imported from the folder
        # its code came from (``code_path``, written by the runner) as well as sys.path.
        with code_trust(trust), code_paths(spec.get("code_path")):
            model = create(
                spec["name"],
                spec["num_classes"],
                spec["in_shape"],
                mean=spec.get("mean"),
                std=spec.get("std"),
                **spec.get("options", {}),
            )
    except UntrustedCodeError as err:
        raise UntrustedCodeError(f"{spec_path}: {err}") from None
    try:
        model.load_state_dict(load_file(str(weights_path)))
    except (SafetensorError, RuntimeError) as err:  # truncated, garbage, or another model's
        reason = str(err).strip().splitlines()[0]
        raise CheckpointError(f"{weights_path}: cannot load the weights ({reason})") from None
    return model.eval(), spec


class CheckpointError(ValueError):
    """A checkpoint file is corrupt or does not match its spec; the message names the file."""


def _read_spec(path: Path) -> dict[str, Any]:
    try:
        spec = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    keys = ("name", "num_classes", "in_shape")
    if not isinstance(spec, dict) or any(k not in spec for k in keys):
        raise CheckpointError(f"{path}: a checkpoint spec must be a JSON object with {keys}")
    return spec


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read weights from safetensors or a PyTorch file, never unpickling arbitrary objects.

    Accepts a bare state dict or one nested under a common key (``state_dict``, ``model``, ...),
    and strips the ``module.`` prefix that ``DataParallel`` adds.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        state: Any = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle errors carry no common base class
            raise ValueError(
                f"{path}: cannot be read safely with torch.load(weights_only=True) ({err}). "
                "Convert it to safetensors with code you trust."
            ) from None
    for key in _STATE_KEYS:
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
    tensors = {str(k): v for k, v in state.items() if isinstance(v, Tensor)}
    return {k.removeprefix("module."): v for k, v in tensors.items()}


def load_weights(model: Classifier, path: str | Path) -> Classifier:
    """Load a foreign weights file into ``model`` (in place, returns it).

    Keys may address the whole model (``normalize.*``, ``net.*``) or the bare network, as in
    most published checkpoints. Missing or unexpected keys are an error that lists them.
    """
    state = read_state_dict(path)
    target: nn.Module = model if any(k.startswith("net.") for k in state) else model.net
    result = target.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("normalize.")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path}: weights do not fit the model. Missing: {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}; unexpected: {result.unexpected_keys[:8]}"
        )
    return model
