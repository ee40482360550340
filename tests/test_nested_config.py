"""Nested options merge: the user's keys over the component's own defaults for that field."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import pytest

from robcomp.attacks import ATTACKS
from robcomp.compress import COMPRESSORS
from robcomp.config import build, build_component, fields_of
from robcomp.data import DATASETS
from robcomp.registry import Registry
from robcomp.train import OBJECTIVES, TrainConfig


@dataclass(frozen=True, kw_only=True)
class Leaf:
    a: int = 1
    b: int = 2


@dataclass(frozen=True, kw_only=True)
class Mid:
    leaf: Leaf = field(default_factory=lambda: Leaf(a=10, b=20))
    c: int = 3


@dataclass(frozen=True, kw_only=True)
class Top:
    mid: Mid = field(default_factory=lambda: Mid(leaf=Leaf(a=100, b=200), c=300))
    optional: Leaf | None = None


def test_nested_keys_merge_over_the_fields_own_default_at_every_depth() -> None:
    top = build(Top, {"mid": {"leaf": {"b": 7}}}, "t")
    assert top.mid == Mid(leaf=Leaf(a=100, b=7), c=300)
    assert build(Top, {"mid": {"c": 1}}, "t").mid.leaf == Leaf(a=100, b=200)
    # Without a default instance, the nested class's own defaults apply.
    assert build(Top, {"optional": {"a": 5}}, "t").optional == Leaf(a=5, b=2)


def _nested_fields(registry: Registry[Any]) -> list[tuple[str, str, Any]]:
    """(component, field, default instance) for every dataclass-valued field with a default
    that differs from its class's generic defaults: where the merge rule matters."""
    out = []
    for name in registry.names():
        cls = registry.get(name)
        for f in fields_of(cls).values():
            if f.default_factory is dataclasses.MISSING:
                continue
            default = f.default_factory()
            if dataclasses.is_dataclass(default) and default != type(default)():
                out.append((name, f.name, default))
    return out


REQUIRED = {"sparsity": 0.5, "student": "tiny_mlp"}  # values for fields without a default
NESTED = [
    (registry, *entry)
    for registry in (COMPRESSORS, OBJECTIVES, ATTACKS, DATASETS)
    for entry in _nested_fields(registry)
]


def test_the_components_that_need_the_rule_are_found() -> None:
    found = {(component, name) for _, component, name, _ in NESTED}
    assert {("hydra", "prune"), ("hydra", "finetune"), ("proximal-l0", "train")} <= found


@pytest.mark.parametrize(
    ("registry", "component", "name", "default"),
    NESTED,
    ids=[f"{c}.{n}" for _, c, n, _ in NESTED],
)
def test_one_nested_key_keeps_every_other_default_of_the_component(
    registry: Registry[Any], component: str, name: str, default: Any
) -> None:
    fields = fields_of(registry.get(component))
    required = {k: v for k, v in REQUIRED.items() if k in fields}
    built = build_component(registry, {"name": component, **required, name: {"epochs": 3}}, "c")
    value = getattr(built, name)
    assert value.epochs == 3
    for key in fields_of(type(default)):
        if key not in ("epochs", "objective"):  # objective: set by the compressor itself
            assert getattr(value, key) == getattr(default, key), key


def test_hydra_prune_lr_keeps_hydras_pruning_stage() -> None:
    spec = {"name": "hydra", "sparsity": 0.5, "prune": {"lr": 0.05}}
    prune = build_component(COMPRESSORS, spec, "compress").prune
    assert (prune.lr, prune.epochs, prune.weight_decay, prune.keep_best) == (0.05, 20, 1e-4, False)


def test_proximal_l0_train_keeps_its_own_recipe() -> None:
    spec = {"name": "proximal-l0", "sparsity": 0.5, "train": {"lr": 0.05}}
    train = build_component(COMPRESSORS, spec, "compress").train
    assert (train.lr, train.epochs, train.momentum, train.schedule) == (0.05, 20, 0.91, "constant")
    assert train.keep_best is False


def test_distill_train_merges_over_its_default() -> None:
    spec = {"name": "distill", "student": "tiny_mlp", "train": {"lr": 0.05}}
    train = build_component(COMPRESSORS, spec, "compress").train
    default = fields_of(COMPRESSORS.get("distill"))["train"].default_factory()  # type: ignore[misc]
    assert train == dataclasses.replace(default, lr=0.05)


def test_a_mapping_given_in_python_merges_the_same_way() -> None:
    hydra = COMPRESSORS.get("hydra")(sparsity=0.5, prune={"lr": 0.05})
    assert (hydra.prune.lr, hydra.prune.epochs, hydra.prune.weight_decay) == (0.05, 20, 1e-4)
    assert isinstance(hydra.finetune, TrainConfig) and hydra.finetune.lr == 0.01
