from __future__ import annotations

import pytest

from robcomp.registry import Registry, RegistryError


def test_register_get_and_names() -> None:
    reg: Registry[object] = Registry("widget")

    @reg.register("alpha")
    class Alpha: ...

    reg.add("beta", 42)
    assert reg.get("alpha") is Alpha
    assert reg.get("beta") == 42
    assert reg.names() == ["alpha", "beta"]
    assert reg.names("a*") == ["alpha"]
    assert "alpha" in reg and "gamma" not in reg
    assert len(reg) == 2


def test_duplicate_name_is_an_error() -> None:
    reg: Registry[int] = Registry("widget")
    reg.add("x", 1)
    with pytest.raises(RegistryError, match="already registered"):
        reg.add("x", 2)
    assert reg.get("x") == 1  # the first registration is kept


def test_unknown_name_suggests_the_closest() -> None:
    reg: Registry[int] = Registry("attack")
    for name in ("pgd", "fgsm", "apgd-ce"):
        reg.add(name, 0)
    with pytest.raises(RegistryError) as info:
        reg.get("pdg")
    message = str(info.value)
    assert "unknown attack 'pdg'" in message
    assert "Did you mean 'pgd'" in message
    assert "Available: apgd-ce, fgsm, pgd" in message


@pytest.mark.parametrize("bad", ["", " pgd", "pgd "])
def test_invalid_names_are_rejected(bad: str) -> None:
    with pytest.raises(RegistryError):
        Registry("x").add(bad, 1)


def test_every_builtin_registry_is_populated() -> None:
    from robcomp.attacks import ATTACKS
    from robcomp.compress import COMPRESSORS
    from robcomp.data import DATASETS
    from robcomp.models import MODELS
    from robcomp.train import OBJECTIVES

    assert {
        "digits",
        "gaussians",
        "mnist",
        "fashion-mnist",
        "cifar10",
        "cifar100",
        "svhn",
        "npz",
    } <= set(DATASETS)
    assert {"tiny_mlp", "tiny_cnn", "lenet5", "kwon_lenet", "small_cnn", "resnet20", "resnet32",
            "resnet44", "resnet56", "resnet18", "resnet34", "resnet50", "mobilenet_v2", "vgg16",
            "wrn_28_4", "wrn_34_10"} <= set(MODELS)  # fmt: skip
    assert {"fgsm", "pgd"} <= set(ATTACKS)
    assert {"none", "magnitude"} <= set(COMPRESSORS)
    assert "ce" in OBJECTIVES


def test_temporarily_registers_for_the_block_only() -> None:
    reg: Registry[int] = Registry("thing")
    reg.add("kept", 1)
    with pytest.raises(RuntimeError), reg.temporarily("scratch", 2):
        assert reg.get("scratch") == 2 and reg.names() == ["kept", "scratch"]
        raise RuntimeError("the block failed")
    assert reg.names() == ["kept"]  # gone even when the block raised
    with pytest.raises(RegistryError, match="already registered"), reg.temporarily("kept", 3):
        pass
    assert reg.get("kept") == 1  # a refused name leaves the original in place
