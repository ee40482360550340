"""Executors run cells. A cell is a pure function of its config, so the executor only decides
where it runs; results come back to the driver, which alone writes the store.

Artifacts (trained baselines, compressed models, shifted test sets) live in one folder that
every process running cells must see: ``OUT/cache`` by default, or ``artifacts`` (a shared
filesystem path: NFS, a Kubernetes volume, an s3fs or gcsfuse mount) on a cluster. A cell's own
folder (``OUT/cells/<id>``: its config, history and per-point verdicts) is written by the cell
where it runs and shipped back to the driver with its result, so ``OUT`` itself need not be
shared.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from robcomp.config import ConfigError, to_dict
from robcomp.experiments.runner import CellResult
from robcomp.experiments.spec import Cell

log = logging.getLogger(__name__)

CellFn = Callable[[Cell, Path], CellResult]
CellFiles = dict[str, bytes]  # a cell folder's files by relative path
CACHE = "cache"  # the runner's artifacts folder inside its workdir
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class Executor(Protocol):
    """Runs ``fn(cell, workdir)`` for each cell and yields results as they finish (any order).

    Attributes:
        one_at_a_time: it runs the cells one after another, in the caller's process, as
            ``map`` is iterated; the driver then claims each cell just before it runs, so
            concurrent runs interleave. An executor running cells in parallel has them all
            claimed before ``map``.
        on_this_machine: its cells run on this machine, so the devices they ask for must be
            this machine's (a cluster's nodes have devices this machine cannot see).
    """

    @property
    def one_at_a_time(self) -> bool: ...

    @property
    def on_this_machine(self) -> bool: ...

    def map(self, fn: CellFn, cells: Sequence[Cell], workdir: Path) -> Iterator[CellResult]: ...


def artifacts_path(value: str | Path | None) -> Path | None:
    """The ``--artifacts`` folder as a local path (None: ``OUT/cache``).

    Raises:
        ConfigError: ``value`` is a URL other than ``file://``. The caches are safetensors and
            JSON files written aside and renamed into place, which object stores cannot do
            atomically, so a bucket is used through a mount (s3fs, gcsfuse) instead.
    """
    if value is None:
        return None
    text = str(value)
    if text.startswith("file://"):
        return Path(text.removeprefix("file://")).expanduser().resolve()
    if _URL.match(text):
        scheme = text.split("://", 1)[0]
        raise ConfigError(
            f"--artifacts {text!r}: {scheme}:// URLs are not supported; the caches are local "
            "files renamed into place. Pass a path every node sees: a shared filesystem (NFS, "
            "a Kubernetes PVC) or a bucket mounted with s3fs or gcsfuse"
        )
    return Path(text).expanduser().resolve()


class LocalExecutor:
    """Runs cells one after another in this process.

    Args:
        artifacts: the artifacts folder (None: ``workdir/cache``).
    """

    one_at_a_time = True
    on_this_machine = True

    def __init__(self, artifacts: str | Path | None = None) -> None:
        self.artifacts = artifacts_path(artifacts)

    def map(self, fn: CellFn, cells: Sequence[Cell], workdir: Path) -> Iterator[CellResult]:
        default = (workdir / CACHE).resolve()
        for cell in cells:
            if self.artifacts is None or self.artifacts == default:
                yield fn(cell, workdir)
            else:
                result, files = run_staged(fn, cell, self.artifacts)
                write_cell_files(workdir, cell.cell_id, files)
                yield result


def run_staged(fn: CellFn, cell: Cell, artifacts: Path) -> tuple[CellResult, CellFiles]:
    """Run ``fn`` in a scratch workdir whose ``cache`` is ``artifacts``; return its result and
    the files of its cell folder (the scratch folder is removed)."""
    artifacts.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="robcomp-cell-") as tmp:
        stage = Path(tmp)
        # The runner keeps its artifacts in workdir/cache; a link puts them on the shared path.
        (stage / CACHE).symlink_to(artifacts, target_is_directory=True)
        result = fn(cell, stage)
        folder = stage / "cells" / cell.cell_id
        files = {
            p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }
    return result, files


def write_cell_files(workdir: Path, cell_id: str, files: CellFiles) -> None:
    """Write a cell folder's files under ``workdir/cells/<cell_id>`` (replacing that folder, so
    a rerun of a failed cell leaves nothing of the earlier attempt)."""
    folder = workdir / "cells" / cell_id
    if folder.exists():
        shutil.rmtree(folder)
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


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

    Each cell reserves its experiment file's ``resources`` (``num_cpus``, ``num_gpus``,
    ``memory``) and uses ``num_cpus`` torch threads unless it sets ``threads``. A cell whose
    worker process dies (killed, out of memory, node lost) is run again up to
    ``resources.max_retries`` times, then recorded as failed; the other cells go on. Results are
    yielded as tasks finish, so the driver stores each at once. The first cell of each baseline
    runs before the others that share it (which then find the baseline in the cache), while
    cells of other baselines run beside it.

    Args:
        address: a Ray cluster address (``auto`` joins a running one, ``ray://host:10001``
            connects through Ray Client); None starts a local Ray.
        artifacts: the artifacts folder every node sees (None: ``workdir/cache``, enough on one
            machine).
        num_cpus: CPUs per cell, overriding the file's ``resources.num_cpus``.
        init_kwargs: extra arguments for ``ray.init`` (e.g. ``num_cpus`` of a local Ray).
    """

    one_at_a_time = False
    on_this_machine = False  # a cluster's nodes, even when Ray runs here

    def __init__(
        self,
        address: str | None = None,
        num_cpus: float | None = None,
        artifacts: str | Path | None = None,
        **init_kwargs: Any,
    ) -> None:
        self.address = address
        self.num_cpus = num_cpus
        self.artifacts = artifacts_path(artifacts)
        self.init_kwargs = init_kwargs

    def map(self, fn: CellFn, cells: Sequence[Cell], workdir: Path) -> Iterator[CellResult]:
        ray = _import_ray()
        if not ray.is_initialized():
            options = {"log_to_driver": False, "include_dashboard": False, **self.init_kwargs}
            ray.init(address=self.address, **options)
        artifacts = self.artifacts or (workdir / CACHE).resolve()
        task = ray.remote(_remote_cell)
        followers: dict[str, list[Cell]] = {}
        pending: dict[Any, Cell] = {}

        def submit(cell: Cell) -> None:
            cell = self._with_threads(cell)
            res = cell.config.resources
            ref = task.options(
                num_cpus=res.num_cpus if self.num_cpus is None else self.num_cpus,
                num_gpus=res.num_gpus,
                memory=res.memory_bytes(),
                max_retries=res.max_retries,
                retry_exceptions=False,  # a cell's own errors are results, not crashes
            ).remote(fn, cell, artifacts)
            pending[ref] = cell

        for cell in cells:
            key = cell.config.baseline_key()
            if key in followers:
                followers[key].append(cell)
            else:
                followers[key] = []
                submit(cell)
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(ref)
            result = _collect(ray, ref, cell, workdir)
            for follower in followers.pop(cell.config.baseline_key(), []):
                submit(follower)
            yield result

    def _with_threads(self, cell: Cell) -> Cell:
        """The cell with as many torch threads as it reserves CPUs (``threads`` is operational:
        its id does not change), so parallel cells do not contend for cores."""
        if cell.config.threads is not None:
            return cell
        cpus = cell.config.resources.num_cpus if self.num_cpus is None else self.num_cpus
        return replace(cell, config=replace(cell.config, threads=max(1, int(cpus))))


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ImportError("the ray executor needs Ray: pip install 'robcomp[ray]'") from None
    return ray


def _remote_cell(fn: CellFn, cell: Cell, artifacts: Path) -> tuple[CellResult, CellFiles]:
    return run_staged(fn, cell, artifacts)


def _collect(ray: Any, ref: Any, cell: Cell, workdir: Path) -> CellResult:
    """A finished task's result, its cell folder written under ``workdir``; a task Ray gave up
    on (its worker died more than ``max_retries`` times) as a failed cell."""
    try:
        result, files = ray.get(ref)
    except ray.exceptions.RayError as err:
        log.error("cell %s lost: %s", cell.cell_id, err)
        return CellResult(
            cell_id=cell.cell_id,
            experiment=cell.config.name,
            config=to_dict(cell.config),
            grid_values=cell.grid_values,
            error=f"{type(err).__name__}: {err}",
        )
    write_cell_files(workdir, cell.cell_id, files)
    return result


EXECUTORS = ("local", "ray")


def make_executor(name: str, **options: Any) -> Executor:
    """An executor by name: ``local`` (options: ``artifacts``) or ``ray`` (options: those of
    :class:`RayExecutor`)."""
    if name == "local":
        return LocalExecutor(**options)
    if name == "ray":
        return RayExecutor(**options)
    raise ValueError(f"unknown executor {name!r}; choose from {', '.join(EXECUTORS)}")
