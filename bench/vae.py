"""How well the on-manifold VAE reconstructs: ``python bench/vae.py`` -> bench/results/vae.json.

Kwon & Lee 2021 build on-manifold adversarial examples by decoding perturbed VAE codes; if the
VAE reconstructs badly, the decoder alone fools the classifier and adv-on fills with points no
latent step was needed for. For MNIST and Fashion-MNIST at the scale of the
kwon2021-onmanifold preset (its MNIST data row, model and baseline training; Fashion-MNIST the
same with the data set swapped), this trains the dense baseline and two VAEs (the settings
used before, ``OLD``, and the preset's ``vae`` section), and records per VAE:

- ``vae_recon_accuracy``: the baseline's accuracy on ``decode(encode(x))`` of the test points,
  and ``recon_ratio`` = that / the baseline's clean accuracy (goal >= 0.95, ``meets_goal``);
- ``train_seconds``: wall time to train the VAE (on this machine, at its load average, also
  recorded), and the latent classifier's;
- the adv-on set of the preset's ``manifold-sets`` shift on those test points: its size under
  the old rule (every point the latent attack fools while keeping its class) and the current
  one (only points the baseline classifies right on their reconstruction), and the count
  excluded; ``median_recon_change``, the median over test images of the mean per-pixel
  |decode(encode(x)) - x|.

Torch runs on one thread. ``--data mnist`` to run one data set; keys are merged into an
existing vae.json. Needs ``$ROBCOMP_DATA/mnist`` and Fashion-MNIST (Debian's
dataset-fashion-mnist or ``$ROBCOMP_DATA/fashion-mnist``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from robcomp import data as datasets
from robcomp.data.base import DataSplits, Split
from robcomp.evaluate import accuracy
from robcomp.evaluate.manifold import ManifoldSets, reconstruction_split
from robcomp.experiments.runner import trained_baseline
from robcomp.experiments.spec import resolve
from robcomp.models.generative import VAEManifold, VAESpec, train_latent_classifier, train_vae

PRESET = Path(__file__).parents[1] / "src" / "robcomp" / "configs" / "kwon2021-onmanifold.yaml"
OUT = Path(__file__).parent / "results" / "vae.json"
OLD = VAESpec(latent_dim=8, epochs=30, beta=1.0, warmup=0)  # the VAE before issue 16


def preset_cell(name: str) -> dict[str, Any]:
    """The preset's MNIST cell (its data row, model, training, vae and shift) on ``name``."""
    raw = yaml.safe_load(PRESET.read_text())
    rows = raw["grid"]["data,model"]
    data, model = next(row for row in rows if row[0]["name"] == "mnist")
    shift = next(s for s in raw["evaluate"]["shifts"] if s["name"] == "manifold-sets")
    return {
        "data": {**data, "name": name}, "model": model, "train": raw["train"],
        "vae": raw.get("vae", {}), "shift": shift, "seed": raw.get("seed", 0),
    }  # fmt: skip


def adv_on_sizes(
    shift: ManifoldSets,
    baseline: torch.nn.Module,
    manifold: VAEManifold,
    test: Split,
    right: torch.Tensor,
) -> dict[str, int]:
    """Adv-on under the old rule (fooled and kept) and the current one (also right on the
    reconstruction: ``right``, one flag per point of ``test``), over ``test``."""
    attack = shift.on_attack().bind(manifold)
    old = new = start = 0
    for x, y in test.batches(256):
        kept = attack.perturb(baseline, x, y).kept
        right_here = right[start : start + len(y)]
        old, new, start = (
            old + int(kept.sum()),
            new + int((kept & right_here).sum()),
            start + len(y),
        )
    return {"adv_on_old_rule": old, "adv_on": new, "adv_on_excluded": old - new}


def measure(
    spec: VAESpec, data: DataSplits, baseline: torch.nn.Module, shift: ManifoldSets, seed: int
) -> dict[str, Any]:
    start = time.perf_counter()
    vae = train_vae(data, spec, seed)
    vae_seconds = time.perf_counter() - start
    start = time.perf_counter()
    classifier = train_latent_classifier(vae, data, spec, seed)
    classifier_seconds = time.perf_counter() - start
    manifold = VAEManifold(vae, classifier)
    test = data.test.head(shift.limit)
    x, y = test.tensors()
    reconstructions = reconstruction_split(manifold, test, 512)
    x_rec = reconstructions.x
    with torch.no_grad():
        right = torch.cat([baseline(xb).argmax(1) == yb for xb, yb in reconstructions.batches(512)])
    clean = accuracy(baseline, test)
    recon = accuracy(baseline, reconstructions)
    with torch.no_grad():
        codes = vae.encode(x)[0]
    return {
        "spec": dataclasses.asdict(spec),
        "train_seconds": round(vae_seconds, 1),
        "classifier_seconds": round(classifier_seconds, 1),
        "clean_accuracy": clean,
        "vae_recon_accuracy": recon,
        "recon_ratio": recon / clean,
        "meets_goal": recon >= 0.95 * clean,
        "median_recon_change": float((x_rec - x).abs().flatten(1).mean(1).median()),
        "latent_classifier_accuracy": float(
            (classifier(codes).argmax(1) == y).float().mean()
        ),
        "code_std": float(codes.std(0).mean()),
        "test_points": len(test),
        **adv_on_sizes(shift, baseline, manifold, test, right),
    }  # fmt: skip


def run(name: str, cache: Path) -> dict[str, Any]:
    cell = preset_cell(name)
    cfg = resolve({"name": "bench-vae", "seed": cell["seed"], "data": cell["data"],
                   "model": cell["model"], "train": cell["train"]}, "bench-vae")  # fmt: skip
    data = datasets.get(cfg.data, seed=cfg.seed)
    baseline, _ = trained_baseline(cfg, data, cache)
    baseline.eval()
    fields = {k: v for k, v in cell["shift"].items() if k != "name"}
    shift = ManifoldSets(**fields)
    preset = VAESpec(**cell["vae"])
    return {
        "data": cell["data"],
        "model": cell["model"]["name"],
        "old": measure(OLD, data, baseline, shift, cfg.seed),
        "preset": measure(preset, data, baseline, shift, cfg.seed),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["mnist", "fashion-mnist"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = json.loads(OUT.read_text()) if OUT.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.data:
            results[name] = run(name, Path(tmp))
            results[name]["load_average_1min"] = os.getloadavg()[0]
            OUT.parent.mkdir(parents=True, exist_ok=True)
            OUT.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(json.dumps(results, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
