"""Quantization: int8 post-training static quantization, low-bit and binary weights.

``int8`` follows PyTorch's current path, PT2E: ``torch.export`` the model, let torchao's
``X86InductorQuantizer`` annotate it, calibrate observers on training batches, convert. The
converted graph is a *reference* model (fp32 arithmetic between quantize/dequantize pairs,
int8 weights); it is slower than fp32. Inductor's x86 passes then rewrite it into oneDNN int8
kernels (weights prepacked, conv + ReLU + add fused), optionally compiled by ``torch.compile``.

A quantized model has no useful gradient (rounding), which masks gradients rather than adding
robustness. Every int8 model therefore carries a differentiable *twin*: the reference graph
with each quantize/dequantize pair replaced by fake quantization with a straight-through
estimator. Its forward is the reference computation bit for bit, so it predicts like the int8
kernels (see :func:`twin_agreement`) and gradient attacks run on it.

``lowbit`` and ``binary`` simulate narrower weights (and optionally activations) in fp32 with
fake quantization that stays in the model, so :func:`robcomp.train.fit` can fine-tune through
it (quantization-aware training). Their records count the bytes the packed integers would take.
"""

from __future__ import annotations

import copy
import logging
import math
import operator
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
from safetensors.torch import save as save_bytes
from torch import Tensor, nn
from torch.fx import GraphModule, Node
from torch.nn.utils import parametrize

from robcomp.compress.base import COMPRESSORS, Record
from robcomp.compress.efficiency import (
    Efficiency,
    count_macs,
    prunable_layers,
    select_layers,
)
from robcomp.compress.prune import finalize
from robcomp.data.base import DataSplits, require_training_split
from robcomp.evaluate.bpda import twin_agreement
from robcomp.models.capabilities import Capabilities

log = logging.getLogger(__name__)

__all__ = [
    "BinaryWeights",
    "Int8PTQ",
    "LowBit",
    "QuantizedModel",
    "bake",
    "fake_quantize_ste",
    "twin_agreement",
]


# --------------------------------------------------------------------------------------------
# int8 post-training static quantization (PT2E)
# --------------------------------------------------------------------------------------------


class _FakeQuantSTE(torch.autograd.Function):
    """quantize -> dequantize exactly as ``quantized_decomposed`` computes them; the backward
    pass lets the gradient through where the input was inside the representable range."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Any, zero_point: Any, qmin: int, qmax: int) -> Tensor:
        unclamped = torch.round(x * (1.0 / scale)) + zero_point
        ctx.save_for_backward((unclamped >= qmin) & (unclamped <= qmax))
        q = torch.clamp(unclamped, qmin, qmax)
        return (q - zero_point) * scale

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


def fake_quantize_ste(
    x: Tensor, scale: Any, zero_point: Any, qmin: int, qmax: int, dtype: torch.dtype
) -> Tensor:
    """Per-tensor fake quantization with a clipped straight-through estimator.

    Same arguments as ``quantized_decomposed.quantize_per_tensor``; ``dtype`` only fixes the
    range and is unused.
    """
    return _FakeQuantSTE.apply(x, scale, zero_point, qmin, qmax)


# Known, harmless warnings of third-party code on the int8 path, each silenced by its exact
# logger (or module) and message so that nothing else is hidden:
# - torchao registers its KernelPreference enum with ``register_constant``, which torch 2.14
#   deprecates for enums (torchao's change, nothing a caller can do);
# - Inductor's C++ toolchain probe finds ``nvcc`` on a machine without a GPU and says it will
#   use that CUDA_HOME; the int8 kernels are CPU-only, so it never does.
_TORCH_LOG_NOISE = {
    "torch.utils._pytree": ("Calling register_constant() on Enum subclasses is deprecated",),
    "torch.utils.cpp_extension": ("No CUDA runtime is found",),
}


class _DropKnown(logging.Filter):
    """Drop a logger's records whose message contains one of ``fragments``."""

    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


def _quiet_known_torch_logs() -> None:
    """Install the :data:`_TORCH_LOG_NOISE` filters once (before torchao's import)."""
    for name, fragments in _TORCH_LOG_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnown) for f in logger.filters):
            logger.addFilter(_DropKnown(fragments))


@contextmanager
def _quiet_int8_lowering() -> Iterator[None]:
    """Inductor's oneDNN int8 lowering (``torch/_inductor/mkldnn_lowerings.py``) copies a
    zero-point tensor with ``torch.tensor(tensor)``, which warns; it is torch's own code, so
    that one warning is ignored while compiling."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message="To copy construct from a tensor",
            category=UserWarning,
            module=r"torch\._inductor\.mkldnn_lowerings",
        )
        yield


def _torchao() -> Any:
    _quiet_known_torch_logs()
    try:
        from torchao.quantization.pt2e import quantize_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer
    except ImportError as err:
        raise ImportError(
            f"int8 quantization needs torchao's PT2E API ({err}); pip install torchao==0.18.0 "
            "(the release that matches torch 2.14)"
        ) from None
    return quantize_pt2e, x86_inductor_quantizer


def _export(model: nn.Module, example: Tensor) -> GraphModule:
    """``torch.export`` with a dynamic batch dimension (strict, so the graph is Dynamo's)."""
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},), strict=True)
    return program.module()


def _fresh(module: GraphModule) -> GraphModule:
    """A plain GraphModule with the same graph and tensors, which never need a gradient.

    Modules from ``torch.export`` refuse ``train()``/``eval()``, which the evaluation code calls
    on every model; a fresh GraphModule behaves like any module. Frozen parameters also keep
    Inductor's freezing passes off the autograd dispatch path (where the in-place qconv + add
    op has no kernel) and cost attacks on the twin no weight gradients.
    """
    fresh = GraphModule(module, copy.deepcopy(module.graph))
    for p in fresh.parameters():
        p.requires_grad_(False)
    return fresh


def _attr(module: nn.Module, target: str) -> Tensor:
    return operator.attrgetter(target)(module)


def _strip_unused(gm: GraphModule) -> GraphModule:
    """Drop parameters and buffers the graph never reads (convert keeps the fp32 weights)."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    names = [n for n, _ in gm.named_parameters()] + [n for n, _ in gm.named_buffers()]
    for name in names:
        if name not in used:
            owner, _, leaf = name.rpartition(".")
            module = gm.get_submodule(owner) if owner else gm
            module._parameters.pop(leaf, None)
            module._buffers.pop(leaf, None)
    gm.delete_all_unused_submodules()
    return gm


_Q_OPS = ("quantize_per_tensor",)
_DQ_OPS = ("dequantize_per_tensor",)


def _op_name(node: Node) -> str:
    """``quantize_per_tensor`` for ``quantized_decomposed.quantize_per_tensor.default``."""
    name = str(node.target) if node.op == "call_function" else ""
    return name.split(".")[1] if name.startswith("quantized_decomposed.") else ""


def _make_twin(reference: GraphModule) -> GraphModule:
    """The reference graph with each activation quantize/dequantize pair made differentiable."""
    twin = _fresh(reference)
    graph = twin.graph
    for node in list(graph.nodes):
        if _op_name(node) not in _DQ_OPS:
            continue
        source = node.args[0]
        if not isinstance(source, Node) or _op_name(source) not in _Q_OPS:
            continue
        x, scale, zero_point, qmin, qmax, dtype = source.args[:6]
        with graph.inserting_before(node):
            fq = graph.call_function(fake_quantize_ste, (x, scale, zero_point, qmin, qmax, dtype))
        node.replace_all_uses_with(fq)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    graph.lint()
    twin.recompile()
    return twin


def _lower_x86(reference: GraphModule, example: Tensor) -> GraphModule:
    """Rewrite the reference graph into oneDNN int8 kernels, ahead of time, for any batch size.

    This is torchao's ``lower_pt2e_quantized_to_x86`` with a dynamic batch dimension (torchao's
    exports with a static one): the Inductor freezing passes that ``torch.compile`` would run
    (weight prepacking, qconv/qlinear fusion with ReLU and residual adds), applied once.
    """
    from torch._inductor.constant_folding import constant_fold
    from torch._inductor.fx_passes.freezing_patterns import freezing_passes

    table = torch.export.default_decompositions()
    for op in list(table.keys()):  # post-autograd: decompose only composite ops
        if not torch._export.utils._is_cia_op(op):
            del table[op]
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(
        reference, (example,), dynamic_shapes=({0: batch},), strict=True
    ).run_decompositions(table)
    lowered: GraphModule = program.module()
    for node in list(lowered.graph.nodes):  # what torchao's lowering does for linear layers
        if node.target == torch.ops.aten.t.default:
            with lowered.graph.inserting_before(node):
                perm = lowered.graph.call_function(
                    torch.ops.aten.permute.default, (node.args[0], [1, 0])
                )
            node.replace_all_uses_with(perm)
            lowered.graph.erase_node(node)
    lowered.recompile()
    with torch.no_grad():
        freezing_passes(lowered, (example,))
        constant_fold(lowered)
    _views_to_reshapes(lowered)
    return _fresh(lowered)


_VIEWS = (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default)


def _views_to_reshapes(graph_module: GraphModule) -> None:
    """Make every ``view`` of the lowered graph a ``reshape``, in place.

    ``torch.export`` traces ``flatten`` (and ``reshape``) on contiguous fp32 tensors, where
    they decompose to ``aten.view``. oneDNN's int8 convolutions return channels-last tensors,
    and max/average pooling keep that layout, so a later ``view`` that merges C, H and W
    raises ("view size is not compatible with input tensor's size and stride") whenever the
    flattened map is larger than 1x1. Inductor would plan the layouts when compiling; this
    graph runs eagerly, so ``reshape`` (the same result, with a copy only where the layout
    needs one) is what it must call.
    """
    graph = graph_module.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _VIEWS:
            node.target = torch.ops.aten.reshape.default
    graph.lint()
    graph_module.recompile()


class QuantizedModel(nn.Module):
    """An int8 model: ``forward`` runs int8 kernels; ``twin`` is its differentiable fake-quant
    copy for gradient attacks (Shen et al. could not attack their PTSQ models with gradients
    for lack of one).

    Without ``compiled``, ``forward`` runs ``int8``, the graph already lowered to oneDNN int8
    ops, eagerly, for any batch size. With it, ``forward`` runs ``torch.compile`` of the
    reference graph with Inductor's freezing passes (the documented x86 PT2E path, which also
    fuses the elementwise ops around the int8 kernels). That compilation needs static shapes:
    each new batch size compiles once, for up to ``max_compiled_shapes`` sizes; other sizes,
    and everything after a failed compilation (logged), run the eager ``int8`` graph.

    The int8 path has no gradient; calling it on an input that requires one is an error that
    points to the twin. It cannot be trained either: fine-tune before quantizing, or use
    ``lowbit`` for quantization-aware training.

    Attributes:
        int8: the lowered graph (oneDNN qconv/qlinear ops), eager.
        twin: the reference graph with straight-through fake quantization; differentiable.
        reference: the converted graph (quantize/dequantize around fp32 ops): what is compiled.
        compiled: whether ``forward`` goes through ``torch.compile``.
        compile_error: why compilation was abandoned, if it was.
    """

    max_compiled_shapes = 8  # Dynamo's default recompile limit
    trainable = False  # the experiment runner skips fine-tuning for such models

    def __init__(
        self,
        int8: GraphModule,
        twin: GraphModule,
        reference: GraphModule,
        compiled: bool,
        cost: Efficiency | None = None,
    ) -> None:
        super().__init__()
        self.int8 = int8
        self.twin = twin
        self.reference = reference
        self.compiled = compiled
        # What it stores, counted when it was quantized: its packed oneDNN weights are opaque
        # tensors that cannot be saved or counted again.
        self.cost = cost
        self.compile_error: str | None = None
        self._shapes: set[tuple[int, ...]] = set()
        _quiet_known_torch_logs()  # compiling imports Inductor's C++ toolchain probe
        # Not a submodule: the compiled wrapper shares the reference graph's tensors.
        self.__dict__["_compiled"] = torch.compile(reference, dynamic=False) if compiled else None
        super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError(
                "an int8 model has no gradient; run gradient attacks on its differentiable "
                "twin (`model.twin`) and evaluate the result on the int8 model"
            )
        with torch.no_grad():
            if len(x) == 0:
                # oneDNN's convolution with a fused residual add refuses empty tensors, which
                # attacks pass once every point is done (Square does); the reference graph
                # gives the (0, classes) result.
                empty: Tensor = self.reference(x)
                return empty
            compiled = self.__dict__["_compiled"]
            shape = tuple(x.shape)
            if compiled is not None and (
                shape in self._shapes or len(self._shapes) < self.max_compiled_shapes
            ):
                try:
                    # Dynamo reads the global freezing flag (not torch.compile's options) to
                    # make weights constants, which the int8 lowering needs.
                    new_shape = shape not in self._shapes  # only then does Inductor compile
                    with (
                        torch._inductor.config.patch(freezing=True),
                        _quiet_int8_lowering() if new_shape else nullcontext(),
                    ):
                        out: Tensor = compiled(x)
                    self._shapes.add(shape)
                    return out
                except Exception as err:  # Inductor raises many types; fall back, loudly
                    self.compile_error = f"{type(err).__name__}: {err}".splitlines()[0]
                    self.__dict__["_compiled"] = None
                    log.warning("int8 compilation failed, running eagerly: %s", self.compile_error)
            return self.int8(x)

    def eager(self) -> QuantizedModel:
        """The same int8 model, never compiled: the same int8 kernels for any batch shape with
        no compilation cost (attacks call a model on many shapes)."""
        return QuantizedModel(self.int8, self.twin, self.reference, False, self.cost)

    def capabilities(self) -> Capabilities:
        """No input gradients (attacks go through ``twin``), no training, CPU kernels only,
        and an eager form for attacks."""
        return Capabilities(gradients=False, trainable=False, pinned=True, eager=True)

    def efficiency(self, in_shape: Sequence[int]) -> Efficiency:
        """The cost counted when the model was quantized (see :class:`Int8PTQ`)."""
        if self.cost is None:
            raise ValueError("this int8 model was built without its cost; quantize it with Int8PTQ")
        return self.cost

    def train(self, mode: bool = True) -> QuantizedModel:
        if mode:
            raise RuntimeError(
                "an int8 model cannot be trained: fine-tune before quantizing, or use the "
                "'lowbit' compressor for quantization-aware training"
            )
        return super().train(False)

    def __deepcopy__(self, memo: dict[int, Any]) -> QuantizedModel:
        # oneDNN's prepacked weights are opaque tensors that cannot be copied; the new int8
        # graph shares them, which is safe because nothing can modify an int8 model.
        return QuantizedModel(
            _fresh(self.int8),
            copy.deepcopy(self.twin, memo),
            copy.deepcopy(self.reference, memo),
            self.compiled,
            self.cost,
        )


def _calibration(
    data: DataSplits, batches: int, batch_size: int, seed: int, who: str
) -> Iterator[Tensor]:
    """Calibration batches, drawn from the training split only: calibrating on test points
    would fit the quantizers to the very points the model is then scored on."""
    require_training_split(data, f"{who} (calibrating activation ranges)")
    generator = torch.Generator().manual_seed(seed)
    for i, (x, _) in enumerate(data.train.batches(batch_size, shuffle=True, generator=generator)):
        if i >= batches:
            return
        yield x


def _int8_tensors(reference: GraphModule) -> dict[str, Any]:
    """What the int8 model stores, read off the reference graph.

    Returns the tensors a deployment stores (int8 weights, their per-channel fp32 scales,
    fp32 biases with BatchNorm folded in, the Normalize statistics; the weights' zero points
    only if not all zero, as int32, where the graph keeps int64 zeros), the number of
    weights and biases (``params``, ``nonzero``), and the per-tensor activation quantizers
    (their scale and zero point are constants in the graph: 8 bytes each).
    """
    state = {n.target: _attr(reference, str(n.target)) for n in reference.graph.nodes
             if n.op == "get_attr"}  # fmt: skip
    params = nonzero = int8_bytes = 0
    for node in reference.graph.nodes:
        if node.op != "call_function" or node.target not in (
            torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default,
            torch.ops.aten.conv3d.default, torch.ops.aten.linear.default,
        ):  # fmt: skip
            continue
        for arg in node.args[1:3]:
            if isinstance(arg, Node) and _op_name(arg).startswith("dequantize"):
                arg = arg.args[0]
            if isinstance(arg, Node) and arg.op == "get_attr":
                tensor = state[arg.target]
                params += tensor.numel()
                nonzero += int(torch.count_nonzero(tensor))
                if tensor.dtype == torch.int8:
                    int8_bytes += tensor.numel()
    activations = sum(1 for n in reference.graph.nodes if _op_name(n) in _Q_OPS)
    stored = {k: v.detach().contiguous() for k, v in state.items()}
    for node in reference.graph.nodes:  # weight zero points: all 0 (symmetric), not stored
        if _op_name(node) == "dequantize_per_channel" and isinstance(node.args[2], Node):
            key = node.args[2].target
            zero_points = stored.pop(key)
            if torch.count_nonzero(zero_points):
                stored[key] = zero_points.to(torch.int32)
    return {
        "state": stored,
        "params": params,
        "nonzero": nonzero,
        "int8_weight_bytes": int8_bytes,
        "activation_quantizers": activations,
    }


@COMPRESSORS.register("int8")
@dataclass(frozen=True, kw_only=True)
class Int8PTQ:
    """Post-training static int8 quantization (Jacob et al., CVPR 2018; the PTSQ of Shen et al.
    2024, Sec. 3.1.3) through PyTorch 2 Export and torchao's ``X86InductorQuantizer``.

    Weights: int8, symmetric, per output channel. Activations: uint8, affine, per tensor, ranges
    from a histogram observer over ``calibration_batches`` training batches. BatchNorm is folded
    into the preceding convolution. Returns a :class:`QuantizedModel`.

    ``size_bytes`` is the safetensors size of what the int8 model stores (int8 weights, fp32
    per-channel scales, fp32 biases and Normalize statistics; the symmetric weights' zero
    points are all zero and not stored) plus 8 bytes per activation quantizer, comparable with
    the fp32 safetensors size of :func:`robcomp.compress.measure`. The converted graph also
    keeps the fp32 weights it no longer reads; they are dropped. MACs are those of the float
    model, now in int8.

    Attributes:
        calibration_batches: number of training batches the observers see.
        batch_size: size of a calibration batch.
        compile: run inference through ``torch.compile`` (Inductor, freezing) of the int8
            graph; each new batch size costs a compilation the first time (see
            :class:`QuantizedModel`). Without it the graph lowered to oneDNN int8 kernels runs
            eagerly, which is already faster than fp32 at large batches.
        seed: picks the calibration batches.
    """

    uses_training_data = True  # calibrates activation ranges on data.train

    calibration_batches: int = 10
    batch_size: int = 64
    compile: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.calibration_batches < 1 or self.batch_size < 2:
            raise ValueError("calibration_batches must be >= 1 and batch_size >= 2")

    def label(self) -> str:
        return "int8"

    def __call__(self, model: nn.Module, data: DataSplits) -> tuple[nn.Module, Record]:
        quantize_pt2e, xiq = _torchao()
        start = time.perf_counter()
        # x86 int8 kernels (oneDNN) run on the CPU only: quantize a CPU copy, whatever the device.
        float_model = copy.deepcopy(model).eval().cpu()
        batches = [
            x.cpu()
            for x in _calibration(
                data, self.calibration_batches, self.batch_size, self.seed, self.label()
            )
        ]
        example = batches[0][:2] if len(batches[0]) >= 2 else torch.cat([batches[0]] * 2)
        quantizer = xiq.X86InductorQuantizer().set_global(
            xiq.get_default_x86_inductor_quantization_config()
        )
        prepared = quantize_pt2e.prepare_pt2e(_export(float_model, example), quantizer)
        with torch.no_grad():
            for x in batches:
                prepared(x)
        reference = _strip_unused(_fresh(quantize_pt2e.convert_pt2e(prepared)))
        twin = _make_twin(reference)
        qmodel = QuantizedModel(_lower_x86(reference, example), twin, reference, self.compile)
        seconds = time.perf_counter() - start
        stored = _int8_tensors(reference)
        act_bytes = 8 * stored["activation_quantizers"]
        size = len(save_bytes(stored["state"])) + act_bytes
        with torch.no_grad():  # on the eager int8 graph: no compilation for this check
            calib = torch.cat(batches)
            same = qmodel.int8(calib).argmax(1) == twin(calib).argmax(1)
        agreement = float(same.float().mean())
        qmodel.cost = Efficiency(
            params=stored["params"],
            nonzero_params=stored["nonzero"],
            bits=8,
            size_bytes=size,
            sparse_bytes=size,
            macs=count_macs(float_model, data.in_shape),
        )
        return qmodel, Record(
            method=self.label(),
            **asdict(qmodel.cost),
            seconds=seconds,
            details={
                "int8_weight_bytes": stored["int8_weight_bytes"],
                "activation_quantizers": stored["activation_quantizers"],
                "calibration_images": sum(len(x) for x in batches),
                "compile": self.compile,
                "twin_agreement_calibration": agreement,
                "backend": "x86 oneDNN (torchao X86InductorQuantizer)",
            },
        )


# --------------------------------------------------------------------------------------------
# low-bit and binary fake quantization (post-training or quantization-aware training)
# --------------------------------------------------------------------------------------------


class _RoundSTE(torch.autograd.Function):
    """Returns the quantized weight exactly; the gradient passes straight through."""

    @staticmethod
    def forward(ctx: Any, w: Tensor, quantized: Tensor) -> Tensor:
        return quantized

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _SignSTE(torch.autograd.Function):
    """Returns the binarized weight; gradient of sign as the clipped identity 1{|w| <= 1}."""

    @staticmethod
    def forward(ctx: Any, w: Tensor, binary: Tensor) -> Tensor:
        ctx.save_for_backward(w.abs() <= 1)
        return binary

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (inside,) = ctx.saved_tensors
        return grad * inside, None


def _channel_view(w: Tensor) -> Tensor:
    return w.detach().flatten(1) if w.ndim > 1 else w.detach().view(-1, 1)


class WeightQuant(nn.Module):
    """Parametrization: per-output-channel symmetric fake quantization of a weight.

    ``bits`` b in {2, 4, 8}: levels ``-(2^(b-1) - 1) .. 2^(b-1) - 1`` times a per-channel scale
    ``max|w_c| / (2^(b-1) - 1)`` (at most 2^b - 1 distinct values per channel). ``bits = 1``:
    XNOR-Net's binary weights ``sign(w) * mean|w_c|`` (Rastegari et al. 2016, Eq. 4). The scale
    follows the weights, so quantization-aware training can move it; it gets no gradient.
    """

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits

    def forward(self, w: Tensor) -> Tensor:
        flat = _channel_view(w)  # (C_out, fan_in)
        shape = (-1,) + (1,) * (w.ndim - 1)
        if self.bits == 1:
            alpha = flat.abs().mean(1).view(shape)  # (C_out, 1, ...)
            binary = torch.where(w.detach() >= 0, alpha, -alpha)
            return _SignSTE.apply(w, binary)
        qmax = 2 ** (self.bits - 1) - 1
        scale = (flat.abs().amax(1) / qmax).clamp_min(1e-12).view(shape)
        quantized = torch.clamp(torch.round(w.detach() / scale), -qmax, qmax) * scale
        return _RoundSTE.apply(w, quantized)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class ActQuant(nn.Module):
    """Per-tensor affine fake quantization of a layer's input, with a clipped STE.

    The range [lo, hi] (always containing 0) is the min/max seen while ``observing`` (the
    calibration pass); afterwards it is frozen, also during quantization-aware training.
    """

    lo: Tensor
    hi: Tensor

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.observing = False
        self.register_buffer("lo", torch.tensor(0.0))
        self.register_buffer("hi", torch.tensor(0.0))

    def forward(self, x: Tensor) -> Tensor:
        if self.observing:
            with torch.no_grad():
                self.lo.copy_(torch.minimum(self.lo, x.min()))
                self.hi.copy_(torch.maximum(self.hi, x.max()))
            return x
        qmax = 2**self.bits - 1
        scale = ((self.hi - self.lo) / qmax).clamp_min(1e-8).reshape(1)
        zero_point = torch.round(-self.lo / scale).clamp(0, qmax).to(torch.int32).reshape(1)
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, qmax)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, range=[{float(self.lo):.4g}, {float(self.hi):.4g}]"


def _quantize_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    quantizer = cast(nn.Module, module.input_quant)
    return (quantizer(args[0]), *args[1:])


def _quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in prunable_layers(model) if parametrize.is_parametrized(m, "weight")]


def bake(model: nn.Module) -> nn.Module:
    """Replace the weight parametrizations of ``lowbit``/``binary`` by their quantized values.

    In place. The weights keep their few distinct values as plain fp32 tensors (what a float
    runtime would load); activation quantizers stay.
    """
    for _, module in _quantized_layers(model):
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model


def _fake_quantize(
    model: nn.Module,
    data: DataSplits,
    *,
    bits: int,
    act_bits: int | None,
    include_first_last: bool,
    calibration_batches: int,
    batch_size: int,
    seed: int,
    method: str,
) -> tuple[nn.Module, Record]:
    start = time.perf_counter()
    new = finalize(copy.deepcopy(model))  # pruning masks become plain zeros first
    layers = select_layers(prunable_layers(new), include_first_last)
    for _, module in layers:
        parametrize.register_parametrization(module, "weight", WeightQuant(bits))
        if act_bits is not None:
            module.add_module("input_quant", ActQuant(act_bits))
            module.register_forward_pre_hook(_quantize_input)
    calibrated = 0
    if act_bits is not None:
        observers = [m for m in new.modules() if isinstance(m, ActQuant)]
        was_training = new.training
        new.eval()
        for obs in observers:
            obs.observing = True
        with torch.no_grad():
            for x in _calibration(data, calibration_batches, batch_size, seed, method):
                new(x)
                calibrated += len(x)
        for obs in observers:
            obs.observing = False
        new.train(was_training)
    seconds = time.perf_counter() - start
    size, params, nonzero = _packed_size(new, bits)
    return new, Record(
        method=method,
        params=params,
        nonzero_params=nonzero,
        bits=bits,
        size_bytes=size,
        sparse_bytes=size,
        macs=count_macs(new, data.in_shape),
        seconds=seconds,
        details={
            "quantized_layers": [n for n, _ in layers],
            "act_bits": act_bits,
            "calibration_images": calibrated,
        },
    )


def _packed_size(model: nn.Module, bits: int) -> tuple[int, int, int]:
    """(bytes, params, nonzero params) with quantized weights packed at ``bits`` per value.

    A quantized layer stores ``ceil(n * bits / 8)`` bytes of weights plus one fp32 scale per
    output channel; an activation quantizer 8 bytes (scale and zero point). Everything else
    (biases, BatchNorm, unquantized layers, Normalize) is stored at its own dtype.
    """
    size = params = nonzero = 0
    quantized = dict(_quantized_layers(model))
    for module in quantized.values():
        w = cast(Tensor, module.weight).detach()
        size += math.ceil(w.numel() * bits / 8) + 4 * w.shape[0]
        params += w.numel()
        nonzero += int(torch.count_nonzero(w))
    for key, tensor in model.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if ".parametrizations." in key or key.endswith("_mask"):
            continue
        if owner.endswith("input_quant"):
            size += 4  # each of lo/hi: together the 8 bytes of scale + zero point
            continue
        size += tensor.numel() * tensor.element_size()
    for name, p in model.named_parameters():
        if ".parametrizations." not in name:
            params += p.numel()
            nonzero += int(torch.count_nonzero(p))
    return size, params, nonzero


def _check_act_bits(act_bits: int | None) -> None:
    if act_bits is not None and act_bits not in (2, 4, 8):
        raise ValueError(f"act_bits must be 2, 4, 8 or null, got {act_bits}")


def _check_calibration(calibration_batches: int, batch_size: int) -> None:
    if calibration_batches < 1 or batch_size < 1:
        raise ValueError(
            f"calibration_batches and batch_size must be >= 1, got {calibration_batches} and "
            f"{batch_size}"
        )


@COMPRESSORS.register("lowbit")
@dataclass(frozen=True, kw_only=True)
class LowBit:
    """Uniform low-bit fake quantization of weights (per output channel, symmetric) and
    optionally of layer inputs (per tensor, affine, calibrated), with straight-through
    gradients (Bengio et al. 2013; Jacob et al. 2018; the low-bit-width quantization the 2025
    benchmark compares).

    Post-training as returned; quantization-aware training when fine-tuned with
    :func:`robcomp.train.fit` (the quantizers stay in the model). :func:`bake` makes the weights
    plain tensors. ``size_bytes`` counts the packed integers and their scales.

    Attributes:
        bits: weight bit-width, 2, 4 or 8.
        act_bits: input bit-width of every quantized layer, or None for float activations.
        include_first_last: quantize the first and last layers too.
        calibration_batches: training batches that set the activation ranges.
        batch_size: size of a calibration batch.
        seed: picks the calibration batches.
    """

    bits: int = 4
    act_bits: int | None = None
    include_first_last: bool = True
    calibration_batches: int = 10
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.bits not in (2, 4, 8):
            raise ValueError(f"bits must be 2, 4 or 8 (binary weights: 'binary'), got {self.bits}")
        _check_act_bits(self.act_bits)
        _check_calibration(self.calibration_batches, self.batch_size)

    @property
    def uses_training_data(self) -> bool:
        """Calibrated input quantizers read training batches; weights alone need no data."""
        return self.act_bits is not None

    def label(self) -> str:
        act = f"a{self.act_bits}" if self.act_bits else ""
        return f"lowbit-w{self.bits}{act}"

    def __call__(self, model: nn.Module, data: DataSplits) -> tuple[nn.Module, Record]:
        return _fake_quantize(
            model, data, bits=self.bits, act_bits=self.act_bits,
            include_first_last=self.include_first_last,
            calibration_batches=self.calibration_batches, batch_size=self.batch_size,
            seed=self.seed, method=self.label(),
        )  # fmt: skip


@COMPRESSORS.register("binary")
@dataclass(frozen=True, kw_only=True)
class BinaryWeights:
    """Binary weights ``sign(w) * mean|w_c|`` per output channel: XNOR-Net's Binary-Weight-
    Network (Rastegari et al., ECCV 2016), with the clipped straight-through gradient of sign.

    As in the paper, the first and last layers stay in floating point by default; their bytes
    count at 32 bits in ``size_bytes``. ``act_bits`` adds uniform input quantization (the paper's
    XNOR variant binarizes activations too; that is not implemented).

    Attributes:
        include_first_last: binarize the first and last layers too.
        act_bits: input bit-width of every binarized layer, or None.
        calibration_batches: training batches that set the activation ranges.
        batch_size: size of a calibration batch.
        seed: picks the calibration batches.
    """

    include_first_last: bool = False
    act_bits: int | None = None
    calibration_batches: int = 10
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        _check_act_bits(self.act_bits)
        _check_calibration(self.calibration_batches, self.batch_size)

    @property
    def uses_training_data(self) -> bool:
        """Calibrated input quantizers read training batches; weights alone need no data."""
        return self.act_bits is not None

    def label(self) -> str:
        return "binary" + (f"-a{self.act_bits}" if self.act_bits else "")

    def __call__(self, model: nn.Module, data: DataSplits) -> tuple[nn.Module, Record]:
        return _fake_quantize(
            model, data, bits=1, act_bits=self.act_bits,
            include_first_last=self.include_first_last,
            calibration_batches=self.calibration_batches, batch_size=self.batch_size,
            seed=self.seed, method=self.label(),
        )  # fmt: skip
