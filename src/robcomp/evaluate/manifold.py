"""On-manifold evaluation (Kwon & Lee 2021, "Improving the Robustness of Model Compression by
On-Manifold Adversarial Training", Future Internet 13(12):300; reference code sanglee/MC-ATON):
choosing the generative model of a data set, and the paper's fixed adversarial test sets.

The paper scores every compressed model on two test sets built **once, against the dense
model**: ``adv-on``, the on-manifold examples that fooled it and kept their class
(Definition 1), and ``adv-off``, the L-inf PGD examples that fooled it. They are a shift
(``manifold-sets``): the runner builds them with the cell's baseline and scores each model's
clean accuracy on them, like any shifted split. A third split, ``recon``, holds the
reconstructions ``decode(encode(x))`` of the same test points: the accuracy there is what the
generative model alone costs, with no latent step. A point the dense model already gets wrong
on its reconstruction never enters adv-on (the decoder, not the attack, fooled it).

Example, an experiment file's evaluation suite on the simulation:

```yaml
evaluate:
  shifts:
    - {name: manifold-sets, eps: 0.3, step_size: 0.01, steps: 7,
       off_eps: 0.07, off_step: 0.01, off_steps: 7}
```
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from robcomp.attacks.base import check_eps, check_positive
from robcomp.attacks.manifold import OnManifold
from robcomp.attacks.pgd import PGD
from robcomp.config import build, runtime_field
from robcomp.data.base import DataSplits, Split
from robcomp.data.shifts.base import ShiftContext, ShiftedSplit
from robcomp.evaluate.adversarial import attack_mode
from robcomp.evaluate.shifts import SHIFTS
from robcomp.models.generative import (
    GaussianManifold,
    Manifold,
    VAEManifold,
    VAESpec,
    cached_latent_classifier,
    cached_vae,
    train_latent_classifier,
    train_vae,
)
from robcomp.progress import track

logger = logging.getLogger(__name__)


KNOWN_GENERATORS = ("gaussians",)
"""Data sets whose generator :func:`manifold_for` knows (no VAE is trained for them)."""


def has_known_generator(data_spec: Mapping[str, Any]) -> bool:
    """Whether the data of ``data_spec`` (a cell's ``data`` section) has a known generator."""
    return data_spec.get("name") in KNOWN_GENERATORS


def manifold_for(
    data_spec: Mapping[str, Any],
    data: DataSplits,
    seed: int,
    cache_dir: Path | None,
    spec: VAESpec | None = None,
) -> Manifold:
    """The generative model on-manifold components of a cell use.

    On the ``gaussians`` simulation, the data set's own generator with the exact Bayes rule
    (:class:`~robcomp.models.generative.GaussianManifold`), as in the paper's first case; on
    other data (or with an explicit ``spec`` on the simulation), a VAE with a latent
    classifier trained on ``data.train`` (the paper's second case), loaded from ``cache_dir``
    if trained before with the same data, spec and seed (trained and not saved when
    ``cache_dir`` is None).

    Args:
        data_spec: the cell's ``data`` section (``{"name": ..., **options}``).
        data: the cell's data.
        seed: seeds the VAE and the latent classifier.
        cache_dir: folder of trained generative models, or None.
        spec: the VAE to train (``VAESpec()`` by default).
    """
    if has_known_generator(data_spec) and spec is None:
        return GaussianManifold(
            n=int(data_spec.get("n", 70000)), encoder_seed=int(data_spec.get("encoder_seed", 0))
        )
    spec = spec if spec is not None else VAESpec()
    if cache_dir is None:
        vae = train_vae(data, spec, seed)
        return VAEManifold(vae, train_latent_classifier(vae, data, spec, seed))
    vae = cached_vae(data, spec, seed, cache_dir)
    return VAEManifold(vae, cached_latent_classifier(vae, data, spec, seed, cache_dir))


def _collect(model: nn.Module, split: Split, batch_size: int, description: str, run: Any) -> Split:
    """The examples ``run(x, y) -> (x_adv, keep)`` keeps, over ``split``, with their labels."""
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    with track(description, len(split)) as advance, attack_mode(model):
        for x, y in split.batches(batch_size):
            x_adv, keep = run(x, y)
            xs.append(x_adv[keep].detach())
            ys.append(y[keep])
            advance(len(y))
    if not xs:
        return Split(split.x[:0].float(), split.y[:0])
    return Split(torch.cat(xs), torch.cat(ys))


@torch.no_grad()
def reconstruct(manifold: Manifold, x: Tensor) -> Tensor:
    """``decode(encode(x))`` clipped to [0, 1]: the point with no latent perturbation."""
    return manifold.decode(manifold.encode(x)).clamp(0.0, 1.0)


def reconstruction_split(manifold: Manifold, split: Split, batch_size: int = 256) -> Split:
    """The reconstructions ``decode(encode(x))`` of every point of ``split``, true labels."""
    xs = [reconstruct(manifold, x) for x, _ in split.batches(batch_size)]
    if not xs:
        return Split(split.x[:0].float(), split.y[:0])
    return Split(torch.cat(xs), split.y)


def on_manifold_set(
    model: nn.Module, attack: OnManifold, split: Split, batch_size: int = 256
) -> Split:
    """The adv-on set: the on-manifold examples of ``split`` that fool ``model`` and keep their
    class (Definition 1), with their true labels, among the points ``model`` classifies right
    on their reconstruction ``decode(encode(x))``. A point it gets wrong there is fooled by the
    generative model with no latent step at all, so it says nothing about the attack."""
    manifold = attack.generative_model()

    def run(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        outcome = attack.perturb(model, x, y)
        with torch.no_grad():
            reconstructs = model(reconstruct(manifold, x)).argmax(1) == y
        return outcome.x_adv, outcome.kept & reconstructs

    return _collect(model, split, batch_size, f"adv-on {attack.label()}", run)


def off_manifold_set(model: nn.Module, attack: PGD, split: Split, batch_size: int = 256) -> Split:
    """The adv-off set: the (pixel-space) adversarial examples of ``split`` that fool ``model``,
    with their true labels."""

    def run(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        x_adv = attack(model, x, y)
        with torch.no_grad():
            return x_adv, model(x_adv).argmax(1) != y

    return _collect(model, split, batch_size, f"adv-off {attack.label()}", run)


@SHIFTS.register("manifold-sets")
@dataclass(frozen=True, kw_only=True)
class ManifoldSets:
    """The fixed on- and off-manifold adversarial test sets of Kwon & Lee 2021 (Sec. 5, Table 2),
    built once against the cell's dense baseline (``uses_baseline``) from the test split:
    ``adv-on`` (latent PGD, filtered by Definition 1, among the points the baseline classifies
    right on their reconstruction) and ``adv-off`` (L-inf PGD from a random start, the examples
    that fooled the baseline), with ``recon``, the reconstructions ``decode(encode(x))`` of the
    same points. Every model is then scored on the three. The summary adds the paper's
    combination (the mean of clean and adv-on accuracy), ``vae_recon_accuracy`` (the dense
    baseline's accuracy on ``recon``: how well the generative model reconstructs, in the
    classifier's eyes; on the simulation the generator is inverted exactly), ``recon_accuracy``
    (the model's own), ``adv_on_recon_errors`` (the points the baseline gets wrong on ``recon``,
    kept out of adv-on) and ``adv_on_points`` (the size of adv-on).

    The generative model is the one passed with :func:`~robcomp.attacks.manifold.with_manifold`
    (the experiment pipeline passes the cell's), else :func:`manifold_for` with the context's
    cache folder.

    Attributes:
        eps: latent L-inf radius of the on-manifold attack (eta; simulation 0.3, HAR 0.003).
        step_size: its signed step (simulation 0.01, HAR 0.0003).
        steps: its iterations.
        reanchor: re-anchor at the clean code every step, as the authors' code.
        off_eps: L-inf radius of the off-manifold PGD (HAR 0.07).
        off_step: its step size (HAR 0.01).
        off_steps: its iterations (HAR 7).
        limit: use the first ``limit`` test points only (None: all).
        vae: VAESpec fields of the generative model on data without a known generator,
            when the shift runs outside the runner (a cell's runs use the cell's ``vae``).
        seed: seeds PGD's random start.
        manifold: the generative model, bound at run time (not configuration).
    """

    eps: float = 0.3
    step_size: float = 0.01
    steps: int = 7
    reanchor: bool = False
    off_eps: float = 0.07
    off_step: float = 0.01
    off_steps: int = 7
    limit: int | None = None
    vae: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    manifold: Manifold | None = runtime_field()

    uses_baseline: ClassVar[bool] = True
    needs_manifold: ClassVar[bool] = True
    summary_uses_sizes: ClassVar[bool] = True
    # 2: adv-on leaves out points misclassified on their reconstruction; the recon split.
    revision: ClassVar[int] = 2

    def __post_init__(self) -> None:
        self.on_attack()  # the attack's own checks name the bad field
        check_eps(self.off_eps, "manifold-sets.off_eps")
        check_positive(self, "off_step")
        if self.off_steps < 1:
            raise ValueError(f"manifold-sets: off_steps must be >= 1, got {self.off_steps}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"manifold-sets: limit must be >= 1 or null, got {self.limit}")
        self.vae_spec()

    def label(self) -> str:
        return "manifold-sets"

    def vae_spec(self) -> VAESpec | None:
        return build(VAESpec, self.vae, "manifold-sets.vae") if self.vae else None

    def on_attack(self) -> OnManifold:
        return OnManifold(
            eps=self.eps, step_size=self.step_size, steps=self.steps, reanchor=self.reanchor
        )

    def off_attack(self) -> PGD:
        return PGD(eps=self.off_eps, step_size=self.off_step, steps=self.off_steps, seed=self.seed)

    def shifted(self, data: DataSplits, context: ShiftContext) -> Sequence[ShiftedSplit]:
        if context.baseline is None:
            raise ValueError(
                "manifold-sets builds its test sets against the dense baseline; got none"
            )
        manifold = self.manifold
        if manifold is None:  # outside the pipeline: the data's generator, else a VAE
            manifold = manifold_for(
                context.data_spec, data, context.seed, context.cache, self.vae_spec()
            )
        test = data.test.head(self.limit)
        on = on_manifold_set(context.baseline, self.on_attack().bind(manifold), test)
        off = off_manifold_set(context.baseline, self.off_attack(), test)
        recon = reconstruction_split(manifold, test)
        logger.info(
            "manifold-sets: %d adv-on and %d adv-off of %d test points (%s)",
            len(on),
            len(off),
            len(test),
            manifold.label(),
        )
        return [
            ShiftedSplit("adv-on", 0, on, family="manifold"),
            ShiftedSplit("adv-off", 0, off, family="manifold"),
            ShiftedSplit("recon", 0, recon, family="manifold"),
        ]

    def summary(
        self,
        model_acc: Mapping[tuple[str, int], float],
        baseline_acc: Mapping[tuple[str, int], float],
        clean: tuple[float, float],
        sizes: Mapping[tuple[str, int], int],
    ) -> dict[str, float]:
        """``combined_accuracy``, the mean of clean and adv-on accuracy (the paper's
        "Combination (Original & Adv-On)"); ``vae_recon_accuracy`` and ``recon_accuracy``,
        the baseline's and the model's accuracy on the reconstructions; ``adv_on_recon_errors``,
        how many reconstructions the baseline gets wrong (kept out of adv-on); and
        ``adv_on_points``, the size of adv-on. ``sizes`` counts the points of each split."""
        out: dict[str, float] = {}
        on = model_acc.get(("adv-on", 0))
        if on is not None and not math.isnan(on):
            out["combined_accuracy"] = (clean[0] + on) / 2
        if ("adv-on", 0) in sizes:
            out["adv_on_points"] = float(sizes[("adv-on", 0)])
        dense_recon, n_recon = baseline_acc.get(("recon", 0)), sizes.get(("recon", 0), 0)
        if dense_recon is not None and n_recon:
            out["vae_recon_accuracy"] = dense_recon
            # accuracy is (correct / n), so this count is exact
            out["adv_on_recon_errors"] = float(round(n_recon * (1.0 - dense_recon)))
        ours_recon = model_acc.get(("recon", 0))
        if ours_recon is not None and n_recon:
            out["recon_accuracy"] = ours_recon
        return out


def manifold_examples(
    model: nn.Module, attack: Any, points: Split, n: int = 8
) -> dict[str, Any] | None:
    """Up to ``n`` originals beside their on-manifold adversarials against ``model``, for the
    report's figure (the arrays of its ``manifold_examples.npz`` contract): the first points
    the attack fooled while keeping their class, or ``None`` when it kept none."""
    x, y = points.tensors()
    with attack_mode(model):
        outcome = attack.perturb(model, x, y)
        kept = outcome.kept.nonzero().flatten()[:n]
        if not len(kept):
            return None
        x_adv = outcome.x_adv[kept].detach()
        with torch.no_grad():
            y_adv = model(x_adv).argmax(1)
    return {
        "x": x[kept].cpu().numpy(),
        "x_adv": x_adv.cpu().numpy(),
        "y": y[kept].cpu().numpy(),
        "y_adv": y_adv.cpu().numpy(),
    }
