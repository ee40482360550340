"""Reading an experiment file and checking its own sections, before torch is loaded.

An experiment file is checked in two passes. This module, which imports neither torch nor any
component, reads the file (YAML syntax, an empty file, ``--set`` overrides), expands its grid and
checks every cell's own sections: the top-level keys (with the closest match for a typo), the
types of ``name``, ``seed``, ``device``, ``threads``, ``trust_code``, and the whole ``model``,
``evaluate`` and ``resources`` sections (limits, batch sizes, ...). A mistake there is one line
before the CLI has imported torch, in a fraction of a second. :func:`robcomp.experiments.spec.
load_experiment` then builds every component (datasets, models, attacks, compressors, objectives,
shifts) and :func:`robcomp.experiments.driver.preflight` loads the data and checks what needs
it, still before any cell runs.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from robcomp.config import (
    OPERATIONAL,
    ConfigError,
    build,
    build_component,
    load_yaml,
    parse_override,
    set_dotted,
)

if TYPE_CHECKING:
    from robcomp.attacks import Attack


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Which network: a registered name or ``module:callable``, its options, optional weights.

    Attributes:
        name: a registered model, ``timm:<name>``, ``torchvision:<name>`` or
            ``module:callable``.
        weights: a safetensors or PyTorch weights file to start from (read safely); needs
            ``mean`` and ``std`` unless the model brings its own statistics.
        mean, std: the normalization statistics (default: the training data's; with
            ``weights``, those the weights were trained with).
        code_path: the folder a ``module:callable`` model is imported from, besides sys.path
            (default: the experiment file's folder; relative to it).
    """

    name: str = "tiny_cnn"
    options: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    code_path: str | None = field(default=None, metadata=OPERATIONAL)


@dataclass(frozen=True, kw_only=True)
class EvaluateSpec:
    """What to measure on the test split.

    Attributes:
        attacks: attack specs ``{"name": ..., "eps": ..., **fields}``; ``eps`` may be a list,
            which runs the attack once per value.
        preset: a named suite (``robcomp list presets``) run before ``attacks``.
        limit: attack at most this many test points (clean accuracy uses the whole split).
        batch_size: evaluation batch size.
        diagnostics: run the gradient-masking checklist and store its flags.
        diagnostics_points: how many test points the checklist uses.
        black_box_queries: query budget of the Square attack that joins BPDA and transfer for
            models without gradients (int8); 5000 is AutoAttack's full budget. Square attacks
            images only: on 1-D signals BPDA and transfer run without it.
        latency_batch_sizes: time one forward pass on batches of these sizes (1 = Marshall's
            Algorithm 4, N = Algorithm 5); empty to skip.
        latency_repeats: timed passes per batch size (the median is stored).
        shifts: distribution shifts ``{"name": ..., **fields}`` (``robcomp list shifts``):
            each turns the test split into shifted splits (corruptions at severities, other
            domains, on-manifold test sets), scored by clean accuracy and stored per shift and
            severity. Training data is never shifted.
        attack_shifted: also run the suite's attacks on each shifted split (``limit`` points).
        shift_limit: shift at most this many test points (null: all of them); a domain shift
            scores the whole target domain regardless.
    """

    attacks: tuple[dict[str, Any], ...] = ()
    preset: str | None = None
    limit: int | None = None
    batch_size: int = 256
    diagnostics: bool = True
    diagnostics_points: int = 200
    black_box_queries: int = 5000
    latency_batch_sizes: tuple[int, ...] = (1, 64)
    latency_repeats: int = field(default=20, metadata=OPERATIONAL)
    shifts: tuple[dict[str, Any], ...] = ()
    attack_shifted: bool = False
    shift_limit: int | None = None

    def __post_init__(self) -> None:
        if self.shift_limit is not None and self.shift_limit < 1:
            raise ValueError(f"shift_limit must be >= 1 or null (all), got {self.shift_limit}")
        # limit: 0 would fail every cell after training; a negative one would slice off the
        # last points instead of keeping the first ones.
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 (points to attack) or null, got {self.limit}")
        for name in ("batch_size", "diagnostics_points", "black_box_queries", "latency_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if any(b < 1 for b in self.latency_batch_sizes):
            sizes = list(self.latency_batch_sizes)
            raise ValueError(f"latency_batch_sizes must be >= 1, got {sizes}")

    def attack_specs(self) -> list[dict[str, Any]]:
        """The preset's attacks then the listed ones, one spec per eps value."""
        from robcomp.attacks.presets import preset_attacks

        specs = list(preset_attacks(self.preset)) if self.preset else []
        for spec in self.attacks:
            eps = spec.get("eps")
            values = eps if isinstance(eps, list | tuple) else [eps]
            specs += [{**spec, "eps": e} if e is not None else dict(spec) for e in values]
        return specs

    def build_attacks(self, where: str = "evaluate") -> list[Attack]:
        """The suite's attacks; two with one label and eps are an error, since the second's
        metrics would overwrite the first's in the store."""
        from robcomp.attacks import ATTACKS

        attacks: list[Attack] = []
        seen: dict[tuple[str, float], str] = {}
        for i, spec in enumerate(self.attack_specs()):
            name = f"{where}.attacks[{i}]"
            attack = build_component(ATTACKS, spec, name)
            key = (attack.label(), float(attack.eps))
            if key in seen:
                raise ConfigError(
                    f"{seen[key]} and {name} {spec} are both {key[0]} at eps={key[1]:.6g}; "
                    "their results would overwrite each other: change a setting or drop one"
                )
            seen[key] = f"{name} {spec}"
            attacks.append(attack)
        return attacks


_MEMORY_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


@dataclass(frozen=True, kw_only=True)
class Resources:
    """How a cell is scheduled on a cluster (the Ray executor); never part of its identity.

    Attributes:
        num_cpus: CPUs reserved per cell; also the cell's torch threads unless ``threads`` is set.
        num_gpus: GPUs reserved per cell (fractions share one GPU).
        memory: memory reserved per cell: bytes, or a string such as ``512M`` or ``4G``.
        max_retries: times a cell is run again when its worker process dies (killed, out of
            memory, node lost); an error raised by the cell itself is recorded, not retried.
    """

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory: int | str | None = None
    max_retries: int = 3

    def __post_init__(self) -> None:
        if self.num_cpus <= 0 or self.num_gpus < 0:
            raise ValueError(
                f"num_cpus must be > 0 and num_gpus >= 0, got {self.num_cpus}, {self.num_gpus}"
            )
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        self.memory_bytes()  # a bad memory value fails when the file loads

    def memory_bytes(self) -> int | None:
        """``memory`` in bytes (None: no reservation)."""
        if self.memory is None or isinstance(self.memory, int):
            return self.memory
        text = self.memory.strip().lower().removesuffix("ib").removesuffix("b")
        unit = text[-1:] if text[-1:] in _MEMORY_UNITS else ""
        try:
            return int(float(text[: len(text) - len(unit)]) * _MEMORY_UNITS[unit])
        except ValueError:
            raise ValueError(
                f"memory must be bytes or a size such as 512M or 4G, got {self.memory!r}"
            ) from None


# The top-level keys of a cell (robcomp.experiments.spec.CellConfig) with the types this pass
# checks; the components inside data, train, compress, finetune and vae need their registries,
# and so torch, and are checked by spec.resolve. A test keeps this in step with CellConfig.
CELL_SECTIONS: Mapping[str, Any] = {
    "name": str,
    "seed": int,
    "data": dict[str, Any],
    "model": ModelSpec,
    "train": dict[str, Any],
    "compress": dict[str, Any],
    "finetune": dict[str, Any] | None,
    "evaluate": EvaluateSpec,
    "trust_code": bool,
    "device": str,
    "threads": int | None,
    "resources": Resources,
    "vae": dict[str, Any],
}
_Sections = dataclasses.make_dataclass(
    "CellSections",
    [(key, hint, field(default=None)) for key, hint in CELL_SECTIONS.items()],
    frozen=True,
    kw_only=True,
)
# What torch.device can read: a type, optionally ":index" (torch itself checks the type later).
_DEVICE = re.compile(r"^[a-z_]+(:\d+)?$")
DEVICE_HELP = "device must be auto, cpu, cuda, cuda:N or another torch device"


def check_threads(threads: int | None) -> None:
    """``threads``: at least 1, or None for the automatic choice."""
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 or null (auto), got {threads}")


@dataclass(frozen=True)
class ExperimentFile:
    """An experiment file as read, overrides applied, before any component is built.

    Attributes:
        raw: the base configuration (without ``grid`` and ``store``).
        grid: dotted keys (or comma-joined keys, one axis) mapped to lists of values.
        store: the file's results store URL, or None.
        where: the file's path (or ``<experiment>`` for a mapping), for messages.
    """

    raw: dict[str, Any]
    grid: dict[str, Any]
    store: str | None
    where: str

    def cells(self) -> list[tuple[str, dict[str, Any]]]:
        """Each grid point's configuration, with its place for messages (``FILE (cell k=v)``)."""
        out = []
        for cell_raw in expand(self.raw, self.grid):
            values = {k: lookup(cell_raw, k) for k in self.grid}
            label = ", ".join(f"{k}={v}" for k, v in values.items())
            out.append((self.where + (f" (cell {label})" if label else ""), cell_raw))
        return out


def read_experiment(
    source: str | Path | Mapping[str, Any], overrides: Sequence[str] = ()
) -> ExperimentFile:
    """Read an experiment file (or take a mapping) and apply ``--set`` overrides.

    Raises:
        ConfigError: the file is missing, not YAML, not a mapping, or empty (which would run
            every default silently); an override is malformed; ``grid`` or ``store`` has the
            wrong shape.
    """
    if isinstance(source, Mapping):
        raw, where = dict(source), "<experiment>"
    else:
        raw, where = load_yaml(source), str(source)
        if not raw:
            raise ConfigError(
                f"{where}: the file is empty, so there is nothing to run; set at least the data, "
                "model and evaluate.attacks, or run a shipped config (robcomp list configs)"
            )
    for text in overrides:
        key, value = parse_override(text)
        raw = set_dotted(raw, key, value, where="--set ")
    grid = raw.pop("grid", None) or {}
    store = raw.pop("store", None)
    if store is not None and not isinstance(store, str):
        raise ConfigError(f"{where}: store must be a URL string (sqlite:///PATH, postgresql+"
                          f"psycopg://USER@HOST/DB), got {store!r}")  # fmt: skip
    if not isinstance(grid, Mapping):
        raise ConfigError(f"{where}: grid must map dotted keys to lists of values")
    return ExperimentFile(raw, dict(grid), store, where)


def check_experiment(source: str | Path | Mapping[str, Any], overrides: Sequence[str] = ()) -> str:
    """Check what can be checked without torch (the module docstring); return the name of the
    experiment (its first cell's), which names its default output folder.

    Raises:
        ConfigError: the first mistake, in one line naming the file, the cell and the key.
    """
    file = read_experiment(source, overrides)
    names = [check_cell(cell, where) for where, cell in file.cells()]
    return names[0]


def check_cell(raw: Mapping[str, Any], where: str) -> str:
    """One cell's own sections (:data:`CELL_SECTIONS`); its name."""
    evaluate = raw.get("evaluate")
    if isinstance(evaluate, Mapping) and "transfer" in evaluate:  # spec.load_transfer checks it
        raw = {**raw, "evaluate": {k: v for k, v in evaluate.items() if k != "transfer"}}
    sections: Any = build(_Sections, raw, where)
    device = sections.device
    if device is not None and device != "auto" and not _DEVICE.match(device):
        raise ConfigError(f"{where}: {DEVICE_HELP}, got {device!r}")
    try:
        check_threads(sections.threads)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None
    return sections.name or "experiment"


def expand(base: Mapping[str, Any], grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """All combinations of the grid applied to ``base`` (the last key varies fastest).

    A key naming several dotted keys, ``"compress,finetune"``, is one axis whose values are
    lists setting them together (a method with its own fine-tuning). An empty grid gives one
    cell: the base itself.
    """
    keys = list(grid)
    for key in keys:
        values = grid[key]
        if isinstance(values, str | bytes) or not isinstance(values, Sequence) or not values:
            raise ConfigError(f"grid.{key}: expected a non-empty list of values, got {values!r}")
        if "," in key:
            _check_zipped(key, values)
    out = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        cell = dict(base)
        for key, value in zip(keys, combo):
            for part, part_value in _zipped(key, value):
                cell = set_dotted(cell, part, part_value, where="grid.")
        out.append(cell)
    return out


def _zipped(key: str, value: Any) -> list[tuple[str, Any]]:
    """``"a,b": [va, vb]`` sets a and b together (one axis); a plain key sets itself."""
    if "," not in key:
        return [(key, value)]
    return list(zip([k.strip() for k in key.split(",")], value))


def _check_zipped(key: str, values: Sequence[Any]) -> None:
    parts = [k.strip() for k in key.split(",")]
    for value in values:
        if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != len(parts):
            raise ConfigError(
                f"grid.{key}: each value must be a list of {len(parts)} values, one for each of "
                f"{', '.join(parts)}; got {value!r}"
            )


def lookup(tree: Mapping[str, Any], dotted: str) -> Any:
    """The value at ``dotted`` (``a.b.c``; comma-joined keys give a list) in ``tree``."""
    if "," in dotted:
        return [lookup(tree, k.strip()) for k in dotted.split(",")]
    node: Any = tree
    for part in dotted.split("."):
        node = node[part]
    return node
