"""Ensembles: several classifiers combined by averaging their class probabilities.

Marshall (2020, "Robust Convolutional Neural Networks with Resource Constraints", Sec. 4.2.3 and
Table C.1) averages the probabilistic predictions of a naturally trained and an adversarially
trained network and reports higher PGD and CW accuracy than the robust network alone. The
``ensemble`` model makes such combinations a model kind like any other, so they are trained,
compressed, attacked and reported by the same code::

    model:
      name: ensemble       # members normalise their own inputs (see below)
      options:
        members:
          - {weights: runs/robust-teacher}          # a robcomp checkpoint folder
          - {weights: runs/natural}
        weights: [0.5, 0.5]                         # optional mixture weights
    train: {epochs: 0}                              # evaluate the trained members as they are

The output is ``log(sum_k w_k softmax(f_k(x)))``: log-probabilities, which behave as logits
(their softmax is the mixture, their argmax its prediction), so cross-entropy, accuracy and every
attack work unchanged. Attacks differentiate through all members, the white-box gradient of the
ensemble's actual output. That gradient can still mislead: a confident natural member has a
saturated softmax, so its share of the gradient nearly vanishes while its probability keeps the
mixture right; a higher PGD accuracy of the ensemble than of its robust member (as in Table C.1)
may be gradient masking. Check it with the diagnostics, gradient-free and transfer attacks.

**Normalisation.** Every member normalises its own input: a checkpoint folder brings its
statistics, a member built by name takes ``mean``/``std`` from its entry (identity by default).
The ensemble's own Normalize, which :func:`robcomp.models.create` puts in front of every model,
must then be the identity: create's defaults are, and the factory is marked
:func:`~robcomp.models.capabilities.self_normalizing`, so the experiment runner gives it the
identity too instead of the data's statistics. Members expect raw pixels, so inputs outside
[0, 1] (a sign of normalising twice) are an error, raised at the first forward pass.

**Training.** Members that load weights are frozen by default (parameters without gradients,
BatchNorm kept in eval mode even when the ensemble is trained): an ensemble of trained models is
evaluated, not trained, so use ``train: {epochs: 0}``. Members built fresh, or with
``frozen: false``, are trained jointly through the mixture's likelihood.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from robcomp.config import build
from robcomp.models.base import MODELS, Classifier, Normalize, create
from robcomp.models.capabilities import reads_files, self_normalizing
from robcomp.models.checkpoint import load_checkpoint, load_weights

# Two fresh tiny CNNs: every registered model must build with its defaults (the zoo's tests).
DEFAULT_MEMBERS: tuple[dict[str, Any], ...] = ({"name": "tiny_cnn"}, {"name": "tiny_cnn"})

# Inputs are in [0, 1]; a little float slack for points an attack clamps.
_PIXEL_TOL = 1e-4


@dataclass(frozen=True, kw_only=True)
class Member:
    """One member of an ensemble, as an experiment file writes it.

    Attributes:
        name: a registered model name (or ``module:callable``); may be left out when ``weights``
            is a checkpoint folder, whose ``spec.json`` names the architecture.
        weights: a robcomp checkpoint folder (architecture, normalisation and weights), a
            weights file (safetensors, or PyTorch read with ``weights_only=True``), or ``None``
            for a freshly initialised model.
        options: architecture options of a member built by name.
        mean, std: normalisation of a member built by name (default: none).
        frozen: keep the member fixed; by default members that load weights are frozen.
    """

    name: str | None = None
    weights: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    frozen: bool | None = None


def _normalizes(model: nn.Module) -> bool:
    """Whether ``model`` starts with a Normalize layer that is not the identity."""
    norm = getattr(model, "normalize", None)
    if not isinstance(norm, Normalize):
        return False
    return bool((norm.mean != 0).any() or (norm.std != 1).any())


class Ensemble(nn.Module):
    """Log of the weighted average of the members' class probabilities (Marshall 2020,
    Table C.1); see the module docstring for normalisation, freezing and attacks.

    Args:
        members: classifiers taking inputs in [0, 1], all with the same number of classes.
        weights: positive mixture weights, normalised to sum to 1; default uniform.
        frozen: per member, whether to freeze it (no parameter gradients, eval mode always).
    """

    weights: Tensor

    def __init__(
        self,
        members: Sequence[nn.Module],
        weights: Sequence[float] | None = None,
        frozen: Sequence[bool] | None = None,
    ) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        weights = [1.0] * len(members) if weights is None else [float(w) for w in weights]
        frozen = [False] * len(members) if frozen is None else list(frozen)
        if len(weights) != len(members) or len(frozen) != len(members):
            raise ValueError(
                f"ensemble of {len(members)} members got {len(weights)} weights and "
                f"{len(frozen)} frozen flags"
            )
        if not all(w > 0 for w in weights):
            raise ValueError(f"ensemble weights must be positive, got {weights}")
        self.members = nn.ModuleList(members)
        total = sum(weights)
        self.register_buffer("weights", torch.tensor([w / total for w in weights]))
        self.frozen = tuple(frozen)
        for member, fixed in zip(self.members, self.frozen):
            if fixed:
                member.requires_grad_(False)
        self.self_normalizing = any(_normalizes(m) for m in self.members)
        self.train(self.training)

    def train(self, mode: bool = True) -> Ensemble:
        """Set the mode of the ensemble and its free members; frozen members stay in eval mode,
        so training the ensemble never moves their BatchNorm statistics."""
        super().train(mode)
        for member, fixed in zip(self.members, self.frozen):
            if fixed:
                member.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        if self.self_normalizing:
            _check_pixels(x)
        log_p = torch.stack([F.log_softmax(m(x), dim=1) for m in self.members])  # (K, B, C)
        log_w = self.weights.log().view(-1, 1, 1)  # (K, 1, 1)
        # log sum_k w_k p_k, computed in log space so confident members do not underflow.
        return torch.logsumexp(log_w + log_p, dim=0)  # (B, C)

    def extra_repr(self) -> str:
        return f"weights={[round(w, 4) for w in self.weights.tolist()]}, frozen={self.frozen}"


def _check_pixels(x: Tensor) -> None:
    """Members that normalise themselves expect [0, 1]; anything else was normalised twice."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return  # a data-dependent check cannot be traced; eager runs have made it already
    low, high = (float(v) for v in torch.aminmax(x.detach()))
    if low < -_PIXEL_TOL or high > 1 + _PIXEL_TOL:
        raise ValueError(
            f"ensemble: its members normalise their own inputs, but it received values in "
            f"[{low:.3g}, {high:.3g}], not [0, 1]: the ensemble itself was created with a "
            "mean/std, so inputs are normalised twice. Create it with mean 0 and std 1 (the "
            "defaults of robcomp.models.create; in an experiment file, model.mean: [0.0, ...] "
            "and model.std: [1.0, ...], one value per channel)."
        )


def _member_from_checkpoint(
    member: Member, folder: Path, num_classes: int, in_shape: tuple[int, ...], where: str
) -> nn.Module:
    if member.options or member.mean is not None or member.std is not None:
        raise ValueError(
            f"{where}: {folder} is a checkpoint folder, whose spec.json fixes the architecture "
            "and normalisation; remove options/mean/std"
        )
    model, spec = load_checkpoint(folder)  # safetensors weights + JSON spec
    if member.name is not None and member.name != spec["name"]:
        raise ValueError(f"{where}: name {member.name!r} but {folder} holds {spec['name']!r}")
    if spec["num_classes"] != num_classes or tuple(spec["in_shape"]) != tuple(in_shape):
        raise ValueError(
            f"{where}: {folder} has {spec['num_classes']} classes and input "
            f"{tuple(spec['in_shape'])}; the ensemble needs {num_classes} and {tuple(in_shape)}"
        )
    return model


def build_member(
    spec: Mapping[str, Any] | str | Member,
    num_classes: int,
    in_shape: tuple[int, ...],
    where: str = "member",
) -> tuple[nn.Module, bool]:
    """Build one member from its entry; returns (model, frozen).

    A string is a checkpoint folder. Files are read only through robcomp's safe loaders
    (safetensors, or ``torch.load`` with ``weights_only=True``).
    """
    if isinstance(spec, str):
        spec = {"weights": spec}
    member = spec if isinstance(spec, Member) else build(Member, spec, where)
    source = Path(member.weights).expanduser() if member.weights is not None else None
    if source is not None and source.is_dir():
        model = _member_from_checkpoint(member, source, num_classes, in_shape, where)
    elif member.name is None:
        raise ValueError(
            f"{where}: name is required unless weights is a checkpoint folder "
            f"(weights: {member.weights!r})"
        )
    else:
        model = create(
            member.name, num_classes, in_shape, mean=member.mean, std=member.std,
            **member.options,
        )  # fmt: skip
        if source is not None:
            load_weights(model, source)
    frozen = member.frozen if member.frozen is not None else source is not None
    return model, frozen


@MODELS.register("ensemble")
@self_normalizing
@reads_files
def ensemble(
    *,
    num_classes: int,
    in_shape: tuple[int, ...],
    members: Sequence[Mapping[str, Any] | str] = DEFAULT_MEMBERS,
    weights: Sequence[float] | None = None,
) -> Ensemble:
    """An ensemble of ``members`` (:class:`Member` entries, or checkpoint folders as strings)
    averaged in probability with mixture ``weights``; default: two fresh tiny CNNs."""
    if isinstance(members, str | Mapping):
        raise ValueError("ensemble: members must be a list of member entries")
    built = [
        build_member(m, num_classes, tuple(in_shape), f"ensemble.members[{i}]")
        for i, m in enumerate(members)
    ]
    return Ensemble([m for m, _ in built], weights, [f for _, f in built])


def ensemble_of(
    models: Sequence[nn.Module], weights: Sequence[float] | None = None, *, frozen: bool = True
) -> Classifier:
    """An ensemble of live models (copied, so the originals are untouched), behind an identity
    Normalize like every robcomp model; e.g. Marshall's robust + natural pair."""
    if not models:
        raise ValueError("an ensemble needs at least one member")
    members = [copy.deepcopy(m) for m in models]
    net = Ensemble(members, weights, [frozen] * len(members))
    channels = _channels(members[0])
    return Classifier(net, Normalize((0.0,) * channels, (1.0,) * channels))


def _channels(model: nn.Module) -> int:
    norm = getattr(model, "normalize", None)
    if isinstance(norm, Normalize):
        return int(norm.mean.numel())
    raise ValueError("ensemble_of needs robcomp models (with a Normalize layer) to size its input")
