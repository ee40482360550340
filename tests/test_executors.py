"""Executors: the Ray executor runs the very same cells and gives the very same results."""

from __future__ import annotations

from pathlib import Path

import pytest

from robcomp.experiments import STORE_NAME, ResultStore, load_experiment, run_experiment
from robcomp.experiments.executors import LocalExecutor, RayExecutor, baseline_waves, make_executor
from test_experiments import tiny_experiment


def test_baseline_waves_put_one_cell_per_baseline_first() -> None:
    raw = tiny_experiment(**{"compress.sparsity": [0.0, 0.5], "seed": [0, 1]})
    cells = load_experiment(raw).cells
    first, rest = baseline_waves(cells)
    assert len(first) == 2 and len(rest) == 2
    assert {c.config.baseline_key() for c in first} == {c.config.baseline_key() for c in cells}
    assert sorted(c.cell_id for c in first + rest) == sorted(c.cell_id for c in cells)


def test_make_executor() -> None:
    assert isinstance(make_executor("local"), LocalExecutor)
    assert isinstance(make_executor("ray", num_cpus=1), RayExecutor)
    with pytest.raises(ValueError, match="unknown executor 'dask'"):
        make_executor("dask")


@pytest.mark.slow
def test_ray_executor_matches_local(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    raw = tiny_experiment(**{"compress.sparsity": [0.0, 0.8]})
    run_experiment(load_experiment(raw), tmp_path / "local")
    try:
        summary = run_experiment(
            load_experiment(raw),
            tmp_path / "ray",
            RayExecutor(num_cpus=1),
        )
    finally:
        ray.shutdown()
    assert (summary.ran, summary.failed) == (2, [])

    def values(folder: str) -> dict[tuple[str, str, str, float], float | None]:
        return {
            (r.cell_id, m.name, m.attack, m.eps): m.value
            for r in ResultStore(tmp_path / folder / STORE_NAME).runs()
            for m in r.metrics
            if not m.is_timing
        }

    assert values("ray") == values("local")
