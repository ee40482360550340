"""Does a busy machine make robcomp slower than it must? ``python bench/threads.py``.

Runs ``robcomp quickstart --quick`` (3 cells, tiny CNN on digits) as a new user would, in a
fresh process each time, under two loads: as the machine is, and with ``--busy`` extra
single-threaded processes spinning on the cores (two by default, as when the issue was found:
725 s instead of 4 minutes for the full quickstart, int8 latency 25.9 ms instead of 0.3 ms).
Each load is run with robcomp's thread choice (``threads: auto``: one intra-op thread for a
model this small) and with one thread per core, PyTorch's default and robcomp's behaviour
before threads were chosen (``--threads N`` with N = the cores). Variants are interleaved.

Writes bench/results/threads.json: per run the wall seconds, the int8 and fp32 latency at
batch 1 and the threads and 1-minute load average the cells recorded next to them; and the
ratios busy/as-is per thread setting. The load average is the honest caveat: on a shared
machine "as is" may already be busy.

Options: ``--busy N`` (default 2), ``--repeats R`` (default 1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results" / "threads.json"
SPIN = "while True: pass"


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _metrics(store: Path) -> dict[str, dict[str, float]]:
    """``{compressor method: {metric: value}}`` of the cost metrics the cells stored."""
    with sqlite3.connect(store) as db:
        runs = dict(db.execute("SELECT cell_id, info FROM runs WHERE status = 'done'").fetchall())
        out: dict[str, dict[str, float]] = {}
        for cell, name, value in db.execute(
            "SELECT cell_id, name, value FROM metrics WHERE attack = ''"
        ):
            method = json.loads(runs[cell])["compressor"] if cell in runs else cell
            out.setdefault(method, {})[name] = value
    return out


def _quickstart(threads: int | None) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-c", "from robcomp.cli import app; app()"]
        cmd += ["quickstart", "--quick", "--out", tmp]
        if threads is not None:
            cmd += ["--threads", str(threads)]
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        seconds = time.perf_counter() - start
        metrics = _metrics(Path(tmp) / "results.sqlite")
    pick = {m: metrics.get(m, {}) for m in ("int8", "none")}
    return {
        "seconds": seconds,
        "load_1min_before": load_before,
        "latency_ms_b1": {m: v.get("latency_ms_b1") for m, v in pick.items()},
        "threads": {m: v.get("threads") for m, v in pick.items()},
        "load_1min": {m: v.get("load_1min") for m, v in pick.items()},
    }


def _with_busy(n: int, threads: int | None) -> dict[str, Any]:
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(n)]
    try:
        time.sleep(2)  # let them reach the run queue
        return _quickstart(threads)
    finally:
        for proc in spinners:  # the processes this bench started, by their handles
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    cores = _cores()
    settings: dict[str, int | None] = {"auto": None, f"one_per_core_{cores}": cores}
    runs: dict[str, list[dict[str, Any]]] = {}
    for _ in range(args.repeats):
        for name, threads in settings.items():  # interleaved, so drifting load hits all alike
            runs.setdefault(f"as_is/{name}", []).append(_quickstart(threads))
            runs.setdefault(f"busy/{name}", []).append(_with_busy(args.busy, threads))
    seconds = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    result = {
        "what": "robcomp quickstart --quick, wall seconds, as the machine is and with "
        f"{args.busy} extra busy single-threaded processes",
        "machine": {"cores": cores, "platform": platform.platform(), "torch": torch.__version__},
        "runs": runs,
        "median_seconds": seconds,
        "busy_over_as_is": {
            name: seconds[f"busy/{name}"] / seconds[f"as_is/{name}"] for name in settings
        },
        "one_per_core_over_auto": {
            load: seconds[f"{load}/one_per_core_{cores}"] / seconds[f"{load}/auto"]
            for load in ("as_is", "busy")
        },
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
