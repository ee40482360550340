"""The AutoAttack members and the cascade on a GPU (skipped without one).

APGD draws its random starts on the CPU and moves them to the input's device, so a run on CUDA
starts where the CPU run does; the GPU's float rounding may still flip a borderline verdict, hence
a tolerance. FAB-T and Square draw on the device's generator: only their robust accuracy is
compared. APGD reads the device's state only when it drops broken
points (every few iterations), never once per iteration.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import Tensor, nn

from robcomp.attacks import ATTACKS, Attack
from robcomp.attacks.apgd import APGDCE
from robcomp.attacks.cascade import Cascade
from robcomp.evaluate import check_threat_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU = torch.device("cuda")
CHEAP = {
    "apgd-ce": {"steps": 10},
    "apgd-dlr": {"steps": 10},
    "apgd-t": {"steps": 10, "n_target_classes": 3},
    "fab-t": {"steps": 10, "n_target_classes": 3},
    "square": {"queries": 200},
}
TOLERANCE = 0.05  # share of points whose verdict may differ between the CPU and the GPU


@pytest.fixture(scope="module")
def on_gpu(
    frozen_digits_cnn: tuple[nn.Module, Tensor, Tensor],
) -> tuple[nn.Module, Tensor, Tensor]:
    model, x, y = frozen_digits_cnn
    return copy.deepcopy(model).to(GPU), x[:100].to(GPU), y[:100].to(GPU)


def robust(model: nn.Module, x_adv: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x_adv).argmax(1) == y


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("name", list(CHEAP))
def test_member_runs_on_the_gpu_like_on_the_cpu(
    frozen_digits_cnn: tuple[nn.Module, Tensor, Tensor],
    on_gpu: tuple[nn.Module, Tensor, Tensor],
    name: str,
    norm: str,
) -> None:
    model_gpu, x_gpu, y_gpu = on_gpu
    model, x, y = frozen_digits_cnn
    x, y = x[:100], y[:100]
    eps = {"linf": 0.1, "l2": 1.0}[norm]
    attack: Attack = ATTACKS.get(name)(eps=eps, norm=norm, seed=1, **CHEAP[name])
    x_adv = attack(model_gpu, x_gpu, y_gpu)
    assert x_adv.device == x_gpu.device and x_adv.shape == x_gpu.shape
    check_threat_model(x_gpu, x_adv, eps, norm, where=attack.label())
    on_cpu = robust(model, attack(model, x, y), y)
    on_gpu_ = robust(model_gpu, x_adv, y_gpu).cpu()
    if name.startswith("apgd"):  # the same starts: per point, the same verdicts
        differ = float((on_gpu_ != on_cpu).float().mean())
        assert differ <= TOLERANCE, f"{differ:.2f} of the verdicts differ between CPU and GPU"
    else:  # randomized on the device's own generator: the same robust accuracy
        gap = abs(float(on_gpu_.float().mean()) - float(on_cpu.float().mean()))
        assert gap <= 2 * TOLERANCE, f"robust accuracy differs by {gap:.2f} on the GPU"


@pytest.mark.slow
def test_standard_cascade_runs_on_the_gpu(on_gpu: tuple[nn.Module, Tensor, Tensor]) -> None:
    model, x, y = on_gpu
    result = Cascade(eps=0.1).run(model, x[:32], y[:32])
    assert result.x_adv.device == x.device
    check_threat_model(x[:32], result.x_adv, 0.1, "linf")
    names = ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert list(result.points_per_attack) == names
    assert result.robust_after["square"] == pytest.approx(
        float(robust(model, result.x_adv, y[:32]).float().mean())
    )


def test_apgd_reads_the_device_only_when_dropping_points(
    on_gpu: tuple[nn.Module, Tensor, Tensor],
) -> None:
    # 100 iterations; the host reads the device a few times per run and once per compaction
    # (every 5 iterations), not once per iteration, and not once per state tensor compacted.
    model, x, y = on_gpu
    attack = APGDCE(eps=0.05, steps=100)
    attack(model, x, y)  # warm up (cuDNN autotuning, lazy initialisation)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            attack(model, x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 100 // 5 + 20, f"{len(syncs)} host synchronisations in 100 iterations"
