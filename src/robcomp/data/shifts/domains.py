"""The ``domains`` shift: score a model trained on one domain on the whole of other domains.

Shen et al., *Robustness to distribution shifts of compressed networks for edge devices* (2024):
train on a source domain (Office-31's Amazon, Webcam or DSLR; here also MNIST, USPS, MNIST-M,
SVHN, scikit-learn's digits) and report the accuracy on *all* images of each other domain.

```yaml
data: {name: domain, source: mnist}          # 90/10 split of all of MNIST, seed 1
evaluate:
  shifts:
    - {name: domains, targets: [usps, mnist-m, {name: svhn, root: /data/svhn}]}
```

With an ``imagefolder`` source and no ``targets``, the targets are the folder's other domains
(and a bare name among its domains, e.g. ``targets: [webcam]``, means that domain).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from robcomp.config import build_component
from robcomp.data.base import DataSplits, Split
from robcomp.data.domains import (
    MNISTM,
    concat,
    dataset_spec,
    describe_match,
    match_shape,
    whole_domain,
)
from robcomp.data.imagefolder import ImageFolder
from robcomp.data.registry import DATASETS
from robcomp.data.shifts.base import SHIFTS, ShiftContext, ShiftedSplit

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Domain:
    """A domain as the shift sees it: the name it is stored under and its dataset spec."""

    name: str
    spec: dict[str, Any]

    def dataset(self, where: str) -> Any:
        return build_component(DATASETS, self.spec, where)


def source_domain(data_spec: Mapping[str, Any] | str) -> _Domain:
    """The source domain of a cell's ``data`` spec (unwrapping ``{name: domain, source: ...}``)."""
    spec = dataset_spec(data_spec)
    if spec.get("name") == "domain":
        spec = dataset_spec(spec["source"])
    name = str(spec["source"]) if spec.get("name") == "imagefolder" else str(spec["name"])
    return _Domain(name, spec)


def _imagefolder_domains(source: _Domain) -> tuple[str, ...]:
    if source.spec.get("name") != "imagefolder":
        return ()
    folder: ImageFolder = source.dataset("data")
    return folder.domain_names()


@SHIFTS.register("domains")
@dataclass(frozen=True, kw_only=True)
class Domains:
    """Other domains, each scored whole: one split per target (severity 0, family ``domain``).

    Images of another shape are brought to the source's shape by :func:`match_shape` (resize,
    grey <-> RGB), logged once per target. A target that is the source itself is skipped with a
    log line, so one ``targets`` list serves a grid whose source varies. With an MNIST-M source,
    an MNIST target leaves out the MNIST test images MNIST-M was made from (they would be the
    source's own digits). Targets must have the source's classes (same names, same order).

    Attributes:
        targets: dataset names or specs (``usps``, ``{name: svhn, root: ...}``), or domains of
            an ``imagefolder`` source; empty = the imagefolder source's other domains.
    """

    targets: tuple[str | dict[str, Any], ...] = ()

    def __post_init__(self) -> None:
        for i, target in enumerate(self.targets):
            spec = dataset_spec(target) if isinstance(target, str | Mapping) else {}
            name = spec.get("name")
            if not isinstance(name, str) or not name:
                raise ValueError(
                    f"targets[{i}] must be a dataset name or {{name: ...}}, got {target!r}"
                )
            if isinstance(target, Mapping) and name not in DATASETS:
                raise ValueError(
                    f"targets[{i}]: no dataset {name!r}; registered: {', '.join(DATASETS.names())}"
                )

    def label(self) -> str:
        return "domains"

    def shifted(self, data: DataSplits, context: ShiftContext) -> Sequence[ShiftedSplit]:
        source = source_domain(context.data_spec)
        out: list[ShiftedSplit] = []
        for target in self._targets(source):
            if target.name == source.name:
                logger.info("domains: skipping target %s, the source domain itself", target.name)
                continue
            split = self._load(target, source, data, context.seed)
            out.append(ShiftedSplit(shift=target.name, severity=0, split=split, family="domain"))
        return out

    def _targets(self, source: _Domain) -> list[_Domain]:
        siblings = _imagefolder_domains(source)
        if not self.targets:
            if not siblings:
                raise ValueError(
                    f"shift 'domains': targets is empty and the source {source.name!r} is not "
                    "an imagefolder with other domains; list them, e.g. targets: [usps, mnist-m]"
                )
            return [_Domain(d, source.spec | {"source": d}) for d in siblings]
        targets = []
        for target in self.targets:
            spec = dataset_spec(target)
            if isinstance(target, str) and target in siblings:
                targets.append(_Domain(target, source.spec | {"source": target}))
                continue
            if isinstance(target, str) and target not in DATASETS:
                known = ", ".join(DATASETS.names())
                if siblings:
                    known += f"; domains of the source folder: {', '.join(siblings)}"
                raise ValueError(f"shift 'domains': unknown target {target!r}; datasets: {known}")
            targets.append(source_domain(spec))
        names = [t.name for t in targets]
        if len(set(names)) != len(names):
            raise ValueError(f"shift 'domains': two targets are stored under one name: {names}")
        return targets

    def _load(self, target: _Domain, source: _Domain, data: DataSplits, seed: int) -> Split:
        where = f"shift 'domains' target {target.name!r}"
        dataset = target.dataset(where)
        if source.spec.get("name") == "mnist-m" and target.spec.get("name") == "mnist":
            split, classes = _mnist_without(dataset, source.dataset("data"), seed)
        else:
            split, _, classes = whole_domain(dataset, seed)
        if tuple(classes) != tuple(data.classes):
            raise ValueError(
                f"{where}: its classes {list(classes)[:10]} are not the source's "
                f"{list(data.classes)[:10]}; a domain shift keeps the classes"
            )
        shape = tuple(split.x.shape[1:])
        if shape != data.in_shape:
            logger.info(
                "domains: %s -> source %s: %s", target.name, source.name,
                describe_match(shape, data.in_shape),
            )  # fmt: skip
        return match_shape(split, data.in_shape)


def _mnist_without(mnist: Any, mnist_m: MNISTM, seed: int) -> tuple[Split, tuple[str, ...]]:
    """All of MNIST but the test images an MNIST-M source was made from, and its classes."""
    train, test, _, classes = mnist.load_splits(seed)  # the official 60k train, then the 10k test
    keep = torch.ones(len(test), dtype=torch.bool)
    index = mnist_m.mnist_test_index()
    if len(index) and (int(index.min()) < 0 or int(index.max()) >= len(test)):
        raise ValueError(
            f"mnist-m's mnist_test_index ranges over [{int(index.min())}, {int(index.max())}], "
            f"outside MNIST's {len(test)} test images"
        )
    keep[index] = False
    logger.info("domains: mnist leaves out the %d test images mnist-m was made from", len(index))
    return concat(train, test.take(keep)), tuple(classes)
