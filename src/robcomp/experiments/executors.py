"""Executors run cells. A cell is a pure function of its config, so the executor only decides
where it runs; results come back to the driver, which alone writes the store."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

from robcomp.experiments.runner import CellResult
from robcomp.experiments.spec import Cell

CellFn = Callable[[Cell, Path], CellResult]


class Executor(Protocol):
    """Runs ``fn(cell, workdir)`` for each cell and yields results as they finish (any order)."""

    def map(self, fn: CellFn, cells: Sequence[Cell], workdir: Path) -> Iterator[CellResult]: ...


class LocalExecutor:
    """Runs cells one after another in this process."""

    def map(self, fn: CellFn, cells: Sequence[Cell], workdir: Path) -> Iterator[CellResult]:
        for cell in cells:
            yield fn(cell, workdir)
