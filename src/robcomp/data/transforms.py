"""Training-time augmentations on batches of float tensors in [0, 1] (seeded, deterministic)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F

from robcomp.data.base import Augment

AugmentName = Literal["none", "flip", "crop_flip"]


def random_flip(x: Tensor, generator: torch.Generator) -> Tensor:
    """Mirror each image left-right with probability 1/2."""
    # Drawn on the CPU from the CPU generator, so every device sees the same augmentation.
    flip = (torch.rand(len(x), generator=generator) < 0.5).to(x.device)
    x = x.clone()
    x[flip] = x[flip].flip(-1)
    return x


def random_crop(x: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """Zero-pad by ``pad`` and crop back at a random offset per image (the CIFAR recipe)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dev = x.device  # offsets drawn on the CPU generator, then moved: the same crops everywhere
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(dev)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(dev)
    rows = (dy[:, None] + torch.arange(h, device=dev)[None, :])[:, None, :, None]  # (N, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=dev)[None, :])[:, None, None, :]  # (N, 1, 1, W)
    batch = torch.arange(n, device=dev)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=dev)[None, :, None, None]
    return padded[batch, chans, rows, cols]


def crop_flip(x: Tensor, generator: torch.Generator) -> Tensor:
    return random_flip(random_crop(x, generator), generator)


def augmentation(name: AugmentName) -> Augment | None:
    """The augmentation function for a config name (``none`` gives None)."""
    return {"none": None, "flip": random_flip, "crop_flip": crop_flip}[name]
