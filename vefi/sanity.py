"""Sanity checks for heatmaps by model parameter randomisation (Adebayo et al. 2018).

If a heatmap explains what a network *learned*, destroying what it learned must change the heatmap. The
*cascading* randomisation test re-initialises the layers that have parameters one at a time, from the top
(the logits) down, cumulatively, recomputes the heatmaps after each step, and scores their similarity to the
heatmaps of the trained model. A method whose heatmaps stay similar while the weights are destroyed fails
the check: it shows the input (edges, the digit) rather than the model's evidence. The *independent* variant
re-initialises one layer at a time, every other layer trained.

Similarity measures (as in Adebayo et al.): the Spearman rank correlation of the heatmaps, with and without
absolute values, and the structural similarity index SSIM (Wang et al. 2004) of the heatmaps' magnitudes
min-max scaled to [0, 1]. The HOG similarity and the data randomisation test of the paper are not
implemented.

Everything happens on a deep copy: the user's model is never changed. Re-initialisation draws from a
generator seeded per layer, so a run is reproducible and a layer gets the same new weights whatever else is
randomised.

Examples
--------
>>> import torch
>>> a = torch.rand(2, 16, 16)
>>> spearman(a, a).tolist(), [round(v, 6) for v in ssim(a, a).tolist()]
([1.0, 1.0], [1.0, 1.0])
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vefi._model_state import preserved
from vefi._progress import progress
from vefi._tensors import all_finite
from vefi.layers import Layer, check_images, layer_table, resolve_layer
from vefi.targets import target_classes

__all__ = ["SIMILARITIES", "MODES", "parameter_layers", "randomise_layers", "spearman", "ssim",
           "similarities", "RandomisationResult", "model_randomisation"]

SIMILARITIES = ("spearman", "spearman_abs", "ssim")
MODES = ("cascading", "independent")

Explainer = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------------------
# Similarity of heatmaps.

def _pair(a, b, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError(f"{name} takes two torch.Tensors, got {type(a).__name__} and {type(b).__name__}")
    if a.shape != b.shape:
        raise ValueError(f"{name} needs heatmaps of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.ndim < 2:
        raise ValueError(f"{name} needs heatmaps of shape (H, W) or (n, H, W), got {tuple(a.shape)}")
    if not (all_finite(a) and all_finite(b)):
        raise ValueError(f"{name}: heatmaps contain NaN or Inf")
    return a.double(), b.double()


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..m along the last axis, ties given their average rank (as ``scipy.stats.rankdata``)."""
    ordered = x.sort(-1).values.contiguous()
    below = torch.searchsorted(ordered, x.contiguous(), right=False)
    upto = torch.searchsorted(ordered, x.contiguous(), right=True)
    return (below + upto + 1).double() / 2


def spearman(a: torch.Tensor, b: torch.Tensor, *, absolute: bool = False) -> torch.Tensor:
    """Spearman rank correlation of heatmaps, per map: (H, W) -> scalar, (n, H, W) -> (n,).

    Ties get average ranks (as ``scipy.stats.spearmanr``); a constant map has no rank order, and its
    correlation is NaN, as scipy's. ``absolute=True`` ranks magnitudes.

    Examples
    --------
    >>> float(spearman(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1.0, 4.0, 9.0]])))
    1.0
    """
    a, b = _pair(a, b, "spearman")
    shape = a.shape[:-2]
    if absolute:
        a, b = a.abs(), b.abs()
    ra = _average_ranks(a.reshape(*shape, -1))
    rb = _average_ranks(b.reshape(*shape, -1))
    ra = ra - ra.mean(-1, keepdim=True)
    rb = rb - rb.mean(-1, keepdim=True)
    den = (ra.square().sum(-1) * rb.square().sum(-1)).sqrt()
    rho = torch.where(den > 0, (ra * rb).sum(-1) / den.clamp_min(1e-300), torch.full_like(den, float("nan")))
    return rho.float()


def _gaussian_window(sigma: float, truncate: float) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, *, data_range: float | None = None, sigma: float = 1.5,
         truncate: float = 3.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Mean structural similarity (Wang et al. 2004) of grey images, per map: (n, H, W) -> (n,).

    Follows ``skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=...)``: local means, variances and covariance under a Gaussian
    window (``sigma``, radius ``int(truncate * sigma + 0.5)``, 11x11 by default), the SSIM map

    .. math:: \\frac{(2\\mu_a\\mu_b + C_1)(2\\sigma_{ab} + C_2)}{(\\mu_a^2 + \\mu_b^2 + C_1)(\\sigma_a^2 +
              \\sigma_b^2 + C_2)},\\quad C_i = (k_i L)^2,

    averaged over the positions whose window lies inside the image (as skimage, which crops the border).

    Parameters
    ----------
    data_range : float, optional
        L, the dynamic range of the maps; default: the largest ``max - min`` over the two maps of each pair
        (1 for maps in [0, 1] that use the whole range).

    Examples
    --------
    >>> a = torch.rand(16, 16)
    >>> round(float(ssim(a, a)), 6), round(float(ssim(a, 1 - a) - ssim(1 - a, a)), 6)
    (1.0, 0.0)
    """
    a, b = _pair(a, b, "ssim")
    window = _gaussian_window(float(sigma), float(truncate))
    side = window.numel()
    h, w = a.shape[-2:]
    if side > min(h, w):
        raise ValueError(f"the SSIM window ({side}x{side}) is larger than the heatmaps ({h}x{w})")
    shape = a.shape[:-2]
    a = a.reshape(-1, 1, h, w)
    b = b.reshape(-1, 1, h, w)
    if data_range is None:
        span = torch.maximum(a.amax((1, 2, 3)) - a.amin((1, 2, 3)), b.amax((1, 2, 3)) - b.amin((1, 2, 3)))
        span = torch.where(span > 0, span, torch.ones_like(span)).view(-1, 1, 1, 1)
    else:
        if data_range <= 0:
            raise ValueError(f"data_range must be > 0, got {data_range}")
        span = torch.tensor(float(data_range), dtype=torch.float64)

    def blur(x):  # valid convolution only: skimage's border padding never reaches the averaged region
        x = F.conv2d(x, window.view(1, 1, 1, -1))
        return F.conv2d(x, window.view(1, 1, -1, 1))

    ma, mb = blur(a), blur(b)
    va = blur(a * a) - ma * ma
    vb = blur(b * b) - mb * mb
    cov = blur(a * b) - ma * mb
    c1 = (k1 * span) ** 2
    c2 = (k2 * span) ** 2
    s = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2))
    return s.mean((1, 2, 3)).float().reshape(shape)


def _unit_range(h: torch.Tensor) -> torch.Tensor:
    h = h.abs()
    low = h.amin((-2, -1), keepdim=True)
    span = h.amax((-2, -1), keepdim=True) - low
    return torch.where(span > 0, (h - low) / span.clamp_min(1e-30), torch.zeros_like(h))


def similarities(original: torch.Tensor, other: torch.Tensor) -> dict[str, torch.Tensor]:
    """All similarity scores of :data:`SIMILARITIES` between two stacks of heatmaps (n, H, W), per map.

    SSIM compares the magnitudes min-max scaled to [0, 1] (``data_range=1``), as the figures show them.
    """
    original, other = _pair(original, other, "similarities")
    return {"spearman": spearman(original, other),
            "spearman_abs": spearman(original, other, absolute=True),
            "ssim": ssim(_unit_range(original), _unit_range(other), data_range=1.0)}


# --------------------------------------------------------------------------------------------------------
# Randomising a copy of the model.

def _has_parameters(layer: Layer) -> bool:
    """Owns parameters (a block: has some inside)."""
    return any(True for _ in layer.module.parameters(recurse=layer.kind == "block"))


def parameter_layers(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> list[Layer]:
    """The layers (of :func:`vefi.layers.layer_table`) that own parameters, in forward order: leaf modules
    only (a block is its parts), each module once (a module called twice has one set of parameters)."""
    return [layer for layer in layer_table(model, input_shape)
            if layer.kind != "block" and layer.call == 1 and _has_parameters(layer)]


def _randomisable(table: list[Layer], keys) -> list[Layer]:
    """The layers named by ``keys``, each of which must own parameters: randomising a ReLU changes nothing,
    and the test would report a similarity of 1 as if the method passed."""
    if isinstance(keys, (int, str, Layer, nn.Module)):
        keys = [keys]
    chosen = [resolve_layer(table, key) for key in keys]
    for layer in chosen:
        if not _has_parameters(layer):
            having = ", ".join(f"{lay.number}={lay.name!r} ({lay.kind})" for lay in table if _has_parameters(lay))
            raise ValueError(f"layer {layer.label} ({layer.name!r}) has no parameters to randomise; the layers "
                             f"with parameters are {having or 'none'}")
    return chosen


def _reinitialise(module: nn.Module, generator: torch.Generator) -> None:
    """New parameters for one module, drawn as torch's default init draws them for conv and linear layers:
    uniform in +-1/sqrt(fan_in) (kaiming_uniform with a = sqrt(5)), for weights and biases alike."""
    for part in module.modules():  # a block: every module in it, one after another
        weight = getattr(part, "weight", None)
        fan_in = weight[0].numel() if isinstance(weight, torch.Tensor) and weight.ndim > 1 else None
        with torch.no_grad():
            for name, p in part.named_parameters(recurse=False):
                fan = fan_in if fan_in is not None else max(1, p.numel() // max(1, p.shape[0] if p.ndim else 1))
                bound = 1.0 / math.sqrt(fan)
                new = torch.rand(p.shape, generator=generator, dtype=torch.float64) * 2 * bound - bound
                p.copy_(new.to(p))


def _layer_seed(seed: int, layer: Layer) -> int:
    return int(seed) * 1_000_003 + layer.number


def randomise_layers(model: nn.Module, layers, *, seed: int = 0,
                     input_shape: tuple[int, ...] | None = None) -> nn.Module:
    """A deep copy of ``model`` with the parameters of ``layers`` (numbers, names or :class:`Layer`)
    re-initialised; every other parameter is copied unchanged. ``model`` itself is not touched.

    Examples
    --------
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> rand = randomise_layers(net, ["3"], seed=0, input_shape=(4,))
    >>> bool(torch.equal(rand[1].weight, net[1].weight)), bool(torch.equal(rand[3].weight, net[3].weight))
    (True, False)
    """
    chosen = _randomisable(layer_table(model, input_shape), layers)
    clone = copy.deepcopy(model)
    modules = dict(clone.named_modules())
    for layer in chosen:
        _reinitialise(modules[layer.module_name], torch.Generator().manual_seed(_layer_seed(seed, layer)))
    return clone


# --------------------------------------------------------------------------------------------------------
# The test.

@dataclass(frozen=True)
class RandomisationResult:
    """Heatmaps and their similarity to the trained model's, as layers are randomised.

    Attributes
    ----------
    mode : str
        ``"cascading"`` or ``"independent"``.
    steps : list of str
        Step labels: ``"original"`` then, per step, the layer randomised in that step (``"fc3"``, ...). In
        cascading mode step s has layers ``steps[1..s]`` randomised.
    randomised : list of tuple of str
        The names of all layers randomised at each step (empty for the original).
    heatmaps : torch.Tensor
        (S+1, n, H, W), step 0 the trained model's.
    similarity : dict of str to torch.Tensor
        Per measure of :data:`SIMILARITIES`, (S+1, n): similarity of each step's heatmap to step 0's.
    target : torch.Tensor
        (n,) the class explained, the same at every step.
    """

    mode: str
    steps: list[str]
    randomised: list[tuple[str, ...]]
    heatmaps: torch.Tensor
    similarity: dict[str, torch.Tensor] = field(default_factory=dict)
    target: torch.Tensor | None = None

    def mean(self, measure: str = "spearman_abs") -> torch.Tensor:
        """(S+1,) mean similarity over images per step; maps with no rank order (constant, Spearman NaN) are
        left out, and a step where every map is constant gives NaN."""
        if measure not in self.similarity:
            raise ValueError(f"unknown measure {measure!r}; expected one of {tuple(self.similarity)}")
        return self.similarity[measure].nanmean(1)


def model_randomisation(model: nn.Module, images: torch.Tensor, explain: Explainer, target=None, *,
                        mode: str = "cascading", layers=None, seed: int = 0,
                        input_shape: tuple[int, ...] | None = None) -> RandomisationResult:
    """Adebayo et al.'s model parameter randomisation test, on copies of ``model``.

    Parameters
    ----------
    model : torch.nn.Module
        The trained model; left exactly as it came (every step works on a deep copy).
    images : torch.Tensor
        (n, C, H, W) floats.
    explain : callable
        ``explain(model, images, target) -> (n, H, W)`` heatmaps; called once per step with the whole batch.
    target : None, int or LongTensor (n,)
        The class to explain at every step; None: the class the *trained* model predicts (kept fixed as the
        layers are randomised, so that only the weights change).
    mode : {"cascading", "independent"}
        Cascading: randomise from the top down, cumulatively. Independent: one layer at a time.
    layers : list, optional
        The layers to randomise, in the order to randomise them; default: every layer with parameters, from
        the last (the logits) to the first.
    seed : int
        Seeds the re-initialisation (per layer).

    Returns
    -------
    RandomisationResult

    Raises
    ------
    ValueError
        A layer in ``layers`` without parameters (a ReLU, a pool): the message lists those that have some;
        images of the wrong shape, with NaN/Inf or on another device than the model.
    TypeError
        Images of another dtype than the model's, an explainer that is not callable.

    Examples
    --------
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 12 * 12, 3))
    >>> def gradient(model, x, target):
    ...     x = x.clone().requires_grad_(True)
    ...     model(x).gather(1, target[:, None]).sum().backward()
    ...     return x.grad[:, 0]
    >>> result = model_randomisation(net, torch.rand(4, 1, 12, 12), gradient, input_shape=(1, 12, 12))
    >>> result.steps, tuple(result.heatmaps.shape)
    (['original', '3', '0'], (3, 4, 12, 12))
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if not callable(explain):
        raise TypeError(f"explain must be a callable explain(model, images, target), got {type(explain).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    images = check_images(images, input_shape if input_shape is not None else model, model=model)
    table = layer_table(model, input_shape)
    if layers is None:
        chosen = [layer for layer in reversed(table) if _has_parameters(layer)]
    else:
        chosen = _randomisable(table, layers)
    if not chosen:
        raise ValueError("the model has no layer with parameters to randomise")

    target = target_classes(model, images, target)
    n = images.shape[0]
    if target.shape != (n,):
        raise ValueError(f"target must give one class per image ({n}), got shape {tuple(target.shape)}")

    def run(net: nn.Module) -> torch.Tensor:
        maps = explain(net, images, target)
        if not isinstance(maps, torch.Tensor):
            raise TypeError(f"the explainer must return a torch.Tensor, got {type(maps).__name__}")
        maps = maps.detach().float().cpu()
        if maps.ndim == 4 and maps.shape[1] == 1:
            maps = maps[:, 0]
        if maps.shape != (n, *images.shape[-2:]):
            raise ValueError(f"the explainer must return (n, H, W) = {(n, *images.shape[-2:])}, "
                             f"got {tuple(maps.shape)}")
        return maps

    # the explainer sees a copy even for the trained model, so that it cannot change the user's model
    with preserved(model):
        maps = [run(copy.deepcopy(model))]
    randomised: list[tuple[str, ...]] = [()]
    cascade = copy.deepcopy(model)
    modules = dict(cascade.named_modules())
    for layer in progress(chosen, desc=f"{mode} randomisation"):
        generator = torch.Generator().manual_seed(_layer_seed(seed, layer))
        if mode == "cascading":
            _reinitialise(modules[layer.module_name], generator)
            names = randomised[-1] + (layer.name,)
            maps.append(run(copy.deepcopy(cascade)))
        else:
            single = copy.deepcopy(model)
            _reinitialise(dict(single.named_modules())[layer.module_name], generator)
            names = (layer.name,)
            maps.append(run(single))
        randomised.append(names)
    stacked = torch.stack(maps)
    scores = [similarities(stacked[0], stacked[s]) for s in range(stacked.shape[0])]
    similarity = {m: torch.stack([sc[m] for sc in scores]) for m in SIMILARITIES}
    return RandomisationResult(mode, ["original"] + [layer.name for layer in chosen], randomised, stacked,
                               similarity, target)
