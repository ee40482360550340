"""The ``distill`` compressor: train a smaller student to mimic the model compressed.

The student is trained by :func:`robcomp.train.fit` with any registered distillation objective
that takes a ``teacher``: ``kd`` by default (:mod:`robcomp.train.distill`), or the robust ones
of :mod:`robcomp.train.robust_distill` (``ard``, ``rslad``, ``iad-i``, ``iad-ii``). The
compressor receives its teacher as a live model, which carries no architecture spec that a
checkpoint could be rebuilt from; rather than round-trip it through disk, it registers a frozen
copy under an in-process handle (:func:`robcomp.train.distill.registered_teacher`) and passes
that handle as the objective's ``teacher``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robcomp.compress.base import COMPRESSORS, Record
from robcomp.compress.efficiency import count_params
from robcomp.compress.prune import record_for
from robcomp.config import build_component, nested_field
from robcomp.data.base import DataSplits
from robcomp.models import (
    MODELS,
    builds_from_files,
    create,
    create_to_check,
    factory_for,
    load_checkpoint,
    load_weights,
)
from robcomp.train.distill import MEMORY, registered_teacher
from robcomp.train.loop import TrainConfig, fit
from robcomp.train.objectives import OBJECTIVES

# Stands in for the teacher where the compressor only needs the objective's configuration.
_PLACEHOLDER = f"{MEMORY}placeholder"


def _default_train() -> TrainConfig:
    return TrainConfig()


@COMPRESSORS.register("distill")
@dataclass(frozen=True, kw_only=True)
class DistillTo:
    """Compress by distillation: train a smaller student to mimic the given model (the teacher)
    with the ``kd`` objective (Hinton et al. 2015; Shen et al. 2024, Sec. 3.1.2), or, for a
    robust teacher, with a robust distillation objective: ``ard`` (Goldblum et al. 2020),
    ``rslad`` (Zi et al. 2021), ``iad-i`` or ``iad-ii`` (Zhu et al. 2022).

    The student is built with :func:`robcomp.models.create` behind the teacher's Normalize
    statistics, optionally starts from pretrained weights, and is trained with ``train``
    (TrainConfig fields; the objective is set here, from ``objective``, ``objective_options``,
    ``tau`` and ``alpha``). The teacher is a frozen copy: the model passed in is never modified.

    Attributes:
        student: a registered model name (e.g. ``resnet20``, ``tiny_cnn``).
        student_options: architecture options of the student.
        train: how to train the student (TrainConfig fields, without ``objective``).
        objective: the registered distillation objective; its ``teacher`` is the model compressed.
        objective_options: its other fields (e.g. ``eps``, ``steps``; ``natural_teacher`` for
            ``iad-ii``).
        tau: temperature of the objective, ``None`` for its default (``kd`` 4, ``ard`` 30).
        alpha: weight of its soft-target term, ``None`` for its default (``kd`` 0.9, ``ard`` 1).
        pretrained_student: start from these weights: a robcomp checkpoint folder, or a weights
            file read with :func:`robcomp.models.load_weights` (as Shen et al. start from
            ImageNet-pretrained students).
        seed: seeds the student's initialisation and training.
    """

    student: str
    student_options: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=_default_train)
    objective: str = "kd"
    objective_options: dict[str, Any] = field(default_factory=dict)
    tau: float | None = None
    alpha: float | None = None
    pretrained_student: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        # A mapping written in Python rather than YAML merges over the default, as in YAML.
        object.__setattr__(self, "train", nested_field(self, "train", "distill.train"))
        if self.train.objective != {"name": "ce"}:
            raise ValueError(
                "distill.train.objective is set by the compressor (from objective, "
                "objective_options, tau and alpha); remove it"
            )
        clash = {"name", "teacher", "tau", "alpha"} & self.objective_options.keys()
        if clash:
            raise ValueError(
                f"distill.objective_options must not set {sorted(clash)}: the teacher is the "
                "model compressed, tau and alpha are fields of distill itself"
            )
        # Build once with a placeholder teacher, so a wrong option fails at configuration time.
        self._objective(_PLACEHOLDER)

    def _objective_spec(self, teacher: str) -> dict[str, Any]:
        spec = {"name": self.objective, **self.objective_options, "teacher": teacher}
        spec.update({k: v for k, v in (("tau", self.tau), ("alpha", self.alpha)) if v is not None})
        return spec

    def _objective(self, teacher: str) -> Any:
        return build_component(OBJECTIVES, self._objective_spec(teacher), "distill.objective")

    def label(self) -> str:
        return (
            f"distill-{self.student}"
            if self.objective == "kd"
            else f"{self.objective}-{self.student}"
        )

    def _student(self, teacher: nn.Module, data: DataSplits) -> nn.Module:
        norm = getattr(teacher, "normalize", None)
        mean = norm.mean.tolist() if norm is not None else list(data.mean)
        std = norm.std.tolist() if norm is not None else list(data.std)
        torch.manual_seed(self.seed)
        student = create(
            self.student, data.num_classes, data.in_shape, mean=mean, std=std,
            **self.student_options,
        )  # fmt: skip
        if self.pretrained_student is not None:
            source = Path(self.pretrained_student).expanduser()
            if source.is_dir():
                pretrained, _ = load_checkpoint(source)
                try:
                    student.load_state_dict(pretrained.state_dict())
                except RuntimeError as err:
                    raise ValueError(
                        f"pretrained_student {source} does not fit student {self.student!r}: {err}"
                    ) from None
            else:
                load_weights(student, source)
        return student

    @property
    def uses_training_data(self) -> bool:
        """The student trains on data.train, unless ``train.epochs`` is 0 (a pretrained
        student scored as it is)."""
        return self.train.epochs > 0

    def check(self, model: nn.Module, data: DataSplits) -> None:
        """Raise a ValueError if the student cannot take ``data``'s inputs (a registered
        student is built on the meta device: shapes only, no weights)."""
        if self.student not in MODELS or builds_from_files(factory_for(self.student)):
            return  # the user's code, or a model that reads files: checked when it is built
        try:
            create_to_check(self.student, data.num_classes, data.in_shape, **self.student_options)
        except (ValueError, TypeError, RuntimeError) as err:
            raise ValueError(f"distill: student {self.student!r}: {err}") from None

    def skeleton(self, model: nn.Module, data: DataSplits) -> nn.Module:
        """The untrained student this compressor would return for ``model``: the structure a
        cached result is loaded into (see :class:`robcomp.compress.Compressor`)."""
        return self._student(model, data)

    def __call__(self, model: nn.Module, data: DataSplits) -> tuple[nn.Module, Record]:
        start = time.perf_counter()
        student = self._student(model, data)
        with registered_teacher(model) as handle:
            cfg = dataclasses.replace(self.train, objective=self._objective_spec(handle))
            history = fit(student, data, cfg, seed=self.seed, description="distill")
        student.eval()
        last = history.epochs[-1] if history.epochs else {}
        built = self._objective(_PLACEHOLDER)  # its fields, defaults filled in, for the record
        return student, record_for(
            self.label(), student, data, time.perf_counter() - start,
            student=self.student, teacher_params=count_params(model), objective=self.objective,
            tau=getattr(built, "tau", None), alpha=getattr(built, "alpha", None),
            best_epoch=history.best_epoch, val_accuracy=last.get("val_accuracy"),
            history=history.as_dict(),
        )  # fmt: skip
