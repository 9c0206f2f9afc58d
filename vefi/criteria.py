"""How good is a heatmap? Selectivity by pixel flipping and continuity (Montavon et al. 2018, Sec. 5).

Two properties of an explanation that can be measured without ground truth:

* **Selectivity** (Bach et al. 2015; Samek et al. 2017; Montavon et al. 2018, Sec. 5.2). Remove the input
  regions the heatmap calls most relevant first, a few at a time, and record the target score after each
  step: the *perturbation curve*. A selective heatmap makes the score drop fast. We summarise a curve by the
  *area over the perturbation curve* of Samek et al. (2017),

  .. math:: \\mathrm{AOPC} = \\frac{1}{K+1} \\sum_{k=0}^{K} \\big(f(x^{(0)}) - f(x^{(k)})\\big),

  where :math:`x^{(k)}` is the input after ``k`` removal steps: **higher is better** (steeper drop). The
  area under the curve itself (trapezoid rule over the fraction of the image removed, lower is better) is
  available too. Regions are square patches, scored by the sum of the heatmap inside them; a removed patch
  is set to a baseline (zero, the image's mean, a blurred copy, or seeded uniform noise as in Samek et al.).
  The *random-order* curve (patches removed in a seeded random order) is the floor a heatmap must beat.
* **Continuity** (Montavon et al. 2018, Sec. 5.1). Nearly equal inputs should get nearly equal
  explanations. Along a path of inputs :math:`x_0, \\dots, x_{T-1}` (e.g. a digit translated by one pixel at
  a time) we report the largest ratio

  .. math:: \\max_{s \\ne t} \\frac{\\lVert R(x_s) - R(x_t) \\rVert_1}{\\lVert x_s - x_t \\rVert_2},

  a Lipschitz-style estimate: **lower is better**.

Metrics follow Quantus: hyper-parameters at construction, data at call, and every metric says whether a
higher value is better (``higher_is_better``). An explainer, wherever one is expected, is a callable
``explain(model, images, target) -> (n, H, W)`` heatmaps.

Examples
--------
>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
>>> with torch.no_grad():
...     _ = net[1].weight.fill_(1.0)
>>> images = torch.ones(1, 1, 4, 4)
>>> curve = Selectivity(patch=2)(net, images, torch.rand(1, 4, 4), target=0)
>>> [round(float(v), 3) for v in curve]
[8.0]
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vefi._model_state import preserved
from vefi._progress import progress
from vefi._tensors import all_finite
from vefi.layers import check_images, check_scores
from vefi.targets import target_classes

__all__ = ["BASELINES", "SCORES", "PerturbationCurve", "perturbation_curve", "random_heatmaps",
           "Selectivity", "translation_path", "continuity", "Continuity", "gaussian_blur"]

BASELINES = ("zero", "mean", "blur", "uniform")
SCORES = ("logit", "probability")

Explainer = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------------------
# Checks shared by the metrics.


def _check_heatmaps(heatmaps, n: int, size: tuple[int, int]) -> torch.Tensor:
    if not isinstance(heatmaps, torch.Tensor):
        raise TypeError(f"heatmaps must be a torch.Tensor of shape (n, H, W), got {type(heatmaps).__name__}")
    if heatmaps.ndim == 2:
        heatmaps = heatmaps.unsqueeze(0)
    if heatmaps.ndim == 4 and heatmaps.shape[1] == 1:
        heatmaps = heatmaps[:, 0]
    if tuple(heatmaps.shape) != (n, *size):
        raise ValueError(f"heatmaps must have shape {(n, *size)} (one (H, W) map per image), "
                         f"got {tuple(heatmaps.shape)}")
    if not all_finite(heatmaps):
        raise ValueError("heatmaps contain NaN or Inf")
    return heatmaps.float()


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _check_target_range(target: torch.Tensor, classes: int) -> None:
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= classes):
        raise ValueError(f"target classes must be in 0..{classes - 1}, got {target.tolist()}")


# --------------------------------------------------------------------------------------------------------
# Baselines.

def _gaussian_kernel(sigma: float, truncate: float = 3.0) -> torch.Tensor:
    radius = max(1, int(truncate * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(images: torch.Tensor, sigma: float = 2.0) -> torch.Tensor:
    """Separable Gaussian blur of (n, C, H, W) images, per channel, with mirrored borders.

    Examples
    --------
    >>> x = torch.ones(1, 1, 5, 5)
    >>> bool(torch.allclose(gaussian_blur(x, 1.0), x))
    True
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    k = _gaussian_kernel(float(sigma)).to(images)
    r = k.numel() // 2
    n, c, h, w = images.shape
    flat = images.reshape(n * c, 1, h, w)
    # "replicate" is used when the image is too small for a mirror of that radius
    mode = "reflect" if min(h, w) > r else "replicate"
    flat = F.conv2d(F.pad(flat, (r, r, 0, 0), mode=mode), k.view(1, 1, 1, -1))
    flat = F.conv2d(F.pad(flat, (0, 0, r, r), mode=mode), k.view(1, 1, -1, 1))
    return flat.reshape(n, c, h, w)


def _baseline_images(images: torch.Tensor, baseline, *, blur_sigma: float, seed: int) -> torch.Tensor:
    """What a removed pixel becomes, per image: a tensor like ``images``."""
    if isinstance(baseline, numbers.Real) and not isinstance(baseline, bool):
        return torch.full_like(images, float(baseline))
    if baseline == "zero":
        return torch.zeros_like(images)
    if baseline == "mean":
        return images.mean((2, 3), keepdim=True).expand_as(images).clone()
    if baseline == "blur":
        return gaussian_blur(images, blur_sigma)
    if baseline == "uniform":
        g = torch.Generator().manual_seed(int(seed))
        return torch.rand(images.shape, generator=g).to(images)
    raise ValueError(f"unknown baseline {baseline!r}; expected a number or one of {BASELINES}")


# --------------------------------------------------------------------------------------------------------
# Selectivity.

@dataclass(frozen=True)
class PerturbationCurve:
    """Target scores as the most relevant regions are removed.

    Attributes
    ----------
    scores : torch.Tensor
        (n, K+1): the target's score (logit or probability) before any removal (column 0) and after each
        of the K steps.
    fraction : torch.Tensor
        (K+1,): fraction of the image's pixels removed after each step (0 ... 1 when every patch goes).
    target : torch.Tensor
        (n,): the class whose score is tracked.
    """

    scores: torch.Tensor
    fraction: torch.Tensor
    target: torch.Tensor

    @property
    def steps(self) -> int:
        """Number of removal steps K."""
        return self.scores.shape[1] - 1

    @property
    def aopc(self) -> torch.Tensor:
        """(n,) area over the perturbation curve (Samek et al. 2017): the mean over k = 0..K of
        ``f(x0) - f(xk)``. Higher means the score drops faster: a more selective heatmap."""
        return (self.scores[:, :1] - self.scores).mean(1)

    @property
    def auc(self) -> torch.Tensor:
        """(n,) area under the curve of the score against the fraction removed (trapezoid rule); lower is
        better. Equals the mean score when the steps are equal."""
        return torch.trapezoid(self.scores, self.fraction.to(self.scores), dim=1)

    def mean(self) -> torch.Tensor:
        """(K+1,) the curve averaged over images."""
        return self.scores.mean(0)


def _patch_index(size: tuple[int, int], patch: int) -> tuple[torch.Tensor, int]:
    """The patch number of every pixel (H, W), patches in raster order; and the number of patches.
    Edge patches are smaller when ``patch`` does not divide the image."""
    h, w = size
    gw = math.ceil(w / patch)
    rows = torch.arange(h) // patch
    cols = torch.arange(w) // patch
    return rows[:, None] * gw + cols[None, :], math.ceil(h / patch) * gw


def perturbation_curve(model: nn.Module, images: torch.Tensor, heatmaps: torch.Tensor, target=None, *,
                       patch: int = 4, per_step: int = 1, steps: int | None = None, baseline="zero",
                       score: str = "logit", blur_sigma: float = 2.0, seed: int = 0,
                       batch_size: int = 2048) -> PerturbationCurve:
    """Pixel flipping: remove the most relevant patches first, ``per_step`` per step, and record the score.

    Parameters
    ----------
    model : torch.nn.Module
        The classifier; left exactly as it came.
    images : torch.Tensor
        (n, C, H, W) or (C, H, W) floats.
    heatmaps : torch.Tensor
        (n, H, W) relevance, higher = more evidence for ``target``. A patch's relevance is its sum.
    target : None, int or LongTensor (n,)
        The class whose score is tracked; None: the class predicted for the unperturbed image.
    patch : int
        Side of the square regions removed (4 on MNIST gives 49 patches).
    per_step : int
        Patches removed per step.
    steps : int, optional
        Number of steps K; default: enough to remove every patch.
    baseline : {"zero", "mean", "blur", "uniform"} or float
        What a removed pixel becomes: 0; the image's per-channel mean; a Gaussian-blurred copy
        (``blur_sigma``); seeded uniform noise in [0, 1] (one draw per image, as Samek et al. 2017); or a
        constant.
    score : {"logit", "probability"}
        Which score of ``target`` is recorded.
    seed : int
        Seed of the ``"uniform"`` baseline.
    batch_size : int
        Perturbed images per forward pass: all images x all steps are evaluated in chunks of this size.

    Returns
    -------
    PerturbationCurve

    Examples
    --------
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 1))
    >>> with torch.no_grad():
    ...     _ = net[1].weight.fill_(1.0); _ = net[1].bias.zero_()
    >>> x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    >>> perturbation_curve(net, x, x[:, 0], 0, patch=1).scores.tolist()
    [[10.0, 6.0, 3.0, 1.0, 0.0]]
    """
    images = check_images(images)
    n, _, h, w = images.shape
    heatmaps = _check_heatmaps(heatmaps, n, (h, w))
    patch = _positive_int(patch, "patch")
    per_step = _positive_int(per_step, "per_step")
    batch_size = _positive_int(batch_size, "batch_size")
    if patch > min(h, w):
        raise ValueError(f"patch ({patch}) is larger than the image ({h}x{w})")
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; expected one of {SCORES}")
    base = _baseline_images(images, baseline, blur_sigma=blur_sigma, seed=seed)
    index, count = _patch_index((h, w), patch)
    max_steps = math.ceil(count / per_step)
    if steps is None:
        steps = max_steps
    steps = _positive_int(steps, "steps")
    if steps > max_steps:
        raise ValueError(f"steps must be <= {max_steps} ({count} patches of {patch}x{patch}, {per_step} per "
                         f"step), got {steps}")

    target = target_classes(model, images, target)
    # relevance of each patch; ties keep raster order (a stable sort), so the result is deterministic
    patch_relevance = torch.zeros(n, count, dtype=torch.float64).index_add_(
        1, index.flatten(), heatmaps.reshape(n, -1).cpu().double())
    order = torch.argsort(-patch_relevance, dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(count).expand(n, count).contiguous())
    pixel_rank = rank[:, index]  # (n, H, W): the step order of each pixel's patch

    removed_counts = torch.arange(steps + 1) * per_step
    rows = n * (steps + 1)
    scores = torch.empty(rows)
    with preserved(model), torch.no_grad():
        model.eval()
        starts = range(0, rows, batch_size)
        for start in progress(starts, desc="pixel flipping"):
            row = torch.arange(start, min(start + batch_size, rows))
            i, k = row // (steps + 1), row % (steps + 1)
            mask = (pixel_rank[i] < removed_counts[k].view(-1, 1, 1)).unsqueeze(1)
            batch = check_images(torch.where(mask, base[i], images[i]), model=model, convert=True)
            logits = check_scores(model(batch), batch.shape[0]).float().cpu()
            _check_target_range(target, logits.shape[1])
            if score == "probability":
                logits = logits.softmax(1)
            scores[row] = logits.gather(1, target[i].view(-1, 1))[:, 0]
    pixels = torch.bincount(index.flatten(), minlength=count)[order]  # (n, count) pixels per patch, in order
    removed_pixels = torch.cat([torch.zeros(n, 1, dtype=torch.long), pixels.cumsum(1)], 1)
    fraction = removed_pixels[0, removed_counts.clamp_max(count)].float() / (h * w)
    return PerturbationCurve(scores.view(n, steps + 1), fraction, target)


def random_heatmaps(n: int, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """(n, H, W) uniform noise from a seeded generator: the random-order control of pixel flipping.

    Examples
    --------
    >>> bool(torch.equal(random_heatmaps(2, (3, 3), seed=1), random_heatmaps(2, (3, 3), seed=1)))
    True
    """
    g = torch.Generator().manual_seed(int(seed))
    return torch.rand((int(n), *size), generator=g)


class Selectivity:
    """Selectivity metric: the area over the pixel-flipping curve (AOPC); higher is better.

    Hyper-parameters are those of :func:`perturbation_curve`; calling the metric on data returns the AOPC
    per image, :meth:`curve` the whole curve and :meth:`random_curve` the random-order control.

    Examples
    --------
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 1))
    >>> with torch.no_grad():
    ...     _ = net[1].weight.fill_(1.0); _ = net[1].bias.zero_()
    >>> x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    >>> metric = Selectivity(patch=1)
    >>> metric.higher_is_better, metric(net, x, x[:, 0], 0).tolist()
    (True, [6.0])
    """

    higher_is_better = True
    name = "selectivity (AOPC)"

    def __init__(self, *, patch: int = 4, per_step: int = 1, steps: int | None = None, baseline="zero",
                 score: str = "logit", blur_sigma: float = 2.0, seed: int = 0, batch_size: int = 2048):
        if score not in SCORES:
            raise ValueError(f"unknown score {score!r}; expected one of {SCORES}")
        if not (isinstance(baseline, numbers.Real) and not isinstance(baseline, bool)) and baseline not in BASELINES:
            raise ValueError(f"unknown baseline {baseline!r}; expected a number or one of {BASELINES}")
        self.options = dict(patch=_positive_int(patch, "patch"), per_step=_positive_int(per_step, "per_step"),
                            steps=None if steps is None else _positive_int(steps, "steps"), baseline=baseline,
                            score=score, blur_sigma=blur_sigma, seed=seed,
                            batch_size=_positive_int(batch_size, "batch_size"))

    def curve(self, model: nn.Module, images: torch.Tensor, heatmaps, target=None) -> PerturbationCurve:
        """The perturbation curve; ``heatmaps`` a tensor (n, H, W) or an explainer
        ``explain(model, images, target)``."""
        images = check_images(images)
        if callable(heatmaps) and not isinstance(heatmaps, torch.Tensor):
            target = target_classes(model, images, target)
            heatmaps = heatmaps(model, images, target)
        return perturbation_curve(model, images, heatmaps, target, **self.options)

    def random_curve(self, model: nn.Module, images: torch.Tensor, target=None, *, seed: int = 0
                     ) -> PerturbationCurve:
        """The curve when patches are removed in a seeded random order (the floor to beat)."""
        images = check_images(images)
        return self.curve(model, images, random_heatmaps(images.shape[0], images.shape[-2:], seed), target)

    def __call__(self, model: nn.Module, images: torch.Tensor, heatmaps, target=None) -> torch.Tensor:
        return self.curve(model, images, heatmaps, target).aopc

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"Selectivity({args})"


# --------------------------------------------------------------------------------------------------------
# Continuity.

def translation_path(images: torch.Tensor, shifts=(0, 1, 2, 3), *, axis: str = "x", fill: float = 0.0
                     ) -> torch.Tensor:
    """Copies of each image translated by whole pixels: (n, T, C, H, W), one per shift.

    A positive shift moves the content right (``axis="x"``) or down (``"y"``); uncovered pixels get
    ``fill`` (0 is MNIST's background).

    Examples
    --------
    >>> x = torch.arange(3.0).view(1, 1, 1, 3)
    >>> translation_path(x, (0, 1))[0, :, 0, 0].tolist()
    [[0.0, 1.0, 2.0], [0.0, 0.0, 1.0]]
    """
    images = check_images(images)
    if axis not in ("x", "y"):
        raise ValueError(f"axis must be 'x' or 'y', got {axis!r}")
    shifts = [int(s) for s in shifts]
    if not shifts:
        raise ValueError("shifts must not be empty")
    dim = 3 if axis == "x" else 2
    size = images.shape[dim]
    out = []
    for s in shifts:
        if abs(s) >= size:
            raise ValueError(f"shift {s} is not smaller than the image side {size}")
        moved = torch.full_like(images, float(fill))
        src = images.narrow(dim, max(0, -s), size - abs(s))
        moved.narrow(dim, max(0, s), size - abs(s)).copy_(src)
        out.append(moved)
    return torch.stack(out, 1)


def continuity(inputs: torch.Tensor, heatmaps: torch.Tensor, *, pairs: str = "all",
               normalise: str | None = None) -> torch.Tensor:
    """Largest ``||R(x_s) - R(x_t)||_1 / ||x_s - x_t||_2`` over pairs of points of each input path.

    Parameters
    ----------
    inputs : torch.Tensor
        (n, T, C, H, W): n paths of T inputs each (or one path (T, C, H, W)).
    heatmaps : torch.Tensor
        (n, T, H, W): the explanation of each input (or (T, H, W)).
    pairs : {"all", "consecutive"}
        Maximise over all pairs s != t (Montavon et al. 2018) or over neighbours on the path only.
    normalise : {None, "path"}
        ``"path"`` divides all heatmaps of a path by their mean L1 norm, so that methods whose heatmaps
        have different scales can be compared; the changes *along* the path are kept.

    Returns
    -------
    torch.Tensor
        (n,) the estimate per path (a scalar tensor for one path); 0 when the explanation is constant.
        Pairs of identical inputs are skipped.

    Examples
    --------
    >>> x = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])
    >>> float(continuity(x, 3 * x[:, 0]))
    6.0
    """
    if not isinstance(inputs, torch.Tensor) or not isinstance(heatmaps, torch.Tensor):
        raise TypeError("inputs and heatmaps must be torch.Tensors")
    single = inputs.ndim == 4
    if single:
        inputs, heatmaps = inputs.unsqueeze(0), heatmaps.unsqueeze(0)
    if inputs.ndim != 5:
        raise ValueError(f"inputs must have shape (n, T, C, H, W) or (T, C, H, W), got {tuple(inputs.shape)}")
    n, t = inputs.shape[:2]
    if heatmaps.ndim == 5 and heatmaps.shape[2] == 1:
        heatmaps = heatmaps[:, :, 0]
    if tuple(heatmaps.shape) != (n, t, *inputs.shape[-2:]):
        raise ValueError(f"heatmaps must have shape {(n, t, *inputs.shape[-2:])} to match the inputs, "
                         f"got {tuple(heatmaps.shape)}")
    if t < 2:
        raise ValueError(f"a path needs at least 2 inputs, got {t}")
    if not (all_finite(inputs) and all_finite(heatmaps)):
        raise ValueError("inputs or heatmaps contain NaN or Inf")
    if pairs not in ("all", "consecutive"):
        raise ValueError(f"pairs must be 'all' or 'consecutive', got {pairs!r}")
    if normalise not in (None, "path"):
        raise ValueError(f"normalise must be None or 'path', got {normalise!r}")
    x = inputs.reshape(n, t, -1).double()
    r = heatmaps.reshape(n, t, -1).double()
    if normalise == "path":
        scale = r.abs().sum(2).mean(1, keepdim=True)
        r = r / torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(2)
    if pairs == "all":
        s, u = torch.triu_indices(t, t, offset=1)
    else:
        s, u = torch.arange(t - 1), torch.arange(1, t)
    dx = (x[:, s] - x[:, u]).norm(dim=2)
    dr = (r[:, s] - r[:, u]).abs().sum(2)
    ratio = torch.where(dx > 0, dr / dx.clamp_min(1e-300), torch.zeros_like(dx))
    out = ratio.amax(1).float()
    return out[0] if single else out


class Continuity:
    """Continuity metric: the Lipschitz-style estimate of :func:`continuity` along translation paths;
    lower is better.

    Each image is translated by ``shifts`` pixels along ``axis`` (:func:`translation_path`), every copy is
    explained for the *same* target (the class predicted for the untranslated image unless given), and
    the largest ratio over pairs is returned per image. All n x T copies go to the explainer in one call.

    Examples
    --------
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    >>> constant = lambda model, x, target: torch.ones(x.shape[0], 4, 4)
    >>> Continuity()(net, torch.rand(3, 1, 4, 4), constant).tolist()
    [0.0, 0.0, 0.0]
    """

    higher_is_better = False
    name = "continuity (max L1/L2 ratio)"

    def __init__(self, *, shifts=(0, 1, 2, 3), axis: str = "x", pairs: str = "all",
                 normalise: str | None = "path", fill: float = 0.0):
        if pairs not in ("all", "consecutive"):
            raise ValueError(f"pairs must be 'all' or 'consecutive', got {pairs!r}")
        if normalise not in (None, "path"):
            raise ValueError(f"normalise must be None or 'path', got {normalise!r}")
        if axis not in ("x", "y"):
            raise ValueError(f"axis must be 'x' or 'y', got {axis!r}")
        shifts = tuple(int(s) for s in shifts)
        if len(shifts) < 2:
            raise ValueError(f"shifts must hold at least 2 values, got {shifts}")
        self.shifts, self.axis, self.pairs, self.normalise, self.fill = shifts, axis, pairs, normalise, fill

    def path(self, images: torch.Tensor) -> torch.Tensor:
        """The translated copies (n, T, C, H, W)."""
        return translation_path(images, self.shifts, axis=self.axis, fill=self.fill)

    def heatmaps(self, model: nn.Module, images: torch.Tensor, explain: Explainer, target=None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The path (n, T, C, H, W) and its heatmaps (n, T, H, W), explained in one call."""
        images = check_images(images)
        target = target_classes(model, images, target)
        path = self.path(images)
        n, t = path.shape[:2]
        maps = explain(model, path.reshape(n * t, *path.shape[2:]), target.repeat_interleave(t))
        if not isinstance(maps, torch.Tensor):
            raise TypeError(f"the explainer must return a torch.Tensor, got {type(maps).__name__}")
        return path, maps.detach().float().cpu().reshape(n, t, *path.shape[-2:])

    def __call__(self, model: nn.Module, images: torch.Tensor, explain: Explainer, target=None
                 ) -> torch.Tensor:
        path, maps = self.heatmaps(model, images, explain, target)
        return continuity(path, maps, pairs=self.pairs, normalise=self.normalise)

    def __repr__(self) -> str:
        return (f"Continuity(shifts={self.shifts}, axis={self.axis!r}, pairs={self.pairs!r}, "
                f"normalise={self.normalise!r})")
