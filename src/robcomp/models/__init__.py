"""Model zoo: every model takes inputs in [0, 1] and normalizes inside."""

from robcomp.models import ensemble, signals, zoo  # noqa: F401  (register the architectures)
from robcomp.models.base import (
    MODELS,
    Classifier,
    Normalize,
    UntrustedCodeError,
    code_trust,
    create,
    create_to_check,
    factory_for,
)
from robcomp.models.capabilities import (
    GradientFree,
    builds_from_files,
    input_statistics,
    model_device,
    normalizes_inputs,
    reads_files,
    resolve_device,
    self_normalizing,
    statistics_for,
)
from robcomp.models.checkpoint import (
    checkpoint_trust,
    load_checkpoint,
    load_weights,
    read_state_dict,
    save_checkpoint,
    save_tensors,
)

__all__ = [
    "MODELS",
    "Classifier",
    "GradientFree",
    "Normalize",
    "UntrustedCodeError",
    "builds_from_files",
    "checkpoint_trust",
    "code_trust",
    "create",
    "create_to_check",
    "factory_for",
    "input_statistics",
    "load_checkpoint",
    "load_weights",
    "model_device",
    "normalizes_inputs",
    "read_state_dict",
    "reads_files",
    "resolve_device",
    "save_checkpoint",
    "save_tensors",
    "self_normalizing",
    "statistics_for",
]
