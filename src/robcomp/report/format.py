"""Numbers as text, for every table of the report (terminal, HTML) and its figures.

One rule for what is missing: ``None`` and NaN (a metric that could not be measured, e.g. the
mean norm of an attack that broke nothing) both show as ``-``; infinities show as themselves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

MISSING = "-"
Z_95 = 1.959963984540054  # the standard normal's 97.5 % quantile: a two-sided 95 % interval


def missing(value: Any) -> bool:
    """Whether ``value`` is absent: ``None`` or a float NaN."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def pct(value: Any) -> str:
    """A fraction as a percentage with one decimal (``0.781`` -> ``78.1``)."""
    return MISSING if missing(value) else f"{100 * value:.1f}"


def ms(value: Any) -> str:
    """A measurement (milliseconds, threads, load, a norm) to three significant digits."""
    return MISSING if missing(value) else f"{value:.3g}"


def human_count(value: Any) -> str:
    """``1.44k``, ``22.33M``: a count for people."""
    if missing(value):
        return MISSING
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.2f}{unit}"
    return str(int(value))


def human_bytes(value: Any) -> str:
    """``6.4 kB``, ``1.2 MB``: a size on disk."""
    if missing(value):
        return MISSING
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{int(value)} B"


def wilson_interval(accuracy: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``accuracy`` measured on ``n`` points
    (Wilson 1927): unlike the normal approximation it stays inside [0, 1] and is not empty at
    0 % or 100 %, which robust accuracies often are.

    Raises:
        ValueError: ``n`` is not positive or ``accuracy`` is outside [0, 1].
    """
    if n <= 0 or not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"no interval for accuracy {accuracy!r} on n={n!r} points")
    z2 = z * z
    centre = (accuracy + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(accuracy * (1 - accuracy) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def interval(value: Any, n: Any, digits: int = 1) -> str:
    """The 95 % interval of an accuracy on ``n`` points in % with ``digits`` decimals,
    ``71.7-83.3``; empty when the value or ``n`` is missing (stores older than the recorded
    ``n``)."""
    if missing(value) or missing(n) or int(n) <= 0:
        return ""
    low, high = wilson_interval(float(value), int(n))
    return f"{100 * low:.{digits}f}-{100 * high:.{digits}f}"


def pct_interval(
    value: Any, n: Any, *, with_n: bool = True, digits: int = 1, sep: str = " "
) -> str:
    """An accuracy in % with its 95 % interval (bounds with ``digits`` decimals) and, with
    ``with_n``, its points, joined by ``sep``: ``78.0 (71.7-83.3) n=200``; the bare percentage
    when ``n`` is unknown."""
    band = interval(value, n, digits)
    if not band:
        return pct(value)
    return sep.join([pct(value), f"({band})", *([f"n={int(n)}"] if with_n else [])])


def ordered_keys(rows: Iterable[dict[Any, Any]], keep: Callable[[Any], bool]) -> list[Any]:
    """The keys of ``rows`` that ``keep`` accepts, in the order they first appear."""
    seen: dict[Any, None] = {}
    for row in rows:
        seen.update({k: None for k in row if keep(k)})
    return list(seen)
