"""Distribution shifts (registry): each turns a cell's test data into shifted splits."""

from robcomp.data.shifts import (  # noqa: F401  (register the shifts)
    corruptions,
    domains,
)
from robcomp.data.shifts.base import (
    SHIFTS,
    Shift,
    ShiftContext,
    ShiftedSplit,
    ShiftFactory,
    shift_summary,
    uses_baseline,
)

__all__ = [
    "SHIFTS",
    "Shift",
    "ShiftContext",
    "ShiftFactory",
    "ShiftedSplit",
    "shift_summary",
    "uses_baseline",
]
