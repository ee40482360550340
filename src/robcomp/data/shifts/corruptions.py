"""Common corruptions (Hendrycks & Dietterich 2019, "Benchmarking Neural Network Robustness to
Common Corruptions and Perturbations"; the authors' code: hendrycks/robustness,
``ImageNet-C/create_c``), as a pure batched function and as the registered shift ``corruptions``.

The 15 benchmark corruptions (noise: gaussian, shot, impulse; blur: defocus, glass, motion,
zoom; weather: snow, frost, fog; digital: brightness, contrast, elastic, pixelate, JPEG) and the
4 extra ones (speckle noise, gaussian blur, spatter, saturate), severities 1-5, with the
constants of CIFAR-10-C (``cifar``), ImageNet-C (``imagenet``) or Tiny-ImageNet-C (``tiny``).

Image sizes. Every length in a table is in pixels of its reference image (32 px for ``cifar``,
224 for ``imagenet``, 64 for ``tiny``). For an image whose shorter side is ``S``, lengths are
multiplied by ``scale = S / reference``: blur sigmas (gaussian, glass, spatter, the elastic
displacement smoothing), the defocus disk radius and its anti-alias sigma, the motion-blur
radius and sigma (also of snow's streaks), the elastic displacement and affine magnitudes,
glass blur's shuffle distance (rounded, at least 1) and the resize factor of frost's
photographs. Relative quantities stay as they are: noise levels, zoom factors, pixelation
factors, JPEG quality and fog's fractal (made at the image's size, the next power of two above
its longer side, like the originals). At the reference size the corruptions are the authors'
(up to the differences each function's docstring names).

Frost crops the authors' frost photographs, which the package imagecorruptions-imaug ships
(Apache-2.0; a dependency of robcomp); spatter's water drops and frost's photographs use OpenCV,
which that package brings in.

Every corruption takes float32 NCHW in [0, 1] with 1 (grayscale) or 3 (RGB) channels and at
least 8x8 pixels, returns a new tensor of the same shape in [0, 1], and draws its randomness
from the given ``torch.Generator`` only. Randomness is drawn for the batch at once, so an
image's corruption depends on its position in the batch; the registered shift fixes its chunks
(:data:`CHUNK` images, each chunk seeded by the cell's seed, the corruption, the severity and
the chunk's index), so a split is the same whatever else the shift is asked for.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from robcomp.data.base import DataSplits, Split
from robcomp.data.shifts.base import SHIFTS, ShiftContext, ShiftedSplit
from robcomp.data.shifts.corruption_tables import (
    ALL,
    BENCHMARK,
    EXTRA,
    FAMILY,
    REFERENCE_SIZE,
    TABLES,
)
from robcomp.progress import track

CHUNK = 256
GROUPS = {"benchmark": BENCHMARK, "extra": EXTRA, "all": ALL}
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as OpenCV's RGB2GRAY in snow and spatter
_Corruption = Callable[[Tensor, Any, float, torch.Generator], Tensor]


# ----------------------------------------------------------------------------- helpers


def _reflect_index(n: int, pad: int, mode: str) -> Tensor:
    """Source indices of a length-``n`` axis padded by ``pad`` on both sides (any ``pad``).

    ``nearest`` repeats the edge (scikit-image's default, ImageMagick's edge pixels);
    ``reflect101`` mirrors about the edge pixel (OpenCV's default, torch's ``reflect``);
    ``symmetric`` mirrors about the edge itself (scipy.ndimage's ``reflect``).
    """
    i = torch.arange(-pad, n + pad)
    if mode == "nearest" or n == 1:
        return i.clamp(0, n - 1)
    if mode == "reflect101":
        i = i.remainder(2 * (n - 1))
        return torch.where(i >= n, 2 * (n - 1) - i, i)
    i = i.remainder(2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def _pad(x: Tensor, pad: int, mode: str) -> Tensor:
    """Pad the last two axes by ``pad`` (may exceed the image, unlike ``F.pad``)."""
    rows = _reflect_index(x.shape[-2], pad, mode).to(x.device)
    cols = _reflect_index(x.shape[-1], pad, mode).to(x.device)
    return x[..., rows, :][..., cols]


@lru_cache(maxsize=128)
def _gaussian_matrix(n: int, sigma: float, truncate: float, mode: str) -> Tensor:
    """The (n, n) matrix of a 1-D Gaussian filter with its boundary folded in, as
    ``scipy.ndimage.gaussian_filter1d`` (radius ``int(truncate * sigma + 0.5)``): any sigma,
    even one wider than the image, costs one matrix product per axis."""
    if sigma <= 0:
        return torch.eye(n)
    radius = int(truncate * sigma + 0.5)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (taps / sigma) ** 2)
    weights /= weights.sum()
    source = _reflect_index(n, radius, mode)
    window = torch.arange(n)[:, None] + torch.arange(2 * radius + 1)[None, :]  # (n, taps)
    matrix = torch.zeros(n, n, dtype=torch.float64)
    rows = torch.arange(n)[:, None].expand_as(window)
    matrix.index_put_((rows, source[window]), weights.expand_as(window), accumulate=True)
    return matrix


def _gaussian(x: Tensor, sigma: float, *, truncate: float = 4.0, mode: str = "nearest") -> Tensor:
    """Separable Gaussian blur of the last two axes (scikit-image ``gaussian`` defaults)."""
    mh = _gaussian_matrix(x.shape[-2], float(sigma), truncate, mode).to(x.device, x.dtype)
    mw = _gaussian_matrix(x.shape[-1], float(sigma), truncate, mode).to(x.device, x.dtype)
    return mh @ x @ mw.T


@lru_cache(maxsize=128)
def _box_resize_matrix(n_in: int, n_out: int) -> Tensor:
    """(n_out, n_in) weights of PIL's BOX resampling along one axis: output pixel ``i`` averages
    the inputs whose centres fall in its box, widened to one input pixel when upscaling."""
    scale = n_in / n_out
    width = max(scale, 1.0)
    matrix = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        centre = (i + 0.5) * scale
        lo = max(int(centre - 0.5 * width + 0.5), 0)
        hi = min(int(centre + 0.5 * width + 0.5), n_in)
        t = (torch.arange(lo, hi, dtype=torch.float64) - centre + 0.5) / width
        inside = ((t > -0.5) & (t <= 0.5)).double()
        matrix[i, lo:hi] = inside / inside.sum().clamp_min(1e-12)
    return matrix


def _quantize(x: Tensor) -> Tensor:
    """Round to the 256 levels of an 8-bit image (where the originals pass through one)."""
    return torch.round(x.clamp(0, 1) * 255) / 255


def _truncate(x: Tensor) -> Tensor:
    """Truncate to the 256 levels of an 8-bit image, as the originals' ``np.uint8(...)`` and
    ``.astype(np.uint8)`` do. In float32, where ``level / 255 * 255`` is exactly ``level`` for
    every level (in float64 from a float32 value it can fall just below and lose one)."""
    return torch.floor(x.float().clamp(0, 1) * 255) / 255


def _gray(x: Tensor) -> Tensor:
    """Luma (N, 1, H, W) of RGB, or the single channel of grayscale."""
    if x.shape[1] == 1:
        return x
    w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _colour(rgb: Sequence[float], x: Tensor) -> Tensor:
    """An RGB colour as (1, C, 1, 1) for ``x``: its luma for grayscale images."""
    c = torch.tensor(rgb, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return _gray(c) if x.shape[1] == 1 else c


def _uniform(shape: Sequence[int], low: float, high: float, g: torch.Generator) -> Tensor:
    return torch.rand(tuple(shape), generator=g, dtype=torch.float64) * (high - low) + low


# ----------------------------------------------------------------------------- noise


def gaussian_noise(x: Tensor, std: float, scale: float, g: torch.Generator) -> Tensor:
    """Additive Gaussian noise of standard deviation ``std`` on every value."""
    return x + std * torch.randn(x.shape, generator=g)


def shot_noise(x: Tensor, photons: float, scale: float, g: torch.Generator) -> Tensor:
    """Poisson (shot) noise: ``Poisson(x * photons) / photons``."""
    return torch.poisson(x.double() * photons, generator=g).float() / photons


def impulse_noise(x: Tensor, amount: float, scale: float, g: torch.Generator) -> Tensor:
    """Salt-and-pepper noise as scikit-image's ``random_noise(mode="s&p")``: each value (each
    channel separately) is replaced with probability ``amount``, by 0 or 1 with equal odds."""
    flipped = torch.rand(x.shape, generator=g) < amount
    salt = (torch.rand(x.shape, generator=g) < 0.5).to(x.dtype)
    return torch.where(flipped, salt, x)


def speckle_noise(x: Tensor, std: float, scale: float, g: torch.Generator) -> Tensor:
    """Multiplicative Gaussian noise: ``x + x * N(0, std^2)``."""
    return x + x * std * torch.randn(x.shape, generator=g)


# ----------------------------------------------------------------------------- blur


def gaussian_blur(x: Tensor, sigma: float, scale: float, g: torch.Generator) -> Tensor:
    """Gaussian blur of ``sigma * scale`` pixels (edges repeated, truncated at 4 sigma)."""
    return _gaussian(x, sigma * scale)


@lru_cache(maxsize=64)
def _disk_kernel(radius: float, alias_sigma: float) -> Tensor:
    """The defocus kernel: a pixel disk of ``radius`` on an integer grid (at least -8..8),
    normalised, smoothed by a 3x3 Gaussian (5x5 above radius 8) of ``alias_sigma`` with
    OpenCV's ``GaussianBlur`` border (reflect101), then cropped to its non-zero support."""
    half = max(8, math.ceil(radius))
    grid = torch.arange(-half, half + 1, dtype=torch.float64)
    disk = ((grid[:, None] ** 2 + grid[None, :] ** 2) <= radius**2).double()
    disk /= disk.sum()
    k = 3 if radius <= 8 else 5
    taps = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    gauss = torch.exp(-(taps**2) / (2 * max(alias_sigma, 1e-6) ** 2))
    gauss /= gauss.sum()
    padded = _pad(disk[None, None], k // 2, "reflect101")[0, 0]
    smooth = F.conv2d(padded[None, None], (gauss[:, None] * gauss[None, :])[None, None])[0, 0]
    support = (smooth.abs() > 1e-12).any(0).nonzero().flatten()
    reach = int(max(half - support.min().item(), support.max().item() - half))
    return smooth[half - reach : half + reach + 1, half - reach : half + reach + 1].float()


def defocus_blur(x: Tensor, c: tuple[float, float], scale: float, g: torch.Generator) -> Tensor:
    """Defocus: convolution with an anti-aliased disk (radius and anti-alias sigma times
    ``scale``), image borders reflected as OpenCV's ``filter2D``."""
    kernel = _disk_kernel(c[0] * scale, c[1] * scale).to(x.device)
    reach = kernel.shape[-1] // 2
    channels = x.shape[1]
    weight = kernel.expand(channels, 1, *kernel.shape).contiguous()
    return F.conv2d(_pad(x, reach, "reflect101"), weight, groups=channels)


_GLASS_POINTERS = 1 << 22  # pointers resolved at once by the glass shuffle (32 MB)


def _glass_positions(h: int, w: int, reach: int) -> tuple[list[int], list[int]]:
    """Rows and columns glass blur visits, in the original's order: from ``side - reach`` down
    to ``reach + 1``, so pixels nearer than ``reach`` to the top/left edge are never visited."""
    return list(range(h - reach, reach, -1)), list(range(w - reach, reach, -1))


def _glass_offsets(
    n: int, h: int, w: int, reach: int, iterations: int, g: torch.Generator
) -> Tensor:
    """The shuffle's random offsets (iterations, steps, 2, N) as ``(dx, dy)``, each uniform in
    ``[-reach, reach)``, one pair per visited pixel and pass (the original's ``randint``)."""
    rows, cols = _glass_positions(h, w, reach)
    return torch.randint(-reach, reach, (iterations, len(rows) * len(cols), 2, n), generator=g)


def _copy_pass(n: int, h: int, w: int, reach: int, dx: Tensor, dy: Tensor) -> Tensor:
    """Where each pixel's value comes from after one pass of the original's pixel "swap".

    The original writes ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` on numpy views of pixel
    rows: ``x[h, w]`` receives ``x[h', w']`` and ``x[h', w']`` is written back with the value
    it already has, so each step is a copy, and only the visited pixel changes. Visiting
    bottom-right to top-left, pixel ``a`` takes the *current* value of ``b = a + (dy, dx)``:
    ``b``'s new value if ``b`` was visited earlier in the pass, else its value before the pass.
    These links always point to earlier steps, so pointer doubling resolves every chain in
    ``log2(H W)`` gathers, for the whole batch at once, instead of H W sequential steps.

    Returns:
        (N, H*W) flat indices into the image before the pass.
    """
    rows, cols = _glass_positions(h, w, reach)
    r = torch.tensor(rows, dtype=torch.long).repeat_interleave(len(cols))  # visiting order
    q = torch.tensor(cols, dtype=torch.long).repeat(len(rows))
    a = r * w + q
    rb, qb = r[:, None] + dy, q[:, None] + dx  # (steps, N) the pixel copied from
    b = rb * w + qb
    # order[p] = step at which pixel p is visited (-1: never); earlier steps have lower numbers
    order = torch.full((h * w,), -1, dtype=torch.long)
    order[a] = torch.arange(len(a))
    step_b = order[b]
    earlier = (step_b >= 0) & (step_b < torch.arange(len(a))[:, None])
    # nodes 0..HW-1: a pixel's value after the pass; HW..2HW-1: its value before the pass
    hw = h * w
    pointer = (torch.arange(hw) + hw).repeat(n, 1)  # unvisited pixels keep their old value
    pointer = torch.cat([pointer, torch.arange(hw, 2 * hw).repeat(n, 1)], 1)  # (N, 2HW)
    target = torch.where(earlier, b, b + hw).T  # (N, steps)
    pointer[:, a] = target
    for _ in range(max(1, math.ceil(math.log2(max(len(a), 2)))) + 1):
        pointer = pointer.gather(1, pointer)
    return pointer[:, :hw] - hw


def _shuffle_with(x: Tensor, reach: int, offsets: Tensor) -> Tensor:
    """Glass blur's pixel shuffle of (N, C, H, W) with the offsets of :func:`_glass_offsets`,
    one :func:`_copy_pass` per pass, a block of images at a time (the pointers take 16 bytes
    per pixel and image)."""
    n, c, h, w = x.shape
    if offsets.shape[1] == 0:  # an image too small to have pixels to visit
        return x
    block = max(1, _GLASS_POINTERS // (2 * h * w))
    out = []
    for start in range(0, n, block):
        flat = x[start : start + block].reshape(-1, c, h * w)
        for it in range(offsets.shape[0]):
            dx, dy = (
                offsets[it, :, 0, start : start + block],
                offsets[it, :, 1, start : start + block],
            )
            source = _copy_pass(flat.shape[0], h, w, reach, dx, dy)
            flat = flat.gather(2, source[:, None, :].expand_as(flat))
        out.append(flat.reshape(-1, c, h, w))
    return torch.cat(out)


def _shuffle_locally(x: Tensor, reach: int, iterations: int, g: torch.Generator) -> Tensor:
    """Glass blur's local pixel shuffle (hendrycks/robustness): ``iterations`` passes, each
    visiting pixels bottom-right to top-left and copying into each the pixel ``[-reach,
    reach)`` rows and columns away (see :func:`_copy_pass` for why a copy, not a swap)."""
    n, _, h, w = x.shape
    rows, cols = _glass_positions(h, w, reach)
    if not rows or not cols:
        return x
    return _shuffle_with(x, reach, _glass_offsets(n, h, w, reach, iterations, g))


def glass_blur(x: Tensor, c: tuple[float, int, int], scale: float, g: torch.Generator) -> Tensor:
    """Glass blur: Gaussian blur, truncation to 8 bits (the original's ``np.uint8``), a local
    pixel shuffle (:func:`_shuffle_locally`), and the Gaussian blur again."""
    sigma, reach, iterations = c[0] * scale, max(1, round(c[1] * scale)), int(c[2])
    blurred = torch.floor(_gaussian(x, sigma).clamp(0, 1) * 255) / 255
    return _gaussian(_shuffle_locally(blurred, reach, iterations, g), sigma)


def _motion_taps(radius: float, sigma: float) -> Tensor:
    """ImageMagick's motion-blur weights: ``2 * ceil(radius) + 1`` taps of a one-sided
    Gaussian of ``sigma``, normalised."""
    width = 2 * math.ceil(radius) + 1
    i = torch.arange(width, dtype=torch.float64)
    k = torch.exp(-(i**2) / (2 * max(sigma, 1e-6) ** 2))
    return k / k.sum()


def _motion(x: Tensor, radius: float, sigma: float, angle: Tensor) -> Tensor:
    """Motion blur with per-image angles (degrees), as ImageMagick's ``MotionBlurImage``: output
    ``(y, x)`` is the weighted sum over taps ``i`` of the pixel at ``(y + round(i sin a),
    x + round(i cos a))`` (rounding half down, edges repeated)."""
    _, _, h, w = x.shape
    taps = _motion_taps(radius, sigma)
    rad = torch.deg2rad(angle.double())
    out = torch.zeros_like(x)
    rows, cols = torch.arange(h), torch.arange(w)
    for i, weight in enumerate(taps.tolist()):
        dy = torch.ceil(i * torch.sin(rad) - 0.5).long()  # (N,)
        dx = torch.ceil(i * torch.cos(rad) - 0.5).long()
        r = (rows[None] + dy[:, None]).clamp(0, h - 1)  # (N, H)
        q = (cols[None] + dx[:, None]).clamp(0, w - 1)  # (N, W)
        shifted = x.gather(2, r[:, None, :, None].expand(-1, x.shape[1], -1, w))
        shifted = shifted.gather(3, q[:, None, None, :].expand(-1, x.shape[1], h, -1))
        out += weight * shifted
    return out


def motion_blur(x: Tensor, c: tuple[float, float], scale: float, g: torch.Generator) -> Tensor:
    """Motion blur at a random angle in [-45, 45) degrees, radius and sigma times ``scale``.

    The original calls ImageMagick's ``MotionBlurImage`` through Wand; we compute the same
    one-sided Gaussian streak (:func:`_motion`) in torch, batched, without ImageMagick, and
    round to 8 bits as its PNG output does.
    """
    angle = _uniform((x.shape[0],), -45, 45, g)
    return _quantize(_motion(x, c[0] * scale, c[1] * scale, angle))


def _clipped_zoom(x: Tensor, factor: float) -> Tensor:
    """Zoom into the centre: crop ``ceil(side / factor)``, resize by ``factor`` with linear
    interpolation through the corner pixels (scipy's ``zoom(order=1)``), trim to the centre."""
    h, w = x.shape[-2:]
    ch, cw = math.ceil(h / factor), math.ceil(w / factor)
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[..., top : top + ch, left : left + cw]
    size = (round(ch * factor), round(cw * factor))
    zoomed = F.interpolate(crop, size=size, mode="bilinear", align_corners=True)
    th, tw = (size[0] - h) // 2, (size[1] - w) // 2
    return zoomed[..., th : th + h, tw : tw + w]


def zoom_blur(x: Tensor, factors: tuple[float, ...], scale: float, g: torch.Generator) -> Tensor:
    """Zoom blur: the mean of the image and its centre zooms by each factor."""
    out = x.clone()
    for factor in factors:
        out += _clipped_zoom(x, factor)
    return out / (len(factors) + 1)


# ----------------------------------------------------------------------------- weather


def _plasma(n: int, size: int, decay: float, g: torch.Generator) -> Tensor:
    """``n`` plasma fractals (diamond-square), (n, size, size) in [0, 1], all drawn at once.

    ``size`` is a power of two; the map wraps around (its neighbours are taken cyclically). At
    each halving of the step the random displacement, uniform in ``[-r, r]`` times ``r``,
    starts at ``r = 100`` and is divided by ``decay``: a larger ``decay`` gives smoother fog.
    """
    m = torch.zeros(n, size, size, dtype=torch.float64)
    step, wibble = size, 100.0

    def displaced(total: Tensor) -> Tensor:
        return total / 4 + wibble * _uniform(total.shape, -wibble, wibble, g)

    while step >= 2:
        half = step // 2
        corners = m[:, ::step, ::step]
        square = corners + corners.roll(-1, 1)
        square = square + square.roll(-1, 2)
        m[:, half::step, half::step] = displaced(square)
        centres, corners = m[:, half::step, half::step], m[:, ::step, ::step]
        across = centres + centres.roll(1, 1) + corners + corners.roll(-1, 2)
        m[:, ::step, half::step] = displaced(across)
        down = centres + centres.roll(1, 2) + corners + corners.roll(-1, 1)
        m[:, half::step, ::step] = displaced(down)
        step, wibble = half, wibble / decay
    m -= m.amin((1, 2), keepdim=True)
    return (m / m.amax((1, 2), keepdim=True).clamp_min(1e-12)).float()


def _fractal(n: int, h: int, w: int, decay: float, g: torch.Generator) -> Tensor:
    """Plasma fractals cropped to (n, 1, h, w) from the next power of two of ``max(h, w)``."""
    size = 1 << (max(h, w) - 1).bit_length()
    return _plasma(n, size, decay, g)[:, None, :h, :w]


def fog(x: Tensor, c: tuple[float, float], scale: float, g: torch.Generator) -> Tensor:
    """Fog: add ``strength`` times a plasma fractal (the same on every channel), then rescale by
    ``max / (max + strength)`` with the image's maximum, so the brightest point keeps its level.
    """
    strength, decay = c
    top = x.amax((1, 2, 3), keepdim=True)
    fogged = x + strength * _fractal(x.shape[0], x.shape[2], x.shape[3], decay, g)
    return fogged * top / (top + strength)


FROST_PHOTOS = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")
"""The authors' frost photographs the generators draw from (``randint(5)``: their list names a
sixth, ``frost6.jpg``, which is never drawn), as shipped by imagecorruptions-imaug."""
_FROST_PACKAGE = "imagecorruptions"
_INSTALL_HINT = "pip install 'imagecorruptions-imaug==1.1.5'"


def _opencv() -> Any:
    """OpenCV, imported when a corruption needs it (frost's photos, spatter's water mask)."""
    try:
        import cv2
    except ImportError as error:  # pragma: no cover - a base dependency
        raise ImportError(
            f"frost and spatter need OpenCV (cv2), which imagecorruptions-imaug brings in: "
            f"{_INSTALL_HINT}"
        ) from error
    return cv2


def frost_photo_path(name: str) -> Path:
    """Where the installed imagecorruptions-imaug keeps frost photograph ``name``.

    The package is located, not imported: importing it loads numba and scikit-image, which
    reading five images does not need.

    Raises:
        FileNotFoundError: the package or the photograph is not installed.
    """
    spec = importlib.util.find_spec(_FROST_PACKAGE)
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        path = Path(root) / "frost" / name
        if path.is_file():
            return path
    where = f"it is not in {roots[0]}/frost" if roots else "that package is not installed"
    raise FileNotFoundError(
        f"frost needs the authors' frost photograph {name!r}, shipped by the package "
        f"imagecorruptions-imaug, but {where}; install it with {_INSTALL_HINT}"
    )


@lru_cache(maxsize=32)
def _frost_photo(index: int, factor: float) -> Tensor:
    """Frost photograph ``index`` of :data:`FROST_PHOTOS` as RGB uint8 (3, H, W), resized by
    ``factor`` as the generators do (OpenCV ``resize(fx=fy=factor)``, bilinear; no call at 1)."""
    cv2 = _opencv()
    path = frost_photo_path(FROST_PHOTOS[index])
    bgr = cv2.imread(str(path))
    if bgr is None:
        raise FileNotFoundError(f"OpenCV could not read the frost photograph {path}")
    if factor != 1.0:
        bgr = cv2.resize(bgr, (0, 0), fx=factor, fy=factor)
    return torch.from_numpy(np.ascontiguousarray(bgr[..., ::-1])).permute(2, 0, 1).contiguous()


def _frost_factor(index: int, factor: float, h: int, w: int) -> float:
    """The photograph's resize factor: the table's, unless that leaves the photograph no larger
    than the image (very wide or tall images), then the least factor that fits it."""
    photo = _frost_photo(index, 1.0)
    need = max((h + 1) / photo.shape[1], (w + 1) / photo.shape[2])
    return factor if factor >= need else need * 1.01


def frost_layer(n: int, h: int, w: int, factor: float, g: torch.Generator) -> Tensor:
    """(n, 3, h, w) random crops of the authors' frost photographs in [0, 1].

    Per image, as the generators: a photograph drawn uniformly from :data:`FROST_PHOTOS`,
    resized by ``factor`` (CIFAR-10-C 0.2, Tiny-ImageNet-C 0.3, ImageNet-C 1, times the image's
    scale), and a crop whose top-left corner is uniform in ``[0, side - size)`` (``randint``).
    """
    indices = torch.randint(len(FROST_PHOTOS), (n,), generator=g).tolist()
    crops = []
    for index in indices:
        photo = _frost_photo(index, _frost_factor(index, factor, h, w))
        top = int(torch.randint(photo.shape[1] - h, (1,), generator=g))
        left = int(torch.randint(photo.shape[2] - w, (1,), generator=g))
        crops.append(photo[:, top : top + h, left : left + w])
    return torch.stack(crops).float() / 255


def frost(x: Tensor, c: tuple[float, float, float], scale: float, g: torch.Generator) -> Tensor:
    """Frost: ``image_weight * x + frost_weight * crop`` of a frost photograph
    (:func:`frost_layer`, resized by the table's factor times ``scale``; its luma on
    grayscale)."""
    image_weight, frost_weight, factor = c
    layer = frost_layer(x.shape[0], x.shape[2], x.shape[3], factor * scale, g).to(x.device)
    return image_weight * x + frost_weight * (_gray(layer) if x.shape[1] == 1 else layer)


def snow(x: Tensor, c: tuple[float, ...], scale: float, g: torch.Generator) -> Tensor:
    """Snow: Gaussian flakes (mean, std), zoomed into, thresholded, streaked by a motion blur at
    a random angle in [-135, -45) degrees (radius and sigma times ``scale``), added twice (the
    layer and its 180-degree rotation) over the image whitened towards ``1.5 * luma + 0.5``.

    The original streaks the flakes with ImageMagick's motion blur (through Wand); we use the
    same one-sided Gaussian streak computed in torch (:func:`_motion`), with the original's
    8-bit round trips of the layer: truncated before (``astype(np.uint8)``), rounded after
    (ImageMagick's PNG).
    """
    mean, std, zoom, threshold, radius, sigma, weight = c
    n, _, h, w = x.shape
    flakes = mean + std * torch.randn((n, 1, h, w), generator=g)
    flakes = _clipped_zoom(flakes, float(zoom))
    flakes = _truncate(torch.where(flakes < threshold, torch.zeros_like(flakes), flakes))
    angle = _uniform((n,), -135, -45, g)
    layer = _quantize(_motion(flakes, radius * scale, sigma * scale, angle))
    whiter = torch.maximum(x, _gray(x) * 1.5 + 0.5)
    x = weight * x + (1 - weight) * whiter
    return x + layer + layer.flip(-2, -1)


def _water_mask(level: np.ndarray) -> np.ndarray:
    """Spatter's water-drop weights for one liquid layer of 8-bit levels (H, W), as the
    generators compute them with OpenCV: Canny edges (thresholds 50 and 150), the Euclidean
    distance to them (5x5 mask) truncated at 20 px, a 3x3 box blur truncated to 8 bits,
    histogram equalisation, an emboss filter saturated to 8 bits, a second box blur, times the
    levels. OpenCV itself, so the mask is the authors' exactly (a Sobel threshold in its place
    marked 66 % of pixels as edges where Canny marks 26 %)."""
    cv2 = _opencv()
    background = 255 - cv2.Canny(level, 50, 150)
    distance = cv2.distanceTransform(background, cv2.DIST_L2, 5)
    distance = np.minimum(distance, 20).astype(np.float32)
    distance = cv2.blur(distance, (3, 3)).astype(np.uint8)
    distance = cv2.equalizeHist(distance)
    emboss = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], dtype=np.float32)
    distance = cv2.filter2D(distance, cv2.CV_8U, emboss)
    distance = cv2.blur(distance, (3, 3)).astype(np.float32)
    return level.astype(np.float32) * distance


def _water(x: Tensor, liquid: Tensor, intensity: float) -> Tensor:
    """Spatter's water drops: pale turquoise, strongest inside drops and embossed at their rims
    (:func:`_water_mask` per image, on the layer truncated to 8 bits as the generators do),
    scaled so that the strongest point adds ``intensity`` times the colour."""
    levels = (liquid[:, 0].double() * 255).clamp(0, 255).floor().to(torch.uint8).numpy()
    m = torch.from_numpy(np.stack([_water_mask(level) for level in levels]))[:, None]
    m = intensity * m / m.amax((2, 3), keepdim=True).clamp_min(1e-12)
    turquoise = _colour((175 / 255, 238 / 255, 238 / 255), x)
    return x + (m.to(x.dtype) * turquoise).clamp(0, 1)


def spatter(x: Tensor, c: tuple[float, ...], scale: float, g: torch.Generator) -> Tensor:
    """Spatter: a thresholded, blurred Gaussian field makes drops; severities 1-3 add water
    (:func:`_water`), 4-5 cover the image with mud-brown blots (:func:`spatter_from_field`).

    The water drops are shaped with OpenCV as in the original (:func:`_water_mask`), one image
    at a time; the rest runs on the batch. Blur sigmas are times ``scale``.
    """
    n, _, h, w = x.shape
    return spatter_from_field(x, torch.randn((n, 1, h, w), generator=g), c, scale)


def spatter_from_field(x: Tensor, field: Tensor, c: tuple[float, ...], scale: float) -> Tensor:
    """Spatter given its random field: standard normal draws (N, 1, H, W), which the original
    draws as ``np.random.normal(loc=mean, scale=std)``; the rest is deterministic."""
    mean, std, sigma, threshold, intensity, mud = c
    liquid = _gaussian(mean + std * field.double(), sigma * scale)
    liquid = torch.where(liquid < threshold, torch.zeros_like(liquid), liquid)
    if not mud:
        return _water(x, liquid, intensity)
    m = _gaussian((liquid > threshold).double(), intensity * scale).to(x.dtype)
    m = torch.where(m < 0.8, torch.zeros_like(m), m)
    brown = _colour((63 / 255, 42 / 255, 20 / 255), x)
    return x * (1 - m) + brown * m


# ----------------------------------------------------------------------------- digital


def brightness(x: Tensor, shift: float, scale: float, g: torch.Generator) -> Tensor:
    """Brightness: add ``shift`` to the HSV value (clipped to 1), hue and saturation kept.

    With hue and saturation fixed each RGB channel is proportional to the value, so this is
    ``x * v' / v`` (black, ``v = 0``, becomes gray ``v'``); on grayscale, ``x + shift``.
    """
    v = x.amax(1, keepdim=True)
    lifted = (v + shift).clamp(max=1)
    return torch.where(v > 0, x * lifted / v.clamp_min(1e-12), lifted.expand_as(x))


def contrast(x: Tensor, factor: float, scale: float, g: torch.Generator) -> Tensor:
    """Contrast: pull every channel towards its own mean, ``(x - mean) * factor + mean``."""
    mean = x.mean((2, 3), keepdim=True)
    return (x - mean) * factor + mean


def saturate(x: Tensor, c: tuple[float, float], scale: float, g: torch.Generator) -> Tensor:
    """Saturate: HSV saturation ``s' = clip(s * gain + shift)``, hue and value kept.

    With hue and value fixed each channel is ``v - (v - x) * s' / s``. Gray pixels (``s = 0``)
    have hue 0 in scikit-image, so a positive ``shift`` tints them red, as in the original.
    Grayscale images have no saturation to change and come back unchanged (the original
    returns the red channel, which is the value).
    """
    if x.shape[1] == 1:
        return x.clone()
    gain, shift = c
    v, low = x.amax(1, keepdim=True), x.amin(1, keepdim=True)
    delta = v - low
    s = torch.where(delta > 0, delta / v.clamp_min(1e-12), torch.zeros_like(v))
    s_new = (s * gain + shift).clamp(0, 1)
    coloured = v - (v - x) * s_new / s.clamp_min(1e-12)
    red = torch.cat([v, v * (1 - s_new), v * (1 - s_new)], 1)
    return torch.where(delta > 0, coloured, red)


def jpeg_compression(x: Tensor, quality: int, scale: float, g: torch.Generator) -> Tensor:
    """JPEG at ``quality`` through PIL (one encode and decode per image, 4:2:0 chroma
    subsampling for RGB, grayscale encoded as one channel)."""
    images = torch.round(x.clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = []
    for image in images:
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        buffer = io.BytesIO()
        pil.save(buffer, "JPEG", quality=int(quality))
        decoded = np.asarray(Image.open(buffer))
        out.append(decoded.reshape(image.shape))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255


_PIL_PRECISION = 22  # PIL's PRECISION_BITS for 8-bit resampling: 32 - 8 - 2


@lru_cache(maxsize=64)
def _pil_box_weights(n_in: int, n_out: int) -> Tensor:
    """PIL's fixed-point BOX weights (n_out, n_in) as float64 integers: the normalised
    weights times ``2**22``, rounded half up (``normalize_coeffs_8bpc``)."""
    exact = _box_resize_matrix(n_in, n_out).double()
    return torch.floor(exact * (1 << _PIL_PRECISION) + 0.5)


def _pil_box_pass(levels: Tensor, n_out: int, axis: int) -> Tensor:
    """One PIL resampling pass of 8-bit ``levels`` (float64 integers) along ``axis`` (-1 or
    -2): integer sums plus half a unit, shifted right and clipped to 0-255, as PIL's
    ``ImagingResampleHorizontal_8bpc`` / ``Vertical_8bpc``. Every sum is an integer below
    2**53, so float64 is exact."""
    weights = _pil_box_weights(levels.shape[axis], n_out)
    total = levels @ weights.T if axis == -1 else weights @ levels
    return torch.floor((total + (1 << (_PIL_PRECISION - 1))) / (1 << _PIL_PRECISION)).clamp(0, 255)


def pixelate(x: Tensor, factor: float, scale: float, g: torch.Generator) -> Tensor:
    """Pixelate: PIL BOX resampling down to ``int(side * factor)`` and back up, each resize
    horizontal then vertical, in PIL's 8-bit fixed point (:func:`_pil_box_pass`), as matrix
    products over the batch."""
    h, w = x.shape[-2:]
    small_h, small_w = max(1, int(h * factor)), max(1, int(w * factor))
    y = torch.round(x.double().clamp(0, 1) * 255)  # the originals resize an 8-bit image
    y = _pil_box_pass(_pil_box_pass(y, small_w, -1), small_h, -2)
    y = _pil_box_pass(_pil_box_pass(y, w, -1), h, -2)
    return (y / 255).to(x.dtype)


def _sample(x: Tensor, px: Tensor, py: Tensor, *, corners: bool) -> Tensor:
    """Bilinear sampling of ``x`` at pixel coordinates (N, H, W); out-of-image points mirror
    about the edge pixels (``corners``, OpenCV's reflect101) or the edges (scipy's reflect)."""
    h, w = x.shape[-2:]
    if corners:
        gx, gy = 2 * px / max(w - 1, 1) - 1, 2 * py / max(h - 1, 1) - 1
    else:
        gx, gy = (2 * px + 1) / w - 1, (2 * py + 1) / h - 1
    grid = torch.stack([gx, gy], -1).float()
    return F.grid_sample(x, grid, "bilinear", "reflection", align_corners=corners)


def elastic_transform(
    x: Tensor, c: tuple[float, float, float], scale: float, g: torch.Generator
) -> Tensor:
    """Elastic transform: a random affine map (three points around the centre, a third of the
    shorter side away, each moved uniformly within +-jitter px), then a smooth random
    displacement field (uniform noise blurred by ``sigma``, scipy's reflect, 3-sigma truncation,
    times ``magnitude``), both with bilinear sampling; all lengths times ``scale``."""
    magnitude, sigma, jitter = (v * scale for v in c)
    n, _, h, w = x.shape
    centre = torch.tensor([w // 2, h // 2], dtype=torch.float64)
    side = min(h, w) // 3
    src = torch.stack([centre + side, centre + torch.tensor([side, -side]), centre - side])
    dst = src + _uniform((n, 3, 2), -jitter, jitter, g)  # (N, 3, 2) as (x, y)
    ones = torch.ones(n, 3, 1, dtype=torch.float64)
    # A maps source points to moved ones; OpenCV's warpAffine samples dst pixel p at A^-1 p
    inverse = torch.linalg.solve(
        torch.cat([dst, ones], -1), torch.cat([src.expand(n, 3, 2), ones], -1)
    )
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    points = torch.stack([xs, ys, torch.ones_like(xs)], -1).reshape(1, -1, 3)  # (1, HW, 3)
    mapped = (points @ inverse).reshape(n, h, w, 3)
    warped = _sample(x, mapped[..., 0], mapped[..., 1], corners=True)
    field = _uniform((n, 2, h, w), -1, 1, g).float()
    field = _gaussian(field, sigma, truncate=3.0, mode="symmetric") * magnitude
    return _sample(warped, xs + field[:, 0], ys + field[:, 1], corners=False)


# ----------------------------------------------------------------------------- public API

CORRUPTIONS: dict[str, _Corruption] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "speckle_noise": speckle_noise,
    "defocus_blur": defocus_blur,
    "glass_blur": glass_blur,
    "motion_blur": motion_blur,
    "zoom_blur": zoom_blur,
    "gaussian_blur": gaussian_blur,
    "snow": snow,
    "frost": frost,
    "fog": fog,
    "spatter": spatter,
    "brightness": brightness,
    "contrast": contrast,
    "elastic_transform": elastic_transform,
    "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
    "saturate": saturate,
}


IMAGES_ONLY = "corruptions take NCHW images with 1 or 3 channels and at least 8x8 pixels"


def is_image(shape: Sequence[int]) -> bool:
    """Whether one input of ``shape`` (no batch axis) is an image the corruptions are defined
    on: channels first, 1 or 3 of them, at least 8x8 pixels (the smallest kernels' support)."""
    return len(shape) == 3 and shape[0] in (1, 3) and min(shape[1:]) >= 8


def _check(name: str, severity: int, constants: str) -> None:
    if constants not in TABLES:
        raise ValueError(f"constants={constants!r} is not one of {sorted(TABLES)}")
    if name not in CORRUPTIONS:
        raise ValueError(f"corruption {name!r} is not one of {', '.join(ALL)}")
    if severity not in (1, 2, 3, 4, 5):
        raise ValueError(f"severity={severity!r} must be an integer from 1 to 5")


def corrupt(
    x: Tensor, name: str, severity: int, *, constants: str = "cifar", generator: torch.Generator
) -> Tensor:
    """Corrupt a batch with one of the 19 common corruptions (Hendrycks & Dietterich 2019).

    Args:
        x: float NCHW in [0, 1], 1 or 3 channels, at least 8x8 (not modified).
        name: one of :data:`~robcomp.data.shifts.corruption_tables.ALL`.
        severity: 1-5.
        constants: whose table: ``cifar`` (CIFAR-10-C), ``imagenet`` (ImageNet-C) or ``tiny``
            (Tiny-ImageNet-C); pixel lengths scale with ``min(H, W) / reference``.
        generator: the only source of randomness (CPU generator).

    Returns:
        A new float32 tensor of ``x``'s shape in [0, 1].
    """
    _check(name, severity, constants)
    if x.ndim != 4 or not is_image(x.shape[1:]):
        raise ValueError(f"{IMAGES_ONLY}; got shape {tuple(x.shape)}")
    params = TABLES[constants][name][severity - 1]
    scale = min(x.shape[-2:]) / REFERENCE_SIZE[constants]
    device = x.device
    out = CORRUPTIONS[name](x.detach().float().cpu(), params, scale, generator)
    return out.clamp(0, 1).to(device)


def resolve(names: Sequence[str]) -> tuple[str, ...]:
    """Corruption names with the groups ``benchmark``, ``extra`` and ``all`` expanded, in order,
    without repeats; an unknown name is an error listing the allowed ones."""
    out: list[str] = []
    for name in names:
        for item in GROUPS.get(name, (name,)):
            if item not in CORRUPTIONS:
                raise ValueError(
                    f"corruptions: {item!r} is not a corruption; allowed: "
                    f"{', '.join([*GROUPS, *ALL])}"
                )
            if item not in out:
                out.append(item)
    return tuple(out)


def _chunk_seed(seed: int, name: str, severity: int, chunk: int) -> int:
    """A 63-bit seed for one chunk of one split, stable across runs and machines."""
    digest = hashlib.sha256(f"{seed}:{name}:{severity}:{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def corrupt_split(split: Split, name: str, severity: int, *, constants: str, seed: int) -> Split:
    """``split`` corrupted, stored as uint8 like CIFAR-10-C: truncated, as the generators'
    ``np.uint8(corruption(image))``. Image ``i`` depends only on (``seed``, ``name``,
    ``severity``, ``i``, the images of its chunk of :data:`CHUNK`)."""
    _check(name, severity, constants)
    pieces = []
    for k, start in enumerate(range(0, len(split), CHUNK)):
        g = torch.Generator().manual_seed(_chunk_seed(seed, name, severity, k))
        x = Split.to_float(split.x[start : start + CHUNK])
        out = corrupt(x, name, severity, constants=constants, generator=g)
        pieces.append(torch.round(_truncate(out) * 255).to(torch.uint8))
    return Split(torch.cat(pieces).to(split.x.device), split.y)


def _errors(acc: Mapping[tuple[str, int], float], name: str, sev: Sequence[int]) -> list[float]:
    return [1.0 - acc[(name, s)] for s in sev]


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator != 0 else math.nan


# What each table of constants was made for: its benchmark, its images and the datasets it
# belongs to (CIFAR-100-C was made with CIFAR-10-C's constants).
CONSTANTS_MADE_FOR = {
    "cifar": ("CIFAR-10-C", "32x32 CIFAR-10", ("cifar10", "cifar100")),
    "imagenet": ("ImageNet-C", "224x224 ImageNet", ()),
    "tiny": ("Tiny-ImageNet-C", "64x64 Tiny ImageNet", ()),
}


@SHIFTS.register("corruptions")
@dataclass(frozen=True, kw_only=True)
class Corruptions:
    """Common corruptions (Hendrycks & Dietterich 2019; hendrycks/robustness): one shifted split
    per (corruption, severity), family noise / blur / weather / digital.

    Attributes:
        corruptions: names, or the groups ``benchmark`` (the 15 of the mCE), ``extra`` (speckle
            noise, gaussian blur, spatter, saturate) and ``all``.
        severities: which of 1-5.
        constants: ``cifar`` (CIFAR-10-C), ``imagenet`` (ImageNet-C) or ``tiny``
            (Tiny-ImageNet-C); see :func:`corrupt` for how they scale to other sizes.
    """

    corruptions: tuple[str, ...] = ("benchmark",)
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    constants: str = "cifar"

    def __post_init__(self) -> None:
        resolve(self.corruptions)
        if self.constants not in TABLES:
            raise ValueError(
                f"corruptions: constants={self.constants!r}; allowed: {sorted(TABLES)}"
            )
        bad = [s for s in self.severities if s not in (1, 2, 3, 4, 5)]
        if bad or not self.severities:
            raise ValueError(f"corruptions: severities={self.severities!r}; allowed: 1-5")

    def check(self, data: DataSplits) -> None:
        """Refuse inputs that are not such images (1-D sensor series, tables, 4x4 pictures)
        before any cell runs, rather than failing in the first cell's evaluation."""
        if not is_image(data.in_shape):
            shape = "x".join(str(n) for n in data.in_shape)
            raise ValueError(f"{IMAGES_ONLY}; {data.name}'s inputs are {shape}")

    def label(self) -> str:
        names = resolve(self.corruptions)
        what = "+".join(self.corruptions) if len(names) > 3 else "+".join(names)
        return f"corruptions[{what}]-{self.constants}"

    def data_note(self, data: str) -> str | None:
        """What a reader of results on ``data`` (a dataset name) should know: whether the
        constants are another dataset's (CIFAR-10-C's on 8x8 digits), or ``None``."""
        benchmark, images, own = CONSTANTS_MADE_FOR[self.constants]
        if data in own:
            return None
        return (
            f"These corruptions use {benchmark}'s corruption constants (made for {images} "
            f"images) on {data}: lengths are rescaled to its image size, but the severities "
            f"are {benchmark}'s, not calibrated for {data}."
        )

    def shifted(self, data: DataSplits, context: ShiftContext) -> Sequence[ShiftedSplit]:
        """One split of ``data.test`` per (corruption, severity), seeded by ``context.seed``."""
        names = resolve(self.corruptions)
        out = []
        with track("corruptions", len(names) * len(self.severities)) as advance:
            for name in names:
                for severity in self.severities:
                    split = corrupt_split(
                        data.test, name, severity, constants=self.constants, seed=context.seed
                    )
                    out.append(ShiftedSplit(name, severity, split, FAMILY[name]))
                    advance()
        return out

    def summary(
        self,
        model_acc: Mapping[tuple[str, int], float],
        baseline_acc: Mapping[tuple[str, int], float],
        clean: tuple[float, float],
    ) -> dict[str, float]:
        """Mean corruption accuracy and the paper's mCE and relative mCE, normalised by the
        cell's own dense baseline instead of AlexNet.

        With ``E = 1 - accuracy`` and sums over this shift's severities:
        ``CE_c = sum_s E_sc(model) / sum_s E_sc(baseline)``, ``mce`` = mean of ``CE_c`` over
        corruptions; ``relative CE_c = sum_s (E_sc(model) - E_clean(model)) / sum_s (E_sc(baseline)
        - E_clean(baseline))``, ``relative_mce`` its mean; ``mean_corruption_accuracy`` = mean
        accuracy over all (corruption, severity) splits. A zero denominator (the baseline never
        wrong on a corruption, or no worse than clean) makes that ratio NaN, and so the mean.
        """
        names = [n for n in resolve(self.corruptions) if (n, self.severities[0]) in model_acc]
        sev = self.severities
        if not names:
            return {}
        accs = [model_acc[(n, s)] for n in names for s in sev]
        ce, rel = [], []
        for name in names:
            em, eb = _errors(model_acc, name, sev), _errors(baseline_acc, name, sev)
            ce.append(_ratio(sum(em), sum(eb)))
            clean_m, clean_b = 1.0 - clean[0], 1.0 - clean[1]
            rel.append(_ratio(sum(em) - len(sev) * clean_m, sum(eb) - len(sev) * clean_b))
        return {
            "mean_corruption_accuracy": sum(accs) / len(accs),
            "mce": sum(ce) / len(ce),
            "relative_mce": sum(rel) / len(rel),
        }
