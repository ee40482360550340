"""Transfer attacks (Marshall 2020, Algorithm 3): craft on a source, score on targets.

Adversarial examples are crafted once on the source model, then every target model is scored
on them with no further attack. Points are attacked as :func:`evaluate_attack` attacks them (in
the same batches, only the points the source classifies correctly), so the source scored on its
own examples is exactly its white-box robust accuracy: the diagonal of a transfer matrix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from robcomp.attacks.base import Attack
from robcomp.attacks.manifold import is_latent
from robcomp.data.base import Split
from robcomp.evaluate.adversarial import attack_batch, attack_mode, check_threat_model
from robcomp.models import model_device
from robcomp.progress import track


@dataclass(frozen=True)
class TransferExamples:
    """Examples crafted on a source model: ``x_adv`` is ``x`` perturbed within the attack's
    threat model (``x`` itself where the source already misclassifies it), ``y`` the labels.
    Tensors are on the CPU, so they can be saved and scored on any device."""

    x: Tensor
    x_adv: Tensor
    y: Tensor

    def check(self, attack: Attack, where: str = "") -> None:
        """Raise :class:`~robcomp.evaluate.adversarial.ThreatModelViolation` unless every
        example lies in ``attack``'s eps ball around its clean point and in [0, 1] (examples
        read back from a file are checked like freshly crafted ones)."""
        check_threat_model(self.x, self.x_adv, float(attack.eps), attack.norm, where)

    def split(self) -> Split:
        return Split(self.x_adv, self.y)


def craft_examples(
    source: nn.Module, attack: Attack, split: Split, batch_size: int = 256
) -> TransferExamples:
    """Algorithm 3, lines 2-3: attack ``source`` on ``split``, batch by batch.

    Raises:
        ValueError: ``attack`` is an on-manifold (latent) attack, whose threat model is
            checked against the source's generative model, not an Lp ball.
    """
    if is_latent(attack):
        raise ValueError(f"{attack.label()}: on-manifold attacks cannot be transferred")
    xs, advs, ys = [], [], []
    with track(f"craft {attack.label()} eps={attack.eps:.4g}", len(split)) as advance:
        for x, y in split.batches(batch_size):
            with attack_mode(source), torch.no_grad():
                correct = source(x).argmax(1) == y
            x_adv = x.clone()
            if correct.any():  # already-wrong points need no perturbation to fool the source
                x_adv[correct] = attack_batch(source, attack, x[correct], y[correct]).x_adv
            xs.append(x.cpu())
            advs.append(x_adv.cpu())
            ys.append(y.cpu())
            advance(len(y))
    examples = TransferExamples(torch.cat(xs), torch.cat(advs), torch.cat(ys))
    examples.check(attack, attack.label())
    return examples


def transfer_accuracy(
    target: nn.Module, examples: TransferExamples, batch_size: int = 256
) -> float:
    """Algorithm 3, lines 4-6: the accuracy of ``target`` on ``examples``.

    Every point counts: a target that misclassifies the clean point is wrong on it whatever the
    perturbation, so the number is directly comparable with robust accuracy.
    """
    device = model_device(target)
    correct = 0
    with attack_mode(target), torch.no_grad():
        for x, y in examples.split().batches(batch_size):
            correct += int((target(x.to(device)).argmax(1).cpu() == y).sum())
    return correct / len(examples.y)


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
    """Algorithm 3 for every source: attack it, then evaluate every target on the same examples."""
    accuracy: dict[str, dict[str, float]] = {}
    for source_name, source in sources.items():
        examples = craft_examples(source, attack, split, batch_size)
        accuracy[source_name] = {
            name: transfer_accuracy(target, examples, batch_size)
            for name, target in targets.items()
        }
    return TransferMatrix(
        sources=list(sources),
        targets=list(targets),
        accuracy=accuracy,
        eps=float(attack.eps),
        attack=attack.label(),
    )
