"""How much of a back-projected map is grid: the artifact that strided layers leave and the stride fix removes.

Two measures, both 0 for a map without grid:

**Grid energy** (:func:`grid_energy`). Take the magnitude ``|m|`` of a map of size ``H x W`` (cropped to
multiples of the period ``S``), its 2-D discrete Fourier transform ``F``, and the power ``P = |F|^2``. A
pattern that repeats every ``S`` pixels has all its power at the *grid frequencies*, the bins ``(u, v)`` with
``u`` a multiple of ``H/S`` and ``v`` a multiple of ``W/S``. The grid energy is the share of the power at the
grid frequencies other than DC, in the power at all frequencies other than DC::

    G(m) = sum_{(u,v) in grid, (u,v) != (0,0)} P(u,v) / sum_{(u,v) != (0,0)} P(u,v)

A constant map scores 0 (no power outside DC; we define 0/0 = 0), a pure period-``S`` comb scores 1, and white
noise about ``(S^2 - 1) / (H*W - 1)`` (the share of grid bins, :func:`grid_chance`). DC is left out so that the
score does not depend on the map's mean; smooth content sits at low frequencies, which are grid bins only
along the axes at multiples of ``H/S``.

**Coverage non-uniformity** (:func:`coverage_cv`). Back-project a constant seed through a layer whose weights
are all ones: each input pixel receives the number of paths that reach it (:func:`coverage_map`). Its
coefficient of variation (standard deviation over mean) inside the image, away from the border where coverage
falls off for any method, is 0 when every pixel is reached equally often. For an 11x11 convolution of stride 4,
each axis is covered 3, 3, 3, 2 times with period 4, so a pixel is reached 4, 6 or 9 times; with the stride
fix, 121 times everywhere inside.

Examples
--------
>>> import torch
>>> from vefi.gridness import coverage_map, grid_energy
>>> plain = coverage_map(112, 11, stride=4)
>>> fixed = coverage_map(112, 11, stride=4, stride_fix=True)
>>> sorted(set(plain[20:90, 20:90].flatten().tolist()))
[4.0, 6.0, 9.0]
>>> round(float(grid_energy(plain, 4, margin=12)), 6), float(grid_energy(fixed, 4, margin=12))
(1.0, 0.0)
"""

from __future__ import annotations

import torch

from vefi._tensors import all_finite
from vefi.backproject import backproject, conv_backproject, strongest_channels
from vefi.layers import pair

__all__ = ["grid_energy", "grid_chance", "coverage_map", "coverage_cv", "layer_grid_energy"]


def _check_maps(maps, name="maps") -> torch.Tensor:
    if not isinstance(maps, torch.Tensor):
        maps = torch.as_tensor(maps)
    if maps.dim() < 2:
        raise ValueError(f"{name} must have shape (..., H, W), got {tuple(maps.shape)}")
    if not maps.is_floating_point():
        maps = maps.double()
    if not all_finite(maps):
        raise ValueError(f"{name} contain NaN or Inf values")
    return maps


def _crop(maps: torch.Tensor, margin: int, period: tuple[int, int] = (1, 1)) -> torch.Tensor:
    if not isinstance(margin, int) or margin < 0:
        raise ValueError(f"margin must be a non-negative int, got {margin!r}")
    h, w = maps.shape[-2] - 2 * margin, maps.shape[-1] - 2 * margin
    h, w = h - h % period[0], w - w % period[1]
    if h < max(period[0], 1) or w < max(period[1], 1):
        raise ValueError(f"maps of size {tuple(maps.shape[-2:])} minus a margin of {margin} leave less than "
                         f"one period {period}")
    return maps[..., margin:margin + h, margin:margin + w]


def grid_energy(maps, period, *, margin: int = 0) -> torch.Tensor:
    """Share of the non-DC spectral power of ``|maps|`` at the frequencies of a period-``period`` grid.

    Parameters
    ----------
    maps : Tensor, shape (..., H, W)
        Maps (for colour maps, reduce the channels first, e.g. ``maps.abs().sum(-3)``).
    period : int or pair of int
        Grid period in pixels per axis, e.g. the stride of the first strided layer (4 for an 11x11 stride-4
        convolution).
    margin : int
        Pixels to drop at each border before measuring. The map is then cropped to whole periods.

    Returns
    -------
    Tensor, shape (...)
        One score per map, in [0, 1]: 0 for no grid (a constant map), 1 for a pure comb.

    Examples
    --------
    >>> comb = torch.zeros(32, 32)
    >>> comb[::4, ::4] = 1
    >>> float(grid_energy(comb, 4)), float(grid_energy(torch.ones(32, 32), 4))
    (1.0, 0.0)
    """
    maps = _check_maps(maps)
    period = pair(period, "period")
    if min(period) < 1:
        raise ValueError(f"period must be >= 1, got {period}")
    m = _crop(maps.abs(), margin, period)
    power = torch.fft.fft2(m).abs() ** 2
    h, w = m.shape[-2:]
    u = torch.arange(h, device=m.device) % (h // period[0]) == 0
    v = torch.arange(w, device=m.device) % (w // period[1]) == 0
    grid = u[:, None] & v[None, :]
    grid[0, 0] = False
    power[..., 0, 0] = 0
    total = power.sum((-2, -1))
    on_grid = (power * grid).sum((-2, -1))
    return torch.where(total > 0, on_grid / total.clamp_min(torch.finfo(total.dtype).tiny),
                       torch.zeros_like(total))


def grid_chance(size, period) -> float:
    """Expected :func:`grid_energy` of white noise: the share of grid bins among the non-DC bins.

    Examples
    --------
    >>> round(grid_chance(112, 4), 5)
    0.0012
    """
    h, w = pair(size, "size")
    p = pair(period, "period")
    h, w = h - h % p[0], w - w % p[1]
    return (p[0] * p[1] - 1) / (h * w - 1)


def coverage_map(input_size, kernel_size, stride, padding=0, *, stride_fix: bool = False,
                 dtype=torch.float64) -> torch.Tensor:
    """How many kernel taps reach each input pixel when a constant 1 is back-projected through a convolution.

    The convolution has one channel and all-ones weights, so the value at a pixel counts the (output unit,
    kernel tap) pairs that land on it.

    Parameters
    ----------
    input_size, kernel_size, stride, padding : int or pair of int
        The layer's geometry (per axis).
    stride_fix : bool
        Back-project with the stride fix (:func:`vefi.backproject.conv_backproject`).

    Returns
    -------
    Tensor, shape (A_h, A_w)

    Examples
    --------
    >>> coverage_map(12, 3, stride=2)[5, :6].tolist()
    [1.0, 1.0, 2.0, 1.0, 2.0, 1.0]
    """
    size, kernel = pair(input_size, "input_size"), pair(kernel_size, "kernel_size")
    stride, padding = pair(stride, "stride"), pair(padding, "padding")
    out = [(size[i] + 2 * padding[i] - kernel[i]) // stride[i] + 1 for i in range(2)]
    if min(out) < 1 or min(stride) < 1:
        raise ValueError(f"no output for input {size}, kernel {kernel}, stride {stride}, padding {padding}")
    seed = torch.ones((1, 1, *out), dtype=dtype)
    weight = torch.ones((1, 1, *kernel), dtype=dtype)
    return conv_backproject(seed, weight, size, stride=stride, padding=padding, stride_fix=stride_fix)[0, 0]


def coverage_cv(coverage, *, margin: int = 0) -> torch.Tensor:
    """Coefficient of variation (std / mean) of a coverage map, ``margin`` pixels away from each border.

    0 when every pixel inside is reached equally often. Works on a batch (..., H, W).

    Examples
    --------
    >>> float(coverage_cv(coverage_map(112, 11, 4, stride_fix=True), margin=10))
    0.0
    """
    c = _crop(_check_maps(coverage, "coverage"), margin)
    mean = c.mean((-2, -1))
    std = c.std((-2, -1), unbiased=False)
    tiny = torch.finfo(mean.dtype).tiny
    return torch.where(mean != 0, std / mean.abs().clamp_min(tiny), torch.zeros_like(mean))


def layer_grid_energy(model, images: torch.Tensor, layers, period, *, margin: int = 0, batch_size: int = 64,
                      **options) -> torch.Tensor:
    """Grid energy of back-projections, per image and layer: each layer's strongest channel for the image
    (:func:`vefi.backproject.strongest_channels`), back-projected from its activation map and scored by
    :func:`grid_energy` of its magnitude (summed over colour channels).

    Parameters
    ----------
    model, images
        As for :func:`vefi.backproject.backproject`.
    layers : sequence of int or str
        Layers by number or name.
    period, margin
        As for :func:`grid_energy`.
    batch_size : int
        Inputs per backward pass, one per image and layer (a row).
    **options
        ``rule``, ``stride_fix``, ``pool_fix`` for :func:`vefi.backproject.backproject`.

    Returns
    -------
    Tensor, shape (n_images, len(layers))

    Examples
    --------
    >>> from vefi.book.models import build_model
    >>> _ = torch.manual_seed(0)
    >>> scores = layer_grid_energy(build_model("mnist"), torch.rand(3, 1, 28, 28), ["conv2", "fc1"], 2)
    >>> tuple(scores.shape)
    (3, 2)
    """
    features = strongest_channels(model, images, layers)
    maps = backproject(model, images, features, source="map", batch_size=batch_size, **options)
    return grid_energy(maps.abs().sum(-3), period, margin=margin)
