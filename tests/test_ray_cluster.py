"""A grid on a Ray cluster of two nodes (two raylets on this machine, as `ray start --head` and
`ray start --address` make on two): cells run on both nodes, artifacts land on the shared path,
and the store holds every cell once."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

import pytest

from robcomp.experiments import STORE_NAME, ResultStore, load_experiment, run_experiment
from robcomp.experiments.executors import RayExecutor

# A bring-your-own model that notes which Ray node built it.
WHERE = """
from math import prod
from pathlib import Path
import ray
from torch import nn

def net(num_classes, in_shape):
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "driver"
    with open(Path({folder!r}) / "nodes", "a") as f:
        f.write(node + "\\n")
    return nn.Sequential(nn.Flatten(), nn.Linear(prod(in_shape), num_classes))
"""


def grid() -> dict[str, Any]:
    return {
        "name": "two-nodes",
        "data": {"name": "digits", "train_limit": 200},
        "model": {"name": "where_model:net"},
        "train": {"epochs": 3, "lr": 0.05, "batch_size": 64},
        "compress": {"name": "magnitude", "sparsity": 0.0},
        "evaluate": {"attacks": [], "diagnostics": False, "latency_batch_sizes": []},
        "resources": {"num_cpus": 1},
        "grid": {"seed": [0, 1], "compress.sparsity": [0.0, 0.3, 0.6]},
    }


@pytest.mark.slow
def test_a_grid_runs_on_two_nodes_with_shared_artifacts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        pytest.skip("another Ray is running in this process")
    code, state = tmp_path / "code", tmp_path / "state"
    code.mkdir()
    state.mkdir()
    (code / "where_model.py").write_text(textwrap.dedent(WHERE.format(folder=str(state))))
    monkeypatch.syspath_prepend(str(code))  # the driver validates the model name too
    env = {"PYTHONPATH": os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")])}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False},
    )
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, runtime_env={"env_vars": env}, log_to_driver=False)
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert len(nodes) == 2
        experiment = load_experiment(grid())
        shared = tmp_path / "shared"
        summary = run_experiment(experiment, tmp_path / "out", RayExecutor(artifacts=shared))
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert (summary.ran, summary.failed) == (6, [])
    built = set((state / "nodes").read_text().split()) - {"driver"}
    assert built == nodes  # both nodes ran cells
    runs = ResultStore(tmp_path / "out" / STORE_NAME).runs()
    assert sorted(r.cell_id for r in runs) == sorted(c.cell_id for c in experiment.cells)
    assert len(list(shared.glob("baseline-*/history.json"))) == 2  # one baseline per seed
    for run in runs:
        assert (tmp_path / "out" / "cells" / run.cell_id / "history.json").is_file()
