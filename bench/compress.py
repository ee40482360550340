"""What compression buys in speed and bytes on this CPU: ``python bench/compress.py``.

Writes bench/results/compress.json and prints it. For the CIFAR ResNet-18 (torchvision, 3x3
stem) and ResNet-20 (option-A shortcuts), at batch 1 (Marshall's Algorithm 4: one image in
memory) and batch 64 (Algorithm 5), the forward latency of:

- ``fp32``: the dense float model, eager;
- ``int8``: PT2E int8 (torchao X86InductorQuantizer) through ``torch.compile`` with Inductor's
  freezing passes (``Int8PTQ(compile=True)``, the deployed form);
- ``int8_eager``: the graph lowered ahead of time to oneDNN int8 ops, run eagerly;
- ``int8_reference``: the converted graph before lowering (fp32 arithmetic between
  quantize/dequantize pairs, what ``convert_pt2e`` returns; its forward is the twin's);
- ``l1_50``: L1 filter pruning removing 50% of the filters of every prunable unit;
- ``unstructured_90``: 90% global magnitude pruning, masks made permanent (dense kernels);

and the model bytes (fp32 safetensors; int8 as the compressor records it). Variants are timed
in interleaved rounds, so a noisy neighbour slows them alike; speedups are ratios of medians
over rounds (``*_from_min``: of the fastest rounds). The load average before and after is
recorded: on a shared machine, two OpenMP threads next to another busy process can make small
kernels 10-30x slower, so absolute numbers move a lot. Random weights and
inputs: speed does not depend on what the weights are (except for int8 calibration ranges).

Options: ``--threads N`` (default: torch's), ``--rounds R`` (default 5), ``--quick``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robcomp.compress import (
    Int8PTQ,
    L1FilterPruning,
    MagnitudePruning,
    QuantizedModel,
    count_macs,
    finalize,
    latency,
    measure,
)
from robcomp.data.base import DataSplits, Split
from robcomp.models import create

IN_SHAPE = (3, 32, 32)
RESULTS = Path(__file__).parent / "results" / "compress.json"


def fake_cifar(n: int = 256) -> DataSplits:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, *IN_SHAPE), dtype=torch.uint8, generator=g)
    y = torch.arange(n) % 10
    split = Split(x, y)
    names = tuple(str(c) for c in range(10))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    return DataSplits("random-cifar", split, split, split, 10, names, mean, std)


class Twin(nn.Module):
    """Run a QuantizedModel's twin (the unlowered reference graph) as an inference model."""

    def __init__(self, twin: nn.Module) -> None:
        super().__init__()
        self.twin = twin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.twin(x)  # type: ignore[no-any-return]


def variants(name: str, data: DataSplits) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    torch.manual_seed(0)
    model = create(name, 10, IN_SHAPE, mean=data.mean, std=data.std).eval()
    info: dict[str, Any] = {}
    start = time.perf_counter()
    int8_eager, record = Int8PTQ(calibration_batches=4, batch_size=32, compile=False)(model, data)
    assert isinstance(int8_eager, QuantizedModel)
    int8 = QuantizedModel(int8_eager.int8, int8_eager.twin, int8_eager.reference, compiled=True)
    info["int8_quantize_seconds"] = time.perf_counter() - start
    l1, l1_record = L1FilterPruning(ratio=0.5)(model, data)
    sparse, _ = MagnitudePruning(sparsity=0.9)(model, data)
    finalize(sparse)
    fp32 = measure(model, IN_SHAPE)
    info |= {
        "fp32_bytes": fp32.size_bytes,
        "int8_bytes": record.size_bytes,
        "int8_bytes_ratio": record.size_bytes / fp32.size_bytes,
        "l1_50_bytes": measure(l1, IN_SHAPE).size_bytes,
        "unstructured_90_bytes": measure(sparse, IN_SHAPE).size_bytes,
        "unstructured_90_sparse_bytes": measure(sparse, IN_SHAPE).sparse_bytes,
        "params": fp32.params,
        "l1_50_params": l1_record.params,
        "macs": count_macs(model, IN_SHAPE),
        "l1_50_macs": l1_record.macs,
    }
    return {
        "fp32": model,
        "int8": int8,
        "int8_eager": int8_eager,
        "int8_reference": Twin(int8_eager.twin).eval(),
        "l1_50": l1.eval(),
        "unstructured_90": sparse.eval(),
    }, info


def time_variants(
    models: dict[str, nn.Module], batch: int, rounds: int, per_round: int
) -> dict[str, dict[str, float]]:
    """Median (and min) ms per forward over interleaved rounds; first calls compile/warm up."""
    warm: dict[str, float] = {}
    for key, model in models.items():
        start = time.perf_counter()
        latency(model, IN_SHAPE, batch, warmup=2, repeats=1)
        warm[key] = time.perf_counter() - start
    samples: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for key, model in models.items():
            result = latency(model, IN_SHAPE, batch, warmup=0, repeats=per_round)
            samples[key].append(result.median_ms)
    return {
        key: {
            "median_ms": statistics.median(values),
            "min_ms": min(values),
            "first_calls_seconds": warm[key],
        }
        for key, values in samples.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="ResNet-20 only, 3 rounds")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    load_before = os.getloadavg()
    data = fake_cifar()
    names = ["resnet20"] if args.quick else ["resnet18", "resnet20"]
    rounds = 3 if args.quick else args.rounds
    out: dict[str, Any] = {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
    }
    for name in names:
        models, info = variants(name, data)
        timings = {}
        for batch in (1, 64):
            per_round = 5 if batch == 1 else 2
            timings[f"b{batch}"] = time_variants(models, batch, rounds, per_round)
        entry: dict[str, Any] = {**info, "timings_ms": timings}
        for batch in (1, 64):
            t = timings[f"b{batch}"]
            base = t["fp32"]["median_ms"]
            best = t["fp32"]["min_ms"]
            for key in ("int8", "int8_eager", "int8_reference", "l1_50", "unstructured_90"):
                entry[f"{key}_speedup_b{batch}"] = base / t[key]["median_ms"]
                # the fastest round of each: less sensitive to a neighbour's load spikes
                entry[f"{key}_speedup_b{batch}_from_min"] = best / t[key]["min_ms"]
        out[name] = entry
    headline = out["resnet20"] if args.quick else out["resnet18"]
    out["headline_model"] = "resnet20" if args.quick else "resnet18"
    for key in ("int8_speedup_b64", "int8_speedup_b1", "l1_50_speedup_b64",
                "unstructured_90_speedup_b64", "int8_bytes_ratio"):  # fmt: skip
        out[key] = headline[key]
    out["load_average_after"] = os.getloadavg()
    out["seconds"] = time.perf_counter() - start
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
