"""Common corruptions (Hendrycks & Dietterich 2019): the contract of every corruption, a
cross-check against imagecorruptions-imaug (ImageNet constants), the mCE formulas, the shift."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image

import robcomp.data.shifts.corruptions as corruptions_module
from robcomp.data.base import DataSplits, Split
from robcomp.data.shifts import SHIFTS, ShiftContext
from robcomp.data.shifts.corruption_tables import ALL, BENCHMARK, EXTRA, FAMILY, TABLES
from robcomp.data.shifts.corruptions import (
    _motion,
    _shuffle_locally,
    corrupt,
    corrupt_split,
    frost_photo_path,
)

RANDOM = {
    "gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "glass_blur",
    "motion_blur", "snow", "frost", "fog", "spatter", "elastic_transform",
}  # fmt: skip
DETERMINISTIC = [n for n in ALL if n not in RANDOM]


def smooth_images(n: int, size: int, channels: int = 3, seed: int = 0) -> torch.Tensor:
    """Smooth random colour images (upsampled noise) in [0.05, 0.95]: edges, flats, colours."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, channels, 6, 6, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic")
    return (0.05 + 0.9 * x).clamp(0, 1)


def run(x: torch.Tensor, name: str, severity: int, seed: int = 0, **kw: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return corrupt(x, name, severity, constants=kw.get("constants", "cifar"), generator=g)


@pytest.mark.parametrize("name", ALL)
def test_contract(name: str) -> None:
    for size in (8, 32):
        for channels in (1, 3):
            x = smooth_images(3, size, channels)
            before = x.clone()
            for severity in range(1, 6):
                out = run(x, name, severity)
                assert out.shape == x.shape and out.dtype == torch.float32
                assert out.min() >= 0 and out.max() <= 1
                assert torch.equal(x, before)  # the input is never modified
            assert torch.equal(run(x, name, 3, seed=1), run(x, name, 3, seed=1))
    x = smooth_images(3, 32)
    if name in RANDOM:
        assert not torch.equal(run(x, name, 5, seed=1), run(x, name, 5, seed=2))
    else:
        assert torch.equal(run(x, name, 5, seed=1), run(x, name, 5, seed=2))
    assert (run(x, name, 5) - x).abs().mean() > 1e-3  # it really corrupts


# The CIFAR-10-C table is not monotone in pixel distance for these (true of the original too):
# glass blur's severity 3 (sigma 0.4, one pass) blurs more than severity 4 (0.25, two passes);
# frost's image weight and frost weight trade off (severity 3 moves pixels most); elastic goes
# from a large affine jitter (2.6 px) at severity 1 to smaller jitters plus local warps;
# saturate desaturates at 1-2 and oversaturates at 3-5; spatter switches from water (1-3) to mud
# (4-5). For them we test what holds: severity 5 moves pixels more than severity 1 (elastic:
# every severity moves them), and monotone within saturate's and spatter's two regimes.
NOT_MONOTONE = {"glass_blur", "frost", "elastic_transform", "saturate", "spatter"}


@pytest.mark.parametrize("name", ALL)
def test_severity_increases_distortion(name: str) -> None:
    x = smooth_images(8, 32)
    dist = [float((run(x, name, s) - x).abs().mean()) for s in range(1, 6)]
    if name not in NOT_MONOTONE:
        assert all(b >= a - 1e-6 for a, b in itertools.pairwise(dist)), dist
    elif name == "elastic_transform":
        assert min(dist) > 0.005, dist
    else:
        assert dist[4] > dist[0], dist
    if name == "saturate":
        assert dist[3] <= dist[4] and dist[0] <= dist[1]
    if name == "spatter":
        assert dist[3] <= dist[4]


def test_groups_and_families() -> None:
    assert len(BENCHMARK) == 15 and len(EXTRA) == 4 and set(FAMILY) == set(ALL)
    shift = SHIFTS.get("corruptions")(corruptions=("extra", "fog"))
    assert shift.label().startswith("corruptions[")
    with pytest.raises(ValueError, match="not a corruption"):
        SHIFTS.get("corruptions")(corruptions=("fgo",))
    with pytest.raises(ValueError, match="constants"):
        SHIFTS.get("corruptions")(constants="cifar100")
    with pytest.raises(ValueError, match="severities"):
        SHIFTS.get("corruptions")(severities=(0, 6))


def test_motion_blur_matches_imagemagick_semantics() -> None:
    """imagecorruptions re-implements ImageMagick's MotionBlurImage in numpy; at a fixed angle
    the streak is deterministic and ours must agree."""
    icc = pytest.importorskip("imagecorruptions.corruptions")
    image = (smooth_images(1, 48)[0].permute(1, 2, 0).numpy() * 255).astype(np.float64)
    for angle in (-40.0, 0.0, 23.0):
        ref = icc._motion_blur(image, radius=12, sigma=4, angle=angle)
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
        ours = _motion(x, 12, 4, torch.tensor([angle]))[0].permute(1, 2, 0).numpy()
        assert np.abs(ours - ref).max() < 1e-2


def reference_glass_loop(image: np.ndarray, reach: int, offsets: np.ndarray) -> np.ndarray:
    """The authors' glass-blur loop (hendrycks/robustness, make_cifar_c.py), literally, on an
    HWC numpy image: the tuple assignment on pixel views copies x[h', w'] into x[h, w]."""
    x = image.copy()
    height, width = x.shape[:2]
    for it in range(offsets.shape[0]):
        step = 0
        for h in range(height - reach, reach, -1):
            for w in range(width - reach, reach, -1):
                dx, dy = offsets[it, step]
                h_prime, w_prime = h + dy, w + dx
                x[h, w], x[h_prime, w_prime] = x[h_prime, w_prime], x[h, w]
                step += 1
    return x


@pytest.mark.parametrize(
    ("height", "width", "reach", "iterations"), [(11, 9, 2, 3), (12, 12, 1, 2)]
)
def test_glass_shuffle_equals_the_reference_loop(
    height: int, width: int, reach: int, iterations: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batched shuffle is the original's sequential loop with its copy semantics, per
    image, with the same draws: (dx, dy) per visited pixel and pass, in visiting order."""
    n, channels = 3, 3
    x = torch.randint(
        0, 256, (n, channels, height, width), generator=torch.Generator().manual_seed(0)
    )
    out = _shuffle_locally(x.float(), reach, iterations, torch.Generator().manual_seed(3))
    steps = (height - 2 * reach) * (width - 2 * reach)
    offsets = torch.randint(
        -reach, reach, (iterations, steps, 2, n), generator=torch.Generator().manual_seed(3)
    ).numpy()
    for i in range(n):
        image = x[i].permute(1, 2, 0).numpy().astype(np.uint8)
        expected = reference_glass_loop(image, reach, offsets[..., i])
        assert np.array_equal(out[i].permute(1, 2, 0).numpy(), expected)
    # large batches are shuffled in blocks of images: blocks of 2 here, same result
    monkeypatch.setattr(corruptions_module, "_GLASS_POINTERS", 2 * 2 * height * width)
    blocks = _shuffle_locally(x.float(), reach, iterations, torch.Generator().manual_seed(3))
    assert torch.equal(blocks, out)


@pytest.mark.slow  # numba compiles the reference loop (~15 s)
def test_glass_shuffle_duplicates_pixels_as_imagecorruptions() -> None:
    """imagecorruptions' numba loop copies too (a true swap would keep every pixel): on an
    image of distinct pixels, the share of distinct pixels left agrees with ours."""
    icc = pytest.importorskip("imagecorruptions.corruptions")
    side = 40
    image = np.arange(side * side * 3, dtype=np.int64).reshape(side, side, 3)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    for reach, iterations in ((1, 2), (2, 1), (3, 2)):
        theirs, mine = [], []
        for seed in range(6):
            shuffled = icc._shuffle_pixels_njit_glass_blur(
                side, side, image.copy(), (0, reach, iterations), seed
            )
            theirs.append(len(np.unique(shuffled.reshape(-1, 3), axis=0)) / side**2)
            ours_ = _shuffle_locally(x, reach, iterations, torch.Generator().manual_seed(seed))
            mine.append(len(torch.unique(ours_[0].reshape(3, -1), dim=1).T) / side**2)
        assert abs(np.mean(mine) - np.mean(theirs)) < 0.03, (reach, mine, theirs)
        assert np.mean(theirs) < 0.9  # copies lose pixels


def frost_crops_by_opencv(n: int, size: int, factor: float, seed: int) -> torch.Tensor:
    """What the authors' frost does per image, with OpenCV on the photographs imagecorruptions
    ships: photograph randint(5), cv2.resize by ``factor`` (none at 1), crop corner
    randint(0, side - size) per axis, BGR to RGB; draws in that order from one generator."""
    cv2 = pytest.importorskip("cv2")
    g = torch.Generator().manual_seed(seed)
    names = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")
    picks = torch.randint(5, (n,), generator=g).tolist()
    crops = []
    for pick in picks:
        photo = cv2.imread(str(frost_photo_path(names[pick])))
        if factor != 1:
            photo = cv2.resize(photo, (0, 0), fx=factor, fy=factor)
        top = int(torch.randint(photo.shape[0] - size, (1,), generator=g))
        left = int(torch.randint(photo.shape[1] - size, (1,), generator=g))
        crops.append(photo[top : top + size, left : left + size, ::-1].copy())
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255


@pytest.mark.parametrize(
    ("constants", "size", "factor"), [("cifar", 32, 0.2), ("tiny", 64, 0.3), ("imagenet", 224, 1.0)]
)
def test_frost_crops_the_authors_photographs(constants: str, size: int, factor: float) -> None:
    """On a black image frost is ``frost_weight * crop``: the crop of the generator for the
    table (make_cifar_c.py: photographs resized by 0.2, 32-px crops; make_tinyimagenet_c.py:
    0.3, 64 px; make_imagenet_c.py: unresized, 224 px)."""
    n = 6
    black = torch.zeros(n, 3, size, size)
    expected = frost_crops_by_opencv(n, size, factor, seed=5)
    for severity in (1, 5):
        frost_weight = TABLES[constants]["frost"][severity - 1][1]
        out = run(black, "frost", severity, seed=5, constants=constants)
        assert torch.allclose(out, (frost_weight * expected).clamp(0, 1), atol=1e-6)


def test_frost_says_where_the_photographs_come_from(monkeypatch: pytest.MonkeyPatch) -> None:
    module = corruptions_module
    monkeypatch.setattr(module, "_FROST_PACKAGE", "no_such_package_robcomp")
    module._frost_photo.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="imagecorruptions-imaug"):
            run(smooth_images(2, 32), "frost", 3)
    finally:
        module._frost_photo.cache_clear()


def reference(images: np.ndarray, name: str, severity: int) -> np.ndarray:
    """imagecorruptions' output in 8-bit levels as float64, before its uint8 truncation."""
    ic = pytest.importorskip("imagecorruptions")
    fn = ic.corruption_dict[name]
    out = [np.asarray(fn(Image.fromarray(im), severity), dtype=np.float64) for im in images]
    return np.stack(out)


def ours(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    out = run(x, name, severity, seed=seed, constants="imagenet")
    return (out * 255).permute(0, 2, 3, 1).double().numpy()


# The reference computes brightness and saturate in float64 through scikit-image's HSV round
# trip, which lands many values a hair (1e-14) below a level, so its truncation loses one
# level there; our float32 result is the level itself. The other deterministic corruptions
# are equal after truncation but for values within float error of a level.
UINT8_EQUAL = {"brightness": 0.95, "saturate": 0.75}
UINT8_EQUAL_OTHERS = 0.95


def check_deterministic(images: np.ndarray) -> None:
    for name in DETERMINISTIC:
        for severity in (1, 3, 5):
            theirs, mine = reference(images, name, severity), ours(images, name, severity)
            assert np.abs(mine - theirs).max() < 0.01, (name, severity)  # of a level
            truncated = np.floor(mine.astype(np.float32))
            equal = float((truncated == np.uint8(np.clip(theirs, 0, 255))).mean())
            assert equal >= UINT8_EQUAL.get(name, UINT8_EQUAL_OTHERS), (name, severity, equal)
        if name in ("contrast", "pixelate", "jpeg_compression"):  # no float error to split
            assert np.array_equal(truncated, np.uint8(np.clip(theirs, 0, 255))), name


def test_deterministic_match_imagecorruptions_on_smooth_images() -> None:
    """At 224 px (the ImageNet reference size, so no rescaling) the deterministic corruptions
    equal the reference implementation within 0.01 of a level per value."""
    images = (smooth_images(1, 224).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    check_deterministic(images)


@pytest.mark.realdata
def test_deterministic_match_imagecorruptions_on_cifar(robcomp_data) -> None:  # type: ignore[no-untyped-def]
    path = robcomp_data / "cifar10-test-first1000.npz"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    small = np.load(path)["x"][:1]
    check_deterministic(
        np.stack([np.asarray(Image.fromarray(a).resize((224, 224), Image.BICUBIC)) for a in small])
    )


@pytest.mark.parametrize("name", ["motion_blur", "pixelate", "jpeg_compression"])
def test_eight_bit_outputs_are_levels(name: str) -> None:
    """Where the generators' output comes out of an 8-bit image (ImageMagick's PNG, PIL), ours
    is on the 256 levels too, so the stored truncation keeps it as it is."""
    out = run(smooth_images(2, 32), name, 3) * 255
    assert torch.equal(out, torch.round(out))


def test_split_truncates_like_the_generators() -> None:
    """The generators store ``np.uint8(corruption(image))``, a truncation: so does the shift's
    uint8 split (contrast has no float error to hide it)."""
    pytest.importorskip("imagecorruptions")
    images = (smooth_images(2, 224).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    split = Split(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.zeros(2).long())
    for severity in (1, 5):
        stored = corrupt_split(split, "contrast", severity, constants="imagenet", seed=0)
        expected = np.uint8(np.clip(reference(images, "contrast", severity), 0, 255))
        assert np.array_equal(stored.x.permute(0, 2, 3, 1).numpy(), expected)


@pytest.mark.parametrize(
    ("name", "size", "count", "tolerance"),
    [
        ("gaussian_noise", 64, 16, 0.02),
        ("shot_noise", 64, 16, 0.02),
        # impulse_noise: the reference draws from an unseeded generator, so it is compared
        # draw for draw instead (test_impulse_noise_equals_imagecorruptions_given_the_same_draws)
        ("speckle_noise", 64, 16, 0.02),
        ("fog", 64, 16, 0.15),  # fractal draws vary a lot from image to image
        ("snow", 224, 3, 0.05),
        ("motion_blur", 224, 3, 0.15),  # |change| depends on the random angle
        pytest.param("glass_blur", 224, 2, 0.05, marks=pytest.mark.slow),  # numba compiles
        ("spatter", 224, 6, 0.25),  # drops are few: |change| varies from draw to draw
    ],
)
def test_random_match_imagecorruptions_in_distribution(
    name: str, size: int, count: int, tolerance: float
) -> None:
    """Random corruptions: the mean absolute change and the mean level agree with the
    reference's within a relative tolerance (noise at 64 px: noise has no length scale)."""
    images = (smooth_images(count, size).permute(0, 2, 3, 1).numpy() * 255).round()
    images = images.astype(np.uint8)
    np.random.seed(0)
    for severity in (1, 3, 5):
        ref = np.uint8(np.clip(reference(images, name, severity), 0, 255))
        mine = np.floor(ours(images, name, severity).astype(np.float32))
        d_ref = np.abs(ref - images.astype(np.float64)).mean()
        d_ours = np.abs(mine - images).mean()
        assert abs(d_ours - d_ref) <= tolerance * d_ref, (name, severity, d_ours, d_ref)
        level_tolerance = 0.05 if name == "fog" else 0.02
        assert abs(mine.mean() - ref.mean()) <= level_tolerance * ref.mean()


class SameDraws:
    """A stand-in for ``np.random.default_rng()`` whose ``random`` returns given arrays."""

    def __init__(self, draws: list[np.ndarray]) -> None:
        self.draws = iter(draws)

    def random(self, shape: tuple[int, ...]) -> np.ndarray:
        out = next(self.draws)
        assert out.shape == tuple(shape)
        return out


def test_impulse_noise_equals_imagecorruptions_given_the_same_draws(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Impulse noise's randomness is two uniform draws per value (flip? salt or pepper?), which
    imagecorruptions takes from an unseeded ``np.random.default_rng()`` in scikit-image: fed
    our draws, its output is ours, so the check cannot fail by chance (comparing the mean
    change of independent draws within 5 % failed now and then: 6.5 % on a CI run)."""
    icc = pytest.importorskip("imagecorruptions.corruptions")
    images = (smooth_images(3, 64, seed=5).permute(0, 2, 3, 1).numpy() * 255).round()
    images = images.astype(np.uint8)
    for severity in range(1, 6):
        mine = ours(images, "impulse_noise", severity, seed=severity)
        g = torch.Generator().manual_seed(severity)
        flip, salt = (torch.rand((len(images), 3, 64, 64), generator=g) for _ in range(2))
        for i, image in enumerate(images):
            hwc = [d[i].permute(1, 2, 0).double().numpy() for d in (flip, salt)]
            monkeypatch.setattr(np.random, "default_rng", lambda seed=None, d=hwc: SameDraws(d))
            theirs = np.asarray(icc.impulse_noise(Image.fromarray(image), severity), np.float64)
            monkeypatch.undo()
            assert np.abs(mine[i] - theirs).max() < 0.01, (severity, i)
            assert (theirs != image).any()  # it did corrupt


def test_spatter_equals_imagecorruptions_given_the_same_field(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Spatter's only randomness is its normal field: fed our draws, imagecorruptions' spatter
    (OpenCV's Canny, distance transform, equalisation, emboss) gives our output to float error,
    water (severities 1-3) and mud (4-5)."""
    icc = pytest.importorskip("imagecorruptions.corruptions")
    images = (smooth_images(2, 224, seed=4).permute(0, 2, 3, 1).numpy() * 255).round()
    images = images.astype(np.uint8)
    for severity in range(1, 6):
        g = torch.Generator().manual_seed(severity)
        mine = ours(images, "spatter", severity, seed=severity)
        field = torch.randn((2, 1, 224, 224), generator=g).double().numpy()
        for i, image in enumerate(images):
            monkeypatch.setattr(
                np.random, "normal", lambda size, loc, scale, z=field[i, 0]: loc + scale * z
            )
            theirs = np.asarray(icc.spatter(Image.fromarray(image), severity), np.float64)
            assert np.abs(mine[i] - theirs).max() < 0.01, (severity, i)


def test_summary_formulas() -> None:
    shift = SHIFTS.get("corruptions")(corruptions=("fog", "snow"), severities=(1, 2))
    model = {("fog", 1): 0.8, ("fog", 2): 0.6, ("snow", 1): 0.7, ("snow", 2): 0.5}
    base = {("fog", 1): 0.9, ("fog", 2): 0.7, ("snow", 1): 0.8, ("snow", 2): 0.6}
    out = shift.summary(model, base, (0.9, 0.95))
    assert out["mean_corruption_accuracy"] == pytest.approx(0.65)
    # CE_fog = (0.2 + 0.4) / (0.1 + 0.3) = 1.5; CE_snow = (0.3 + 0.5) / (0.2 + 0.4) = 4/3
    assert out["mce"] == pytest.approx((1.5 + 4 / 3) / 2)
    # relative: fog (0.1 + 0.3) / (0.05 + 0.25) = 4/3; snow (0.2 + 0.4) / (0.15 + 0.35) = 1.2
    assert out["relative_mce"] == pytest.approx((4 / 3 + 1.2) / 2)
    perfect = dict.fromkeys(base, 1.0)
    guarded = shift.summary(model, perfect, (0.9, 1.0))
    assert math.isnan(guarded["mce"]) and math.isnan(guarded["relative_mce"])


def tiny_data(n: int = 300) -> DataSplits:
    g = torch.Generator().manual_seed(0)
    x = (smooth_images(n, 16, seed=1) * 255).round().to(torch.uint8)
    y = torch.randint(0, 3, (n,), generator=g)
    split = Split(x, y)
    return DataSplits("tiny", split, split, split, 3, ("a", "b", "c"))


def test_shift_end_to_end() -> None:
    data = tiny_data()
    shift = SHIFTS.get("corruptions")(corruptions=("gaussian_noise", "contrast"), severities=(1, 5))
    splits = shift.shifted(data, ShiftContext(seed=7))
    assert [(s.shift, s.severity, s.family) for s in splits] == [
        ("gaussian_noise", 1, "noise"),
        ("gaussian_noise", 5, "noise"),
        ("contrast", 1, "digital"),
        ("contrast", 5, "digital"),
    ]
    for s in splits:
        assert s.split.x.dtype == torch.uint8 and s.split.x.shape == data.test.x.shape
        assert torch.equal(s.split.y, data.test.y)
    # same seed, same splits, whatever else is asked; another seed, other noise
    alone = SHIFTS.get("corruptions")(corruptions=("gaussian_noise",), severities=(5,))
    again = alone.shifted(data, ShiftContext(seed=7))[0].split.x
    assert torch.equal(again, splits[1].split.x)
    other = alone.shifted(data, ShiftContext(seed=8))[0].split.x
    assert not torch.equal(other, again)
    # image i does not depend on the images of other chunks
    head = corrupt_split(data.test.head(10), "gaussian_noise", 5, constants="cifar", seed=7)
    assert torch.equal(head.x, again[:10])


@pytest.mark.realdata
def test_pretrained_resnet20_loses_accuracy_on_corrupted_cifar10(robcomp_data) -> None:  # type: ignore[no-untyped-def]
    """The published ResNet-20 on the 1,000 real CIFAR-10 test images, corrupted with
    CIFAR-10-C's constants: accuracy falls with severity and stays far above chance, as for
    standard networks on CIFAR-10-C (mean over the 15 here: 82 % at severity 1, 52 % at 5)."""
    from robcomp.evaluate import accuracy
    from robcomp.models import create, load_weights

    path = robcomp_data / "cifar10-test-first1000.npz"
    weights = robcomp_data / "models" / "resnet20-12fca82f.th"
    if not (path.is_file() and weights.is_file()):
        pytest.skip("needs cifar10-test-first1000.npz and models/resnet20 under ROBCOMP_DATA")
    arrays = np.load(path)
    x = torch.from_numpy(arrays["x"]).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32) uint8
    split = Split(x, torch.from_numpy(arrays["y"]).long())
    model = create("resnet20", 10, (3, 32, 32), mean=(0.485, 0.456, 0.406),
                   std=(0.229, 0.224, 0.225))  # fmt: skip
    load_weights(model, weights)
    model.eval()
    clean = accuracy(model, split)
    assert clean > 0.9  # 91.5 % published on these images
    for name in ("gaussian_noise", "contrast", "fog"):
        mild, harsh = (
            accuracy(model, corrupt_split(split, name, s, constants="cifar", seed=0))
            for s in (1, 5)
        )
        assert 0.15 < harsh < mild <= clean + 0.01, (name, mild, harsh)
    noisy = corrupt_split(split, "gaussian_noise", 5, constants="cifar", seed=0)
    assert accuracy(model, noisy) < 0.5  # CIFAR-10-C's hardest noise breaks standard models


@pytest.mark.realdata
@pytest.mark.slow
def test_resnet20_glass_and_frost_match_the_authors_generator(robcomp_data) -> None:  # type: ignore[no-untyped-def]
    """Issue 16: the published ResNet-20 on the 1,000 CIFAR-10 test images scores 43.7 % on
    glass blur and 53.6 % on frost at severity 5 with the authors' generator (make_cifar_c.py);
    ours agrees within seed noise (a true swap gave 22.1 %, the procedural frost 74.8 %)."""
    from robcomp.evaluate import accuracy
    from robcomp.models import create, load_weights

    path = robcomp_data / "cifar10-test-first1000.npz"
    weights = robcomp_data / "models" / "resnet20-12fca82f.th"
    if not (path.is_file() and weights.is_file()):
        pytest.skip("needs cifar10-test-first1000.npz and models/resnet20 under ROBCOMP_DATA")
    arrays = np.load(path)
    x = torch.from_numpy(arrays["x"]).permute(0, 3, 1, 2).contiguous()
    split = Split(x, torch.from_numpy(arrays["y"]).long())
    model = create("resnet20", 10, (3, 32, 32), mean=(0.485, 0.456, 0.406),
                   std=(0.229, 0.224, 0.225))  # fmt: skip
    load_weights(model, weights)
    model.eval()
    for name, published in (("glass_blur", 0.437), ("frost", 0.536)):
        shifted = corrupt_split(split, name, 5, constants="cifar", seed=0)
        assert abs(accuracy(model, shifted) - published) < 0.04, name


def test_constants_made_for_another_dataset_are_noted() -> None:
    """CIFAR-10-C's constants on 8x8 digits are a choice a reader of the results must know of;
    on CIFAR they are the benchmark's own, and there is nothing to say."""
    cifar = SHIFTS.get("corruptions")(corruptions=("fog",))
    assert cifar.data_note("cifar10") is None and cifar.data_note("cifar100") is None
    note = cifar.data_note("digits")
    assert note and "CIFAR-10-C's corruption constants" in note and "on digits" in note
    imagenet = SHIFTS.get("corruptions")(corruptions=("fog",), constants="imagenet")
    assert "ImageNet-C" in (imagenet.data_note("cifar10") or "")
