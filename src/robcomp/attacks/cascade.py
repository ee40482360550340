"""AutoAttack as a cascade: each attack runs only on the points every earlier attack missed."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from robcomp.attacks.apgd import (
    APGDCE,
    APGDDLR,
    APGDT,
    AutoAttackNorm,
    check_norm,
    seeded_global_rng,
)
from robcomp.attacks.base import ATTACKS, Attack, check_eps
from robcomp.attacks.fab import FABT
from robcomp.attacks.labels import settings_label
from robcomp.attacks.square import Square

log = logging.getLogger(__name__)

CASCADE_NAME = "autoattack"

# The settings of fra31/auto-attack's ``version="custom"``: its constructor builds APGD with 5
# restarts and only the standard version lowers them to 1; APGD-T keeps 1 restart and FAB-T is
# forced to 1 restart when it runs.
CUSTOM_SETTINGS: dict[str, dict[str, Any]] = {
    "apgd-ce": {"steps": 100, "restarts": 5},
    "apgd-dlr": {"steps": 100, "restarts": 5},
    "apgd-t": {"steps": 100, "restarts": 1, "n_target_classes": 9},
    "fab-t": {"steps": 100, "restarts": 1, "n_target_classes": 9},
    "square": {"queries": 5000, "p_init": 0.8, "restarts": 1},
}


@dataclass(frozen=True)
class CascadeResult:
    """What a cascade found on one batch.

    Attributes:
        x_adv: per point the adversarial example of the attack that broke it, or the clean input
            if no attack did (or if the model already misclassifies it).
        robust_after: robust accuracy over the whole batch after each attack, in run order
            (non-increasing); an attack skipped because no point was left keeps the last value.
        found_by: per point the name of the attack that broke it, ``"clean"`` if the model
            misclassifies the clean input, ``None`` if the point is robust to every attack.
        seconds_per_attack: wall time of each attack, in run order.
        clean_accuracy: accuracy on the clean inputs, before any attack.
        points_per_attack: how many points each attack was given, in run order: the points
            still robust when it started (0 for an attack skipped because none was left). With
            ``seconds_per_attack`` it shows where the work of an evaluation goes.
    """

    x_adv: Tensor
    robust_after: dict[str, float]
    found_by: list[str | None]
    seconds_per_attack: dict[str, float]
    clean_accuracy: float
    points_per_attack: dict[str, int]


@ATTACKS.register(CASCADE_NAME)
@dataclass(frozen=True, kw_only=True)
class Cascade:
    """AutoAttack (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an
    ensemble of diverse parameter-free attacks", ICML): diverse parameter-free attacks run in
    sequence, each on the points still robust, so a point counts as robust only if it survives
    them all.

    The versions pin the settings of the authors' code (fra31/auto-attack, its ``autoattack.py``),
    with every member seeded by ``seed`` as the reference passes its seed to every attack:

    - ``standard`` (linf, l2): ``apgd-ce`` (100 steps, 1 restart, rho 0.75), ``apgd-t``
      (100 steps, 1 restart, 9 target classes), ``fab-t`` (100 steps, 1 restart, 9 target
      classes, alpha_max 0.1, eta 1.05, beta 0.9), ``square`` (5000 queries, p_init 0.8,
      1 restart).
    - ``rand``, for randomized models: ``apgd-ce`` and ``apgd-dlr``, each with 100 steps,
      1 restart and the gradient averaged over ``eot_iter=20`` passes (EOT).
    - ``custom``: the registered attacks named in ``attacks``, in that order, with the
      reference's custom defaults: ``apgd-ce``/``apgd-dlr`` 100 steps and 5 restarts;
      ``apgd-t`` 100 steps, 1 restart, 9 targets; ``fab-t`` 100 steps, 1 restart, 9 targets;
      ``square`` 5000 queries, p_init 0.8, 1 restart. Any other registered attack gets its own
      defaults, with this cascade's ``eps``, ``norm`` and ``seed``.

    Unlike the reference, the versions are fixed lists built here, never flags flipped on
    shared attack objects. Run it with the model in eval mode and parameters frozen
    (``robcomp.evaluate.attack_mode``), as the evaluator does.

    Attributes:
        eps: radius of the threat model, in pixel units of [0, 1] inputs.
        norm: ``linf`` or ``l2``.
        version: ``standard``, ``rand`` or ``custom``.
        attacks: registered attack names, in run order; only with ``version="custom"``.
        seed: seeds every member and torch's global generator (for randomized models).
    """

    eps: float
    norm: AutoAttackNorm = "linf"
    version: Literal["standard", "rand", "custom"] = "standard"
    attacks: tuple[str, ...] = ()
    seed: int = 0

    # 2: FAB-T and Square native (revision 2 of each); stored results of 1 are not reused.
    revision: ClassVar[int] = 2

    def __post_init__(self) -> None:
        check_eps(self.eps, CASCADE_NAME)
        check_norm(self.norm, CASCADE_NAME)
        if self.version not in ("standard", "rand", "custom"):
            raise ValueError(
                f"unknown version {self.version!r}; choose from 'standard', 'rand', 'custom'"
            )
        if self.version != "custom":
            if self.attacks:
                raise ValueError(
                    f"attacks={list(self.attacks)} is only used with version='custom'; "
                    f"version={self.version!r} runs a fixed list"
                )
            return
        if not self.attacks:
            raise ValueError("version='custom' needs a non-empty list of attacks, e.g. [apgd-ce]")
        for name in self.attacks:
            if name == CASCADE_NAME:
                raise ValueError(f"a cascade cannot contain {CASCADE_NAME!r} itself")
            if name not in ATTACKS:
                raise ValueError(ATTACKS.unknown_message(name))
        duplicates = sorted({n for n in self.attacks if self.attacks.count(n) > 1})
        if duplicates:
            raise ValueError(f"attacks lists {', '.join(duplicates)} more than once")
        self.members()  # a member that rejects this eps or norm should fail here, not mid-run

    def label(self) -> str:
        """``autoattack-standard-linf``, plus every other setting not at its default."""
        shown = ("version", "attacks", "norm")
        if self.version == "custom":
            return settings_label(self, f"autoattack[{'+'.join(self.attacks)}]-{self.norm}", shown)
        return settings_label(self, f"autoattack-{self.version}-{self.norm}", shown)

    @property
    def uses_gradients(self) -> bool:
        """True unless every member is gradient-free (a custom cascade of Square alone)."""
        return any(member.uses_gradients for _, member in self.members())

    def members(self) -> list[tuple[str, Attack]]:
        """The attacks this cascade runs, in order, as ``(name, attack)``."""
        eps, norm, seed = self.eps, self.norm, self.seed
        if self.version == "standard":
            return [
                ("apgd-ce", APGDCE(eps=eps, norm=norm, steps=100, restarts=1, seed=seed)),
                (
                    "apgd-t",
                    APGDT(eps=eps, norm=norm, steps=100, restarts=1, n_target_classes=9, seed=seed),
                ),
                (
                    "fab-t",
                    FABT(eps=eps, norm=norm, steps=100, restarts=1, n_target_classes=9, seed=seed),
                ),
                ("square", Square(eps=eps, norm=norm, queries=5000, p_init=0.8, seed=seed)),
            ]
        if self.version == "rand":
            return [
                ("apgd-ce", APGDCE(eps=eps, norm=norm, restarts=1, eot_iter=20, seed=seed)),
                ("apgd-dlr", APGDDLR(eps=eps, norm=norm, restarts=1, eot_iter=20, seed=seed)),
            ]
        return [(name, self._custom_member(name)) for name in self.attacks]

    def _custom_member(self, name: str) -> Attack:
        cls = ATTACKS.get(name)
        fields: set[str] = set()
        if dataclasses.is_dataclass(cls):
            fields = {f.name for f in dataclasses.fields(cls) if f.init}
        options = {"eps": self.eps, "norm": self.norm, "seed": self.seed}
        options = {k: v for k, v in options.items() if k in fields}
        attack: Attack = cls(**options, **CUSTOM_SETTINGS.get(name, {}))
        if attack.norm != self.norm:
            raise ValueError(
                f"attack {name!r} works in the {attack.norm} norm, the cascade in {self.norm}"
            )
        return attack

    def run(self, model: nn.Module, x: Tensor, y: Tensor) -> CascadeResult:
        """Run the attacks in order, each on the points no earlier attack has broken.

        A point counts as broken by an attack when the model misclassifies the attack's output;
        points the model misclassifies already are never attacked.

        The host reads the verdicts once per attack (to hand the next one its survivors), never
        inside one: the members' own loops keep their work on the device. The survivors are not
        regrouped into full batches: on a CPU a forward and backward pass costs no less per
        image in a large batch than in a small one (SmallCNN on MNIST, one thread, is no
        cheaper per image at 450 images than at 50), so refilling would buy nothing there; on
        a GPU, hand the cascade a large batch.
        """
        if model.training:
            log.warning(
                "%s: the model is in training mode (BatchNorm and dropout behave differently "
                "and BatchNorm statistics change); attack it inside "
                "robcomp.evaluate.attack_mode(model)",
                self.label(),
            )
        members = self.members()
        for _, attack in members:  # a member that cannot take x fails before the first stage
            check_inputs = getattr(attack, "check_inputs", None)
            if check_inputs is not None:
                check_inputs(x)
        x_adv = x.clone()
        robust_after: dict[str, float] = {}
        seconds: dict[str, float] = {}
        attacked: dict[str, int] = {}
        # Randomized models draw from the global generator; seeding it makes the run repeatable.
        with seeded_global_rng(self.seed, x.device):
            with torch.no_grad():
                robust = model(x).argmax(1) == y
            found_by: list[str | None] = [None if r else "clean" for r in robust.tolist()]
            clean_accuracy = _fraction(robust)
            for name, attack in members:
                start = time.perf_counter()
                idx = robust.nonzero().squeeze(1)
                attacked[name] = len(idx)
                if len(idx):
                    x_try = attack(model, x[idx], y[idx])
                    with torch.no_grad():
                        broken = model(x_try).argmax(1) != y[idx]
                    hit = idx[broken]
                    x_adv[hit] = x_try[broken]
                    robust[hit] = False
                    for i in hit.tolist():
                        found_by[i] = name
                seconds[name] = time.perf_counter() - start
                robust_after[name] = _fraction(robust)
                log.info("%s: robust accuracy %.4f after %s", self.label(), _fraction(robust), name)
        return CascadeResult(
            x_adv=x_adv,
            robust_after=robust_after,
            found_by=found_by,
            seconds_per_attack=seconds,
            clean_accuracy=clean_accuracy,
            points_per_attack=attacked,
        )

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """The adversarial examples of :meth:`run` (clean inputs where no attack succeeds)."""
        return self.run(model, x, y).x_adv


def _fraction(mask: Tensor) -> float:
    """Share of True entries; nan for an empty batch."""
    return int(mask.sum()) / len(mask) if len(mask) else float("nan")
