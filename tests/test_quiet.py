"""What a user sees on stderr: the int8 path (quantize, then the first compiled forward pass,
which is where the quickstart's torch warnings came from) prints nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import torch
    from robcomp import data as datasets
    from robcomp.compress.quantize import Int8PTQ
    from robcomp.models import create

    torch.set_num_threads(1)
    d = datasets.get("digits", seed=0)
    model = create("tiny_cnn", 10, d.in_shape, mean=d.mean, std=d.std).eval()
    qmodel, _ = Int8PTQ(compile=True, calibration_batches=1, batch_size=8)(model, d)
    assert qmodel(torch.rand(4, *d.in_shape)).shape == (4, 10)
    assert qmodel.compile_error is None
    """
)


@pytest.mark.slow
def test_int8_quantize_and_compile_print_no_warnings() -> None:
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr
