"""The one training loop: any objective, SGD/Adam, LR schedules, keeping the best epoch (clean
or robust validation accuracy, ``select``), optional adversarial telemetry (``monitor``), early
stopping on catastrophic overfitting (``early_stop``) and :class:`Callback` hooks for methods
that act on the weights as they train (ADMM's Z/U-updates, proximal steps)."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from robcomp.attacks.base import ATTACKS, Attack
from robcomp.config import build, build_component
from robcomp.data.base import DataSplits, Split, require_training_split
from robcomp.data.transforms import AugmentName, augmentation
from robcomp.evaluate.adversarial import attack_batch, attack_mode, check_threat_model
from robcomp.evaluate.clean import accuracy
from robcomp.progress import track
from robcomp.train.objectives import OBJECTIVES, Objective, ProgressAware

log = logging.getLogger(__name__)

Advance = Callable[..., None]
LrSchedule = Callable[[int, int, int], float]  # (epoch, step, steps_per_epoch) -> lr multiplier
Select = Literal["auto", "clean", "robust", "last"]
SELECTS: tuple[str, ...] = get_args(Select)


def attack_spec(
    attack: Mapping[str, Any] | str | None,
    default: Mapping[str, Any],
    where: str,
    **overrides: float | int | None,
) -> dict[str, Any]:
    """The attack spec of a loop feature: ``attack`` (a spec or a bare name; None for
    ``default``) with the non-None ``overrides`` (eps, steps, step_size shorthands) merged in.

    Raises:
        ValueError: if an override contradicts a value that ``attack`` itself sets.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    if attack is None:
        return {**default, **given}
    spec: dict[str, Any] = {"name": attack} if isinstance(attack, str) else dict(attack)
    for key, value in given.items():
        if key in spec and spec[key] != value:
            raise ValueError(
                f"{where}: {key}={value} contradicts the attack's {key}={spec[key]}; set it once"
            )
        spec[key] = value
    return spec


# Wong et al.'s check: PGD-5, step 2/255, one random start, at eps 8/255.
EARLY_STOP_PGD: Mapping[str, Any] = {
    "name": "pgd",
    "eps": 8 / 255,
    "steps": 5,
    "step_size": 2 / 255,
}
MONITOR_PGD: Mapping[str, Any] = {"name": "pgd", "eps": 8 / 255, "steps": 10}
SELECT_POINTS = 256  # validation points attacked per epoch for ``select: robust`` (no monitor)


@dataclass(frozen=True, kw_only=True)
class _AttackChoice:
    """An attack named by spec or name, with ``eps``/``steps``/``step_size`` shorthands merged
    into it (into ``DEFAULT_ATTACK`` when ``attack`` is None)."""

    attack: dict[str, Any] | str | None = None
    eps: float | None = None
    steps: int | None = None
    step_size: float | None = None
    DEFAULT_ATTACK: ClassVar[Mapping[str, Any]]
    WHERE: ClassVar[str]

    def __post_init__(self) -> None:
        self.build_attack()  # fail at configuration time, not after the first epoch

    def build_attack(self) -> Attack:
        spec = attack_spec(
            self.attack, self.DEFAULT_ATTACK, self.WHERE,
            eps=self.eps, steps=self.steps, step_size=self.step_size,
        )  # fmt: skip
        attack: Attack = build_component(ATTACKS, spec, self.WHERE)
        return attack


@dataclass(frozen=True, kw_only=True)
class EarlyStop(_AttackChoice):
    """Stop on catastrophic overfitting, as Wong, Rice & Kolter (2020, "Fast is better than
    free", ``--early-stop`` in locuslab/fast_adversarial ``train_fgsm.py``) do for FGSM training.

    After each epoch, the model (in eval mode) is attacked on the first training batch of that
    epoch. If the robust accuracy fell by more than ``drop`` since the previous epoch, training
    stops and the previous epoch's weights come back; the collapsed epoch is still recorded
    (``early_stop_accuracy``) and ``History.stopped_epoch`` names it. With ``keep_best`` the
    best-validation epoch is then chosen among the epochs before the collapse.

    Attributes:
        attack: a registered attack spec or name; None (default) for the reference's PGD-5
            (eps 8/255, step 2/255, random start).
        eps, steps, step_size: shorthands merged into the attack (into the default PGD-5 when
            ``attack`` is None); an error if they contradict ``attack``.
        drop: the largest tolerated fall of robust accuracy between epochs, in (0, 1].
    """

    drop: float = 0.2
    DEFAULT_ATTACK: ClassVar[Mapping[str, Any]] = EARLY_STOP_PGD
    WHERE: ClassVar[str] = "early_stop.attack"

    def __post_init__(self) -> None:
        if not 0.0 < self.drop <= 1.0:
            raise ValueError(f"drop must be in (0, 1], got {self.drop}")
        super().__post_init__()


@dataclass(frozen=True, kw_only=True)
class Monitor(_AttackChoice):
    """Per-epoch validation telemetry, Marshall's (2020, Sec. 4.1.2) adversarial-loss curves:
    ``val_loss`` and ``val_accuracy`` on the whole validation split, ``val_adv_loss`` and
    ``val_adv_accuracy`` under ``attack`` on its first ``points`` points (model in eval mode;
    every point is attacked, the loss is the mean cross-entropy on the adversarial inputs).

    Attributes:
        attack: a registered attack spec or name; None (default) for PGD-10 at eps 8/255.
        eps, steps, step_size: shorthands merged into the attack (into the default PGD-10 when
            ``attack`` is None); an error if they contradict ``attack``.
        points: how many validation points to attack.
    """

    points: int = 256
    DEFAULT_ATTACK: ClassVar[Mapping[str, Any]] = MONITOR_PGD
    WHERE: ClassVar[str] = "monitor.attack"

    def __post_init__(self) -> None:
        if self.points < 1:
            raise ValueError(f"points must be >= 1, got {self.points}")
        super().__post_init__()


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How to train. ``epochs: 0`` means "do not train" (e.g. use pretrained weights as they are).

    Attributes:
        schedule: ``constant``; ``step`` (x gamma every ``lr_step`` epochs); ``multistep``
            (x gamma at each of ``milestones``); ``cosine`` (to 0 over the run, per iteration);
            ``cyclic`` (linear 0 -> lr at the middle -> 0, per iteration, as in Fast-AT).
        objective: ``{"name": ..., **fields}`` of a registered objective (``ce`` by default).
        select: which epoch's weights ``fit`` returns: ``clean`` (best validation accuracy),
            ``robust`` (best robust validation accuracy under the monitor's attack, or PGD-10 at
            the objective's eps and norm on the first 256 validation points; ties go to the
            better clean accuracy), ``last``, or ``auto`` (default): ``robust`` for an
            adversarial objective (one with an ``eps``), ``clean`` otherwise. Selecting on
            clean accuracy after adversarial training can return the epoch after Fast-AT's
            catastrophic overfitting (Wong et al. 2020; Rice et al. 2020 select on robust
            accuracy for the same reason).
        keep_best: False is ``select: last`` (kept for existing files); True leaves the choice
            to ``select``.
        early_stop: :class:`EarlyStop` fields, e.g. ``{"drop": 0.2}``, to stop when robust
            accuracy on a training batch collapses (Fast-AT's catastrophic overfitting).
            None (default): never.
        monitor: :class:`Monitor` fields, e.g. ``{"attack": {"name": "pgd", "eps": 8/255,
            "steps": 10}, "points": 256}``, to record validation clean and adversarial loss and
            accuracy every epoch. None (default): only ``val_accuracy``, at no extra cost.
    """

    epochs: int = 10
    batch_size: int = 128
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: Literal["constant", "step", "multistep", "cosine", "cyclic"] = "cosine"
    lr_step: int = 30
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    objective: dict[str, Any] = field(default_factory=lambda: {"name": "ce"})
    augment: AugmentName = "none"
    keep_best: bool = True
    select: Select = "auto"
    early_stop: dict[str, Any] | None = None
    monitor: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1:
            raise ValueError("epochs must be >= 0 and batch_size >= 1")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        for name in ("momentum", "weight_decay", "gamma"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.lr_step < 1 or any(m < 1 for m in self.milestones):
            raise ValueError(
                f"lr_step and milestones must be >= 1 (epochs), got {self.lr_step}, "
                f"{list(self.milestones)}"
            )
        if self.schedule == "multistep" and not self.milestones:
            raise ValueError("schedule 'multistep' needs milestones, e.g. [50, 75]")
        if self.select not in SELECTS:
            raise ValueError(f"select must be one of {', '.join(SELECTS)}; got {self.select!r}")
        if not self.keep_best and self.select not in ("auto", "last"):
            raise ValueError(
                f"keep_best: false means select: last, which contradicts select: {self.select}; "
                "set select alone"
            )
        self.early_stop_config()
        self.monitor_config()
        if self.select == "robust" and self.monitor is None:
            self.selection_attack()  # fails here if there is no threat model to select on

    def build_objective(self, where: str = "train.objective") -> Objective:
        objective: Objective = build_component(OBJECTIVES, self.objective, where)
        return objective

    def early_stop_config(self) -> EarlyStop | None:
        """The parsed ``early_stop``; raises ConfigError on a bad key or value."""
        return None if self.early_stop is None else build(EarlyStop, self.early_stop, "early_stop")

    def monitor_config(self) -> Monitor | None:
        """The parsed ``monitor``; raises ConfigError on a bad key or value."""
        return None if self.monitor is None else build(Monitor, self.monitor, "monitor")

    def criterion(self, objective: Objective | None = None) -> Literal["clean", "robust", "last"]:
        """``select`` with ``auto`` and ``keep_best: false`` resolved for ``objective`` (the
        configured one when None)."""
        if not self.keep_best or self.select == "last":
            return "last"
        if self.select != "auto":
            return "robust" if self.select == "robust" else "clean"
        threat = training_threat(objective if objective is not None else self.build_objective())
        return "robust" if threat is not None else "clean"

    def selection_attack(self, objective: Objective | None = None) -> tuple[Attack, int]:
        """The attack and number of validation points of ``select: robust``: the monitor's,
        else PGD-10 at the objective's threat model on the first 256 points.

        Raises:
            ValueError: with no monitor and an objective that has no threat model.
        """
        monitor = self.monitor_config()
        if monitor is not None:
            return monitor.build_attack(), monitor.points
        threat = training_threat(objective if objective is not None else self.build_objective())
        if threat is None:
            raise ValueError(
                "select: robust needs an adversarial objective (one with eps) or a monitor "
                "attack to measure robust validation accuracy with"
            )
        eps, norm = threat
        spec = {**MONITOR_PGD, "eps": eps, "norm": norm}
        return build_component(ATTACKS, spec, "train.select"), SELECT_POINTS


def training_threat(objective: Objective) -> tuple[float, str] | None:
    """(eps, norm) of the threat model ``objective`` trains against, or None for a natural one.

    An objective is adversarial when it has an ``eps`` field (PGD-AT, Fast-AT, TRADES, ARD,
    ...); a PGD-AT run with a registered ``attack`` trains against that attack's eps and norm.
    """
    attack = getattr(objective, "attack", None)
    if isinstance(attack, Mapping):
        built = build_component(ATTACKS, attack, "train.objective.attack")
        return float(built.eps), str(built.norm)
    eps = getattr(objective, "eps", None)
    if not isinstance(eps, int | float) or eps <= 0:
        return None
    return float(eps), str(getattr(objective, "norm", "linf"))


def make_optimizer(params: Any, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
        )  # fmt: skip
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(cfg: TrainConfig, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Multiplier of the base learning rate at ``step`` of ``epoch`` (both from 0)."""
    progress = (epoch + step / steps_per_epoch) / max(cfg.epochs, 1)  # in [0, 1)
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        return float(cfg.gamma ** (epoch // cfg.lr_step))
    if cfg.schedule == "multistep":
        return float(cfg.gamma ** sum(epoch >= m for m in cfg.milestones))
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - abs(2.0 * progress - 1.0)  # cyclic: triangle peaking at mid-run


@dataclass
class History:
    """Per-epoch records (loss, accuracies, learning rate, seconds) of one training run.

    ``stopped_epoch`` is the epoch at which ``early_stop`` detected a collapse (its record is
    the last one; its weights were discarded), or None.
    """

    epochs: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int | None = None
    stopped_epoch: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "best_epoch": self.best_epoch,
            "stopped_epoch": self.stopped_epoch,
        }


class Callback:
    """Hooks into :func:`fit` for methods that act on the weights as they train (ADMM's Z- and
    U-updates, proximal steps). Override what you need; every hook does nothing by default.
    ``epoch`` and ``step`` count from 0."""

    def before_epoch(self, model: nn.Module, epoch: int) -> None:
        """Before the first batch of ``epoch``."""

    def after_step(self, model: nn.Module, epoch: int, step: int) -> None:
        """Right after each optimizer step."""

    def after_epoch(self, model: nn.Module, epoch: int, record: dict[str, float]) -> None:
        """After the epoch's validation, before it is logged and selected; may add to
        ``record``."""


@dataclass(frozen=True)
class _Run:
    """What every step of one :func:`fit` call needs."""

    cfg: TrainConfig
    objective: Objective
    optimizer: torch.optim.Optimizer
    schedule: LrSchedule
    steps_per_epoch: int
    callbacks: Sequence[Callback]
    advance: Advance


def _mean(values: Mapping[str, list[float]]) -> dict[str, float]:
    return {k: sum(v) / len(v) for k, v in values.items() if v}


def collapsed(previous: float | None, current: float, drop: float) -> bool:
    """Wong et al.'s early-stop rule: robust accuracy fell by more than ``drop`` in one epoch."""
    return previous is not None and previous - current > drop


@dataclass
class _Guard:
    """Early-stop state: the last accepted epoch's robust accuracy and weights."""

    rule: EarlyStop
    attack: Attack
    previous: float | None = None
    state: dict[str, Tensor] | None = None

    def check(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[bool, float]:
        """(collapsed?, robust accuracy on ``batch``); remembers the weights if not collapsed."""
        x, y = batch
        robust = 1.0 - float(attack_batch(model, self.attack, x, y).success.float().mean())
        if collapsed(self.previous, robust, self.rule.drop):
            return True, robust
        self.previous = robust
        self.state = copy.deepcopy(model.state_dict())
        return False, robust

    def restore(self, model: nn.Module) -> None:
        """Load the weights of the last epoch that passed the check."""
        if self.state is not None:
            model.load_state_dict(self.state)


def _clean_metrics(model: nn.Module, split: Split, batch_size: int = 512) -> dict[str, float]:
    loss = 0.0
    correct = 0
    with attack_mode(model), torch.no_grad():  # eval mode, parameters untouched
        for x, y in split.batches(batch_size):
            logits = model(x)
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
    return {"val_loss": loss / len(split), "val_accuracy": correct / len(split)}


def _adversarial_metrics(
    model: nn.Module, split: Split, attack: Attack, batch_size: int = 256
) -> dict[str, float]:
    loss = 0.0
    correct = 0
    with attack_mode(model):
        for x, y in split.batches(batch_size):
            x_adv = attack(model, x, y)
            check_threat_model(x, x_adv, attack.eps, attack.norm, where=f"monitor {attack.label()}")
            with torch.no_grad():
                logits = model(x_adv)
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
    return {"val_adv_loss": loss / len(split), "val_adv_accuracy": correct / len(split)}


def _validate(model: nn.Module, val: Split, probe: tuple[Attack, int] | None) -> dict[str, float]:
    """Validation metrics; with ``probe`` (an attack and a number of points: the monitor's, or
    robust selection's) also the adversarial loss and accuracy on the first points."""
    if not len(val):
        return {}
    if probe is None:
        return {"val_accuracy": accuracy(model, val)}
    attack, points = probe
    start = time.perf_counter()
    record = _clean_metrics(model, val)
    record |= _adversarial_metrics(model, val.head(points), attack)
    record["monitor_seconds"] = time.perf_counter() - start
    return record


@dataclass
class _Best:
    """The weights of the selected epoch so far, under ``criterion``."""

    criterion: Literal["clean", "robust", "last"]
    score: tuple[float, float] = (-math.inf, -math.inf)
    epoch: int | None = None
    state: dict[str, Tensor] | None = None

    def offer(self, model: nn.Module, record: Mapping[str, float]) -> None:
        """Keep ``model``'s weights if this epoch scores higher (ties keep the earlier one)."""
        if self.criterion == "last":
            return
        clean = record.get("val_accuracy", -record["loss"])  # no validation split: train loss
        score = (record.get("val_adv_accuracy", clean), clean)
        if self.criterion == "clean":
            score = (clean, 0.0)
        if score > self.score:
            self.score, self.epoch = score, int(record["epoch"])
            self.state = copy.deepcopy(model.state_dict())

    def restore(self, model: nn.Module) -> None:
        if self.state is not None:
            model.load_state_dict(self.state)


def _train_epoch(
    model: nn.Module, run: _Run, batches: Iterable[tuple[Tensor, Tensor]], epoch: int
) -> tuple[dict[str, float], tuple[Tensor, Tensor] | None]:
    """One pass over the training batches; returns the epoch's record and its first batch."""
    model.train()
    sums: dict[str, list[float]] = {}
    correct = seen = 0
    first: tuple[Tensor, Tensor] | None = None
    cfg, objective, optimizer = run.cfg, run.objective, run.optimizer
    for step, (x, y) in enumerate(batches):
        if first is None:
            first = (x, y)
        factor = run.schedule(epoch, step, run.steps_per_epoch)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * factor
        if isinstance(objective, ProgressAware):
            objective.set_progress(epoch, step, run.steps_per_epoch, cfg.epochs)
        out = objective(model, x, y)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        for callback in run.callbacks:
            callback.after_step(model, epoch, step)
        for key, value in out.items():
            if key != "logits" and value.ndim == 0:
                sums.setdefault(key, []).append(float(value.detach()))
        if "logits" in out:
            correct += int((out["logits"].detach().argmax(1) == y).sum())
            seen += len(y)
        run.advance(1, status=f"epoch {epoch + 1}/{cfg.epochs} loss {sums['loss'][-1]:.3f}")
    record = _mean(sums)
    if seen:
        record["train_accuracy"] = correct / seen
    record["lr"] = optimizer.param_groups[0]["lr"]
    return record, first


def fit(
    model: nn.Module,
    data: DataSplits,
    cfg: TrainConfig,
    *,
    seed: int = 0,
    description: str = "train",
    objective: Objective | None = None,
    callbacks: Sequence[Callback] = (),
    lr_schedule: LrSchedule | None = None,
) -> History:
    """Train ``model`` in place on ``data.train``, selecting on ``data.val``; returns the history.

    Shuffling and augmentation are driven by a generator seeded with ``seed``, so a run is
    reproducible on the same machine. ``monitor``, ``early_stop`` and robust-selection attacks
    draw from their own seeded generators and run in eval mode: enabling them does not change
    the trained weights (until an early stop).

    Args:
        objective: train with this objective instead of ``cfg.objective`` (e.g. one wrapped
            with a penalty); ``select: auto`` and the robust-selection attack follow it.
        callbacks: hooks run before each epoch, after each optimizer step and after each epoch.
        lr_schedule: ``(epoch, step, steps_per_epoch) -> multiplier of cfg.lr`` replacing
            ``cfg.schedule`` (e.g. ADMM's period restarts).
    """
    history = History()
    if cfg.epochs == 0:
        return history
    require_training_split(data, description)
    objective = objective if objective is not None else cfg.build_objective()
    steps_per_epoch = math.ceil(len(data.train) / cfg.batch_size)
    best = _Best(cfg.criterion(objective))
    probe = cfg.selection_attack(objective) if best.criterion == "robust" else None
    monitor = cfg.monitor_config()
    if monitor is not None:
        probe = monitor.build_attack(), monitor.points
    rule = cfg.early_stop_config()
    guard = _Guard(rule, rule.build_attack()) if rule is not None else None
    model.to(data.device)  # the model follows the data (a student built on the CPU, say)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    augment = augmentation(cfg.augment)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout and anything else drawing from the global generator
    schedule = lr_schedule or (lambda e, s, n: lr_factor(cfg, e, s, n))
    with track(description, cfg.epochs * steps_per_epoch) as advance:
        run = _Run(cfg, objective, optimizer, schedule, steps_per_epoch, callbacks, advance)
        for epoch in range(cfg.epochs):
            start = time.perf_counter()
            for callback in callbacks:
                callback.before_epoch(model, epoch)
            batches = data.train.batches(
                cfg.batch_size, shuffle=True, generator=generator, augment=augment
            )
            record, first = _train_epoch(model, run, batches, epoch)
            record |= _validate(model, data.val, probe)
            stop = False
            if guard is not None and first is not None:
                stop, record["early_stop_accuracy"] = guard.check(model, first)
            record["epoch"] = epoch + 1
            for callback in callbacks:
                callback.after_epoch(model, epoch, record)
            record["seconds"] = time.perf_counter() - start
            history.epochs.append(record)
            log.info("%s epoch %d: %s", description, epoch + 1, record)
            if stop and guard is not None:
                log.warning(
                    "%s: robust accuracy on a training batch fell from %.3f to %.3f at epoch %d; "
                    "stopping and restoring epoch %d",
                    description, guard.previous, record["early_stop_accuracy"], epoch + 1, epoch,
                )  # fmt: skip
                guard.restore(model)
                history.stopped_epoch = epoch + 1
                break
            best.offer(model, record)
    best.restore(model)
    history.best_epoch = best.epoch
    model.eval()
    return history
