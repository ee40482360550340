"""Attacks (registry). Each is a frozen dataclass: ``attack(model, x, y) -> x_adv``."""

from robcomp.attacks import pgd  # noqa: F401  (registers the attacks)
from robcomp.attacks.base import ATTACKS, Attack
from robcomp.attacks.norms import NORMS, get_norm
from robcomp.attacks.pgd import FGSM, PGD

__all__ = ["ATTACKS", "FGSM", "NORMS", "PGD", "Attack", "get_norm"]
