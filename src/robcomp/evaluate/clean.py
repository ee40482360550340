"""Clean accuracy."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from robcomp.data.base import Split


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    """Predicted labels for float inputs ``x``, in eval mode; restores the model's mode."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat(
            [model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]
        )
    finally:
        model.train(was_training)


def accuracy(model: nn.Module, split: Split, batch_size: int = 512) -> float:
    """Top-1 accuracy on a split, in [0, 1]."""
    if len(split) == 0:
        raise ValueError("cannot compute accuracy on an empty split")
    correct = 0
    for x, y in split.batches(batch_size):
        correct += int((predict(model, x, batch_size) == y).sum())
    return correct / len(split)
