"""Inference latency and peak memory of a model on this machine.

Latency follows Marshall's protocols (MSc thesis, Algorithms 4 and 5): the time of one forward
pass on one image already in memory, and on a batch of N images, repeated; we report the median
and 90th percentile rather than the mean, which one descheduled run can dominate. Speed is a
benchmark quantity (``bench/``), never a test assertion.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from robcomp.models.capabilities import model_device


@dataclass(frozen=True)
class LatencyResult:
    """Wall-clock time of one forward pass, in milliseconds.

    Attributes:
        median_ms: median over the timed repeats.
        p90_ms: 90th percentile (nearest rank).
        mean_ms: mean, as Marshall's protocols report.
        threads: ``torch.get_num_threads()`` during the measurement.
        batch_size: images per forward pass.
        repeats: timed forward passes.
        include_load: whether each timed pass included turning a uint8 batch into floats.
    """

    median_ms: float
    p90_ms: float
    threads: int
    batch_size: int
    mean_ms: float = math.nan
    repeats: int = 0
    include_load: bool = False

    @property
    def per_image_ms(self) -> float:
        return self.median_ms / self.batch_size


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def latency(
    model: nn.Module,
    in_shape: Sequence[int],
    batch_size: int = 1,
    warmup: int = 5,
    repeats: int = 20,
    *,
    include_load: bool = False,
    seed: int = 0,
) -> LatencyResult:
    """Time ``model`` on random inputs of ``in_shape``, in eval mode under ``torch.no_grad``.

    ``batch_size=1`` is Algorithm 4 (one image already in memory); a larger batch is
    Algorithm 5 (N images per pass). With ``include_load`` each timed pass also converts a
    uint8 batch to float32 in [0, 1], the "load n samples into memory" step of Algorithm 5 for
    data held in memory as robcomp holds it. The warm-up passes are not timed (they include
    one-off costs: allocator growth, oneDNN primitive creation, ``torch.compile``). The model's
    training mode is restored afterwards.
    """
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise ValueError("batch_size and repeats must be >= 1, warmup >= 0")
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (batch_size, *in_shape), dtype=torch.uint8, generator=generator)
    raw = raw.to(model_device(model))  # the probe lives where the model does
    x = raw.float().div_(255.0)
    sync = _synchronizer(raw.device)
    was_training = model.training
    model.eval()
    times: list[float] = []
    try:
        with torch.no_grad():
            for i in range(warmup + repeats):
                start = time.perf_counter()
                batch = raw.float().div_(255.0) if include_load else x
                model(batch)
                sync()  # an accelerator returns before its kernels finish
                elapsed = time.perf_counter() - start
                if i >= warmup:
                    times.append(elapsed * 1000.0)
    finally:
        model.train(was_training)
    return LatencyResult(
        median_ms=statistics.median(times),
        p90_ms=_percentile(times, 0.9),
        threads=torch.get_num_threads(),
        batch_size=batch_size,
        mean_ms=statistics.fmean(times),
        repeats=repeats,
        include_load=include_load,
    )


def _synchronizer(device: torch.device) -> Callable[[], None]:
    """Waits for ``device``'s queued work (a no-op on the CPU, whose ops are synchronous)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def peak_memory_bytes(model: nn.Module, in_shape: Sequence[int], batch_size: int = 1) -> int:
    """Peak bytes of tensors a forward pass holds at once, beyond those that existed before it.

    Method: PyTorch's profiler with ``profile_memory=True`` records every CPU allocation and
    free of the tensor allocator (also those of oneDNN int8 ops and of ``torch.compile``d code,
    which both allocate through it). Allocations made inside a top-level op are charged when
    that op ends, frees when they happen; the peak of the running sum is the working set of
    the pass (activations, not weights, which exist before it). One warm-up pass runs first so
    lazy initialisation is not counted. Scratch memory a library allocates outside PyTorch's
    allocator is not seen.

    ``tracemalloc`` cannot do this (it traces Python's allocator, not tensor storage), and the
    ``ru_maxrss`` delta is a process-lifetime high-water mark that a previous, larger model
    hides.
    """
    from torch.profiler import ProfilerActivity, profile

    x = torch.rand(batch_size, *in_shape)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)  # warm-up
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                model(x)
    finally:
        model.train(was_training)
    points: list[tuple[float, int]] = []
    for event in prof.events():
        if event.name == "[memory]":  # a free (or an allocation outside any op)
            points.append((event.time_range.start, event.cpu_memory_usage))
        elif event.cpu_parent is None and event.cpu_memory_usage:
            points.append((event.time_range.end, event.cpu_memory_usage))
    points.sort(key=lambda p: p[0])
    peak = running = 0
    for _, change in points:
        running += change
        peak = max(peak, running)
    return peak
