"""Transfer attacks (Marshall 2020, Algorithm 3): craft on a source, score on targets."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from robcomp.attacks.base import Attack
from robcomp.data.base import Split
from robcomp.evaluate.adversarial import attack_batch, attack_mode
from robcomp.progress import track


@dataclass(frozen=True)
class TransferMatrix:
    """``accuracy[source][target]``: target accuracy on examples crafted against the source.

    The diagonal is the white-box robust accuracy of each model.
    """

    sources: list[str]
    targets: list[str]
    accuracy: dict[str, dict[str, float]]
    eps: float
    attack: str


def transfer_matrix(
    sources: Mapping[str, nn.Module],
    targets: Mapping[str, nn.Module],
    attack: Attack,
    split: Split,
    batch_size: int = 256,
) -> TransferMatrix:
    """Algorithm 3 for every source: attack it, then evaluate every target on the same examples.

    Every point counts: a target that misclassifies the clean point is wrong on it whatever the
    perturbation, so the numbers are directly comparable with robust accuracy.
    """
    correct = {s: {t: 0 for t in targets} for s in sources}
    with track(f"transfer {attack.label()}", len(sources) * len(split)) as advance:
        for source_name, source in sources.items():
            for x, y in split.batches(batch_size):
                x_adv = attack_batch(source, attack, x, y).x_adv  # threat model checked
                for target_name, target in targets.items():
                    with attack_mode(target), torch.no_grad():
                        hits = int((target(x_adv).argmax(1) == y).sum())
                    correct[source_name][target_name] += hits
                advance(len(y))
    n = len(split)
    return TransferMatrix(
        sources=list(sources),
        targets=list(targets),
        accuracy={s: {t: c / n for t, c in row.items()} for s, row in correct.items()},
        eps=float(attack.eps),
        attack=attack.label(),
    )
