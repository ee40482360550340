"""Ensembles (Marshall 2020, Table C.1): probability averaging by hand, one-member identity,
gradients through all members, frozen members, and building from an experiment-style spec."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from robcomp.attacks import PGD
from robcomp.config import ConfigError
from robcomp.data.base import DataSplits
from robcomp.evaluate import accuracy
from robcomp.experiments.runner import build_model
from robcomp.experiments.spec import resolve
from robcomp.models import Classifier, create, load_checkpoint, save_checkpoint
from robcomp.models.ensemble import Ensemble, ensemble_of
from robcomp.train import TrainConfig, fit


def _softmax(z: Tensor) -> Tensor:
    e = torch.exp(z - z.max(1, keepdim=True).values)
    return e / e.sum(1, keepdim=True)


def _mlp(seed: int, hidden: int = 16) -> Classifier:
    torch.manual_seed(seed)
    return create("tiny_mlp", 10, (1, 8, 8), hidden=hidden).eval()


def _spec(name: str, digits: DataSplits, **options: Any) -> dict[str, Any]:
    return {"name": name, "num_classes": 10, "in_shape": list(digits.in_shape),
            "mean": list(digits.mean), "std": list(digits.std), "options": options}  # fmt: skip


@pytest.fixture(scope="module")
def folders(
    trained_cnn: Classifier, digits: DataSplits, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """The trained CNN as a checkpoint folder, and a tiny MLP as a bare safetensors file."""
    root = tmp_path_factory.mktemp("members")
    save_checkpoint(trained_cnn, root / "cnn", _spec("tiny_cnn", digits))
    mlp = create("tiny_mlp", 10, digits.in_shape, mean=digits.mean, std=digits.std, hidden=16)
    fit(mlp, digits, TrainConfig(epochs=3, lr=0.1, batch_size=64), seed=0)
    save_file(
        {k: v.contiguous() for k, v in mlp.state_dict().items()}, str(root / "mlp.safetensors")
    )
    return {"cnn": root / "cnn", "mlp": root / "mlp.safetensors"}


def test_output_is_the_log_of_the_weighted_average_of_probabilities() -> None:
    a, b = _mlp(0), _mlp(1)
    model = ensemble_of([a, b], weights=[3.0, 1.0]).eval()
    x = torch.rand(7, 1, 8, 8)
    with torch.no_grad():
        expected = 0.75 * _softmax(a(x)) + 0.25 * _softmax(b(x))  # by hand
        out = model(x)
    torch.testing.assert_close(out.exp(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(7))
    assert torch.equal(out.argmax(1), expected.argmax(1))
    # Log-probabilities behave as logits: their softmax is the mixture itself.
    torch.testing.assert_close(_softmax(out), expected, rtol=1e-5, atol=1e-6)
    assert all(p.requires_grad for p in a.parameters())  # ensemble_of copies, never mutates


def test_one_member_ensemble_predicts_as_the_member(
    trained_cnn: Classifier, digits: DataSplits, folders: dict[str, Path]
) -> None:
    model = create("ensemble", 10, digits.in_shape, members=[str(folders["cnn"])]).eval()
    x, _ = digits.test.tensors()
    with torch.no_grad():
        member = trained_cnn(x)
        out = model(x)
    torch.testing.assert_close(out, member.log_softmax(1), rtol=1e-5, atol=1e-5)
    assert torch.equal(out.argmax(1), member.argmax(1))
    assert accuracy(model, digits.test) == accuracy(trained_cnn, digits.test)


def test_input_gradient_flows_through_every_member() -> None:
    a, b = _mlp(0), _mlp(1)
    w = (0.4, 0.6)
    model = ensemble_of([a, b], weights=w)
    x, y = torch.rand(5, 1, 8, 8, requires_grad=True), torch.tensor([0, 1, 2, 3, 4])
    (grad,) = torch.autograd.grad(-model(x)[torch.arange(5), y].sum(), x)
    # d/dx -log(sum_k w_k p_k,y) = -sum_k w_k grad p_k,y / sum_k w_k p_k,y, member by member.
    probs, grads = [], []
    for member in (a, b):
        xi = x.detach().requires_grad_(True)
        p_y = _softmax(member(xi))[torch.arange(5), y]
        probs.append(p_y.detach())
        grads.append(torch.autograd.grad(p_y.sum(), xi)[0])
    mixture = (w[0] * probs[0] + w[1] * probs[1]).view(-1, 1, 1, 1)
    expected = -(w[0] * grads[0] + w[1] * grads[1]) / mixture
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)
    assert grad.abs().sum() > 0


def test_free_members_train_and_frozen_members_stay_put(
    digits: DataSplits, folders: dict[str, Path]
) -> None:
    model = create(
        "ensemble", 10, digits.in_shape,
        members=[{"weights": str(folders["cnn"])}, {"name": "tiny_mlp", "options": {"hidden": 8}}],
    )  # fmt: skip
    net: Any = model.net
    assert net.frozen == (True, False)  # loaded weights: frozen by default; fresh: trained
    frozen_state = {k: v.clone() for k, v in net.members[0].state_dict().items()}
    free_before = [p.clone() for p in net.members[1].parameters()]
    model.train()
    assert not net.members[0].training and net.members[1].training
    x, y = next(digits.train.batches(32))
    nn.functional.cross_entropy(model(x), y).backward()
    assert all(p.grad is None for p in net.members[0].parameters())
    assert all(p.grad is not None for p in net.members[1].parameters())
    fit(model, digits, TrainConfig(epochs=1, lr=0.05, batch_size=128, keep_best=False))
    for key, value in net.members[0].state_dict().items():  # BatchNorm statistics included
        assert torch.equal(value, frozen_state[key]), key
    assert any(not torch.equal(p, q) for p, q in zip(net.members[1].parameters(), free_before))


EXPERIMENT = """
data: {name: digits}
model:
  name: ensemble
  mean: [0.0]
  std: [1.0]
  options:
    members:
      - {weights: CNN}
      - {name: tiny_mlp, weights: MLP, options: {hidden: 16}, mean: MEAN, std: STD}
    weights: [2, 1]
train: {epochs: 0}
evaluate:
  attacks: [{name: pgd, eps: 0.1, steps: 5}]
"""


def _experiment(digits: DataSplits, folders: dict[str, Path], mean: bool) -> dict[str, Any]:
    text = EXPERIMENT.replace("CNN", str(folders["cnn"])).replace("MLP", str(folders["mlp"]))
    text = text.replace("MEAN", str(list(digits.mean))).replace("STD", str(list(digits.std)))
    raw = yaml.safe_load(text)
    if not mean:  # what a user gets when leaving the ensemble's normalisation to the data's
        del raw["model"]["mean"], raw["model"]["std"]
    return raw


def test_created_from_an_experiment_spec_and_round_trips(
    trained_cnn: Classifier, digits: DataSplits, folders: dict[str, Path], tmp_path: Path
) -> None:
    cfg = resolve(_experiment(digits, folders, mean=True), "experiment.yaml")
    model, spec = build_model(cfg, digits)
    model.eval()
    x, y = digits.test.tensors()
    mlp = create("tiny_mlp", 10, digits.in_shape, mean=digits.mean, std=digits.std, hidden=16)
    mlp.load_state_dict(load_file(str(folders["mlp"])))
    with torch.no_grad():
        expected = (2 / 3) * _softmax(trained_cnn(x)) + (1 / 3) * _softmax(mlp.eval()(x))
        out = model(x)
    torch.testing.assert_close(out.exp(), expected, rtol=1e-5, atol=1e-6)

    save_checkpoint(model, tmp_path / "ensemble", spec)
    loaded, _ = load_checkpoint(tmp_path / "ensemble")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), out, rtol=0, atol=0)

    x_adv = PGD(eps=0.1, steps=5)(loaded, x[:100], y[:100])  # attacks run through all members
    assert (x_adv - x[:100]).abs().max() <= 0.1 + 1e-6
    with torch.no_grad():
        assert (loaded(x_adv).argmax(1) == y[:100]).float().mean() < accuracy(loaded, digits.test)


def test_normalising_twice_is_avoided_by_the_runner_and_an_error_elsewhere(
    digits: DataSplits, folders: dict[str, Path]
) -> None:
    x = digits.test.tensors()[0][:4]
    outputs = []
    for mean in (True, False):  # the runner gives an ensemble an identity Normalize by default
        model, _ = build_model(resolve(_experiment(digits, folders, mean), "e.yaml"), digits)
        with torch.no_grad():
            outputs.append(model.eval()(x))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    members = [{"weights": str(folders["cnn"])}]
    twice = create("ensemble", 10, digits.in_shape, mean=digits.mean, std=digits.std,
                   members=members)  # fmt: skip
    with pytest.raises(ValueError, match=r"model\.mean"):
        twice(x)
    # Members built by name without their own normalisation share the ensemble's: allowed.
    shared = create("ensemble", 10, digits.in_shape, mean=digits.mean, std=digits.std)
    assert shared(x).shape == (4, 10)


def test_mistakes_are_reported_where_they_are_made(
    digits: DataSplits, folders: dict[str, Path]
) -> None:
    shape, cnn = digits.in_shape, str(folders["cnn"])
    cases: list[tuple[dict[str, Any], str]] = [
        ({"members": [{"name": "tiny_mlp"}], "weights": [1.0, 2.0]}, "2 weights"),
        ({"members": [{"name": "tiny_mlp"}, {"name": "tiny_mlp"}], "weights": [1, 0]}, "positive"),
        ({"members": []}, "at least one"),
        ({"members": [{"weights": str(folders["mlp"])}]}, "name is required"),
        ({"members": [{"weights": cnn, "options": {"hidden": 3}}]}, "checkpoint folder"),
        ({"members": [{"name": "tiny_mlp", "weights": cnn}]}, "holds 'tiny_cnn'"),
        ({"members": [{"name": "tiny_mlp", "hidden": 3}]}, "unknown key 'hidden'"),
    ]
    for options, message in cases:
        with pytest.raises((ValueError, ConfigError), match=message):
            create("ensemble", 10, shape, **options)
    with pytest.raises(ValueError, match="classes"):
        create("ensemble", 3, shape, members=[cnn])


def test_ensemble_module_rejects_mismatched_flags() -> None:
    with pytest.raises(ValueError, match="frozen"):
        Ensemble([_mlp(0)], frozen=[True, False])
