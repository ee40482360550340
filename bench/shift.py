"""Common-corruption speed: ``python bench/shift.py`` -> bench/results/shift.json.

Ours (:func:`robcomp.data.shifts.corruptions.corrupt`, batched torch, chunks of 256 as the
shift runs it) against the reference package imagecorruptions-imaug 1.1.5 (``from
imagecorruptions import corrupt``, one HWC uint8 image at a time, as it is used) on the same
1,000 CIFAR-10 test images (``$ROBCOMP_DATA/cifar10-test-first1000.npz``), all 19 corruptions at
severity 3. Like with like: both use the ImageNet-C constants (the only ones imagecorruptions
has), on the 32x32 images; ours rescales pixel lengths to 32 px (radii and sigmas x 32/224),
imagecorruptions does not, so the blurs do less work on our side (smaller kernels) for glass,
motion, defocus and gaussian blur; the other corruptions do the same work.

Records seconds per corruption for each, their sum, images per second, and
``corruption_speedup`` = total reference time / total ours (goal >= 3). The load average is
recorded; keys are merged into an existing shift.json. ``--images N`` to use fewer. Torch runs
on one thread (``--threads``): the reference is single-threaded, and on a busy 2-core machine
two OpenMP threads spinning against other processes made our small kernels 5-10x slower.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from robcomp.data.shifts.corruption_tables import ALL
from robcomp.data.shifts.corruptions import CHUNK, corrupt

OUT = Path(__file__).parent / "results" / "shift.json"
SEVERITY = 3


def load(n: int) -> np.ndarray:
    root = Path(os.environ.get("ROBCOMP_DATA", "/work/shared/data"))
    return np.load(root / "cifar10-test-first1000.npz")["x"][:n]  # (N, 32, 32, 3) uint8


def time_ours(images: np.ndarray, name: str) -> float:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    start = time.perf_counter()
    for k, i in enumerate(range(0, len(x), CHUNK)):
        g = torch.Generator().manual_seed(k)
        batch = x[i : i + CHUNK].float() / 255
        out = corrupt(batch, name, SEVERITY, constants="imagenet", generator=g)
        torch.round(out * 255).to(torch.uint8)
    return time.perf_counter() - start


def time_reference(images: np.ndarray, name: str) -> float:
    from imagecorruptions import corrupt as reference

    reference(images[0], corruption_name=name, severity=SEVERITY)  # numba compiles once
    np.random.seed(0)
    start = time.perf_counter()
    for image in images:
        reference(image, corruption_name=name, severity=SEVERITY)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    images = load(args.images)
    load_start = os.getloadavg()[0]
    ours, ref = {}, {}
    for name in ALL:
        time_ours(images[:8], name)  # warm-up (caches, first-call costs)
        ours[name] = round(time_ours(images, name), 4)
        ref[name] = round(time_reference(images, name), 4)
        line = f"{name:18s} ours {ours[name]:8.3f} s  imagecorruptions {ref[name]:8.3f} s"
        print(line, flush=True)
    total_ours, total_ref = sum(ours.values()), sum(ref.values())
    report = {
        "corruption_images": len(images),
        "corruption_severity": SEVERITY,
        "corruption_constants": "imagenet (both), 32x32 CIFAR-10 images",
        "corruption_threads": torch.get_num_threads(),
        "corruption_seconds_ours": ours,
        "corruption_seconds_imagecorruptions": ref,
        "corruption_total_seconds_ours": round(total_ours, 3),
        "corruption_total_seconds_imagecorruptions": round(total_ref, 3),
        "corruption_images_per_second_ours": round(len(images) * len(ALL) / total_ours, 1),
        "corruption_images_per_second_imagecorruptions": round(
            len(images) * len(ALL) / total_ref, 1
        ),
        "corruption_speedup": round(total_ref / total_ours, 2),
        "corruption_speedup_per_corruption": {n: round(ref[n] / ours[n], 2) for n in ALL},
        "corruption_load_1min": [load_start, os.getloadavg()[0]],
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    merged = {**(json.loads(OUT.read_text()) if OUT.is_file() else {}), **report}
    OUT.write_text(json.dumps(merged, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if not isinstance(v, dict)}, indent=2))


if __name__ == "__main__":
    main()
