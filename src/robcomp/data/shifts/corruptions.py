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
radius and sigma (also of snow's streaks), the elastic displacement and affine magnitudes, and
glass blur's shuffle distance (rounded, at least 1). Relative quantities stay as they are: noise
levels, zoom factors, pixelation factors, JPEG quality, fog's fractal (made at the image's size,
the next power of two above its longer side, like the originals) and the procedural frost
texture. At the reference size the corruptions are the authors' (up to the differences each
function's docstring names).

Every corruption takes float32 NCHW in [0, 1] with 1 (grayscale) or 3 (RGB) channels and at
least 8x8 pixels, returns a new tensor of the same shape in [0, 1], and draws its randomness
from the given ``torch.Generator`` only. Randomness is drawn for the batch at once, so an
image's corruption depends on its position in the batch; the registered shift fixes its chunks
(:data:`CHUNK` images, each chunk seeded by the cell's seed, the corruption, the severity and
the chunk's index), so a split is the same whatever else the shift is asked for.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
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
    return matrix.float()


def _gaussian(x: Tensor, sigma: float, *, truncate: float = 4.0, mode: str = "nearest") -> Tensor:
    """Separable Gaussian blur of the last two axes (scikit-image ``gaussian`` defaults)."""
    mh = _gaussian_matrix(x.shape[-2], float(sigma), truncate, mode).to(x.device)
    mw = _gaussian_matrix(x.shape[-1], float(sigma), truncate, mode).to(x.device)
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
    return matrix.float()


def _quantize(x: Tensor) -> Tensor:
    """Round to the 256 levels of an 8-bit image (where the originals pass through one)."""
    return torch.round(x.clamp(0, 1) * 255) / 255


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


def _shuffle_locally(x: Tensor, reach: int, iterations: int, g: torch.Generator) -> Tensor:
    """Glass blur's pixel shuffle: for each pass, visit pixels bottom-right to top-left (at
    least ``reach`` from the top/left edge, less than ``reach`` from the bottom/right) and swap
    each with a random pixel ``[-reach, reach)`` rows and columns away.

    The swaps are sequential within an image (a pixel can travel several times), as in the
    original; they run on the whole batch at once, one position at a time, with all offsets
    drawn in advance, so the loop costs H*W steps whatever the batch size.
    """
    n, c, h, w = x.shape
    rows = list(range(h - reach, reach, -1))
    cols = list(range(w - reach, reach, -1))
    if not rows or not cols:
        return x
    steps = len(rows) * len(cols)
    offsets = torch.randint(-reach, reach, (iterations, steps, 2, n), generator=g).numpy()
    flat = x.permute(0, 2, 3, 1).reshape(n, h * w, c).numpy().copy()  # (N, H*W, C)
    images = np.arange(n)
    here = np.array([r * w + q for r in rows for q in cols])
    for it in range(iterations):
        dy, dx = offsets[it, :, 0], offsets[it, :, 1]
        there = here[:, None] + dy * w + dx  # (steps, N)
        for step in range(steps):
            a = here[step]
            b = there[step]
            kept = flat[:, a].copy()
            flat[:, a] = flat[images, b]
            flat[images, b] = kept
    return torch.from_numpy(flat).reshape(n, h, w, c).permute(0, 3, 1, 2).contiguous()


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
    without its 8-bit round trip.
    """
    angle = _uniform((x.shape[0],), -45, 45, g)
    return _motion(x, c[0] * scale, c[1] * scale, angle)


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


_FROST_RGB = (0.52, 0.58, 0.62)  # mean colour of frosted glass: pale, slightly blue
_FROST_STD = 0.13


def frost_texture(n: int, h: int, w: int, g: torch.Generator) -> Tensor:
    """A procedural frost texture (n, 3, h, w) in [0, 1]: our stand-in for the six photographs
    of frosted glass the original crops from (not redistributed here).

    Ice crystals are thin bright veins: the ridges ``(1 - |2 p - 1|)^4`` of a rough plasma
    fractal ``p`` (decay 1.5, the fractal wraps at the next power of two of the image), over a
    smoother fractal haze (decay 2.5). The sum is standardised per image and coloured to the
    photographs' average, pale blue-grey (mean ~(0.52, 0.58, 0.62), std ~0.13).
    """
    veins = (1 - (2 * _fractal(n, h, w, 1.5, g) - 1).abs()) ** 4
    haze = _fractal(n, h, w, 2.5, g)
    t = 0.7 * veins + 0.3 * haze
    t = (t - t.mean((2, 3), keepdim=True)) / t.std((2, 3), keepdim=True).clamp_min(1e-6)
    base = torch.tensor(_FROST_RGB).view(1, 3, 1, 1)
    tint = torch.tensor((0.9, 1.0, 1.05)).view(1, 3, 1, 1)
    return (base + _FROST_STD * tint * t).clamp(0, 1)


def frost(x: Tensor, c: tuple[float, float], scale: float, g: torch.Generator) -> Tensor:
    """Frost: ``image_weight * x + frost_weight * texture`` with :func:`frost_texture` (its
    luma on grayscale), in place of the original's random crop of a frost photograph."""
    texture = frost_texture(x.shape[0], x.shape[2], x.shape[3], g).to(x.device)
    return c[0] * x + c[1] * (_gray(texture) if x.shape[1] == 1 else texture)


def snow(x: Tensor, c: tuple[float, ...], scale: float, g: torch.Generator) -> Tensor:
    """Snow: Gaussian flakes (mean, std), zoomed into, thresholded, streaked by a motion blur at
    a random angle in [-135, -45) degrees (radius and sigma times ``scale``), added twice (the
    layer and its 180-degree rotation) over the image whitened towards ``1.5 * luma + 0.5``.

    The original streaks the flakes with ImageMagick's motion blur (through Wand); we use the
    same one-sided Gaussian streak computed in torch (:func:`_motion`), with the original's
    8-bit rounding of the layer before and after.
    """
    mean, std, zoom, threshold, radius, sigma, weight = c
    n, _, h, w = x.shape
    flakes = mean + std * torch.randn((n, 1, h, w), generator=g)
    flakes = _clipped_zoom(flakes, float(zoom))
    flakes = _quantize(torch.where(flakes < threshold, torch.zeros_like(flakes), flakes))
    angle = _uniform((n,), -135, -45, g)
    layer = _quantize(_motion(flakes, radius * scale, sigma * scale, angle))
    whiter = torch.maximum(x, _gray(x) * 1.5 + 0.5)
    x = weight * x + (1 - weight) * whiter
    return x + layer + layer.flip(-2, -1)


def _edges(level: Tensor) -> Tensor:
    """Edge map (N, 1, H, W) of 8-bit levels: Sobel |gx| + |gy| of at least 100 (between
    Canny's thresholds 50 and 150; no hysteresis or thinning)."""
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    kernels = torch.stack([sobel, sobel.T])[:, None]
    grad = F.conv2d(_pad(level, 1, "reflect101"), kernels)
    return (grad.abs().sum(1, keepdim=True) >= 100).float()


def _equalize(level: Tensor) -> Tensor:
    """Per-image histogram equalisation of 8-bit levels (N, 1, H, W), as OpenCV's."""
    n = level.shape[0]
    flat = level.reshape(n, -1).long().clamp(0, 255)
    hist = torch.zeros(n, 256).scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float))
    cdf = hist.cumsum(1)
    first = hist.gather(1, (hist > 0).float().argmax(1, keepdim=True))
    total = flat.shape[1]
    lut = torch.round((cdf - first) * 255 / (total - first).clamp_min(1)).clamp(0, 255)
    return lut.gather(1, flat).reshape(level.shape)


def _water(x: Tensor, liquid: Tensor, intensity: float) -> Tensor:
    """Spatter's water drops: pale turquoise, strongest inside drops and embossed at their
    rims (edge map, distance to the edges up to 20 px, equalised and embossed)."""
    level = torch.floor(liquid * 255)
    edges = _edges(level)
    distance = torch.full_like(level, 20.0)
    reached = edges
    for d in range(20):  # chessboard distance to the nearest edge, truncated at 20
        distance = torch.where((reached > 0) & (distance == 20), float(d), distance)
        reached = F.max_pool2d(reached, 3, stride=1, padding=1)
    box = torch.full((1, 1, 3, 3), 1 / 9)
    distance = torch.floor(F.conv2d(_pad(distance, 1, "reflect101"), box))
    distance = _equalize(distance)
    emboss = torch.tensor([[-2.0, -1.0, 0.0], [-1.0, 1.0, 1.0], [0.0, 1.0, 2.0]])[None, None]
    distance = torch.round(F.conv2d(_pad(distance, 1, "reflect101"), emboss)).clamp(0, 255)
    distance = F.conv2d(_pad(distance, 1, "reflect101"), box)
    m = liquid * distance
    m = intensity * m / m.amax((2, 3), keepdim=True).clamp_min(1e-12)
    turquoise = _colour((175 / 255, 238 / 255, 238 / 255), x)
    return x + (m * turquoise).clamp(0, 1)


def spatter(x: Tensor, c: tuple[float, ...], scale: float, g: torch.Generator) -> Tensor:
    """Spatter: a thresholded, blurred Gaussian field makes drops; severities 1-3 add water
    (:func:`_water`), 4-5 cover the image with mud-brown blots.

    The original shapes water drops with OpenCV (Canny edges, a distance transform, histogram
    equalisation, an emboss filter); we do the same steps in torch, with a Sobel threshold for
    Canny and a chessboard distance for the Euclidean one, so drops differ in detail but not in
    kind. Blur sigmas are times ``scale``.
    """
    mean, std, sigma, threshold, intensity, mud = c
    n, _, h, w = x.shape
    liquid = _gaussian(mean + std * torch.randn((n, 1, h, w), generator=g), sigma * scale)
    liquid = torch.where(liquid < threshold, torch.zeros_like(liquid), liquid)
    if not mud:
        return _water(x, liquid, intensity)
    m = _gaussian((liquid > threshold).float(), intensity * scale)
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


def pixelate(x: Tensor, factor: float, scale: float, g: torch.Generator) -> Tensor:
    """Pixelate: PIL BOX resampling down to ``int(side * factor)`` and back up (8-bit rounding
    after each axis, as PIL's passes), as matrix products over the batch."""
    h, w = x.shape[-2:]
    small_h, small_w = max(1, int(h * factor)), max(1, int(w * factor))
    y = _quantize(x @ _box_resize_matrix(w, small_w).T)
    y = _quantize(_box_resize_matrix(h, small_h) @ y)
    y = _quantize(y @ _box_resize_matrix(small_w, w).T)
    return _quantize(_box_resize_matrix(small_h, h) @ y)


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
    if x.ndim != 4 or x.shape[1] not in (1, 3) or min(x.shape[-2:]) < 8:
        raise ValueError(
            f"corruptions take NCHW images with 1 or 3 channels and at least 8x8 pixels; "
            f"got shape {tuple(x.shape)}"
        )
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
    """``split`` corrupted, stored as uint8 like CIFAR-10-C; image ``i`` depends only on
    (``seed``, ``name``, ``severity``, ``i``, the images of its chunk of :data:`CHUNK`)."""
    _check(name, severity, constants)
    pieces = []
    for k, start in enumerate(range(0, len(split), CHUNK)):
        g = torch.Generator().manual_seed(_chunk_seed(seed, name, severity, k))
        x = Split.to_float(split.x[start : start + CHUNK])
        out = corrupt(x, name, severity, constants=constants, generator=g)
        pieces.append(torch.round(out * 255).to(torch.uint8))
    return Split(torch.cat(pieces).to(split.x.device), split.y)


def _errors(acc: Mapping[tuple[str, int], float], name: str, sev: Sequence[int]) -> list[float]:
    return [1.0 - acc[(name, s)] for s in sev]


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator != 0 else math.nan


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

    def label(self) -> str:
        names = resolve(self.corruptions)
        what = "+".join(self.corruptions) if len(names) > 3 else "+".join(names)
        return f"corruptions[{what}]-{self.constants}"

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
