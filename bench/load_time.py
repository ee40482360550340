"""How soon does ``robcomp run`` reject a malformed file? ``python bench/load_time.py``.

Each file is run as a user would, ``robcomp run FILE --out OUT`` in a fresh interpreter, and
timed wall-clock to its exit; next to them, ``python -c "import torch"`` alone (what a check
after torch's import could never beat). The files' own mistakes (syntax, empty, unknown keys,
types, limits, threads) are found before torch is imported; a mistake that needs a component or
the data (an eps covering the whole input range, a device this machine lacks) after it.

Writes bench/results/load_time.json: per file, the exit code, the seconds of each repeat and
their min and median, and whether torch was imported; the 1-minute load average before, since
on a shared machine the timings move with it.

Options: ``--repeats R`` (default 5).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results" / "load_time.json"
FILES = {
    "unknown key": "name: x\ntrian: {epochs: 1}\n",
    "evaluate.limit 0": "name: x\nevaluate: {limit: 0}\n",
    "YAML syntax error": "name: x\ndata: {name: digits\n",
    "empty file": "",
    "threads 0": "name: x\nthreads: 0\n",
    "Linf eps 2 (needs the data)": "name: x\nevaluate: {attacks: [{name: pgd, eps: 2}]}\n",
    "device cuda without a GPU": "name: x\ndevice: cuda\n",
}
# Runs the CLI, then says whether torch was imported (stdout's last line).
RUN = (
    "import sys\nfrom robcomp.cli import app\ntry:\n    app(sys.argv[1:], prog_name='robcomp')\n"
    "finally:\n    print('torch', 'torch' in sys.modules)\n"
)


def _time(cmd: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    return time.perf_counter() - start, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    # No GPU for the device case, as on the machine the issue was found on.
    env = os.environ | {"CUDA_VISIBLE_DEVICES": ""}
    out: dict[str, Any] = {
        "what": "wall seconds of `robcomp run FILE` on a malformed FILE, fresh process each",
        "machine": {"cores": os.cpu_count(), "platform": platform.platform()},
        "load_1min_before": os.getloadavg()[0],
        "files": {},
    }
    torch_only = [
        _time([sys.executable, "-c", "import torch"], env)[0] for _ in range(args.repeats)
    ]
    out["import torch"] = {"min": min(torch_only), "median": statistics.median(torch_only)}
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in FILES.items():
            path = Path(tmp) / "bad.yaml"
            path.write_text(text)
            cmd = [sys.executable, "-c", RUN, "run", str(path), "--out", str(Path(tmp) / "o")]
            times, done = [], None
            for _ in range(args.repeats):
                seconds, done = _time(cmd, env)
                times.append(seconds)
            assert done is not None
            out["files"][name] = {
                "exit_code": done.returncode,
                "error": done.stderr.strip(),
                "torch_imported": done.stdout.strip().endswith("True"),
                "seconds": times,
                "min": min(times),
                "median": statistics.median(times),
            }
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
