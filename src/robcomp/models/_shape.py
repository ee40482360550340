"""Shape checks shared by the zoo's factories."""

from __future__ import annotations

from collections.abc import Sequence


def image_shape(in_shape: Sequence[int], model: str, min_size: int = 1) -> tuple[int, int, int]:
    """Return ``(C, H, W)`` from ``in_shape``, or raise a ValueError that names the model.

    Args:
        in_shape: the shape of one input, channels first.
        model: the model's name, for the error message.
        min_size: the smallest height and width the architecture can process.
    """
    if len(in_shape) != 3:
        raise ValueError(f"model {model!r} needs image inputs (C, H, W), got in_shape={in_shape}")
    channels, height, width = (int(s) for s in in_shape)
    if channels < 1 or min(height, width) < min_size:
        raise ValueError(
            f"model {model!r} needs at least 1 channel and {min_size}x{min_size} pixels, "
            f"got in_shape={tuple(in_shape)}"
        )
    return channels, height, width
