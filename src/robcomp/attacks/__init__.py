"""Attacks (registry). Each is a frozen dataclass: ``attack(model, x, y) -> x_adv``."""

import robcomp.attacks.manifold
import robcomp.attacks.minimal  # noqa: F401  (registers the minimal-norm attacks)
from robcomp.attacks import pgd  # noqa: F401  (registers the attacks)
from robcomp.attacks.apgd import APGDCE as APGDCE
from robcomp.attacks.apgd import APGDDLR as APGDDLR
from robcomp.attacks.apgd import APGDT as APGDT
from robcomp.attacks.base import ATTACKS, Attack
from robcomp.attacks.cascade import Cascade as Cascade
from robcomp.attacks.cascade import CascadeResult as CascadeResult
from robcomp.attacks.fab import FABT as FABT
from robcomp.attacks.norms import NORMS, get_norm
from robcomp.attacks.pgd import FGSM, PGD
from robcomp.attacks.square import Square as Square

__all__ = ["ATTACKS", "FGSM", "NORMS", "PGD", "Attack", "get_norm"]
