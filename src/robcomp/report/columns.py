"""Typed leaderboard columns: what a column measures as fields, its header as a rendering.

A leaderboard row is a flat dict for people and spreadsheets (``leaderboard.csv``/``.json``):
``clean_accuracy``, ``pgd10-linf@0.05``, ``acc:usps``. Those headers are built here, by
:meth:`Column.label`, and never read back: each row also carries its typed columns under
:data:`COLUMNS` (attack label, norm, eps, shift, severity and the points ``n`` the value was
measured on), which the tables, the HTML report and the figures select columns by.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

COLUMNS = "columns"  # the row key of its typed columns (a list of :meth:`Column.record`)


class Kind(enum.Enum):
    """What a leaderboard column holds."""

    METRIC = "metric"  # an attack-free metric of the test split, by name (clean_accuracy)
    ROBUST = "robust"  # robust accuracy under one attack at one eps
    WORST = "worst"  # per-point worst case over the attacks of one threat model (norm, eps)
    MIN_NORM = "min_norm"  # mean perturbation norm of an unbounded (eps = inf) attack
    SHIFT_ACCURACY = "shift_accuracy"  # clean accuracy on an ungraded shifted split
    SHIFT_SUMMARY = "shift_summary"  # a shift's summary (mce), qualified by shift if needed


@dataclass(frozen=True)
class Column:
    """One leaderboard column.

    Attributes:
        kind: what it holds.
        name: the metric's name (``METRIC``, ``SHIFT_SUMMARY``).
        attack: the attack label (``pgd10-linf``, ``worst-linf`` for a worst case).
        norm: the attack's norm; ``""`` where the store did not record it (schema < 5).
        eps: the attack's budget (``inf`` for an unbounded minimal-norm attack).
        shift: the shifted split (``SHIFT_ACCURACY``), or the shift label qualifying a
            summary that two shifts share (``SHIFT_SUMMARY``); ``""`` otherwise.
        severity: the shifted split's severity (0 when ungraded).
    """

    kind: Kind
    name: str = ""
    attack: str = ""
    norm: str = ""
    eps: float = 0.0
    shift: str = ""
    severity: int = 0

    def label(self) -> str:
        """The header users see in ``leaderboard.csv``/``.json``: ``pgd10-linf@0.05``,
        ``min_norm:ddn50-l2``, ``acc:usps``, ``mce`` or ``mce:<shift>``."""
        if self.kind in (Kind.ROBUST, Kind.WORST):
            return f"{self.attack}@{self.eps:.4g}"
        if self.kind is Kind.MIN_NORM:
            return f"min_norm:{self.attack}"
        if self.kind is Kind.SHIFT_ACCURACY:
            return f"acc:{self.shift}"
        if self.kind is Kind.SHIFT_SUMMARY and self.shift:
            return f"{self.name}:{self.shift}"
        return self.name

    @property
    def bounded(self) -> bool:
        """False for an unbounded (eps = inf) attack, whose accuracy is ~0 by construction."""
        return not math.isinf(self.eps)

    def threat(self) -> str:
        """The threat model in words: ``worst case linf eps=0.05``, ``pgd10-linf eps=0.1``."""
        if self.kind is Kind.WORST:
            return f"worst case {self.norm or self.attack} eps={self.eps:.4g}"
        return f"{self.attack} eps={self.eps:.4g}"

    def headers(self) -> list[str]:
        """The header's lines in a narrow table: attack, norm, eps (``pgd10``, ``linf``,
        ``0.05``); the attack label whole when its norm is not recorded or not its suffix."""
        attack, suffix = self.attack, f"-{self.norm}"
        lines = (
            [attack[: -len(suffix)], self.norm]
            if self.norm and attack.endswith(suffix)
            else [attack]
        )
        return [*lines, f"{self.eps:.4g}"]

    def record(self, n: int | None) -> dict[str, Any]:
        """The column as JSON fields (those not at their default), with the points its value
        was measured on and its ``label`` (the row's key it describes)."""
        unset = asdict(Column(self.kind))
        fields = {k: v for k, v in asdict(self).items() if v != unset[k]}
        return {**fields, "kind": self.kind.value, "n": n, "label": self.label()}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Column:
        return cls(
            kind=Kind(record["kind"]),
            name=str(record.get("name", "")),
            attack=str(record.get("attack", "")),
            norm=str(record.get("norm", "")),
            eps=float(record.get("eps", 0.0)),
            shift=str(record.get("shift", "")),
            severity=int(record.get("severity", 0)),
        )


def row_columns(row: dict[str, Any]) -> dict[Column, int | None]:
    """A row's typed columns and the points each was measured on (None: not recorded)."""
    return {Column.from_record(r): r.get("n") for r in row.get(COLUMNS) or []}


def columns_of(rows: Iterable[dict[str, Any]], *kinds: Kind) -> list[Column]:
    """The typed columns of ``kinds`` in ``rows``, in the order they first appear."""
    seen: dict[Column, None] = {}
    for row in rows:
        seen.update({c: None for c in row_columns(row) if c.kind in kinds})
    return list(seen)


def metric_column(name: str) -> Column:
    """The column of an attack-free test-split metric (``clean_accuracy``)."""
    return Column(Kind.METRIC, name=name)


def points(row: dict[str, Any], column: Column) -> int | None:
    """How many points ``row``'s value of ``column`` was measured on, when recorded."""
    n = row_columns(row).get(column)
    return None if n is None else int(n)


def value(row: dict[str, Any], column: Column) -> Any:
    """``row``'s value of ``column`` (None when the row has none)."""
    return row.get(column.label())
