"""Components state their own facts (gradients, normalization, devices); the runner asks them
instead of recognising names, label prefixes or types."""

from __future__ import annotations

import ast
import inspect
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from robcomp.attacks import ATTACKS
from robcomp.config import build_component
from robcomp.data.base import DataSplits
from robcomp.evaluate.bpda import StraightThrough
from robcomp.evaluate.diagnostics import DEFAULT_EPS, DEFAULT_NORM, diagnose, probe_threat_model
from robcomp.experiments import pipeline, runner
from robcomp.experiments.spec import CellConfig, EvaluateSpec
from robcomp.models import (
    Capabilities,
    GradientFree,
    capabilities,
    create,
    factory_for,
    model_device,
    normalizes_inputs,
)


@pytest.mark.parametrize("name", ATTACKS.names())
def test_every_attack_says_whether_it_uses_gradients(name: str) -> None:
    attack = build_component(ATTACKS, {"name": name, "eps": 0.1}, "test")
    assert isinstance(attack.uses_gradients, bool)
    assert attack.uses_gradients == (name not in ("square", "salt-and-pepper"))


def test_a_cascade_of_gradient_free_attacks_uses_no_gradients() -> None:
    spec = {"name": "autoattack", "eps": 0.1, "version": "custom", "attacks": ["square"]}
    assert build_component(ATTACKS, spec, "test").uses_gradients is False
    spec["attacks"] = ["square", "apgd-ce"]
    assert build_component(ATTACKS, spec, "test").uses_gradients is True


def test_only_the_ensemble_factory_normalizes_its_own_inputs() -> None:
    assert normalizes_inputs(factory_for("ensemble"))
    assert not normalizes_inputs(factory_for("tiny_cnn"))


class _Masked(nn.Module):
    """A model whose own forward gives no gradient (rounded logits) with a differentiable twin:
    not an int8 model, but it has the same capability, so it must be attacked the same way."""

    trainable = False

    def __init__(self, twin: nn.Module) -> None:
        super().__init__()
        self.twin = twin

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.twin(x).round()

    def eager(self) -> _Masked:
        return self

    def capabilities(self) -> Capabilities:
        return Capabilities(gradients=False, trainable=False, eager=True)


def test_gradient_free_is_a_capability_not_a_type(trained_cnn: nn.Module) -> None:
    masked = _Masked(trained_cnn)
    assert isinstance(masked, GradientFree)
    assert not isinstance(trained_cnn, GradientFree)
    assert not isinstance(StraightThrough(masked, trained_cnn), GradientFree)


def test_any_gradient_free_model_is_attacked_through_its_twin(
    trained_cnn: nn.Module, digits: DataSplits
) -> None:
    cfg = CellConfig(
        evaluate=EvaluateSpec(
            attacks=(
                {"name": "pgd", "eps": 0.1, "steps": 3},
                {"name": "square", "eps": 0.1, "queries": 20},
            ),
            limit=40,
            black_box_queries=20,
            diagnostics_points=40,
        )
    )
    masked = _Masked(trained_cnn)
    caps = capabilities(masked)
    evaluation = pipeline._evaluate(cfg, masked, digits, trained_cnn, caps)
    # the gradient attack ran as BPDA + transfer + black box; Square ran on the model itself
    (route,) = evaluation.routes
    assert (route["attack"], route["eps"]) == ("pgd3-linf", 0.1)
    assert set(route["per_route"]) == {
        "bpda", "transfer", "black-box",
    }  # fmt: skip
    assert [a.uses_gradients for a in evaluation.attacks] == [True, False]
    metrics, flags = pipeline._diagnostics(cfg, masked, digits, evaluation, caps)
    checks = {f["check"] for f in flags}
    assert "black_box_weaker" in checks  # Square is recognised as black box by its capability
    assert metrics


def test_the_default_threat_model_comes_from_one_place() -> None:
    params = inspect.signature(diagnose).parameters
    assert (params["norm"].default, params["eps"].default) == (DEFAULT_NORM, DEFAULT_EPS)
    assert probe_threat_model([]) == (DEFAULT_NORM, DEFAULT_EPS)
    # unbounded (minimal-norm) and L1 attacks give no threat model to probe
    assert probe_threat_model([("l2", float("inf")), ("l1", 5.0)]) == (DEFAULT_NORM, DEFAULT_EPS)
    assert probe_threat_model([("l1", 5.0), ("l2", 0.5)]) == ("l2", 0.5)
    assert probe_threat_model([("l2", 0.5), ("linf", 0.1)], norms=("linf",)) == ("linf", 0.1)


def test_diagnostics_without_a_bounded_attack_use_the_default_threat_model(
    trained_cnn: nn.Module, digits: DataSplits, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, object] = {}

    def spy(model: nn.Module, x: Tensor, y: Tensor, **kwargs: object) -> list[object]:
        seen.update(kwargs)
        return []

    monkeypatch.setattr(pipeline, "diagnose", spy)
    cfg = CellConfig(evaluate=EvaluateSpec(diagnostics_points=10))
    pipeline._diagnostics(cfg, trained_cnn, digits, pipeline.Evaluation(), Capabilities())
    assert (seen["norm"], seen["eps"]) == (DEFAULT_NORM, DEFAULT_EPS)


@pytest.mark.parametrize("module", [runner, pipeline])
def test_the_runner_names_no_attack_model_or_compressor(module: object) -> None:
    """The runner and its pipeline ask components for their capabilities (one declared
    record, read once); they do not recognise them."""
    tree = ast.parse(Path(inspect.getfile(module)).read_text())  # type: ignore[arg-type]
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)}
    for special_case in ("Square", "PGD", "QuantizedModel", "startswith", "getattr"):
        assert special_case not in names, special_case
    assert "ensemble" not in strings


def _isinstance_checks(path: Path) -> list[str]:
    """The class names every ``isinstance(x, Name)`` in ``path`` tests against."""
    tree = ast.parse(path.read_text())
    return [
        ast.unparse(call.args[1])
        for call in ast.walk(tree)
        if isinstance(call, ast.Call)
        and isinstance(call.func, ast.Name)
        and call.func.id == "isinstance"
        and len(call.args) == 2
    ]


def test_models_and_executors_are_asked_for_capabilities_not_types() -> None:
    """No isinstance ladder on the kind of model (int8) or executor (local): the code asks
    :func:`robcomp.models.capabilities` and ``Executor.one_at_a_time``."""
    src = Path(inspect.getfile(runner)).parents[1]
    found = {
        f"{p.relative_to(src)}: {name}"
        for p in src.rglob("*.py")
        for name in _isinstance_checks(p)
        if name in ("GradientFree", "LocalExecutor", "RayExecutor", "QuantizedModel")
    }
    assert not found, found


def test_a_model_declares_its_capabilities(trained_cnn: nn.Module) -> None:
    assert capabilities(trained_cnn) == Capabilities()  # an ordinary module declares nothing
    masked = capabilities(_Masked(trained_cnn))
    assert not masked.gradients and not masked.trainable and masked.eager


def test_model_device_reads_parameters_then_buffers() -> None:
    model = create("tiny_mlp", 10, (1, 8, 8))
    assert model_device(model) == torch.device("cpu")
    assert model_device(model.to("meta")) == torch.device("meta")
    assert model_device(nn.Identity()) == torch.device("cpu")
    assert replace(CellConfig(), seed=1).seed == 1
