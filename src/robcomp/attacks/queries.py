"""Forward-only model queries for the attacks that need outputs but no gradient.

Square queries the model thousands of times per point and FAB checks each iterate; both only
need logits. :func:`query_fn` is the one place that decides how such a query runs, so a faster
execution path (issue 18: AutoAttack at 3x) changes every forward-only query at once.

On the CPU the fast path is the model traced, frozen and optimized for inference by TorchScript
(``torch.jit.trace`` -> ``torch.jit.freeze`` -> ``torch.jit.optimize_for_inference``): the
weights become constants, BatchNorm folds into the convolution before it, and convolutions,
ReLUs and max-pools run on oneDNN's blocked layout without converting back between layers.
Measured by ``bench/queries.py`` (``bench/results/queries.json``) against eager PyTorch and the
other candidates (``torch.compile``, channels-last inputs, ``torch.inference_mode``).

Why it is the same function: the trace records the operations the model ran, freezing inlines
the model's own weights into them, and the optimizations are identities of real arithmetic
(folding ``BN(conv(x))`` into one convolution, running the same operators on another memory
layout), so only float32 rounding changes (about 1e-7 of the logits on the zoo's models). The
trace is also the risk: it keeps the one branch of Python control flow it saw and any number
it read off the batch, and a frozen graph keeps the weights it was built with. Hence the
checks: tracing must not warn, the graph is compared with the eager model (logits within
:data:`RTOL` of each row's largest logit, identical argmax) on the first batch of every query
object and on the first :data:`TRUSTED_SIZES` batch sizes it serves, and answers eagerly for
good if they differ, and the graph is rebuilt
whenever the model's parameters, buffers, hooks or modes change. Anything the checks cannot
vouch for runs eagerly: see :func:`query_fn`. ``ROBCOMP_FAST_QUERIES=0`` turns the fast path
off.
"""

from __future__ import annotations

import itertools
import logging
import os
import warnings
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.modules import module as global_hooks
from torch.overrides import TorchFunctionMode

from robcomp.models.capabilities import Capabilities, capabilities

log = logging.getLogger(__name__)

ENV = "ROBCOMP_FAST_QUERIES"
# Largest difference allowed between the fast path's logits and eager's, relative to each row's
# largest eager logit: float32 rounding from folding BatchNorm and reordering sums is ~1e-6 of
# the logits; a stale or wrong graph is off by far more.
RTOL = 1e-4

# Batch sizes on which a graph is compared with eager before other sizes are trusted to it
# (besides the first batch of every query). The trace reads no batch size: a branch on one
# warns while tracing, and a size fixed by the code fails on any other; comparing a few sizes
# checks that, without an eager pass for each size as points retire.
TRUSTED_SIZES = 3

Forward = Callable[[Tensor], Tensor]
_SERIALS = itertools.count()


@dataclass
class _Graph:
    """The fast path built for one model: the graph, or why there is none, and the model's
    fingerprint it was built from."""

    fingerprint: Hashable  # None when there is no graph
    forward: Forward | None
    reason: str | None = None
    serial: int = field(default_factory=lambda: next(_SERIALS))  # names it in Query's checks
    # Batch sizes it was compared with eager on, per shape of one input.
    compared: dict[tuple[int, ...], set[int]] = field(default_factory=dict)
    # Built again after its predecessor failed or differed: if it fails too, it is not rebuilt.
    retry: bool = False


# One fast path per live model; a weak key, so caching never keeps a model alive.
_GRAPHS: weakref.WeakKeyDictionary[nn.Module, _Graph] = weakref.WeakKeyDictionary()
# Fallback reasons already logged per model (each is logged once).
_LOGGED: weakref.WeakKeyDictionary[nn.Module, set[str]] = weakref.WeakKeyDictionary()


def query_fn(model: nn.Module, *, fast: bool | None = None) -> Query:
    """A function computing ``model``'s logits without building an autograd graph.

    Call it once per attack run and query the result many times: on the CPU it serves the
    model as a frozen, inference-optimized TorchScript graph (see the module docstring), built
    on the first batch, cached per model and rebuilt when the model changes. The result is the
    model's function up to float32 rounding: the query compares the graph with the eager model
    on its first batch and on the graph's first :data:`TRUSTED_SIZES` batch sizes, and falls
    back to eager for good if they differ.

    The query runs the model eagerly (``with torch.no_grad(): model(x)``), logging why once per
    model, when: the fast path is off (``fast=False``, or the environment variable
    ``ROBCOMP_FAST_QUERIES=0`` when ``fast`` is None); the inputs are not float32 on the CPU
    (other devices run eagerly: the graph's oneDNN layouts are CPU-only); a module is in
    training mode; autocast is on; the model declares its own execution (an int8 model, see
    :class:`robcomp.models.capabilities.GradientFree`) or has no parameters or buffers, or
    holds packed weights outside them; two eager passes differ (randomness); tracing reads a
    tensor's value into Python or warns (control flow depending on the data) or fails; or the
    graph's logits differ from eager's. An empty batch always runs eagerly.

    The graph is rebuilt when any parameter or buffer is replaced or changed
    in place through autograd-visible ops (optimizer steps, ``load_state_dict``,
    ``torch.no_grad()`` updates bump a tensor's version), or a hook or training flag changes.
    Writes through ``tensor.data`` bypass version counters, and plain tensor attributes are not
    tracked; those changes are caught by the comparison each new query makes on its first
    batch, which is why a query should not outlive a change of weights.

    Args:
        model: the classifier, taking inputs in [0, 1] and returning logits.
        fast: use the fast path where it is exact; None reads ``ROBCOMP_FAST_QUERIES``
            (anything but ``0`` means on).

    Returns:
        A :class:`Query`: ``query(x)`` returns ``model(x)``'s logits, detached.
    """
    if fast is None:
        fast = os.environ.get(ENV, "1").strip() != "0"
    return Query(model, fast)


@dataclass(eq=False)
class Query:
    """``model``'s logits without autograd, through the fast path where it is verified exact.

    Attributes:
        model: the model queried.
        fast: whether the fast path may be used at all.
        served: how the last call was answered, ``fast`` or ``eager``.
        reason: why the last call ran eagerly, if it did.
    """

    model: nn.Module
    fast: bool = True
    served: str = ""
    reason: str | None = None
    # Serials of the graphs this query compared with eager at least once.
    _compared: set[int] = field(default_factory=set, init=False, repr=False)
    # model.modules(), listed once: walking the tree on every call costs more than the rest.
    _modules: list[nn.Module] = field(default_factory=list, init=False, repr=False)

    def __call__(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            reason = self._transient_reason(x)
            if reason is None and len(x) > 0:  # an empty batch costs nothing eagerly
                graph, built, reason = self._graph(x)
                out = None if graph is None else self._fast(graph, x)
                if graph is not None and out is None and not built and not graph.retry:
                    # Weights written through ``.data`` leave the fingerprint as it was: a
                    # cached graph that differs is rebuilt once before giving up on the model
                    # (once: a graph that fails at another batch size would fail every time).
                    graph = _rebuild(self.model, x, self._modules, retry=True)
                    out = self._fast(graph, x)
                if out is not None:
                    self.served, self.reason = "fast", None
                    return out
                reason = reason or (graph.reason if graph is not None else None)
            self.served, self.reason = "eager", reason
            if reason is not None:
                _log_once(self.model, reason)
            eager: Tensor = self.model(x)
            return eager

    def _transient_reason(self, x: Tensor) -> str | None:
        """Why this call cannot use the fast path, for reasons that may pass (None if it can)."""
        if not self.fast:
            return f"fast queries are off ({ENV}=0 or fast=False)"
        if not isinstance(self.model, nn.Module):
            return f"the model is a {type(self.model).__name__}, not an nn.Module"
        if x.device.type != "cpu" or x.dtype != torch.float32:
            return f"inputs are {x.dtype} on {x.device}; the fast path is for float32 on the CPU"
        if torch.is_autocast_enabled("cpu"):
            # The graph was traced in float32; under autocast eager runs in lower precision.
            return "autocast is on; the fast path is traced in float32"
        return None

    def _graph(self, x: Tensor) -> tuple[_Graph | None, bool, str | None]:
        """The model's graph (built or rebuilt on ``x`` if the model changed), whether it was
        built now, or why there is none."""
        graph = _GRAPHS.get(self.model)
        if graph is not None and graph.reason is not None:
            return None, False, graph.reason  # not retried when the weights change
        if graph is not None and self._unchanged(graph):
            return graph, False, None
        self._modules = list(self.model.modules())
        if any(m.training for m in self._modules):
            return None, False, "the model is in training mode"
        graph = _rebuild(self.model, x, self._modules)
        return (graph, True, None) if graph.reason is None else (None, True, graph.reason)

    def _unchanged(self, graph: _Graph) -> bool:
        """Whether the model is as ``graph`` was built from, relisting its modules first if
        that is what differs (a submodule was added or replaced)."""
        if self._modules and graph.fingerprint == _fingerprint(self._modules):
            return True
        self._modules = list(self.model.modules())
        return graph.fingerprint == _fingerprint(self._modules)

    def _fast(self, graph: _Graph, x: Tensor) -> Tensor | None:
        """The graph's logits on ``x``, compared with eager's where that is due (see
        :data:`TRUSTED_SIZES`); None, and the graph dropped for good, if it fails or differs."""
        if graph.forward is None:
            return None
        sizes = graph.compared.setdefault(tuple(x.shape[1:]), set())
        compare = graph.serial not in self._compared or (
            len(x) not in sizes and len(sizes) < TRUSTED_SIZES
        )
        try:
            out = _run(graph.forward, x)
            difference = _difference(out, self.model(x)) if compare else None
        except Exception as err:  # TorchScript raises many types; any means not this graph
            difference = f"it failed: {_first(err)}"
        if difference is not None:
            graph.reason = f"the traced graph differs from eager on {tuple(x.shape)}: {difference}"
            graph.forward = None
            log.warning("fast queries off for this model: %s", graph.reason)
            return None
        if compare:
            sizes.add(len(x))
            self._compared.add(graph.serial)
        return out


def _run(forward: Forward, x: Tensor) -> Tensor:
    """Run the graph as optimized when it was built, without the profiling executor
    re-specializing it per shape: the graph verified is the graph that runs. (The flag is
    thread-local.)"""
    with torch.jit.optimized_execution(False):
        return forward(x)


def _rebuild(model: nn.Module, x: Tensor, modules: list[nn.Module], retry: bool = False) -> _Graph:
    reason = _unsupported(model, modules)
    graph = _Graph(None, None, reason) if reason else _build(model, x, _fingerprint(modules))
    graph.retry = retry
    _GRAPHS[model] = graph
    return graph


def _fingerprint(modules: list[nn.Module]) -> Hashable:
    """What the frozen graph depends on: each module's identity, mode, children and hooks,
    and each parameter's and buffer's identity, storage and version counter (bumped by every
    in-place change autograd sees), each module's class and any forward set on the instance,
    and the global module hooks. Plain tensor attributes are left out: pruning's forward
    hook sets a new ``weight`` attribute on every call."""
    parts: list[Hashable] = [
        tuple(global_hooks._global_forward_pre_hooks),
        tuple(global_hooks._global_forward_hooks),
    ]
    add = parts.append
    for module in modules:
        add(id(module))
        add(id(type(module)))
        add(id(module.__dict__.get("forward")))  # a forward replaced on the instance
        add(module.training)
        add(tuple(map(id, module._modules.values())))
        add(tuple(module._forward_pre_hooks))  # handle ids, never reused
        add(tuple(module._forward_hooks))
        for tensors in (module._parameters.values(), module._buffers.values()):
            for t in tensors:
                if t is not None:
                    add((id(t), t.data_ptr(), t._version))
    return tuple(parts)


def _build(model: nn.Module, x: Tensor, fingerprint: Hashable) -> _Graph:
    """Trace, freeze and optimize ``model`` on ``x``, or say why it must run eagerly."""
    reason = _random(model, x)
    if reason is not None:
        return _Graph(fingerprint, None, reason)
    conversions = _Conversions()
    try:
        with warnings.catch_warnings(record=True) as caught, conversions:
            warnings.simplefilter("always")
            # TorchScript is deprecated in torch 2.14 (FutureWarning) but is the fastest exact
            # path measured (bench/queries.py); torch.compile costs seconds per shape instead.
            warnings.filterwarnings("ignore", r".*torch\.jit.*deprecated", FutureWarning)
            traced = torch.jit.trace(model, x, check_trace=False)
            forward = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
    except Exception as err:  # tracing fails on many constructs; each means: run eagerly
        return _Graph(fingerprint, None, f"tracing failed: {_first(err)}")
    if conversions.seen:
        # Warning filters in the model's code can hide the TracerWarning; this cannot be hidden.
        names = ", ".join(sorted(conversions.seen))
        return _Graph(fingerprint, None, f"the model reads tensor values into Python ({names})")
    for warning in caught:
        if issubclass(warning.category, torch.jit.TracerWarning):
            # The trace fixed a branch, a Python number or a shape taken from this batch.
            return _Graph(fingerprint, None, f"tracing warned: {_first(warning.message)}")
    return _Graph(fingerprint, forward)


class _Conversions(TorchFunctionMode):
    """Records, while tracing, every tensor value the model turns into a Python value: the
    trace freezes it (a branch, a loop count, an index) as it was on the traced batch."""

    NAMES = frozenset(
        {"__bool__", "__int__", "__float__", "__index__", "__len__", "item", "tolist", "numpy"}
    )

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def __torch_function__(
        self,
        func: Callable[..., object],
        types: object,
        args: tuple[object, ...] = (),
        kwargs: dict[str, object] | None = None,
    ) -> object:
        name = getattr(func, "__name__", "")
        if name in self.NAMES:
            self.seen.add(name)
        return func(*args, **(kwargs or {}))


def _unsupported(model: nn.Module, modules: list[nn.Module]) -> str | None:
    """Why ``model`` is not a plain module of tensors the trace can freeze and
    :func:`_fingerprint` can watch (None if it is)."""
    if capabilities(model) != Capabilities():
        return "the model declares its own execution (e.g. int8 kernels)"
    tensors = [t for m in modules for t in (*m._parameters.values(), *m._buffers.values())]
    if not any(t is not None for t in tensors):
        return "the model has no parameters or buffers"
    if any(t is not None and (t.layout != torch.strided or t.is_mkldnn) for t in tensors):
        return "the model holds tensors without plain storage (sparse, oneDNN)"
    for module in modules:
        if any(isinstance(v, torch.ScriptObject) for v in vars(module).values()):
            return "the model holds packed weights outside its parameters"
    return None


def _random(model: nn.Module, x: Tensor) -> str | None:
    """Whether two eager passes differ; the caller's random stream is left as it was."""
    with torch.random.fork_rng(devices=[]):
        first, second = model(x), model(x)
    if not isinstance(first, Tensor):
        return f"the model returns a {type(first).__name__}, not a tensor of logits"
    if not torch.equal(first, second):
        return "two eager passes differ (the model is random)"
    return None


def _difference(out: Tensor, ref: Tensor) -> str | None:
    """How ``out`` differs from ``ref`` beyond rounding, or None if it does not."""
    if out.shape != ref.shape or out.dtype != ref.dtype:
        return f"shape {tuple(out.shape)} {out.dtype} vs {tuple(ref.shape)} {ref.dtype}"
    scale = ref.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(ref.dtype).tiny)
    excess = ((out - ref).abs() / scale).nan_to_num(nan=float("inf")).max()
    if excess > RTOL:
        return f"logits differ by {float(excess):.2e} of their scale (allowed {RTOL:g})"
    if ref.ndim > 1 and not torch.equal(out.argmax(-1), ref.argmax(-1)):
        return "argmax differs"
    return None


def _first(err: object) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _log_once(model: nn.Module, reason: str) -> None:
    try:
        seen = _LOGGED.setdefault(model, set())
    except TypeError:  # not weakly referenceable
        return
    if reason not in seen:
        seen.add(reason)
        log.info("forward-only queries run eagerly: %s", reason)
