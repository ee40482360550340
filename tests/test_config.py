from __future__ import annotations

import dataclasses
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from robcomp.config import (
    ConfigError,
    build,
    canonical_json,
    coerce,
    config_hash,
    load_yaml,
    parse_override,
    set_dotted,
    to_dict,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Inner:
    eps: float = 0.1
    norm: Literal["linf", "l2"] = "linf"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Outer:
    name: str
    steps: int = 10
    milestones: tuple[int, ...] = ()
    inner: Inner = dataclasses.field(default_factory=Inner)
    limit: int | None = None


def test_build_nested_and_defaults() -> None:
    cfg = build(Outer, {"name": "x", "milestones": [5, 8], "inner": {"eps": 1}}, "f.yaml")
    assert cfg == Outer(name="x", milestones=(5, 8), inner=Inner(eps=1.0))
    assert isinstance(cfg.inner.eps, float)


def test_unknown_key_names_file_key_and_allowed() -> None:
    with pytest.raises(ConfigError) as info:
        build(Outer, {"name": "x", "stepz": 3}, "exp.yaml: train")
    msg = str(info.value)
    assert msg.startswith("exp.yaml: train: unknown key 'stepz'")
    assert "did you mean 'steps'" in msg
    assert "allowed keys: inner, limit, milestones, name, steps" in msg


def test_wrong_type_and_literal_list_allowed_values() -> None:
    with pytest.raises(ConfigError, match=r"exp.yaml.steps: expected int, got '3'"):
        build(Outer, {"name": "x", "steps": "3"}, "exp.yaml")
    with pytest.raises(ConfigError, match=r"inner.norm: expected one of 'linf', 'l2', got 'l3'"):
        build(Outer, {"name": "x", "inner": {"norm": "l3"}}, "exp.yaml")
    with pytest.raises(ConfigError, match="expected int, got True"):
        build(Outer, {"name": "x", "steps": True}, "exp.yaml")


def test_missing_required_key() -> None:
    with pytest.raises(ConfigError, match="missing required key"):
        build(Outer, {}, "exp.yaml")


def test_fractions_as_written_in_papers() -> None:
    assert coerce("8/255", float, "eps") == pytest.approx(8 / 255)
    assert coerce(" 2 / 255 ", float, "eps") == pytest.approx(2 / 255)
    with pytest.raises(ConfigError):
        coerce("8/", float, "eps")


def test_optional_accepts_null() -> None:
    assert build(Outer, {"name": "x", "limit": None}, "f").limit is None
    assert build(Outer, {"name": "x", "limit": 3}, "f").limit == 3


def test_overrides_parse_yaml_values() -> None:
    assert parse_override("train.epochs=3") == ("train.epochs", 3)
    assert parse_override("evaluate.attacks=[]") == ("evaluate.attacks", [])
    assert parse_override("model.name=resnet20") == ("model.name", "resnet20")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("train.epochs")


def test_set_dotted_copies_and_creates() -> None:
    tree = {"train": {"epochs": 1}}
    out = set_dotted(tree, "train.lr", 0.1)
    assert out == {"train": {"epochs": 1, "lr": 0.1}}
    assert tree == {"train": {"epochs": 1}}  # the argument is never mutated
    assert set_dotted({}, "a.b.c", 1) == {"a": {"b": {"c": 1}}}
    with pytest.raises(ConfigError, match="not a mapping"):
        set_dotted({"a": 3}, "a.b", 1)


def test_load_yaml_errors_name_the_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="no such file"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML"):
        load_yaml(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_yaml(scalar)


outers = st.builds(
    Outer,
    name=st.text(min_size=1, max_size=8),
    steps=st.integers(-5, 1000),
    milestones=st.lists(st.integers(0, 300), max_size=4).map(tuple),
    inner=st.builds(
        Inner,
        eps=st.floats(0, 10, allow_nan=False),
        norm=st.sampled_from(["linf", "l2"]),
    ),
    limit=st.none() | st.integers(1, 10**6),
)


@given(outers)
def test_config_round_trips_through_plain_dicts(cfg: Outer) -> None:
    assert build(Outer, to_dict(cfg), "roundtrip") == cfg
    assert config_hash(build(Outer, to_dict(cfg), "roundtrip")) == config_hash(cfg)


@given(st.dictionaries(st.text(max_size=5), st.integers(), max_size=6))
def test_canonical_json_ignores_key_order(d: dict[str, int]) -> None:
    reversed_d = dict(reversed(list(d.items())))
    assert canonical_json(d) == canonical_json(reversed_d)
    assert config_hash(d) == config_hash(reversed_d)
