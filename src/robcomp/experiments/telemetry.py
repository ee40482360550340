"""What a cell keeps besides its numbers, for the report's pictures: weight histograms of the
dense and the compressed model (Marshall's Figures 4.1 and 4.2) and the fraction of each layer's
weights that compression kept.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from robcomp.compress.efficiency import effective_weights, prunable_layers

BINS = 60


def _layer_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Effective Conv/Linear weights by layer name (pruning masks applied)."""
    weights = effective_weights(model)
    # Layers whose weight is not a parameter (constants of an int8 graph) are left out.
    return {
        name: weights[f"{name}.weight"]
        for name, _ in prunable_layers(model)
        if f"{name}.weight" in weights
    }


def weight_histogram(model: nn.Module, edges: torch.Tensor) -> dict[str, Any]:
    """Counts of the nonzero Conv/Linear weights in ``edges``, and how many are exactly zero
    (pruned weights would otherwise hide everything else in one bar at 0)."""
    values = [w.flatten() for w in _layer_weights(model).values()]
    if not values:
        return {"counts": [], "zeros": 0}
    flat = torch.cat(values).float()
    nonzero = flat[flat != 0].clamp(float(edges[0]), float(edges[-1]))
    counts = torch.histogram(nonzero, bins=edges).hist
    return {"counts": [int(c) for c in counts], "zeros": int((flat == 0).sum())}


def kept_per_layer(model: nn.Module, base: nn.Module) -> dict[str, float]:
    """Nonzero weights of each layer over that layer's weights in ``base``. Layers that do not
    exist in ``base`` (a distilled student, an int8 graph) are left out."""
    base_weights = _layer_weights(base)
    return {
        name: int(torch.count_nonzero(w)) / base_weights[name].numel()
        for name, w in _layer_weights(model).items()
        if name in base_weights
    }


def model_telemetry(model: nn.Module, base: nn.Module) -> dict[str, Any]:
    """Histograms of ``base`` and ``model`` on shared bins, and the kept fraction per layer."""
    base_values = [w.flatten() for w in _layer_weights(base).values()]
    if not base_values:
        return {}
    # Bins span the dense model's range, clipped at its 99.9th percentile of |w| so that one
    # outlier does not squeeze the histogram into a few bars.
    limit = float(torch.quantile(torch.cat(base_values).abs().float()[:1_000_000], 0.999))
    edges = torch.linspace(-limit, limit, BINS + 1)
    return {
        "bins": [float(e) for e in edges],
        "dense": weight_histogram(base, edges),
        "compressed": weight_histogram(model, edges),
        "kept_per_layer": kept_per_layer(model, base),
    }
