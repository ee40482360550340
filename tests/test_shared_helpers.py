"""One implementation each of what compressors and attacks share: the first/last-layer choice,
sparsity validation, the forward-pass layer order, the Record's cost fields and the PGD step
loop (issue 10, point 12)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor, nn

from robcomp.attacks import PGD
from robcomp.compress import COMPRESSORS
from robcomp.compress.base import Record
from robcomp.compress.efficiency import Efficiency, execution_order, measure, select_layers
from robcomp.data.base import DataSplits
from robcomp.train.adversarial import ascend, inner_attack_mode, summed_ce


def test_select_layers_drops_first_and_last_only_when_asked_and_possible() -> None:
    assert select_layers([1, 2, 3, 4], include_first_last=False) == [2, 3]
    assert select_layers([1, 2, 3, 4], include_first_last=True) == [1, 2, 3, 4]
    assert select_layers([1, 2], include_first_last=False) == [1, 2]  # nothing would be left


class Shuffled(nn.Module):
    """Layers defined in another order than the forward pass runs them, plus an unused one."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 3)
        self.unused = nn.Linear(3, 3)
        self.stem = nn.Conv2d(1, 4, 3)
        self.norm = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.stem(x)).mean((2, 3)))


def test_execution_order_follows_the_forward_pass_and_moves_no_statistics() -> None:
    model = Shuffled().train()
    before = model.norm.running_mean.clone()
    assert execution_order(model, (1, 5, 5)) == ["stem", "head"]
    assert model.training and torch.equal(model.norm.running_mean, before)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("magnitude", {}),
        ("random", {}),
        ("gradual", {}),
        ("gradual", {"sparsity": 0.5, "initial_sparsity": 1.0}),
        ("hydra", {}),
        ("admm", {}),
    ],
)
def test_sparsity_out_of_range_names_the_compressor(name: str, options: dict[str, float]) -> None:
    options = {"sparsity": 1.0, **options}
    with pytest.raises(ValueError, match=rf"^{name}\.\w*sparsity must be in \[0, 1\), got 1"):
        COMPRESSORS.get(name)(**options)


@pytest.mark.parametrize("name", ["magnitude", "random", "gradual"])
def test_pruning_labels_carry_the_sparsity(name: str) -> None:
    cls = COMPRESSORS.get(name)
    assert cls(sparsity=0.5).label() != cls(sparsity=0.9).label()
    assert cls(sparsity=0.9).label().endswith("-0.9")


def test_a_record_is_an_efficiency_plus_what_the_compressor_did(
    trained_cnn: nn.Module, digits: DataSplits
) -> None:
    own = {f.name for f in dataclasses.fields(Record)} - {
        f.name for f in dataclasses.fields(Efficiency)
    }
    assert own == {"method", "seconds", "details"}
    _, record = COMPRESSORS.get("magnitude")(sparsity=0.5)(trained_cnn, digits)
    assert isinstance(record, Efficiency)
    assert record.nonzero_params < record.params
    cost = measure(trained_cnn, digits.in_shape)
    assert (record.params, record.macs) == (cost.params, cost.macs)


@pytest.mark.parametrize(("norm", "eps", "step"), [("linf", 0.1, 0.02), ("l1", 2.0, 0.5)])
def test_adversarial_training_and_pgd_take_the_same_steps(
    trained_cnn: nn.Module, digits: DataSplits, norm: str, eps: float, step: float
) -> None:
    # One step loop: the inner maximisation of training is PGD from the same start, step for
    # step (for L1 too, whose sparse steps skip pixels pinned at a face of the [0, 1] box).
    x, y = digits.test.tensors()
    x, y = x[:64], y[:64]
    attack = PGD(eps=eps, norm=norm, steps=5, step_size=step, random_start=False)
    with inner_attack_mode(trained_cnn, "eval") as model:
        trained = ascend(model, x, x, summed_ce(y), eps=eps, step=step, steps=5, norm=norm)
        attacked = attack(model, x, y)
    assert torch.equal(trained, attacked)
