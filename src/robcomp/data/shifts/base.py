"""The Shift protocol: a registered component that turns a cell's test data into shifted splits.

A shift never touches the training data. Each shifted split is scored by the evaluator (clean
accuracy, and the suite's attacks when ``evaluate.attack_shifted`` is set) and stored per
``(shift, severity)``; the shift may also summarise its scores (mean corruption accuracy, mCE
against the dense baseline).

Example, an experiment file's evaluation suite:

```yaml
evaluate:
  shifts:
    - {name: corruptions, corruptions: [gaussian_noise, fog], severities: [1, 3, 5]}
    - {name: domains, targets: [usps, mnist-m]}
```
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from robcomp.data.base import DataSplits, Split
from robcomp.registry import Registry

SHIFTS: Registry[Any] = Registry("shift")


@dataclass(frozen=True)
class ShiftedSplit:
    """One shifted version of the test data.

    Attributes:
        shift: what this split is, as stored and shown (``gaussian_noise``, ``usps``, ``adv-on``).
        severity: 1-5 for graded shifts (corruptions), 0 for a shift without a grade (a domain).
        split: the shifted inputs (uint8 or float32 in [0, 1], the source's shape) and labels.
        family: a group for plots and summaries (``noise``, ``blur``, ``weather``, ``digital``,
            ``domain``, ``manifold``).
    """

    shift: str
    severity: int
    split: Split
    family: str = ""


@dataclass(frozen=True)
class ShiftContext:
    """What a shift may need besides the test data.

    Attributes:
        data_spec: the cell's ``data`` section (``{"name": ..., **options}``): a domain shift
            reads it to know its source (and, e.g., to leave out MNIST test images that an
            MNIST-M source was made from).
        seed: the cell's seed; random corruptions draw from a generator seeded by it.
        baseline: the cell's dense trained model, for shifts built against it (fixed
            on-manifold adversarial test sets); ``None`` when the caller has none.
        cache: a folder the shift may keep artifacts in (a generative model), or ``None``.
    """

    data_spec: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    baseline: nn.Module | None = None
    cache: Path | None = None


class Shift(Protocol):
    """``shift.shifted(data, context) -> [ShiftedSplit, ...]``: shifted versions of
    ``data.test`` (or of other data, for a domain shift), never of the training split.

    Shifts are frozen keyword-only dataclasses registered in :data:`SHIFTS`; the dataclass is
    the config, and its fields (with the cell's data and seed) are the cache key of the shifted
    arrays. A shift whose splits depend on the cell's trained baseline says so with
    ``uses_baseline = True`` (its cache key then includes the baseline). A shift defined on
    some inputs only (images) may define ``check(data) -> None``, raising ValueError for data it
    cannot shift; the experiment driver calls it before any cell runs.
    """

    def label(self) -> str: ...

    def shifted(self, data: DataSplits, context: ShiftContext) -> Sequence[ShiftedSplit]: ...


def uses_baseline(shift: Any) -> bool:
    """Whether ``shift`` builds its splits against the cell's baseline model."""
    return bool(getattr(shift, "uses_baseline", False))


def shift_summary(
    shift: Any,
    model: Mapping[tuple[str, int], float],
    baseline: Mapping[tuple[str, int], float],
    clean: tuple[float, float],
    sizes: Mapping[tuple[str, int], int] | None = None,
) -> dict[str, float]:
    """The shift's own summary of per-split accuracies (``{(shift, severity): accuracy}``) of
    the model and of the dense baseline, with both models' clean accuracies ``clean`` =
    (model, baseline); ``{}`` for a shift without one. A shift defines it as ``summary``; one
    that also counts points says ``summary_uses_sizes = True`` and is given ``sizes``, the
    number of points of each split."""
    method = getattr(shift, "summary", None)
    if method is None:
        return {}
    if getattr(shift, "summary_uses_sizes", False):
        return dict(method(model, baseline, clean, dict(sizes or {})))
    return dict(method(model, baseline, clean))
