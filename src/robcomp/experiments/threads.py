"""How many intra-op threads a cell runs with.

PyTorch starts one OpenMP thread per core. On a tiny model each operator is a few microseconds
of work, so the threads spend their time synchronising, and when other processes share the
cores, a descheduled thread holds up the barrier all the others spin on: with two busy
single-threaded jobs on a 2-core machine the quickstart took 12 minutes instead of 4, and int8
latency at batch 1 read 25.9 ms instead of 0.3 ms (``bench/threads.py`` measures it). So a
cell uses one thread when its model is too small to gain from more, and never more threads
than the cores other processes leave free.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import torch

log = logging.getLogger(__name__)

# Below this many multiply-accumulates per image a forward pass is a few microseconds per layer,
# too little to split across threads (tiny_cnn on 8x8 digits: 83 k; a CIFAR ResNet-20: 41 M).
SMALL_MODEL_MACS = 5_000_000


def cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's or a Slurm job's)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def load_1min() -> float:
    """The 1-minute load average: runnable processes, averaged (nan where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return math.nan


@cache
def free_cores() -> int:
    """Cores not busy with other processes, at least 1. Read once per process, before this
    process adds its own load, so a long run does not count itself."""
    load = load_1min()
    busy = 0 if math.isnan(load) else round(load)
    return max(1, cores() - busy)


def choose_threads(setting: int | None, macs_per_image: int | None) -> int:
    """Intra-op threads for a cell: ``setting`` when given (at most the cores there are),
    else 1 for a model under :data:`SMALL_MODEL_MACS`, else every free core."""
    if setting is not None:
        if setting < 1:
            raise ValueError(f"threads must be >= 1 or null (auto), got {setting}")
        if setting > free_cores():
            log.warning(
                "threads=%d but only %d of %d cores are free: threads will wait for each other",
                setting, free_cores(), cores(),
            )  # fmt: skip
        return min(setting, cores())
    if macs_per_image is not None and macs_per_image < SMALL_MODEL_MACS:
        return 1
    return free_cores()


@contextmanager
def intra_op_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` intra-op threads, restoring the previous number after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
