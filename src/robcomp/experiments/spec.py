"""The experiment file: a base configuration and a grid of dotted keys mapped to lists.

```yaml
name: quickstart
seed: 0
data: {name: digits}
model: {name: tiny_cnn}
train: {epochs: 15, lr: 0.05}
compress: {name: magnitude, sparsity: 0.5}
finetune: {epochs: 3, lr: 0.01}
evaluate:
  attacks:
    - {name: pgd, eps: 0.1, steps: 10}
grid:
  compress.sparsity: [0.0, 0.5, 0.9]
```
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import inspect
import json
import math
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from robcomp.attacks import ATTACKS, Attack
from robcomp.attacks.base import missing_library
from robcomp.attacks.manifold import is_latent, needs_manifold
from robcomp.compress import COMPRESSORS
from robcomp.config import (
    OPERATIONAL,
    ConfigError,
    build,
    build_component,
    config_hash,
    identity_dict,
    to_dict,
)
from robcomp.data import DATASETS
from robcomp.data.shifts import SHIFTS
from robcomp.evaluate.manifold import has_known_generator
from robcomp.experiments.digest import by_content, content_of
from robcomp.experiments.schema import (
    DEVICE_HELP,
    EvaluateSpec,
    ModelSpec,
    Resources,
    check_threads,
    expand,
    lookup,
    read_experiment,
)
from robcomp.models import factory_for
from robcomp.models.base import code_paths
from robcomp.models.checkpoint import SPEC, WEIGHTS
from robcomp.models.ecosystem import is_ecosystem
from robcomp.models.generative import VAESpec
from robcomp.registry import RegistryError
from robcomp.train import OBJECTIVES, TrainConfig


@dataclass(frozen=True, kw_only=True)
class CellConfig:
    """One fully resolved point of the grid: everything needed to run it, nothing else.

    Its identity (:meth:`cell_id`, :meth:`baseline_key`, the compressed-model cache key) is a
    hash of what the results depend on: every component's fields with defaults filled in, the
    *contents* of the files it names (weights, teacher and ensemble checkpoints, npz data), and
    none of its *operational* fields. A field is operational when it changes where or how fast
    a result is computed but never the result (a data folder, ``download``, latency repeats,
    trusting a checkpoint's code, devices, threads); declare one with
    ``field(default=..., metadata=OPERATIONAL)`` (:data:`robcomp.config.OPERATIONAL`), here or
    in any component, and it leaves every id and cache key unchanged.

    Attributes:
        trust_code: let checkpoints this cell loads (teachers, ensemble members, pretrained
            students) import the ``module:callable`` their spec.json names, which runs that
            code; by default a checkpoint may name registered models only.
        device: where the cell's model and data live: ``auto`` (CUDA when present, else the
            CPU), ``cpu``, ``cuda``, ``cuda:1``, ...; a model that runs on the CPU only (int8)
            is evaluated there.
        threads: intra-op CPU threads; null (auto) is 1 for a model under 5 M MACs per image,
            which more threads only slow down, else every core other processes leave free.
        resources: what a cell reserves on a Ray cluster and how often it is retried when its
            worker dies (:class:`Resources`); the local executor ignores it.
        vae: the VAE (:class:`~robcomp.models.generative.VAESpec` fields) that on-manifold
            attacks, objectives and test sets use on data without a known generator (every
            data set but ``gaussians``, whose own generator is used); trained once per (data,
            settings, seed) and cached. Part of the cell's identity only where it is used.
    """

    name: str = "experiment"
    seed: int = 0
    data: dict[str, Any] = field(default_factory=lambda: {"name": "digits"})
    model: ModelSpec = field(default_factory=ModelSpec)
    train: TrainConfig = field(default_factory=TrainConfig)
    compress: dict[str, Any] = field(default_factory=lambda: {"name": "none"})
    finetune: TrainConfig | None = None
    evaluate: EvaluateSpec = field(default_factory=EvaluateSpec)
    trust_code: bool = field(default=False, metadata=OPERATIONAL)
    device: str = field(default="auto", metadata=OPERATIONAL)
    threads: int | None = field(default=None, metadata=OPERATIONAL)
    resources: Resources = field(default_factory=Resources, metadata=OPERATIONAL)
    vae: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise ValueError(f"{DEVICE_HELP}, got {self.device!r}") from None
        check_threads(self.threads)

    def canonical(self) -> dict[str, Any]:
        """The configuration with every component's defaults filled in (data, compressor,
        training objectives, attacks), so a changed default is a different cell, never a stale
        cached result, and ``{sparsity: 0.5}`` is the same cell as ``{sparsity: 0.5, scope:
        global}``; files by their contents, operational fields left out (see the class)."""
        out: dict[str, Any] = identity_dict(self)
        if self.model.weights and (digest := content_of(self.model.weights, any_file=True)):
            out["model"]["weights"] = digest
        out["data"] = _resolved(DATASETS, self.data)
        out["compress"] = _resolved(COMPRESSORS, self.compress)
        out["train"]["objective"] = _resolved(OBJECTIVES, self.train.objective)
        if self.finetune is not None:
            out["finetune"]["objective"] = _resolved(OBJECTIVES, self.finetune.objective)
        out["evaluate"]["attacks"] = [_resolved(ATTACKS, s) for s in self.evaluate.attack_specs()]
        out["evaluate"].pop("preset", None)  # its attacks are listed above
        if self.evaluate.shifts:
            out["evaluate"]["shifts"] = [_resolved(SHIFTS, s) for s in self.evaluate.shifts]
        else:  # a suite without shifts keeps the identity it had before shifts existed
            for key in ("shifts", "attack_shifted", "shift_limit"):
                out["evaluate"].pop(key)
        # A cell that trains no VAE keeps the identity it had before the setting existed.
        out.pop("vae")
        if (spec := self.vae_spec()) is not None:
            out["vae"] = dataclasses.asdict(spec)
        return _json_safe(by_content(out))

    def uses_manifold(self) -> bool:
        """Whether an attack, shift or training objective of the cell needs a generative
        model of the data (an on-manifold component, Kwon & Lee 2021)."""
        specs = [(ATTACKS, s) for s in self.evaluate.attack_specs()]
        specs += [(SHIFTS, s) for s in self.evaluate.shifts]
        specs += [(OBJECTIVES, self.train.objective)]
        if self.finetune is not None:
            specs.append((OBJECTIVES, self.finetune.objective))
        if isinstance(self.compress, Mapping) and "objective" in self.compress:
            specs.append((OBJECTIVES, self.compress["objective"]))
        return any(_needs_manifold(registry, spec) for registry, spec in specs)

    def vae_spec(self) -> VAESpec | None:
        """The VAE the cell's on-manifold components use (:attr:`vae` with its defaults), or
        None when it uses none: no component needs one, or the data has a known generator."""
        if has_known_generator(self.data) or not self.uses_manifold():
            return None
        return build(VAESpec, self.vae, "vae")

    def cell_id(self) -> str:
        """Hash of the canonical configuration: the cell's identity in the store."""
        return config_hash(self.canonical())

    def baseline_key(self) -> str:
        """Hash of what produces the trained baseline, shared by all compressed variants (and
        the cell's VAE if its training objective is an on-manifold one)."""
        full = self.canonical()
        parts = {k: full[k] for k in ("data", "model", "train", "seed")}
        if "vae" in full and _needs_manifold(OBJECTIVES, self.train.objective):
            parts["vae"] = full["vae"]
        return config_hash(parts)


def _needs_manifold(registry: Any, spec: Mapping[str, Any] | str | None) -> bool:
    name = spec if isinstance(spec, str) else (spec or {}).get("name")
    return isinstance(name, str) and name in registry and needs_manifold(registry.get(name))


def _resolved(registry: Any, spec: Mapping[str, Any] | str) -> Any:
    """``{"name": ..., **every field}`` of a registered component, with its ``revision`` if
    it has one (a component whose results changed with the same fields says so by raising
    it, so its cells are new ones); the spec as given when it cannot be built on its own
    (e.g. an objective that needs a teacher bound at run time)."""
    name = spec if isinstance(spec, str) else spec.get("name")
    try:
        component = build_component(registry, spec, "hash")
    except (ConfigError, RegistryError, TypeError, ValueError):
        return to_dict(spec)
    revision = getattr(component, "revision", None)
    return {
        "name": name,
        **identity_dict(component),
        **({"revision": revision} if revision else {}),
    }


def _json_safe(obj: Any) -> Any:
    """Non-finite floats (``eps: inf`` of minimal-norm attacks) as strings, for the hash."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return repr(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


@dataclass(frozen=True)
class Cell:
    """A cell to run: its resolved config and the grid values that distinguish it."""

    config: CellConfig
    grid_values: dict[str, Any]

    @property
    def cell_id(self) -> str:
        return self.config.cell_id()


def validate(cfg: CellConfig, where: str) -> None:
    """Check the registry-backed sections by building them (cheap; nothing is loaded)."""
    build_component(DATASETS, cfg.data, f"{where}: data")
    build_component(COMPRESSORS, cfg.compress, f"{where}: compress")
    cfg.train.build_objective(f"{where}: train.objective")
    if cfg.finetune is not None:
        cfg.finetune.build_objective(f"{where}: finetune.objective")
    try:
        attacks = cfg.evaluate.build_attacks(f"{where}: evaluate")
    except KeyError as err:  # an unknown preset
        raise ConfigError(f"{where}: evaluate.preset: {err}") from None
    for i, attack in enumerate(attacks):  # a missing library fails here, not after training
        if message := missing_library(attack):
            raise ConfigError(f"{where}: evaluate.attacks[{i}]: {message}")
    for i, shift in enumerate(cfg.evaluate.shifts):
        build_component(SHIFTS, shift, f"{where}: evaluate.shifts[{i}]")
    build(VAESpec, cfg.vae, f"{where}: vae")  # checked even where no component uses it
    try:
        with code_paths(cfg.model.code_path):
            factory = factory_for(cfg.model.name)
    except (RegistryError, ValueError) as err:
        raise ConfigError(f"{where}: model.name: {err}") from None
    _check_model_options(factory, cfg.model, where)


def _check_model_options(factory: Any, model: ModelSpec, where: str) -> None:
    """An option the model's factory does not take is an error now, not when a cell builds it."""
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = [p for p in params if p not in ("num_classes", "in_shape")]
    for key in model.options:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{where}: model.options: model {model.name!r} has no option {key!r}{hint}; "
                f"its options: {', '.join(allowed) or 'none'}"
            )


def resolve(raw: Mapping[str, Any], where: str) -> CellConfig:
    """Turn a plain mapping into a validated :class:`CellConfig`."""
    cfg = build(CellConfig, raw, where)
    validate(cfg, where)
    return cfg


# ----------------------------------------------------------------------------- transfer

TRANSFER_KEY = "evaluate.transfer"
MIN_ID_PREFIX = 6  # characters of a cell id that name a transfer source


@dataclass(frozen=True, kw_only=True)
class TransferSpec:
    """``evaluate.transfer``: transfer attacks across the cells of one experiment (Marshall
    2020, Algorithm 3). Examples crafted once per source on the test points scored every
    target cell: the source -> target accuracy matrix.

    Attributes:
        sources: the models the examples are crafted on. A cell of this experiment, by its
            compression variant (its compressor's label: ``none``, ``magnitude-global-0.8``,
            ``int8``) when one cell has it, else by the first characters (at least 6) of its
            cell id; or a checkpoint folder (``model.safetensors`` + ``spec.json``, relative
            to the experiment file). A cell variant wins over a folder of the same name.
        attack: the attack ``{"name": ..., "eps": ..., **fields}``; ``eps`` may be a list,
            one matrix per value.
        limit: how many test points (the first ones); default: ``evaluate.limit``.
        batch_size: default: ``evaluate.batch_size`` (the same batches give the source's own
            white-box accuracy on the diagonal).
    """

    sources: tuple[str, ...] = ()
    attack: dict[str, Any] = field(default_factory=dict)
    limit: int | None = None
    batch_size: int | None = None

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("sources must name at least one model to craft the examples on")
        if not self.attack:
            raise ValueError("attack must be an attack spec such as {name: pgd, eps: 0.1}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 (points to attack) or null, got {self.limit}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class TransferSource:
    """A resolved transfer source.

    Attributes:
        name: what the store keeps in the metrics' ``source`` column: the cell id, or
            ``checkpoint:<folder as written>@<first 8 hex of its content hash>``, so a
            checkpoint retrained in place is a new source.
        written: the source as the experiment file names it.
        cell: the source cell (None for a checkpoint).
        checkpoint: the checkpoint folder (None for a cell).
    """

    name: str
    written: str
    cell: Cell | None = None
    checkpoint: Path | None = None


@dataclass(frozen=True)
class Transfer:
    """A loaded ``evaluate.transfer``: its sources, attacks (one per eps) and points."""

    sources: tuple[TransferSource, ...]
    attacks: tuple[Attack, ...]
    limit: int | None
    batch_size: int
    trust_code: bool


def _pop_transfer(
    raw: dict[str, Any], grid: Mapping[str, Any], where: str
) -> tuple[dict[str, Any], Any]:
    """``raw`` without ``evaluate.transfer``, and that section. It builds one matrix across
    the cells, so it is no part of any cell (their ids stay as they were) and no grid axis."""
    for key in grid:
        if any(k.strip().startswith(TRANSFER_KEY) for k in key.split(",")):
            raise ConfigError(
                f"{where}: grid.{key}: {TRANSFER_KEY} builds one matrix across the cells of the "
                "experiment and cannot vary over the grid; list several eps values in its attack"
            )
    evaluate = raw.get("evaluate")
    if not isinstance(evaluate, Mapping) or "transfer" not in evaluate:
        return raw, None
    rest = {k: v for k, v in evaluate.items() if k != "transfer"}
    return {**raw, "evaluate": rest}, evaluate["transfer"]


def _transfer_attacks(attack: Mapping[str, Any], where: str) -> tuple[Attack, ...]:
    eps = attack.get("eps")
    values = eps if isinstance(eps, list | tuple) else [eps]
    specs = [{**attack, "eps": e} if e is not None else dict(attack) for e in values]
    out = []
    for spec in specs:
        built = build_component(ATTACKS, spec, f"{where}.attack")
        if is_latent(built):
            raise ConfigError(
                f"{where}.attack: {built.label()} is an on-manifold attack; its examples are "
                "checked against the source's generative model and cannot be transferred"
            )
        if message := missing_library(built):
            raise ConfigError(f"{where}.attack: {message}")
        out.append(built)
    return tuple(out)


def load_transfer(section: Any, cells: Sequence[Cell], folder: Path, where: str) -> Transfer:
    """Resolve ``evaluate.transfer`` against the experiment's cells.

    Raises:
        ConfigError: a bad key or attack, or a source that names no cell and no checkpoint
            (the message lists the valid names).
    """
    where = f"{where}: {TRANSFER_KEY}"
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where}: expected a mapping {{sources: [...], attack: {{...}}}}")
    section = dict(section)
    if isinstance(section.get("sources"), str):
        section["sources"] = [section["sources"]]
    spec = build(TransferSpec, section, where)
    if not cells:
        raise ConfigError(f"{where}: the experiment has no cells to transfer to")
    first = cells[0].config
    labels = {c.cell_id: build_component(COMPRESSORS, c.config.compress, "compress").label()
              for c in cells}  # fmt: skip
    sources = tuple(
        _transfer_source(
            str(text), cells, labels, folder, first.trust_code, f"{where}.sources[{i}]"
        )
        for i, text in enumerate(spec.sources)
    )
    return Transfer(
        sources=sources,
        attacks=_transfer_attacks(spec.attack, where),
        limit=spec.limit if spec.limit is not None else first.evaluate.limit,
        batch_size=spec.batch_size or first.evaluate.batch_size,
        trust_code=first.trust_code,
    )


def _transfer_source(
    text: str,
    cells: Sequence[Cell],
    labels: Mapping[str, str],
    folder: Path,
    trust: bool,
    where: str,
) -> TransferSource:
    """A cell by its variant (when unique) or id prefix, else a checkpoint folder."""
    named = [c for c in cells if labels[c.cell_id] == text]
    if not named and len(text) >= MIN_ID_PREFIX and set(text) <= set(string.hexdigits):
        named = [c for c in cells if c.cell_id.startswith(text.lower())]
    if len(named) == 1:
        return TransferSource(named[0].cell_id, text, cell=named[0])
    if named:
        ids = ", ".join(c.cell_id[:10] for c in named)
        raise ConfigError(
            f"{where}: {text!r} names {len(named)} cells ({ids}); name one by the first "
            f"{MIN_ID_PREFIX}+ characters of its cell id"
        )
    path = Path(text).expanduser()
    path = path if path.is_absolute() else folder / path
    if path.is_dir():
        return _checkpoint_source(text, path, trust, where)
    counts = collections.Counter(labels.values())
    unique = [label for label, n in counts.items() if n == 1]
    raise ConfigError(
        f"{where}: unknown source {text!r}; valid: a cell variant "
        f"({', '.join(unique) or 'none unique'}), a cell id prefix of {MIN_ID_PREFIX}+ "
        f"characters (e.g. {cells[0].cell_id[:8]}), or a checkpoint folder (model.safetensors "
        "+ spec.json)"
    )


def _checkpoint_source(text: str, path: Path, trust: bool, where: str) -> TransferSource:
    if not ((path / SPEC).is_file() and (path / WEIGHTS).is_file()):
        raise ConfigError(
            f"{where}: {text!r} is a folder but not a robcomp checkpoint (expected {SPEC} and "
            f"{WEIGHTS}); save one with `robcomp train`"
        )
    try:
        name = json.loads((path / SPEC).read_text()).get("name", "")
    except (ValueError, AttributeError):
        raise ConfigError(f"{where}: {path / SPEC} is not a JSON object") from None
    if isinstance(name, str) and ":" in name and not is_ecosystem(name) and not trust:
        # The same rule as every checkpoint a cell loads (models/checkpoint.py): importing
        # the code a file names runs it, which needs the user's consent.
        raise ConfigError(
            f"{where}: checkpoint {text!r} names the code {name!r}, which loading it would "
            "import and run; set trust_code: true (or --trust-code) if you trust it"
        )
    digest = (content_of(str(path)) or "").removeprefix("sha256:")[:8]
    return TransferSource(f"checkpoint:{text}@{digest}", text, checkpoint=path.resolve())


@dataclass(frozen=True)
class Experiment:
    """A loaded experiment file: its name, source, raw contents and its expanded cells.

    ``store`` is the file's results store URL (``store:``), operational like ``device``: where
    results go, never which, so it is kept out of every cell and its id. ``transfer`` is the
    file's ``evaluate.transfer`` (None without one), run after the cells.
    """

    name: str
    source: str
    raw: dict[str, Any]
    cells: list[Cell]
    store: str | None = None
    transfer: Transfer | None = None


def load_experiment(
    source: str | Path | Mapping[str, Any], overrides: Sequence[str] = ()
) -> Experiment:
    """Load an experiment file (or mapping), apply ``--set`` overrides, expand and validate.

    Every cell is validated before anything runs, so a typo in the last cell costs nothing.
    """
    file = read_experiment(source, overrides)
    raw, grid, store, where = file.raw, file.grid, file.store, file.where
    raw, transfer_section = _pop_transfer(raw, grid, where)
    cells = []
    seen: set[str] = set()
    for cell_raw in expand(raw, grid):
        if not isinstance(source, Mapping):
            cell_raw = _with_code_path(cell_raw, Path(source).parent)
        values = {k: lookup(cell_raw, k) for k in grid}
        label = ", ".join(f"{k}={v}" for k, v in values.items())
        cfg = resolve(cell_raw, f"{where}" + (f" (cell {label})" if label else ""))
        if cfg.cell_id() not in seen:  # a grid may repeat a point; run it once
            seen.add(cfg.cell_id())
            cells.append(Cell(cfg, values))
    transfer = None
    if transfer_section is not None:
        folder = Path.cwd() if isinstance(source, Mapping) else Path(source).parent
        transfer = load_transfer(transfer_section, cells, folder, where)
        raw = {**raw, "evaluate": {**raw.get("evaluate", {}), "transfer": transfer_section}}
    raw["grid"] = dict(grid)
    if store is not None:
        raw["store"] = store
    name = cells[0].config.name if cells else "experiment"
    return Experiment(
        name=name, source=where, raw=to_dict(raw), cells=cells, store=store, transfer=transfer
    )


def _with_code_path(raw: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A ``module:callable`` model imports from the experiment file's folder (or its
    ``code_path``, relative to that folder), as pytest imports from its rootdir."""
    model = raw.get("model")
    if not isinstance(model, Mapping) or not isinstance(name := model.get("name"), str):
        return raw
    if ":" not in name or is_ecosystem(name):
        return raw
    code_path = folder / str(model.get("code_path") or ".")
    return {**raw, "model": {**model, "code_path": str(code_path.expanduser().resolve())}}
