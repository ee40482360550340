"""Shared fixtures: seeded tiny data and a small model trained once per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from robcomp import data as datasets
from robcomp.data.base import DataSplits
from robcomp.models import Classifier, create
from robcomp.train import TrainConfig, fit

# Property tests are deterministic (the same examples every run) and have no time limit: CI's
# two cores are shared, and a deadline would fail a correct test on a busy machine.
settings.register_profile("robcomp", deadline=None, derandomize=True)
settings.load_profile("robcomp")

# Tests run in parallel workers (pytest -n 2) on tiny models: one intra-op thread per worker
# avoids oversubscribing the cores, which slows such models down several times.
torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before `-m` selects on the markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Real-data tests (marked ``realdata``, or using the ``robcomp_data`` fixture) are part
    of the slow tier: they load real checkpoints and datasets and run for tens of seconds
    to minutes, so ``-m "not slow"`` (the fast tier) leaves them out and ``-m slow`` runs them."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if item.get_closest_marker("realdata") or "robcomp_data" in fixtures:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def digits() -> DataSplits:
    return datasets.get("digits", seed=0)


@pytest.fixture(scope="session")
def trained_cnn(digits: DataSplits) -> Classifier:
    """tiny_cnn trained on digits (~95% test accuracy); tests must not modify it."""
    torch.manual_seed(0)
    model = create(
        "tiny_cnn", digits.num_classes, digits.in_shape, mean=digits.mean, std=digits.std
    )
    fit(model, digits, TrainConfig(epochs=10, lr=0.05, batch_size=64), seed=0)
    return model.eval()


@pytest.fixture(scope="session")
def robcomp_data() -> Path:
    """The real-data folder (``ROBCOMP_DATA``); tests using it are skipped when it is unset."""
    root = os.environ.get("ROBCOMP_DATA")
    if not root:
        pytest.skip("ROBCOMP_DATA is not set")
    return Path(root)


@pytest.fixture(scope="session")
def frozen_digits_cnn() -> tuple[Classifier, torch.Tensor, torch.Tensor]:
    """A tiny CNN trained on digits (~95% test accuracy), frozen, in eval mode, with the first
    200 test points; its own copy, so attack tests cannot disturb other fixtures."""
    digits = datasets.get("digits", seed=0)  # not the `digits` fixture: test files shadow it
    torch.manual_seed(0)
    model = create("tiny_cnn", 10, (1, 8, 8), mean=digits.mean, std=digits.std)
    fit(model, digits, TrainConfig(epochs=10, lr=0.05, batch_size=64))
    model.eval().requires_grad_(False)
    x, y = digits.test.tensors()
    return model, x[:200], y[:200]


@pytest.fixture(autouse=True)
def _trained_cnn_is_left_as_found(request: pytest.FixtureRequest) -> Iterator[None]:
    """The session's trained_cnn is shared by many tests: one that leaves it in train mode or
    changes its weights makes later tests fail or pass depending on the order they run in."""
    if "trained_cnn" not in request.fixturenames:
        yield
        return
    model: Classifier = request.getfixturevalue("trained_cnn")
    before = [p.detach().clone() for p in model.parameters()]
    yield
    assert not model.training, f"{request.node.name} left trained_cnn in train mode"
    changed = any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert not changed, f"{request.node.name} changed trained_cnn's weights"
