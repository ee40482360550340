"""What a model costs: parameters, nonzeros, bits, bytes on disk, MACs.

Measured the way a deployment sees them: a pruned model that keeps its zeros in dense tensors is
as large on disk as the dense one, so ``size_bytes`` is the real safetensors file size and the
sparse size is reported separately as what a sparse format could store.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

import torch
from safetensors.torch import save as save_bytes
from torch import Tensor, nn

from robcomp.models.capabilities import model_device

PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_Layer = TypeVar("_Layer")


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv and Linear layers, whose ``weight`` compressors act on."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PRUNABLE)]


def select_layers(layers: Sequence[_Layer], include_first_last: bool) -> list[_Layer]:
    """``layers`` without the first and the last unless ``include_first_last``.

    Many papers keep those two dense or in floating point (they are small and sensitive). A
    model of two layers or fewer keeps them all, or nothing would be left to compress.
    """
    if include_first_last or len(layers) <= 2:
        return list(layers)
    return list(layers[1:-1])


def execution_order(model: nn.Module, in_shape: Sequence[int]) -> list[str]:
    """Names of the Conv/Linear layers in the order one forward pass first runs them.

    Layers the forward pass does not use are left out. The pass runs in eval mode on the
    model's device, so BatchNorm statistics do not move.
    """
    names = {m: n for n, m in prunable_layers(model)}
    if not names:
        return []
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda m, _i, _o: order.append(names[m])) for m in names]
    training = model.training
    try:
        model.eval()
        device = next(model.parameters()).device
        with torch.no_grad():
            model(torch.zeros(1, *in_shape, device=device))
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    return list(dict.fromkeys(order))


def effective_weights(model: nn.Module) -> dict[str, Tensor]:
    """The weights the forward pass uses, including masked ones from ``torch.nn.utils.prune``."""
    out: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            key = pname.removesuffix("_orig")
            value = getattr(module, key) if pname.endswith("_orig") else param
            out[f"{name}.{key}" if name else key] = value.detach()
    return out


def count_params(model: nn.Module) -> int:
    """Number of parameters (masks and buffers excluded)."""
    return sum(t.numel() for t in effective_weights(model).values())


def count_nonzero(model: nn.Module) -> int:
    """Number of parameters that are not exactly zero."""
    return sum(int(torch.count_nonzero(t)) for t in effective_weights(model).values())


def state_bytes(model: nn.Module) -> int:
    """Bytes of the model saved as a safetensors file (weights as the forward pass uses them)."""
    state = {k: v.contiguous().clone() for k, v in effective_weights(model).items()}
    state.update(
        {n: b.contiguous().clone() for n, b in model.named_buffers() if not n.endswith("_mask")}
    )
    return len(save_bytes(state))


def sparse_bytes(model: nn.Module, bits: int = 32) -> int:
    """Bytes a bitmap-sparse format would need: nonzero values plus one bit per parameter."""
    return (count_nonzero(model) * bits + count_params(model) + 7) // 8


def count_macs(model: nn.Module, in_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass on one input (dense execution).

    Zeros from unstructured pruning are still multiplied by a dense kernel, so they do not
    reduce this number; physically removed channels do.
    """
    total = 0

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Linear):
            total += output.numel() * module.in_features
        elif isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            per_output = (module.in_channels // module.groups) * int(
                torch.tensor(module.kernel_size).prod()
            )
            total += output.numel() * per_output

    handles = [m.register_forward_hook(hook) for _, m in prunable_layers(model)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *in_shape, device=model_device(model)))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total


@dataclass(frozen=True)
class Efficiency:
    """Cost of a model. ``compression_rate`` follows Shen et al.: ``1 - kept / base`` params."""

    params: int
    nonzero_params: int
    bits: int
    size_bytes: int
    sparse_bytes: int
    macs: int

    def compression_rate(self, base_params: int) -> float:
        return 1.0 - self.nonzero_params / base_params if base_params else 0.0


@runtime_checkable
class MeasuresItself(Protocol):
    """A model that counts its own cost (an int8 model: its packed weights are opaque tensors
    that cannot be saved again to count their bytes)."""

    def efficiency(self, in_shape: Sequence[int]) -> Efficiency: ...


def measure(model: nn.Module, in_shape: Sequence[int], bits: int = 32) -> Efficiency:
    """The cost of ``model`` as it runs: parameters, nonzeros, bytes, MACs of one input (a
    model that counts its own cost is asked for it)."""
    if isinstance(model, MeasuresItself):
        return model.efficiency(in_shape)
    return Efficiency(
        params=count_params(model),
        nonzero_params=count_nonzero(model),
        bits=bits,
        size_bytes=state_bytes(model),
        sparse_bytes=sparse_bytes(model, bits),
        macs=count_macs(model, in_shape),
    )
