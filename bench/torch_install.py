"""How much does the default PyTorch install weigh? ``python bench/torch_install.py``.

PyPI's Linux wheels of torch bring the CUDA libraries (``nvidia-*``, ``cuda-*``, ``triton``)
whether or not the machine has a GPU; the install guide tells CPU users to take PyTorch's CPU
build instead. This sums, from each installed distribution's RECORD, the bytes that torch,
torchvision and every package torch pulls in for CUDA occupy on disk in this environment, and
writes bench/results/torch_install.json: the torch and torchvision versions, the bytes per
package, the CUDA packages' total and the total with torch and torchvision. On a CPU build the
CUDA total is 0.
"""

from __future__ import annotations

import json
import platform
import re
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "torch_install.json"
# The packages torch's CUDA wheels depend on (directly or through one another).
CUDA = re.compile(r"^(nvidia-.*|cuda-.*|triton)$")


def installed_bytes(dist: metadata.Distribution) -> int:
    """Bytes of the files a distribution installed, as its RECORD lists them."""
    return sum(f.size or 0 for f in dist.files or [])


def main() -> None:
    sizes: dict[str, int] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"].lower().replace("_", "-")
        if name in ("torch", "torchvision") or CUDA.match(name):
            sizes[name] = installed_bytes(dist)
    cuda = sum(size for name, size in sizes.items() if CUDA.match(name))
    result = {
        "torch": metadata.version("torch"),
        "torchvision": metadata.version("torchvision"),
        "platform": platform.platform(),
        "bytes": dict(sorted(sizes.items())),
        "cuda_packages": sorted(name for name in sizes if CUDA.match(name)),
        "cuda_bytes": cuda,
        "total_bytes": sum(sizes.values()),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("torch", "cuda_bytes", "total_bytes")}))


if __name__ == "__main__":
    main()
