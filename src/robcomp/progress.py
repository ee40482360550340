"""Progress bars for long loops: rich bars when a front end turns them on, silent otherwise.

The library never prints; the CLI opens a :func:`display` and every long loop reports into it
through :func:`track`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_current: Progress | None = None


@contextmanager
def display(console: Console | None = None) -> Iterator[Progress]:
    """Show progress bars for every :func:`track` inside this block."""
    global _current
    bars = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        transient=False,
    )
    previous, _current = _current, bars
    try:
        with bars:
            yield bars
    finally:
        _current = previous


@contextmanager
def track(description: str, total: int, transient: bool = True) -> Iterator[Callable[..., None]]:
    """A progress task; yields ``advance(n=1, status="")``. A no-op without a display."""
    bars = _current
    if bars is None:
        yield lambda n=1, status="": None
        return
    task = bars.add_task(description, total=total, status="")

    def advance(n: int = 1, status: str = "") -> None:
        bars.update(task, advance=n, status=status)

    try:
        yield advance
    finally:
        if transient:
            bars.remove_task(task)
