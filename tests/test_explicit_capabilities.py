"""Capabilities passed explicitly (issue 17, item 3): the on-manifold generative model is an
argument, never a context variable; each layer registers into its own registry; registries
are typed."""

from __future__ import annotations

import ast
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from robcomp import data as datasets
from robcomp.attacks.manifold import ManifoldMissing, OnManifold, needs_manifold, with_manifold
from robcomp.config import ConfigError, build, build_component, identity_dict, to_dict
from robcomp.data.base import DataSplits
from robcomp.data.shifts import SHIFTS as DATA_SHIFTS
from robcomp.evaluate import SHIFTS, evaluate_attack
from robcomp.models import create
from robcomp.models.generative import GaussianManifold, LazyManifold, Manifold
from robcomp.registry import Registry, RegistryError
from robcomp.train import OBJECTIVES, TrainConfig, fit

SRC = Path(__file__).resolve().parents[1] / "src" / "robcomp"
SPEC = {"name": "gaussians", "n": 2000}


@pytest.fixture(scope="module")
def gaussians() -> DataSplits:
    return datasets.get(SPEC, seed=0)


@pytest.fixture(scope="module")
def manifold() -> GaussianManifold:
    return GaussianManifold(n=SPEC["n"])


@pytest.fixture(scope="module")
def model(gaussians: DataSplits) -> nn.Module:
    torch.manual_seed(0)
    net = create("tiny_mlp", 4, gaussians.in_shape, mean=gaussians.mean, std=gaussians.std)
    fit(net, gaussians, TrainConfig(epochs=2, lr=0.05, batch_size=64), seed=0)
    return net.eval()


# --- no hidden state ------------------------------------------------------------------------------


def test_the_manifold_module_holds_no_context_variable() -> None:
    tree = ast.parse((SRC / "attacks" / "manifold.py").read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (node.names if isinstance(node, ast.Import) else [])
    } | {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
    }
    assert "contextvars" not in imported and "contextlib" not in imported
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert not names & {"ContextVar", "using_manifold", "active_manifold"}


def test_on_manifold_components_are_bound_by_replace_not_behind_the_dataclass() -> None:
    """Binding a generative model makes a copy (``dataclasses.replace`` on a run-time field);
    nothing writes a frozen dataclass with ``object.__setattr__`` on the way."""
    files = ["attacks/manifold.py", "train/manifold.py", "evaluate/manifold.py"]
    files += ["experiments/runner.py", "train/loop.py", "config.py"]
    offenders = [
        f"{name}:{i}"
        for name in files
        for i, line in enumerate((SRC / name).read_text().splitlines(), 1)
        if "object.__setattr__" in line
    ]
    assert offenders == []


def test_the_identity_of_on_manifold_components_is_what_it_was() -> None:
    """The generative model was a private ``_manifold`` field (None in every configuration);
    cells from then keep their ids."""
    for component in (OnManifold(eps=0.1), OBJECTIVES.get("mc-at-on")()):
        identity = identity_dict(component)
        assert identity["_manifold"] is None and "manifold" not in identity


def test_registries_are_typed() -> None:
    untyped = [
        f"{path.relative_to(SRC)}:{i}"
        for path in sorted(SRC.rglob("*.py"))
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"Registry\[Any\]", line)
    ]
    assert untyped == []


# --- the generative model is an argument ----------------------------------------------------------


def test_a_latent_attack_given_its_generator_runs_outside_any_context(
    gaussians: DataSplits, manifold: GaussianManifold, model: nn.Module
) -> None:
    attack = OnManifold(eps=0.3, step_size=0.03, steps=10)
    bound = with_manifold(attack, manifold)
    assert bound.manifold is manifold and attack.manifold is None  # a copy; the original is kept
    points = gaussians.test.head(300)
    result = evaluate_attack(model, bound, points)  # the evaluator's latent-ball checks pass
    assert result.norm == "latent-linf"
    assert result.robust_accuracy < result.clean_accuracy  # it found on-manifold adversarials
    x, y = points.tensors()
    with pytest.raises(ManifoldMissing, match="with_manifold"):
        attack(model, x[:4], y[:4])


def test_binding_is_not_configuration(manifold: GaussianManifold) -> None:
    attack = OnManifold(eps=0.1)
    bound = with_manifold(attack, manifold)
    assert bound == attack and hash(bound) == hash(attack)
    assert to_dict(bound) == to_dict(attack) and identity_dict(bound) == identity_dict(attack)
    assert bound.label() == attack.label() == "on-manifold7" and repr(bound) == repr(attack)
    with pytest.raises(ConfigError, match="unknown key 'manifold'"):
        build(OnManifold, {"eps": 0.1, "manifold": "vae"}, "attack")


def test_components_that_need_no_manifold_are_returned_as_they_are(
    manifold: GaussianManifold,
) -> None:
    pgd = build_component(OBJECTIVES, {"name": "pgd-at"}, "objective")
    assert with_manifold(pgd, manifold) is pgd
    on = OnManifold(eps=0.1)
    assert with_manifold(on, None) is on


def test_fit_hands_its_manifold_to_an_on_manifold_objective(
    gaussians: DataSplits, manifold: GaussianManifold
) -> None:
    cfg = TrainConfig(
        epochs=1, lr=0.05, batch_size=256,
        objective={"name": "mc-at-on", "eta": 0.3, "on_step": 0.03, "on_steps": 3},
    )  # fmt: skip
    assert needs_manifold(OBJECTIVES.get("mc-at-on"))
    torch.manual_seed(0)
    net = create("tiny_mlp", 4, gaussians.in_shape, mean=gaussians.mean, std=gaussians.std)
    with pytest.raises(ManifoldMissing, match="MCATOn"):
        fit(net, gaussians, cfg, seed=0)
    history = fit(net, gaussians, cfg, seed=0, manifold=manifold)
    assert len(history.epochs) == 1


def test_a_lazy_manifold_is_built_once_and_only_when_used(manifold: GaussianManifold) -> None:
    calls: list[int] = []

    def build_it() -> Manifold:
        calls.append(1)
        return manifold

    lazy = LazyManifold(build_it)
    bound = with_manifold(OnManifold(eps=0.1), lazy)
    assert calls == [] and bound.label() == "on-manifold7"
    x = torch.rand(3, 1, 4, 4)
    assert torch.equal(lazy.encode(x), manifold.encode(x))
    assert torch.equal(lazy.decode(manifold.encode(x)), manifold.decode(manifold.encode(x)))
    assert lazy.label() == manifold.label() and calls == [1]


# --- each layer registers into its own registry ---------------------------------------------------


def test_importing_evaluate_leaves_the_data_layers_shifts_alone() -> None:
    code = (
        "import robcomp.data.shifts as d; before = d.SHIFTS.names(); "
        "import robcomp.evaluate as e; "
        "print(before == d.SHIFTS.names(), 'manifold-sets' in d.SHIFTS, "
        "'manifold-sets' in e.SHIFTS, set(before) <= set(e.SHIFTS.names()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={"PYTHONPATH": str(SRC.parent), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert out.stdout.split() == ["True", "False", "True", "True"]


def test_code_above_the_data_layer_looks_shifts_up_in_the_evaluation_registry() -> None:
    """The data layer's registry lacks manifold-sets: a lookup there would refuse it."""
    pattern = re.compile(r"from robcomp\.data\.shifts(\.base)? import .*\bSHIFTS\b")
    allowed = {Path("evaluate/shifts.py")}
    offenders = [
        f"{path.relative_to(SRC)}:{i}"
        for path in sorted(SRC.rglob("*.py"))
        if "data" not in path.relative_to(SRC).parts[:1] and path.relative_to(SRC) not in allowed
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


def test_the_evaluation_shift_registry_sees_both_layers() -> None:
    assert "corruptions" in SHIFTS and "manifold-sets" in SHIFTS
    assert "manifold-sets" not in DATA_SHIFTS
    assert SHIFTS.get("corruptions") is DATA_SHIFTS.get("corruptions")
    shift = build_component(SHIFTS, {"name": "manifold-sets"}, "evaluate.shifts[0]")
    assert needs_manifold(shift)
    with pytest.raises(RegistryError, match="manifold-sets"):
        SHIFTS.get("manifold-set")  # the hint names the extending registry's own entries


def test_an_extending_registry_adds_only_to_itself() -> None:
    low: Registry[int] = Registry("number")
    low.add("one", 1)
    high: Registry[int] = Registry("number", extends=low)
    high.add("two", 2)
    assert high.names() == ["one", "two"] and low.names() == ["one"]
    assert len(high) == 2 and list(high) == ["one", "two"] and high.get("one") == 1
    with pytest.raises(RegistryError, match="already registered"):
        high.add("one", 3)  # a name of the lower layer cannot be shadowed
    with high.temporarily("three", 3):
        assert "three" in high and "three" not in low
    assert "three" not in high


def test_registered_components_are_dataclasses_of_their_protocol() -> None:
    from robcomp.attacks import ATTACKS
    from robcomp.compress import COMPRESSORS

    for registry in (ATTACKS, COMPRESSORS, OBJECTIVES, SHIFTS, datasets.DATASETS):
        for name in registry:
            factory = registry.get(name)
            assert isinstance(factory, type) and dataclasses.is_dataclass(factory), name
