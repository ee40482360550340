"""How fast can a forward-only query run? ``python bench/queries.py``.

Square (5000 queries per point) and FAB (a forward per iterate) only need logits, so they run
through :func:`robcomp.attacks.queries.query_fn`. This bench times the candidate execution
paths of such a query against eager PyTorch, per model (as attacks see it: behind its Normalize
layer, in eval mode), batch size and thread count, interleaved over rounds (so a busy
neighbour on the machine hurts all paths alike):

- ``eager``: ``with torch.no_grad(): model(x)``, what the attacks ran before;
- ``inference_mode``: the same under ``torch.inference_mode()``;
- ``channels_last_input``: eager, with the input converted to channels-last memory format;
- ``channels_last_model``: the same on a copy of the model with channels-last weights;
- ``jit_trace``: ``torch.jit.trace`` (reads the live weights);
- ``jit_freeze``: trace + ``torch.jit.freeze`` (weights become constants, conv-BN folded);
- ``jit_ofi``: trace + freeze + ``torch.jit.optimize_for_inference`` (oneDNN conv layouts,
  fused ReLU);
- ``query_fn``: what :func:`robcomp.attacks.queries.query_fn` serves, checks included;
- ``compile``: ``torch.compile`` (Inductor, ``dynamic=None``: static shapes first, dynamic
  after the first recompilation), at the ``--compile-batches`` sizes only (it costs seconds).

Per path: median ms per call, the one-time cost (trace/compile and first calls), whether a
shrinking batch (as points retire) runs without rebuilding and matches eager, and the largest
logit difference from eager relative to the logits' scale with argmax agreement.

Writes bench/results/queries.json. Options: ``--threads 1 2``, ``--batches 1 8 50 256``,
``--models ...``, ``--rounds R``, ``--compile-batches 50`` (none: ``--compile-batches``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import robcomp.models
from robcomp.attacks.queries import query_fn

RESULTS = Path(__file__).parent / "results" / "queries.json"
SHAPES = {
    "small_cnn": (1, 28, 28),
    "lenet5": (1, 28, 28),
    "resnet20": (3, 32, 32),
    "mobilenet_v2": (3, 32, 32),
}
Query = Callable[[Tensor], Tensor]


def _jit(model: nn.Module, x: Tensor, level: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in 2.14
        traced = torch.jit.trace(model, x, check_trace=False)
        if level == "trace":
            return traced
        frozen = torch.jit.freeze(traced)
        return frozen if level == "freeze" else torch.jit.optimize_for_inference(frozen)


def _no_grad(fn: Callable[[Tensor], Tensor]) -> Query:
    def run(x: Tensor) -> Tensor:
        with torch.no_grad():
            return fn(x)

    return run


def _paths(model: nn.Module, x: Tensor, use_compile: bool) -> dict[str, tuple[Query, float]]:
    """Each path as (query, seconds it took to build, including its first two calls)."""
    paths: dict[str, tuple[Query, float]] = {}

    def build(name: str, make: Callable[[], Query]) -> None:
        start = time.perf_counter()
        query = make()
        query(x)
        query(x)  # the JIT's profiling executor optimizes on the second call
        paths[name] = (query, time.perf_counter() - start)

    def inference(x: Tensor) -> Tensor:
        with torch.inference_mode():
            return model(x)

    build("eager", lambda: _no_grad(model))
    build("inference_mode", lambda: inference)
    build(
        "channels_last_input",
        lambda: _no_grad(lambda x: model(x.contiguous(memory_format=torch.channels_last))),
    )
    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    build(
        "channels_last_model",
        lambda: _no_grad(lambda x: channels_last(x.contiguous(memory_format=torch.channels_last))),
    )
    for level in ("trace", "freeze", "ofi"):
        build(f"jit_{level}", lambda level=level: _no_grad(_jit(model, x, level)))  # type: ignore[misc]
    build("query_fn", lambda: query_fn(model))
    if use_compile:
        torch._dynamo.reset()  # each model compiles afresh, not against the recompile limit
        build("compile", lambda: _no_grad(torch.compile(model)))
    return paths


def _time(query: Query, x: Tensor, budget: float = 0.25) -> float:
    """Median seconds per call over at least 3 calls and about ``budget`` seconds."""
    times = []
    while len(times) < 3 or (sum(times) < budget and len(times) < 50):
        start = time.perf_counter()
        query(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _shrinking(query: Query, model: nn.Module, x: Tensor) -> dict[str, Any]:
    """Serve batches shrinking as points retire; seconds of the first call at each new size
    and the worst difference from eager (relative to the logits' scale)."""
    sizes = sorted({n for n in (len(x) - 1, len(x) // 2 + 1, 3, 1) if 0 < n < len(x)}, reverse=True)
    first: list[float] = []
    worst = 0.0
    for n in sizes:
        start = time.perf_counter()
        out = query(x[:n])
        first.append(time.perf_counter() - start)
        with torch.no_grad():
            ref = model(x[:n])
        worst = max(worst, _relative(out, ref))
    return {"sizes": sizes, "first_call_s": first, "max_rel_diff": worst}


def _relative(out: Tensor, ref: Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def _model(name: str) -> nn.Module:
    """The model in eval mode, with BatchNorm statistics that are not the identity (as after
    training), so folding them into the convolutions changes the weights."""
    torch.manual_seed(0)
    model = robcomp.models.create(name, 10, SHAPES[name]).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.uniform_(0.5, 1.5)
            module.bias.uniform_(-0.2, 0.2)
    return model


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    rows: list[dict[str, Any]] = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name in args.models:
            model = _model(name)
            for batch in args.batches:
                x = torch.rand(batch, *SHAPES[name], generator=torch.Generator().manual_seed(1))
                paths = _paths(model, x, batch in args.compile_batches)
                with torch.no_grad():
                    ref = model(x)
                ms: dict[str, list[float]] = {p: [] for p in paths}
                for _ in range(args.rounds):  # interleaved
                    for p, (query, _) in paths.items():
                        ms[p].append(1e3 * _time(query, x))
                for p, (query, build_s) in paths.items():
                    out = query(x)
                    row = {
                        "threads": threads,
                        "model": name,
                        "batch": batch,
                        "path": p,
                        "ms": round(statistics.median(ms[p]), 3),
                        "build_s": round(build_s, 4),
                        "max_rel_diff": _relative(out, ref),
                        "argmax_equal": bool((out.argmax(1) == ref.argmax(1)).all()),
                    }
                    if batch == max(args.batches) or p == "compile":
                        row["shrinking"] = _shrinking(query, model, x)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return {
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "rounds": args.rounds,
        # the 1-minute load average before and after: on a shared machine other processes
        # compete for the cores, which hurts multi-threaded timings most
        "load_average": [load_before, os.getloadavg()[0]],
        "cores": len(os.sched_getaffinity(0)),
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 50, 256])
    parser.add_argument("--models", nargs="+", default=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile-batches", type=int, nargs="*", default=[50])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = run(args)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
