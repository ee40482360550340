"""What does Ray cost per cell, and what do two workers buy? ``python bench/scale.py``.

Runs the same 8-cell digits grid of tiny cells (eight seeds, so eight independent baselines;
one intra-op thread per cell) three ways, interleaved, each in a fresh output folder so every
run trains its baselines: the local loop (``LocalExecutor``), Ray with one cell at a time (each
cell reserves both CPUs of a ``ray.init(num_cpus=2)``) and Ray with two cells at a time (one CPU
each). Ray is started and both its workers have run a cell before each Ray run is timed (the
overhead "once Ray is up"); the start and the first cells of fresh workers are reported on
their own. Ray's workers run at nice 15 by default, which on a machine other processes share
times the kernel's priorities rather than Ray; the bench starts Ray with
``RAY_worker_niceness=0`` (unless set), the priority of the local loop.

Writes into bench/results/scale.json (read, merged, written: other benches add their keys):
``ray_overhead_per_cell_s`` = (Ray one at a time - local) / 8, goal < 1 s;
``ray_speedup_2_workers`` = local / Ray two at a time, goal >= 1.6 on 2 cores;
``ray_speedup_2_vs_1_workers``; and under ``ray`` every run's seconds with the 1-minute load
average before and after it, since other processes on the machine slow parallel runs most.

Options: ``--repeats R`` (default 2; medians are reported), ``--epochs E`` (training epochs
per cell, default 4: longer cells show how the speedup grows as the overhead shrinks in
proportion), ``--results PATH``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from robcomp.experiments import load_experiment, run_experiment
from robcomp.experiments.executors import Executor, LocalExecutor, RayExecutor

RESULTS = Path(__file__).parent / "results" / "scale.json"
CELLS = 8
NICENESS = "RAY_worker_niceness"  # Ray reads its settings from RAY_<name>
EPOCHS = 4
SETTINGS = {"epochs": EPOCHS}  # --epochs


def grid(cpus_per_cell: float, seeds: int = CELLS) -> dict[str, Any]:
    """Tiny independent cells (one per seed): a tiny CNN on digits, FGSM and PGD."""
    return {
        "name": "scale",
        "data": {"name": "digits"},
        "model": {"name": "tiny_cnn"},
        "train": {"epochs": SETTINGS["epochs"], "lr": 0.05, "batch_size": 64},
        "compress": {"name": "magnitude", "sparsity": 0.5},
        "evaluate": {
            "attacks": [{"name": "fgsm", "eps": 0.1}, {"name": "pgd", "eps": 0.1, "steps": 10}],
            "limit": 200,
            "diagnostics": False,
            "latency_batch_sizes": [1],
            "latency_repeats": 5,
        },
        "threads": 1,
        "resources": {"num_cpus": cpus_per_cell},
        "grid": {"seed": list(range(seeds))},
    }


def timed(executor: Executor, cpus_per_cell: float) -> dict[str, float]:
    experiment = load_experiment(grid(cpus_per_cell))
    before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        summary = run_experiment(experiment, Path(tmp) / "out", executor)
        seconds = time.perf_counter() - start
    if summary.failed or summary.ran != CELLS:
        raise RuntimeError(f"bench grid: {len(summary.failed)} cells failed: {summary.failed}")
    return {"seconds": seconds, "load_before": before, "load_after": os.getloadavg()[0]}


def start_ray() -> dict[str, float]:
    """Start a local two-CPU Ray; time that and the first cells of its two fresh workers."""
    import ray

    # Ray runs its workers at nice 15 to keep its own daemons responsive; on a machine other
    # processes share, that would time the scheduler's priorities instead of Ray's overhead.
    os.environ.setdefault(NICENESS, "0")
    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    up = time.perf_counter() - start
    start = time.perf_counter()
    warm()
    return {"ray_start_s": up, "ray_worker_warmup_s": time.perf_counter() - start}


def warm() -> None:
    """Make sure two Ray workers are up and have each run a cell. Ray stops a worker that
    idles for a second (as one does while cells run one at a time); without this its
    replacement would import torch and robcomp inside the next timed run."""
    import ray

    @ray.remote(num_cpus=1)
    def pid() -> int:
        import robcomp.experiments.runner  # noqa: F401  (what a cell imports first)

        time.sleep(0.3)  # overlap with the other task, so it needs the other worker
        return os.getpid()

    for _ in range(60):  # two tasks at once returned by two processes: both workers are up
        if len(set(ray.get([pid.remote(), pid.remote()]))) == 2:
            break
    with tempfile.TemporaryDirectory() as tmp:
        run_experiment(load_experiment(grid(1.0, seeds=2)), Path(tmp) / "out", RayExecutor())


def merge(keys: dict[str, Any], path: Path = RESULTS) -> None:
    """Add ``keys`` to the results file, keeping what other benches wrote there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    current = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**current, **keys}, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="training epochs per cell")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    SETTINGS["epochs"] = args.epochs
    import ray

    startup = start_ray()
    variants: dict[str, tuple[Executor, float]] = {
        "local": (LocalExecutor(), 1.0),
        "ray_1_worker": (RayExecutor(), 2.0),  # each cell holds both CPUs: one at a time
        "ray_2_workers": (RayExecutor(), 1.0),
    }
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    try:
        for repeat in range(args.repeats):
            for name, (executor, cpus) in variants.items():
                if isinstance(executor, RayExecutor):
                    warm()
                runs[name].append(timed(executor, cpus))
                print(f"repeat {repeat} {name}: {runs[name][-1]}", file=sys.stderr)
    finally:
        ray.shutdown()
    med = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items()}
    overhead = (med["ray_1_worker"] - med["local"]) / CELLS
    keys = {
        "ray_overhead_per_cell_s": round(overhead, 3),
        "ray_speedup_2_workers": round(med["local"] / med["ray_2_workers"], 3),
        "ray_speedup_2_vs_1_workers": round(med["ray_1_worker"] / med["ray_2_workers"], 3),
        "ray": {
            "cells": CELLS,
            "threads_per_cell": 1,
            "epochs_per_cell": SETTINGS["epochs"],
            "repeats": args.repeats,
            "median_seconds": {k: round(v, 2) for k, v in med.items()},
            "runs": runs,
            **{k: round(v, 2) for k, v in startup.items()},
            "ray_worker_niceness": int(os.environ[NICENESS]),
            "cores": len(os.sched_getaffinity(0)),
            "torch": torch.__version__,
            "ray_version": ray.__version__,
            "python": platform.python_version(),
            "goals": {"ray_overhead_per_cell_s": "< 1", "ray_speedup_2_workers": ">= 1.6"},
        },
    }
    merge(keys, args.results)
    print(json.dumps({k: v for k, v in keys.items() if k != "ray"}, indent=2))


if __name__ == "__main__":
    main()
