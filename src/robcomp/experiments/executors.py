"""Executors run cells. A cell is a pure function of its config, so the executor only decides
where it runs; results come back to the driver, which alone writes the store."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

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


def baseline_waves(cells: Sequence[Cell]) -> tuple[list[Cell], list[Cell]]:
    """Split cells so the first wave holds one cell per distinct baseline.

    Running that wave first means each shared baseline is trained exactly once and every later
    cell finds it in the cache, instead of parallel workers training it side by side.
    """
    first: dict[str, Cell] = {}
    rest: list[Cell] = []
    for cell in cells:
        key = cell.config.baseline_key()
        if key in first:
            rest.append(cell)
        else:
            first[key] = cell
    return list(first.values()), rest


class RayExecutor:
    """Runs cells as Ray tasks, on this machine or a cluster (``pip install robcomp[ray]``).

    On a cluster, ``workdir`` must be on a filesystem every node sees (the baseline cache and the
    per-cell folders live there). Results stream back to the driver as tasks finish.

    Args:
        address: a Ray cluster address (``auto`` to join a running one); None starts a local one.
        num_cpus: CPUs reserved per cell; it is also the cell's torch thread count.
        init_kwargs: extra arguments for ``ray.init`` (e.g. ``num_cpus`` of a local cluster).
    """

    def __init__(
        self, address: str | None = None, num_cpus: float = 1.0, **init_kwargs: Any
    ) -> None:
        self.address = address
        self.num_cpus = num_cpus
        self.init_kwargs = init_kwargs

    def map(self, fn: CellFn, cells: Sequence[Cell], workdir: Path) -> Iterator[CellResult]:
        try:
            import ray
        except ImportError:
            raise ImportError("the ray executor needs Ray: pip install 'robcomp[ray]'") from None
        if not ray.is_initialized():
            options = {"log_to_driver": False, "include_dashboard": False, **self.init_kwargs}
            ray.init(address=self.address, **options)
        threads = max(1, int(self.num_cpus))
        task = ray.remote(num_cpus=self.num_cpus)(_with_threads)
        for wave in baseline_waves(cells):
            pending = [task.remote(fn, cell, workdir.resolve(), threads) for cell in wave]
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                yield ray.get(done[0])


def _with_threads(fn: CellFn, cell: Cell, workdir: Path, threads: int) -> CellResult:
    import torch

    torch.set_num_threads(threads)  # as many as the task reserved, so tasks do not contend
    return fn(cell, workdir)


EXECUTORS = ("local", "ray")


def make_executor(name: str, **options: Any) -> Executor:
    """An executor by name (``local`` or ``ray``)."""
    if name == "local":
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(**options)
    raise ValueError(f"unknown executor {name!r}; choose from {', '.join(EXECUTORS)}")
