"""Typed configuration: YAML and dotted overrides mapped onto frozen dataclasses.

Every component (dataset, attack, compressor, objective) is a frozen keyword-only dataclass. This
module turns plain mappings (parsed YAML, ``--set`` overrides) into those dataclasses, rejecting
unknown keys and wrong types with messages that name the file, the key and the allowed values.

Two rules hold for every component:

- **Nested options merge.** A field whose value is itself a dataclass (HYDRA's ``prune`` stage,
  a distiller's ``train``) is built from the user's keys over *the component's own default* for
  that field, not over the nested class's generic defaults: ``prune: {lr: 0.1}`` keeps HYDRA's
  20 epochs and weight decay 1e-4.
- **Operational fields are not identity.** A field declared with ``metadata=OPERATIONAL``
  changes where or how fast a result is computed, never the result (a data folder, a download
  switch, timing repeats, devices, threads). :func:`identity_dict` leaves such fields out, so
  cell ids and cache keys do not change with them. Mark a new field of that kind with
  ``field(default=..., metadata=OPERATIONAL)``.
- **A field added later keeps old ids.** A field declared with ``metadata=absent_at(value)``
  is left out of :func:`identity_dict` when it holds ``value``, the setting that reproduces
  what the component did before the field existed, so cells and caches from then keep their
  ids; any other value (its default included, if that differs) is a new identity.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from robcomp.registry import Registry, RegistryError

T = TypeVar("T")

_FRACTION = re.compile(r"^\s*([-+]?\d+(?:\.\d*)?)\s*/\s*(\d+(?:\.\d*)?)\s*$")

# Field metadata of a setting that does not change results; see the module docstring.
OPERATIONAL: Mapping[str, Any] = MappingProxyType({"operational": True})


def absent_at(value: Any) -> Mapping[str, Any]:
    """Field metadata: at ``value`` the field is left out of the identity (see the module
    docstring), because that value reproduces the results from before the field existed."""
    return MappingProxyType({"absent_at": value})


class ConfigError(ValueError):
    """A configuration mistake, reported where the user can fix it."""


def _type_name(hint: Any) -> str:
    origin = get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def _fail(where: str, hint: Any, value: Any) -> ConfigError:
    return ConfigError(f"{where}: expected {_type_name(hint)}, got {value!r}")


def coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against the type ``hint`` and convert where lossless.

    Ints are accepted for floats, and a float may be written as a fraction string such as
    ``"8/255"`` (the way the field writes epsilons). Lists become tuples for tuple fields.
    """
    if hint is Any or hint is object:
        return value
    origin = get_origin(hint)
    if origin is Literal:
        if value in get_args(hint):
            return value
        raise _fail(where, hint, value)
    if origin in (Union, types.UnionType):
        for option in get_args(hint):
            try:
                return coerce(value, option, where)
            except ConfigError:
                continue
        raise _fail(where, hint, value)
    if hint is type(None):
        if value is None:
            return None
        raise _fail(where, hint, value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _fail(where, hint, value)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _fail(where, hint, value)
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str) and (m := _FRACTION.match(value)):
            if float(m.group(2)) == 0:
                raise ConfigError(f"{where}: {value!r} divides by zero")
            number = float(m.group(1)) / float(m.group(2))
        else:
            raise _fail(where, hint, value)
        # NaN compares false with every bound, so it would slip past any range check.
        if math.isnan(number):
            raise ConfigError(f"{where}: expected a number, got nan")
        return number
    if hint is str:
        if isinstance(value, str):
            return value
        raise _fail(where, hint, value)
    if origin is tuple:
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise _fail(where, hint, value)
        args = get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(args, value)))
    if origin is list:
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise _fail(where, hint, value)
        (arg,) = get_args(hint) or (Any,)
        return [coerce(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _fail(where, hint, value)
        key_t, val_t = get_args(hint) or (Any, Any)
        return {coerce(k, key_t, where): coerce(v, val_t, f"{where}.{k}") for k, v in value.items()}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, Mapping):
            raise _fail(where, hint, value)
        return build(hint, value, where)
    raise ConfigError(f"{where}: unsupported field type {hint!r}")  # a bug in a component


def fields_of(cls: type) -> dict[str, dataclasses.Field[Any]]:
    """The init fields of a dataclass, by name."""
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _field_default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _accepts(hint: Any, cls: type) -> bool:
    if get_origin(hint) in (Union, types.UnionType):
        return any(_accepts(h, cls) for h in get_args(hint))
    return hint is cls


def _nested(value: Any, default: Any, hint: Any, where: str) -> Any:
    """A mapping for a field whose default is a dataclass instance: the user's keys over that
    default (recursively); anything else is coerced to ``hint`` as usual."""
    if (
        isinstance(value, Mapping)
        and dataclasses.is_dataclass(default)
        and not isinstance(default, type)
        and _accepts(hint, type(default))
    ):
        return build(type(default), value, where, base=default)
    return coerce(value, hint, where)


def nested_field(obj: Any, name: str, where: str) -> Any:
    """Field ``name`` of the dataclass ``obj`` under the nested-options rule, for components
    built in Python with a mapping where a dataclass belongs (YAML goes through :func:`build`,
    which applies the rule itself): the mapping's keys over the field's own default."""
    value = getattr(obj, name)
    if not isinstance(value, Mapping):
        return value
    f = fields_of(type(obj))[name]
    return _nested(value, _field_default(f), typing.get_type_hints(type(obj))[name], where)


def build(cls: type[T], values: Mapping[str, Any], where: str, *, base: Any = None) -> T:
    """Build the dataclass ``cls`` from ``values``, checking keys and types.

    A field whose default is a dataclass instance and whose value is a mapping is built from
    the mapping's keys over that default (nested options merge; see the module docstring).

    Args:
        base: an instance of ``cls`` whose values stand in for the keys ``values`` leaves out
            (instead of the class's defaults).

    Raises:
        ConfigError: on an unknown key (with the closest allowed keys), a missing required key,
            a value of the wrong type, or a value the dataclass itself rejects.
    """
    allowed = fields_of(cls)
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in allowed:
            close = difflib.get_close_matches(str(key), list(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{where}: unknown key {key!r}{hint}; allowed keys: {', '.join(sorted(allowed))}"
            )
        default = getattr(base, key) if base is not None else _field_default(allowed[key])
        kwargs[key] = _nested(value, default, hints[key], f"{where}.{key}")
    if base is not None:
        kwargs = {name: getattr(base, name) for name in allowed} | kwargs
    missing = [
        n
        for n, f in allowed.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where}: {err}") from None


def build_component(registry: Registry[Any], spec: Mapping[str, Any] | str, where: str) -> Any:
    """Build a registered component from ``{"name": ..., **fields}`` (or just a name)."""
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ConfigError(f"{where}: expected a mapping with a 'name' key, got {spec!r}")
    options = {k: v for k, v in spec.items() if k != "name"}
    try:
        cls = registry.get(spec["name"])
    except RegistryError as err:
        raise ConfigError(f"{where}.name: {err}") from None
    return build(cls, options, where)


def to_dict(obj: Any) -> Any:
    """A plain, JSON-ready view of dataclasses, tuples and mappings."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def is_operational(f: dataclasses.Field[Any]) -> bool:
    """Whether a dataclass field was declared with ``metadata=OPERATIONAL``."""
    return bool(f.metadata.get("operational", False))


def _absent(f: dataclasses.Field[Any], value: Any) -> bool:
    """Whether a field declared with :func:`absent_at` holds its pre-existence value."""
    return "absent_at" in f.metadata and value == f.metadata["absent_at"]


def identity_dict(obj: Any) -> Any:
    """:func:`to_dict` without operational fields: what a configuration's results depend on."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name: identity_dict(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if not is_operational(f) and not _absent(f, getattr(obj, f.name))
        }
    if isinstance(obj, Mapping):
        return {str(k): identity_dict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [identity_dict(v) for v in obj]
    return to_dict(obj)


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, floats in repr form."""
    return json.dumps(to_dict(obj), sort_keys=True, separators=(",", ":"), allow_nan=False)


def config_hash(obj: Any, length: int = 12) -> str:
    """Stable short hash of a configuration; the identity of a cell or a cached artifact."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    return data


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: where (1-based, as editors count) and what."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None)
    if mark is None or problem is None:
        return " ".join(str(err).split())
    context = getattr(err, "context", None)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" + (
        f" ({context})" if context else ""
    )


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key.sub=value`` (value in YAML syntax) as given to ``--set``."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.epochs=3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text!r}: value is not valid YAML: {err}") from None
    return key.strip(), value


def parse_spec(text: str) -> dict[str, Any]:
    """``pgd:eps=8/255,steps=20`` -> ``{"name": "pgd", "eps": "8/255", "steps": 20}``, the
    CLI's syntax for a component; a value may be a YAML list (``attacks=[apgd-ce,apgd-t]``)."""
    name, _, rest = text.partition(":")
    spec: dict[str, Any] = {"name": name.strip()}
    for item in filter(None, (p.strip() for p in _top_level(rest))):
        key, value = parse_override(item)
        spec[key] = value
    return spec


def _top_level(text: str) -> list[str]:
    """``text`` split at the commas outside brackets and braces."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char in "[{") - (char in "]}")
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


def parse_data_spec(text: str | Path) -> str | dict[str, Any]:
    """A dataset as the CLI's ``--data`` and the API's ``data`` take it, as a spec for
    :func:`robcomp.data.get`.

    ``mnist`` stays a name; ``npz:path=test.npz,split=test`` becomes its mapping; a YAML
    mapping (``{name: npz, path: test.npz}``) is read as one; a path ending in ``.npz``
    (a string or a :class:`~pathlib.Path`) is ``npz:path=PATH`` with the npz dataset's
    defaults (``x_test``/``y_test`` as the test split if the file holds them, else a seeded
    20 % of it; add ``split=test`` to score the whole file).

    Raises:
        ConfigError: a path that is not an ``.npz`` file, or a mapping that is not valid YAML.
    """
    if isinstance(text, Path):
        return _npz_path(text)
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            spec = yaml.safe_load(stripped)
        except yaml.YAMLError as err:
            raise ConfigError(f"data {text!r}: not a valid YAML mapping: {err}") from None
        if not isinstance(spec, dict):
            raise ConfigError(f"data {text!r}: expected a mapping with a name")
        return spec
    if stripped.lower().endswith(".npz") and "=" not in stripped:  # not npz:path=...
        return _npz_path(Path(stripped))
    return parse_spec(stripped) if ":" in stripped else stripped


def _npz_path(path: Path) -> dict[str, Any]:
    if path.suffix.lower() != ".npz":
        raise ConfigError(
            f"data {str(path)!r}: a path to data must be an .npz file (np.savez(path, x=..., "
            "y=...)); other datasets are named, e.g. {'name': 'imagefolder', 'root': ...}"
        )
    return {"name": "npz", "path": str(path)}


def set_dotted(tree: dict[str, Any], dotted: str, value: Any, where: str = "") -> dict[str, Any]:
    """Return a deep copy of ``tree`` with ``dotted`` (``a.b.c``) set to ``value``."""
    out = copy.deepcopy(tree)
    node = out
    parts = dotted.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            prefix = ".".join(parts[: i + 1])
            raise ConfigError(f"{where}{dotted}: {prefix} is {child!r}, not a mapping")
        node = child
    node[parts[-1]] = copy.deepcopy(value)
    return out
