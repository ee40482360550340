"""Generative models for on-manifold robustness (Kwon & Lee 2021, "Improving the Robustness of
Model Compression by On-Manifold Adversarial Training", Future Internet 13(12):300; reference
code sanglee/MC-ATON).

An on-manifold adversarial example moves a point along the data manifold: encode ``x`` to a
latent code ``z``, perturb ``z``, decode. Whether the perturbed point still belongs to its class
is judged in the latent space (Definition 1 of the paper): by a latent classifier trained on the
codes of a VAE for real data, or by the exact Bayes rule where the generator is known (the
paper's simulation). Both are a :class:`Manifold`:

- :class:`VAEManifold`: a :class:`VAE` (conv for images NCHW, 1-D conv for signals NCL, MLP for
  small inputs such as the simulation's 1x4x4) and a :class:`LatentClassifier` on its mean
  codes; :func:`train_vae` / :func:`train_latent_classifier` train them and :func:`cached_vae` /
  :func:`cached_latent_classifier` keep them on disk (safetensors, never unpickled) keyed by a
  hash of (data, spec, seed), like a trained baseline.
- :class:`GaussianManifold`: the ``gaussians`` data set's own generator (the true 2-D latent,
  the fixed encoder 2->16 and its min-max scaling, inverted exactly) with :func:`bayes_class`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.nn import functional as F

from robcomp.data.base import DataSplits, Split
from robcomp.data.builtin import (
    GAUSSIAN_COVS,
    GAUSSIAN_MEANS,
    gaussian_encoder,
    gaussian_latents,
)
from robcomp.models.checkpoint import save_tensors
from robcomp.progress import track

logger = logging.getLogger(__name__)

VAEKind = Literal["auto", "mlp", "conv"]


@runtime_checkable
class Manifold(Protocol):
    """A data manifold with a latent space: ``encode(x) -> z``, ``decode(z) -> x`` (in [0, 1],
    the data's shape) and ``keeps_class(z, y)``, whether latent codes ``z`` still belong to
    class ``y`` (Definition 1 of Kwon & Lee 2021). ``decode`` must be differentiable."""

    def encode(self, x: Tensor) -> Tensor: ...

    def decode(self, z: Tensor) -> Tensor: ...

    def keeps_class(self, z: Tensor, y: Tensor) -> Tensor: ...

    def label(self) -> str: ...


class LazyManifold:
    """A :class:`Manifold` built by ``build()`` on first use, once.

    The experiment pipeline hands one to every on-manifold component of a cell, so a cell whose
    components never encode or decode (everything read from caches) never trains a VAE.
    """

    def __init__(self, build: Callable[[], Manifold]) -> None:
        self._build = build
        self._built: Manifold | None = None

    def get(self) -> Manifold:
        """The manifold, built now if this is the first use."""
        if self._built is None:
            self._built = self._build()
        return self._built

    def encode(self, x: Tensor) -> Tensor:
        return self.get().encode(x)

    def decode(self, z: Tensor) -> Tensor:
        return self.get().decode(z)

    def keeps_class(self, z: Tensor, y: Tensor) -> Tensor:
        return self.get().keeps_class(z, y)

    def label(self) -> str:
        return self.get().label()


# --- the VAE ------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class VAESpec:
    """How to build and train the VAE and its latent classifier (small and fast by default).

    The defaults (latent 32, KL weight 0.25) are the kwon2021-onmanifold preset's: they
    reconstruct MNIST and Fashion-MNIST well enough that its classifier keeps at least 95 % of
    its clean accuracy on ``decode(encode(x))`` (``bench/vae.py``), where latent 8 with the
    full KL term did not. The authors' code (sanglee/MC-ATON) uses a larger conv VAE (latent
    128) trained on all training images.

    Attributes:
        latent_dim: size of the latent code.
        kind: ``conv`` (2-D conv for NCHW images, 1-D conv for NCL signals), ``mlp``, or ``auto``
            (conv when every spatial side is at least 8, else mlp: the simulation's 1x4x4).
        hidden: width of the MLP layers (the conv layers have 32 and 64 channels).
        epochs: VAE training epochs.
        batch_size: batch size of both trainings.
        lr: Adam learning rate of both trainings.
        beta: weight of the KL term (1 is the VAE of Kingma & Welling 2014; below 1 the
            decoder keeps more detail, which a classifier of the reconstructions needs).
        warmup: epochs over which the KL weight rises linearly from ``beta / warmup`` to
            ``beta`` (0: ``beta`` from the start); lets the decoder use the code before the
            KL term closes it (Bowman et al. 2016).
        classifier_epochs: latent classifier training epochs.
        limit: train on the first ``limit`` training points only (None: all).
    """

    latent_dim: int = 32
    kind: VAEKind = "auto"
    hidden: int = 128
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    beta: float = 0.25
    warmup: int = 0
    classifier_epochs: int = 30
    limit: int | None = None

    def __post_init__(self) -> None:
        for name in ("latent_dim", "hidden", "epochs", "batch_size", "classifier_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"vae.{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"vae.lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"vae.beta must be a finite number >= 0, got {self.beta}")
        if self.kind not in ("auto", "mlp", "conv"):
            raise ValueError(f"vae.kind must be one of auto, mlp, conv; got {self.kind!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"vae.limit must be >= 1 or null, got {self.limit}")
        if self.warmup < 0:
            raise ValueError(f"vae.warmup must be >= 0, got {self.warmup}")

    def kl_weight(self, epoch: int) -> float:
        """The KL weight in (0-based) ``epoch``: ``beta``, ramped up over ``warmup`` epochs."""
        return self.beta * min(1.0, (epoch + 1) / self.warmup) if self.warmup else self.beta


def resolve_kind(kind: VAEKind, in_shape: tuple[int, ...]) -> Literal["mlp", "conv"]:
    """``auto``: conv for NCHW/NCL inputs whose spatial sides are all >= 8, else mlp."""
    if kind != "auto":
        return kind
    spatial = in_shape[1:]
    return "conv" if len(spatial) in (1, 2) and min(spatial) >= 8 else "mlp"


def _conv_stack(dims: int, channels: int) -> tuple[nn.Module, nn.Module]:
    """Encoder body (two stride-2 convolutions) and decoder body (two transposed ones)."""
    conv = nn.Conv2d if dims == 2 else nn.Conv1d
    deconv = nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose1d
    body = nn.Sequential(conv(channels, 32, 4, 2, 1), nn.ReLU(), conv(32, 64, 4, 2, 1), nn.ReLU())
    head = nn.Sequential(deconv(64, 32, 4, 2, 1), nn.ReLU(), deconv(32, channels, 4, 2, 1))
    return body, head


class VAE(nn.Module):
    """A variational auto-encoder (Kingma & Welling 2014) on inputs in [0, 1]: Gaussian encoder
    ``q(z|x) = N(mu, exp(logvar))``, Bernoulli decoder (sigmoid outputs, binary cross-entropy).
    """

    def __init__(self, in_shape: tuple[int, ...], latent_dim: int, kind: str, hidden: int) -> None:
        super().__init__()
        self.in_shape, self.latent_dim, self.kind, self.hidden = in_shape, latent_dim, kind, hidden
        features = math.prod(in_shape)
        if kind == "conv":
            dims = len(in_shape) - 1
            self.body, self.head = _conv_stack(dims, in_shape[0])
            with torch.no_grad():
                out = self.body(torch.zeros(1, *in_shape))  # (1, 64, *spatial/4)
            self.code_shape = tuple(out.shape[1:])
            width = math.prod(self.code_shape)
            self.to_code = nn.Linear(width, 2 * latent_dim)
            self.from_code = nn.Linear(latent_dim, width)
        elif kind == "mlp":
            self.code_shape = (hidden,)
            self.body = nn.Sequential(
                nn.Flatten(), nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                nn.ReLU(),
            )  # fmt: skip
            self.head = nn.Sequential(nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
            self.head.append(nn.Linear(hidden, features))
            self.to_code = nn.Linear(hidden, 2 * latent_dim)
            self.from_code = nn.Linear(latent_dim, hidden)
        else:
            raise ValueError(f"VAE kind must be mlp or conv, got {kind!r}")

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu, logvar)`` of ``q(z|x)``, each (B, latent_dim)."""
        code = self.to_code(self.body(x).flatten(1))  # (B, 2 * latent_dim)
        mu, logvar = code.chunk(2, dim=1)
        return mu, logvar.clamp(-20.0, 10.0)

    def decode_logits(self, z: Tensor) -> Tensor:
        """Pre-sigmoid reconstruction, (B, *in_shape)."""
        h = self.from_code(z).reshape(len(z), *self.code_shape)
        out = self.head(h)
        if self.kind == "conv" and tuple(out.shape[2:]) != self.in_shape[1:]:
            # Odd sides are not restored exactly by stride-2 transposed convolutions.
            mode = "bilinear" if len(self.in_shape) == 3 else "linear"
            out = F.interpolate(out, size=self.in_shape[1:], mode=mode, align_corners=False)
        return out.reshape(len(z), *self.in_shape)

    def decode(self, z: Tensor) -> Tensor:
        """The decoder's mean, in [0, 1], (B, *in_shape)."""
        return torch.sigmoid(self.decode_logits(z))

    def loss(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Negative ELBO per example, averaged over the batch (reconstruction + beta * KL is
        formed by the caller: this returns the two terms stacked, shape (2,))."""
        mu, logvar = self.encode(x)
        noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + noise * (0.5 * logvar).exp()
        recon = F.binary_cross_entropy_with_logits(self.decode_logits(z), x, reduction="sum")
        kl = -0.5 * (1 + logvar - mu.square() - logvar.exp()).sum()
        return torch.stack([recon, kl]) / len(x)


class LatentClassifier(nn.Module):
    """``f_z``: predicts the class from a latent code (an estimate of P(Y|Z), Kwon & Lee 2021,
    Sec. 4.1.2; the reference's ``LatentClf``)."""

    def __init__(self, latent_dim: int, num_classes: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )  # fmt: skip

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)  # (B, num_classes)


def _frozen(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _training_split(data: DataSplits, spec: VAESpec) -> Split:
    return data.train.head(spec.limit)


def train_vae(data: DataSplits, spec: VAESpec, seed: int) -> VAE:
    """Train a VAE on ``data.train`` (Adam, ``spec.epochs``); returned frozen, in eval mode."""
    g = torch.Generator().manual_seed(seed)
    kind = resolve_kind(spec.kind, data.in_shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = VAE(data.in_shape, spec.latent_dim, kind, spec.hidden).to(data.device)
    optimizer = torch.optim.Adam(vae.parameters(), lr=spec.lr)
    split = _training_split(data, spec)
    noise = torch.Generator(device=data.device).manual_seed(seed + 1)
    vae.train()
    with track(f"vae {kind} z={spec.latent_dim}", spec.epochs) as advance:
        for epoch in range(spec.epochs):
            beta = spec.kl_weight(epoch)
            for x, _ in split.batches(spec.batch_size, shuffle=True, generator=g):
                recon, kl = vae.loss(x, noise)
                optimizer.zero_grad(set_to_none=True)
                (recon + beta * kl).backward()
                optimizer.step()
            advance()
    return _frozen(vae)  # type: ignore[return-value]


@torch.no_grad()
def latent_codes(vae: VAE, split: Split, batch_size: int = 512) -> Tensor:
    """The mean codes ``mu`` of every input of ``split``, (N, latent_dim)."""
    codes = [vae.encode(x)[0] for x, _ in split.batches(batch_size)]
    return torch.cat(codes) if codes else torch.zeros(0, vae.latent_dim)


def train_latent_classifier(
    vae: VAE, data: DataSplits, spec: VAESpec, seed: int
) -> LatentClassifier:
    """Train ``f_z`` on the VAE's mean codes of ``data.train`` and the true labels."""
    split = _training_split(data, spec)
    codes = Split(latent_codes(vae, split), split.y)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = LatentClassifier(vae.latent_dim, data.num_classes).to(data.device)
    optimizer = torch.optim.Adam(clf.parameters(), lr=spec.lr)
    g = torch.Generator().manual_seed(seed)
    clf.train()
    with track("latent classifier", spec.classifier_epochs) as advance:
        for _ in range(spec.classifier_epochs):
            for z, y in codes.batches(spec.batch_size, shuffle=True, generator=g):
                loss = F.cross_entropy(clf(z), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            advance()
    return _frozen(clf)  # type: ignore[return-value]


# --- the disk cache -----------------------------------------------------------------------------


def _digest(split: Split) -> str:
    h = hashlib.sha256()
    for t in (split.x, split.y):
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_key(data: DataSplits, spec: VAESpec, seed: int) -> str:
    """A hash of the data (name, shape, and the training split's contents), the spec and seed."""
    payload = {
        "data": data.name,
        "in_shape": list(data.in_shape),
        "num_classes": data.num_classes,
        "train": _digest(_training_split(data, spec)),
        "spec": dataclasses.asdict(spec),
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def _save(module: nn.Module, path: Path, meta: Mapping[str, Any]) -> None:
    # atomic: a concurrent reader sees the old file or the new
    save_tensors(path, module.state_dict(), {"meta": json.dumps(dict(meta), sort_keys=True)})


def _load(module: nn.Module, path: Path, device: torch.device) -> nn.Module:
    module.load_state_dict(load_file(str(path)))
    return _frozen(module.to(device))


def cached_vae(data: DataSplits, spec: VAESpec, seed: int, cache_dir: Path) -> VAE:
    """The VAE of :func:`train_vae`, loaded from ``cache_dir`` if trained before (same data,
    spec and seed), else trained and saved there (``vae-<key>/vae.safetensors``)."""
    path = Path(cache_dir) / f"vae-{cache_key(data, spec, seed)}" / "vae.safetensors"
    kind = resolve_kind(spec.kind, data.in_shape)
    if path.is_file():
        vae = VAE(data.in_shape, spec.latent_dim, kind, spec.hidden)
        return _load(vae, path, data.device)  # type: ignore[return-value]
    vae = train_vae(data, spec, seed)
    _save(vae, path, {"data": data.name, "spec": dataclasses.asdict(spec), "seed": seed})
    logger.info("trained VAE saved to %s", path)
    return vae


def cached_latent_classifier(
    vae: VAE, data: DataSplits, spec: VAESpec, seed: int, cache_dir: Path
) -> LatentClassifier:
    """The latent classifier of :func:`train_latent_classifier` for the VAE cached under the
    same key, loaded from or saved to ``cache_dir`` (``vae-<key>/latent_classifier.safetensors``).
    """
    path = Path(cache_dir) / f"vae-{cache_key(data, spec, seed)}" / "latent_classifier.safetensors"
    if path.is_file():
        clf = LatentClassifier(spec.latent_dim, data.num_classes)
        return _load(clf, path, data.device)  # type: ignore[return-value]
    clf = train_latent_classifier(vae, data, spec, seed)
    _save(clf, path, {"data": data.name, "spec": dataclasses.asdict(spec), "seed": seed})
    return clf


@dataclass(frozen=True, eq=False)
class VAEManifold:
    """The manifold of a trained VAE: codes are the encoder means, class membership is the
    latent classifier's prediction (Kwon & Lee 2021, Sec. 4.1.2)."""

    vae: VAE
    classifier: LatentClassifier

    def _on(self, t: Tensor) -> None:
        # The generative nets follow the data (a cell may run on a GPU); .to is a no-op after.
        self.vae.to(t.device)
        self.classifier.to(t.device)

    def encode(self, x: Tensor) -> Tensor:
        self._on(x)
        with torch.no_grad():
            return self.vae.encode(x)[0]  # (B, latent_dim)

    def decode(self, z: Tensor) -> Tensor:
        self._on(z)
        return self.vae.decode(z)  # sigmoid: already in [0, 1]

    def keeps_class(self, z: Tensor, y: Tensor) -> Tensor:
        self._on(z)
        with torch.no_grad():
            return self.classifier(z).argmax(1) == y

    def label(self) -> str:
        return f"vae-{self.vae.kind}-z{self.vae.latent_dim}"


# --- the simulation's known generator -----------------------------------------------------------


def bayes_class(z: Tensor) -> Tensor:
    """The Bayes-optimal class of 2-D latent points ``z`` (B, 2) under the four Gaussians of the
    simulation (equal priors: the ``gaussians`` data set draws balanced classes), (B,) int64."""
    means = torch.tensor(GAUSSIAN_MEANS, dtype=torch.float64, device=z.device)  # (4, 2)
    covs = torch.tensor(GAUSSIAN_COVS, dtype=torch.float64, device=z.device)  # (4, 2, 2)
    diff = z.detach().double()[:, None, :] - means[None]  # (B, 4, 2)
    solved = torch.linalg.solve(covs[None].expand(len(z), -1, -1, -1), diff)  # (B, 4, 2)
    mahalanobis = (diff * solved).sum(-1)  # (B, 4)
    log_pdf = -0.5 * (mahalanobis + torch.logdet(covs)[None])  # up to a shared constant
    return log_pdf.argmax(1)


def _leaky_inverse(h: Tensor, slope: float = 0.2) -> Tensor:
    return torch.where(h >= 0, h, h / slope)


class GaussianManifold:
    """The ``gaussians`` simulation's true generator (Kwon & Lee 2021, Sec. 4.1.1): the latent
    is the 2-D Gaussian point itself, ``decode`` the data set's fixed encoder 2->16 with its
    min-max scaling (reshaped to 1x4x4, clipped to [0, 1]), ``encode`` its exact inverse (the
    layers are injective: least squares through each Linear, LeakyReLU inverted), and class
    membership the exact Bayes rule :func:`bayes_class`. So Definition 1 is checked exactly,
    with no VAE or latent classifier in between.

    Args:
        n: the data set's ``n`` (the scaling is over its whole set of points).
        encoder_seed: the data set's ``encoder_seed``.
    """

    def __init__(self, n: int = 70000, encoder_seed: int = 0) -> None:
        self.n, self.encoder_seed = n, encoder_seed
        self.encoder = gaussian_encoder(encoder_seed)
        with torch.no_grad():  # the data set's own scaling, recomputed from its own draw
            z, _ = gaussian_latents(n, torch.Generator().manual_seed(42))
            x = self.encoder(z)
        self.lo, self.hi = float(x.min()), float(x.max())

    def decode(self, z: Tensor) -> Tensor:
        self.encoder.to(z.device)
        x = (self.encoder(z) - self.lo) / (self.hi - self.lo)  # (B, 16)
        return x.clamp(0.0, 1.0).reshape(-1, 1, 4, 4)

    def encode(self, x: Tensor) -> Tensor:
        layers = [m for m in self.encoder if isinstance(m, nn.Linear)]
        h = x.detach().reshape(len(x), -1).double() * (self.hi - self.lo) + self.lo  # (B, 16)
        for i, layer in enumerate(reversed(layers)):
            w = layer.weight.detach().double().to(x.device)
            b = layer.bias.detach().double().to(x.device)
            # Least squares: exact on the image of an injective (tall or square) layer.
            h = torch.linalg.lstsq(w, (h - b).T).solution.T
            if i < len(layers) - 1:
                h = _leaky_inverse(h)
        return h.to(x.dtype)  # (B, 2)

    def keeps_class(self, z: Tensor, y: Tensor) -> Tensor:
        return bayes_class(z) == y

    def label(self) -> str:
        return "gaussian-generator"
