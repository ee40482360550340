"""Robust distillation (ARD, RSLAD, IAD-I, IAD-II): the reference loss scalings by hand, which
logits go where, the inner attacks, IAD's switch at ``begin``, and robustness gained on digits."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from robcomp.attacks import PGD
from robcomp.compress.distill import DistillTo
from robcomp.config import ConfigError
from robcomp.data.base import DataSplits
from robcomp.evaluate import accuracy
from robcomp.experiments.spec import resolve
from robcomp.models import Classifier, create, save_checkpoint
from robcomp.train import OBJECTIVES, TrainConfig, fit
from robcomp.train import robust_distill as rd
from robcomp.train.distill import registered_teacher

EPS = 0.15  # digits pixels are in [0, 1] with 17 grey levels; 0.15 breaks a CE-trained MLP
ATTACK = {"eps": EPS, "step": EPS / 2, "steps": 3}
# Adam: the references' KL reductions scale the gradients by 1/C (and tau^2), which SGD would
# have to compensate with the reference's 200-300 epochs; Adam's steps do not depend on it.
BUDGET: dict[str, Any] = {
    "epochs": 10, "optimizer": "adam", "lr": 0.01, "weight_decay": 0.0, "batch_size": 64,
}  # fmt: skip


def _softmax(z: Tensor) -> Tensor:
    e = torch.exp(z - z.max(1, keepdim=True).values)
    return e / e.sum(1, keepdim=True)


def _kl(p: Tensor, q: Tensor) -> Tensor:
    """Per-row KL(p || q) of probability rows, by the definition."""
    return (p * (p.log() - q.log())).sum(1)


def _ce(z: Tensor, y: Tensor) -> Tensor:
    return -_softmax(z)[torch.arange(len(y)), y].log().mean()


@pytest.fixture()
def logits() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    names = ("s_adv", "s_nat", "t_nat", "t_adv", "st_adv")
    out = {n: 3 * torch.randn(6, 5, generator=g) for n in names}
    out["y"] = torch.tensor([0, 1, 2, 3, 4, 0])
    return out


# ------------------------------------------------------------------ loss scalings by hand


def test_ard_loss_is_mean_over_batch_and_classes(logits: dict[str, Tensor]) -> None:
    s, t, n, y = logits["s_adv"], logits["t_nat"], logits["s_nat"], logits["y"]
    tau, alpha = 30.0, 0.8
    kl = _kl(_softmax(t / tau), _softmax(s / tau)).sum() / (6 * 5)  # nn.KLDivLoss(): / (B * C)
    expected = alpha * tau**2 * kl + (1 - alpha) * _ce(n, y)
    loss, kl_out, ce = rd.ard_loss(s, n, t, y, tau=tau, alpha=alpha)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert float(kl_out) == pytest.approx(float(kl), rel=1e-5)
    assert float(ce) == pytest.approx(float(_ce(n, y)), rel=1e-5)


def test_rslad_loss_is_five_sixths_adversarial_kl_mean_over_b_c(
    logits: dict[str, Tensor],
) -> None:
    s, n, t = logits["s_adv"], logits["s_nat"], logits["t_nat"]
    p = _softmax(t)  # temperature 1
    expected = (5 / 6) * _kl(p, _softmax(s)).sum() / 30 + (1 / 6) * _kl(p, _softmax(n)).sum() / 30
    loss, _, _ = rd.rslad_loss(s, n, t, adv_weight=5 / 6)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    scaled, _, _ = rd.rslad_loss(s, n, t, adv_weight=5 / 6, scale=10.0)  # CIFAR-100 setting
    assert float(scaled) == pytest.approx(10 * float(expected), rel=1e-5)


def test_iad1_loss_before_and_after_begin(logits: dict[str, Tensor]) -> None:
    s, n, t, y = logits["s_adv"], logits["s_nat"], logits["t_nat"], logits["y"]
    tau, alpha, beta = 2.0, 0.9, 0.1
    kl_t = _kl(_softmax(t / tau), _softmax(s / tau)).mean()  # batch mean, unlike ARD
    warmup = alpha * tau**2 * kl_t + (1 - alpha) * _ce(n, y)
    loss, *_ = rd.iad1_loss(s, n, t, y, None, tau=tau, alpha=alpha)
    assert float(loss) == pytest.approx(float(warmup), rel=1e-5)

    trust = _softmax(logits["t_adv"])[torch.arange(6), y] ** beta
    torch.testing.assert_close(rd.trust(logits["t_adv"], y, beta), trust)
    self_kl = ((1 - trust) * _kl(_softmax(n), _softmax(s))).mean()
    loss, _, self_out, _ = rd.iad1_loss(s, n, t, y, trust, tau=tau, alpha=alpha)
    assert float(loss) == pytest.approx(float(warmup + alpha * self_kl), rel=1e-5)
    assert float(self_out) == pytest.approx(float(self_kl), rel=1e-5)


def test_iad2_loss_before_and_after_begin(logits: dict[str, Tensor]) -> None:
    s, n, ta, st, y = (logits[k] for k in ("s_adv", "s_nat", "t_adv", "st_adv", "y"))
    tau, a1, a2 = 2.0, 0.5, 0.25
    kl_t = _kl(_softmax(ta / tau), _softmax(s / tau))  # (B,)
    kl_n = _kl(_softmax(st / tau), _softmax(s / tau)).mean()
    ce = _ce(s, y)  # on the adversarial logits
    warmup = (1 - a1 - a2) * ce + a1 * tau**2 * kl_t.mean() + a2 * tau**2 * kl_n
    loss, *_ = rd.iad2_loss(s, n, ta, st, y, None, tau=tau, alpha1=a1, alpha2=a2)
    assert float(loss) == pytest.approx(float(warmup), rel=1e-5)

    w = torch.tensor([1.0, 0.5, 0.9, 0.2, 0.7, 0.0])
    mixed = (w * kl_t + (1 - w) * _kl(_softmax(n), _softmax(s))).mean()
    expected = (1 - a1 - a2) * ce + a1 * tau**2 * mixed + a2 * tau**2 * kl_n
    loss, *_ = rd.iad2_loss(s, n, ta, st, y, w, tau=tau, alpha1=a1, alpha2=a2)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


# ------------------------------------------------------------------ which logits go where


def _linear(seed: int) -> Classifier:
    torch.manual_seed(seed)
    return create("tiny_mlp", 5, (1, 2, 2), hidden=4)


@pytest.fixture()
def wiring(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Linear-ish student and teachers, and adversaries replaced by a known shift, so each
    objective's loss can be recomputed from the logits it should use."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 1, 2, 2, generator=g) * 0.8
    x_adv = x + 0.1

    def shifted(model: nn.Module, x_in: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return x_in + 0.1

    monkeypatch.setattr(rd, "ce_adversary", shifted)
    monkeypatch.setattr(rd, "kl_adversary", shifted)
    student, teacher, natural = _linear(0), _linear(1), _linear(2)
    with registered_teacher(teacher) as t, registered_teacher(natural) as n:
        yield {
            "x": x, "x_adv": x_adv, "y": torch.tensor([0, 1, 2, 3, 4, 0]), "student": student,
            "teacher": teacher.eval(), "natural": natural.eval(), "handles": (t, n),
        }  # fmt: skip


def test_objectives_feed_the_reference_logits_to_their_losses(wiring: dict[str, Any]) -> None:
    x, xa, y, s = wiring["x"], wiring["x_adv"], wiring["y"], wiring["student"]
    t_model, n_model = wiring["teacher"], wiring["natural"]
    t, n = wiring["handles"]
    with torch.no_grad():
        sa, sn, tn, ta, na = s(xa), s(x), t_model(x), t_model(xa), n_model(xa)
        get = OBJECTIVES.get
        cases = {
            "ard": (get("ard")(teacher=t), rd.ard_loss(sa, sn, tn, y, tau=30, alpha=1)),
            "rslad": (get("rslad")(teacher=t), rd.rslad_loss(sa, sn, tn, adv_weight=5 / 6)),
            "iad-i": (get("iad-i")(teacher=t), rd.iad1_loss(sa, sn, tn, y, None, tau=1, alpha=1)),
            "iad-ii": (
                get("iad-ii")(teacher=t, natural_teacher=n),
                rd.iad2_loss(sa, sn, ta, na, y, None, tau=1, alpha1=0.5, alpha2=0.25),
            ),
        }
    for name, (objective, expected) in cases.items():
        out = objective(s, x, y)
        assert float(out["loss"].detach()) == pytest.approx(float(expected[0]), rel=1e-5), name
        torch.testing.assert_close(out["logits"].detach(), sn, msg=name)  # clean logits
        out["loss"].backward()  # the student gets gradients
        assert all(p.grad is not None for p in s.parameters()), name
        s.zero_grad()


def test_iad_switches_from_the_ard_warmup_at_begin(wiring: dict[str, Any]) -> None:
    x, xa, y, s = wiring["x"], wiring["x_adv"], wiring["y"], wiring["student"]
    t, n = wiring["handles"]
    with torch.no_grad():
        sa, sn, tn, ta, na = (
            s(xa),
            s(x),
            wiring["teacher"](x),
            wiring["teacher"](xa),
            wiring["natural"](xa),
        )
    w = rd.trust(ta, y, 0.1)
    iad1 = OBJECTIVES.get("iad-i")(teacher=t, begin=2)
    iad2 = OBJECTIVES.get("iad-ii")(teacher=t, natural_teacher=n, begin=2)
    for epoch, on in [(0, False), (1, False), (2, True), (5, True)]:
        for objective in (iad1, iad2):
            objective.set_progress(epoch, 3, 10, 6)
            assert objective.introspecting is on
        expected1 = rd.iad1_loss(sa, sn, tn, y, w if on else None, tau=1, alpha=1)[0]
        expected2 = rd.iad2_loss(
            sa, sn, ta, na, y, w if on else None, tau=1, alpha1=0.5, alpha2=0.25
        )[0]
        out1, out2 = iad1(s, x, y), iad2(s, x, y)
        assert float(out1["loss"].detach()) == pytest.approx(float(expected1), rel=1e-5), epoch
        assert float(out2["loss"].detach()) == pytest.approx(float(expected2), rel=1e-5), epoch
        assert ("trust" in out1) is on and (float(out1["self_kl"].detach()) > 0) is on
    # Before begin, IAD-I is ARD with a batch-mean KL: C times ARD's at equal tau and alpha.
    iad1.set_progress(0, 0, 10, 6)
    ard = OBJECTIVES.get("ard")(teacher=t, tau=1.0)
    assert float(iad1(s, x, y)["loss"].detach()) == pytest.approx(
        5 * float(ard(s, x, y)["loss"].detach()), rel=1e-5
    )


def resolve_objective(spec: dict[str, Any]) -> Any:
    return TrainConfig(objective=spec).build_objective()


def test_progress_is_state_not_configuration() -> None:
    a = OBJECTIVES.get("iad-i")(teacher="t")
    b = OBJECTIVES.get("iad-i")(teacher="t")
    a.set_progress(70, 0, 10, 100)
    assert a.introspecting and not b.introspecting
    assert a == b and hash(a) == hash(b) and "progress" not in repr(a)
    with pytest.raises(ConfigError, match="progress"):
        resolve_objective({"name": "iad-i", "teacher": "t", "progress": {}})


def test_fit_tells_iad_the_epoch(digits: DataSplits) -> None:
    torch.manual_seed(0)
    teacher = create("tiny_mlp", 10, digits.in_shape, hidden=16)
    student = create("tiny_mlp", 10, digits.in_shape, hidden=8)
    with registered_teacher(teacher) as handle:
        spec = {
            "name": "iad-i",
            "teacher": handle,
            "begin": 1,
            "eps": 0.05,
            "step": 0.05,
            "steps": 1,
        }
        cfg = TrainConfig(epochs=2, batch_size=256, lr=0.05, objective=spec, keep_best=False)
        history = fit(student, digits, cfg)
    first, second = history.epochs
    assert "trust" not in first and first["self_kl"] == 0.0
    assert 0.0 < second["trust"] <= 1.0 and second["self_kl"] > 0.0


# ------------------------------------------------------------------ the inner attacks


class _Recorder(nn.Module):
    """A linear classifier that records its mode on every forward pass with input gradients."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 3)
        self.modes: list[bool] = []

    def forward(self, x: Tensor) -> Tensor:
        if x.requires_grad:
            self.modes.append(self.training)
        return self.fc(x.flatten(1))


@pytest.mark.parametrize(
    ("name", "attack_in_train_mode"), [("ard", True), ("rslad", False), ("iad-i", True)]
)
def test_attack_mode_follows_the_reference(name: str, attack_in_train_mode: bool) -> None:
    student, teacher = _Recorder(), _Recorder()
    x, y = torch.rand(5, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1])
    with registered_teacher(teacher) as handle:
        objective = OBJECTIVES.get(name)(teacher=handle, steps=3)
        for training in (True, False):
            student.train(training)
            student.modes.clear()
            objective(student, x, y)
            assert student.modes == [attack_in_train_mode] * 3
            assert student.training is training  # the caller's mode is restored


@pytest.mark.parametrize("kind", ["ce", "kl"])
def test_adversaries_stay_in_the_ball_and_raise_their_loss(
    kind: str, trained_cnn: nn.Module, digits: DataSplits
) -> None:
    model = trained_cnn
    x, y = digits.test.tensors()
    x, y = x[:64], y[:64]
    with torch.no_grad():
        t_nat = model(x)
    torch.manual_seed(0)
    if kind == "ce":
        x_adv = rd.ce_adversary(model, x, y, eps=0.1, step=0.05, steps=5)
        loss = lambda z: nn.functional.cross_entropy(z, y)  # noqa: E731
    else:
        x_adv = rd.kl_adversary(model, x, t_nat, eps=0.1, step=0.05, steps=5)
        loss = lambda z: rd.kl_rows(z, t_nat).mean()  # noqa: E731
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert not model.training
    with torch.no_grad():
        assert float(loss(model(x_adv))) > float(loss(model(x))) + 0.1


def test_validation_names_the_field() -> None:
    for spec, field in [
        ({"name": "ard", "teacher": "t", "tau": 0.0}, "tau"),
        ({"name": "ard", "teacher": "t", "alpha": 1.5}, "alpha"),
        ({"name": "rslad", "teacher": "t", "eps": 8}, "eps"),
        ({"name": "rslad", "teacher": "t", "steps": 0}, "steps"),
        ({"name": "rslad", "teacher": "t", "adv_weight": -0.1}, "adv_weight"),
        ({"name": "iad-i", "teacher": "t", "begin": -1}, "begin"),
        ({"name": "iad-ii", "teacher": "t"}, "natural_teacher"),
        ({"name": "iad-ii", "teacher": "t", "natural_teacher": "n", "alpha1": 0.9}, "alpha1"),
    ]:
        with pytest.raises(ConfigError, match=field):
            resolve_objective(spec)


# ------------------------------------------------------------------ the distill compressor


def test_distill_takes_a_robust_objective_by_name(tmp_path: Path) -> None:
    compressor = DistillTo(student="tiny_mlp", objective="ard", objective_options={"eps": 0.1})
    assert compressor.label() == "ard-tiny_mlp"
    assert DistillTo(student="tiny_mlp").label() == "distill-tiny_mlp"  # kd unchanged
    with pytest.raises(ConfigError, match="natural_teacher"):
        DistillTo(student="tiny_mlp", objective="iad-ii")
    with pytest.raises(ConfigError, match="alpha"):
        DistillTo(student="tiny_mlp", objective="rslad", alpha=0.5)  # rslad has no alpha
    with pytest.raises(ValueError, match="teacher"):
        DistillTo(student="tiny_mlp", objective="ard", objective_options={"teacher": "x"})
    raw = {
        "data": {"name": "digits"},
        "train": {"epochs": 1, "objective": {"name": "pgd-at", "eps": 0.1}},
        "compress": {
            "name": "distill", "student": "tiny_mlp", "objective": "iad-ii",
            "objective_options": {"natural_teacher": str(tmp_path), "begin": 5, "eps": "8/255"},
            "train": {"epochs": 3},
        },
    }  # fmt: skip
    assert resolve(raw, "experiment.yaml").compress["objective"] == "iad-ii"  # validated


def _pgd_accuracy(model: nn.Module, digits: DataSplits) -> float:
    x, y = digits.test.tensors()
    model.eval()
    x_adv = PGD(eps=EPS, steps=10, step_size=EPS / 4)(model, x, y)
    with torch.no_grad():
        return float((model(x_adv).argmax(1) == y).float().mean())


@pytest.fixture(scope="module")
def robust_teacher(digits: DataSplits) -> Classifier:
    """tiny_cnn adversarially trained on digits (PGD-AT, about 80 % clean, 35 % PGD at 0.15)."""
    torch.manual_seed(0)
    model = create("tiny_cnn", 10, digits.in_shape, mean=digits.mean, std=digits.std)
    objective = {"name": "pgd-at", **ATTACK}
    fit(model, digits, TrainConfig(**{**BUDGET, "epochs": 6}, objective=objective), seed=0)
    return model.eval()


@pytest.fixture(scope="module")
def ce_student(digits: DataSplits) -> tuple[float, float]:
    """(clean, PGD) accuracy of the student architecture trained with CE on the same budget."""
    torch.manual_seed(0)  # as DistillTo(seed=0) initialises its student
    model = create("tiny_mlp", 10, digits.in_shape, mean=digits.mean, std=digits.std, hidden=32)
    fit(model, digits, TrainConfig(**BUDGET), seed=0)
    return accuracy(model, digits.test), _pgd_accuracy(model, digits)


@pytest.mark.parametrize("objective", ["ard", "rslad"])
@pytest.mark.slow
def test_robust_distillation_beats_a_ce_student(
    objective: str,
    robust_teacher: Classifier,
    ce_student: tuple[float, float],
    digits: DataSplits,
) -> None:
    compressor = DistillTo(
        student="tiny_mlp", student_options={"hidden": 32}, objective=objective,
        objective_options=ATTACK, train=TrainConfig(**BUDGET),
    )  # fmt: skip
    student, record = compressor(robust_teacher, digits)
    clean, robust = accuracy(student, digits.test), _pgd_accuracy(student, digits)
    ce_clean, ce_robust = ce_student
    assert record.details["objective"] == objective and record.params < 5000
    assert clean > 0.7  # robust students trade some clean accuracy, as in the papers
    assert robust > ce_robust + 0.15, (objective, clean, robust, ce_clean, ce_robust)


def test_ard_teacher_from_a_checkpoint_folder(
    robust_teacher: Classifier, digits: DataSplits, tmp_path: Path
) -> None:
    spec = {"name": "tiny_cnn", "num_classes": 10, "in_shape": list(digits.in_shape),
            "mean": list(digits.mean), "std": list(digits.std)}  # fmt: skip
    save_checkpoint(robust_teacher, tmp_path / "teacher", spec)
    objective = OBJECTIVES.get("ard")(teacher=str(tmp_path / "teacher"), eps=0.1, step=0.05)
    x, y = next(digits.train.batches(16))
    out = objective(create("tiny_mlp", 10, digits.in_shape), x, y)
    assert {"loss", "logits", "kl", "ce"} <= set(out) and math.isfinite(float(out["loss"].detach()))
