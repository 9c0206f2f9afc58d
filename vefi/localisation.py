"""How well does a heatmap find the discriminative part? IoU with an8Flower's ground truth (Sec. 4.3, Fig. 8-9).

an8Flower knows, for every image, which pixels decide its class (the mask of the part that carries the class
colour). A heatmap, normalised to [0, 1] per image, is thresholded at ``t``: the pixels with value ``>= t``
form the explanation's region ``E_t``. Its agreement with the ground-truth mask ``G`` is the intersection over
union ``IoU_t = |E_t & G| / |E_t | G|``. Sweeping ``t`` over [0, 1] gives a curve per image (the paper's
Fig. 8). We summarise it three ways:

* **mean IoU**: the mean of ``IoU_t`` over the images and over the thresholds of an evenly spaced grid
  (by default 21 thresholds 0, 0.05, ..., 1). The paper's Sec. 4.3 measures IoU "at different thresholds" and
  reports one mean IoU per method (Fig. 9) without a single chosen threshold, so we average over the
  thresholds as well as the images.
* **area under the curve**: the trapezoidal area under the image-averaged curve over ``t`` in [0, 1]; on an
  even grid it differs from the mean IoU only by the half weight of the two end points.
* **best IoU**: the largest value of the image-averaged curve (the threshold a user would pick in hindsight).

At ``t = 0`` every pixel is kept, so every method scores the fraction of the image that the mask covers;
at ``t = 1`` only the maximum pixels are kept. Two empty sets count as IoU 1.

Examples
--------
>>> import torch
>>> h = torch.tensor([[[0.0, 0.5], [1.0, 0.2]]])
>>> g = torch.tensor([[[False, True], [True, False]]])
>>> iou_curve(h, g, [0.0, 0.5, 1.0]).tolist()
[[0.5, 1.0, 0.5]]
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from vefi._progress import progress
from vefi._tensors import all_finite
from vefi.targets import resolve_target

__all__ = ["THRESHOLDS", "area_under_curve", "iou_curve", "method_heatmaps"]


#: The default thresholds: 0 to 1 in steps of 0.05.
THRESHOLDS = np.round(np.linspace(0.0, 1.0, 21), 10)


def _as_heatmaps(heatmaps) -> torch.Tensor:
    h = torch.as_tensor(heatmaps)
    if h.dim() == 2:
        h = h.unsqueeze(0)
    if h.dim() != 3:
        raise ValueError(f"heatmaps must have shape (n, H, W) or (H, W), got {tuple(h.shape)}")
    if not h.is_floating_point():
        h = h.float()
    if not all_finite(h):
        raise ValueError("heatmaps contain NaN or Inf values")
    return h


def iou_curve(heatmaps, masks, thresholds: Sequence[float] = THRESHOLDS, *, normalise: bool = True
              ) -> np.ndarray:
    """IoU of each thresholded heatmap with its ground-truth mask, at every threshold.

    Parameters
    ----------
    heatmaps : Tensor or array, shape (n, H, W) or (H, W)
        Any real maps; higher = more evidence.
    masks : Tensor or array of bool, same shape
        Ground-truth regions.
    thresholds : sequence of float
        Thresholds in [0, 1]; a pixel is in the explanation when its normalised value is ``>= t``.
    normalise : bool
        Min-max normalise each heatmap to [0, 1] first (a constant map becomes all zeros). Turn off only for
        maps already in [0, 1].

    Returns
    -------
    numpy.ndarray, shape (n, len(thresholds))

    Examples
    --------
    >>> iou_curve(np.eye(3), np.eye(3, dtype=bool), [0.0, 0.5]).round(3).tolist()
    [[0.333, 1.0]]
    """
    h = _as_heatmaps(heatmaps)
    g = torch.as_tensor(masks)
    if g.dim() == 2:
        g = g.unsqueeze(0)
    if g.dtype != torch.bool:
        raise TypeError(f"masks must be boolean, got dtype {g.dtype}")
    if g.shape != h.shape:
        raise ValueError(f"masks must have the heatmaps' shape {tuple(h.shape)}, got {tuple(g.shape)}")
    t = torch.as_tensor(np.asarray(thresholds, dtype=np.float64)).reshape(-1)
    if t.numel() == 0 or not all_finite(t) or t.min() < 0 or t.max() > 1:
        raise ValueError(f"thresholds must be a non-empty sequence in [0, 1], got {np.asarray(thresholds)}")
    if normalise:
        from vefi.heatmaps import normalise as _normalise
        h = _normalise(h)
    h = h.double().flatten(1)
    g = g.flatten(1)
    # (n, T, P) at once: the images are small and T is ~20.
    region = h.unsqueeze(1) >= t.view(1, -1, 1)
    inter = (region & g.unsqueeze(1)).sum(-1)
    union = (region | g.unsqueeze(1)).sum(-1)
    iou = torch.where(union > 0, inter.double() / union.clamp_min(1).double(), torch.ones_like(inter.double()))
    return iou.numpy()


def area_under_curve(curve, thresholds: Sequence[float] = THRESHOLDS) -> float:
    """Trapezoidal area under an IoU curve (values at ``thresholds``, sorted ascending).

    Examples
    --------
    >>> area_under_curve([0.0, 1.0, 0.0], [0.0, 0.5, 1.0])
    0.5
    """
    curve = np.asarray(curve, dtype=float).reshape(-1)
    t = np.asarray(thresholds, dtype=float).reshape(-1)
    if curve.shape != t.shape:
        raise ValueError(f"curve has {curve.size} values but there are {t.size} thresholds")
    if t.size < 2 or np.any(np.diff(t) <= 0):
        raise ValueError("thresholds must be at least two, strictly increasing")
    return float(np.sum((curve[1:] + curve[:-1]) * np.diff(t)) / 2)


def method_heatmaps(method: str, model, images: torch.Tensor, target=None, *, images_per_call: int = 50,
                    desc: str | None = None, **options) -> torch.Tensor:
    """:func:`vefi.heatmaps.compute` over a large set of images, ``images_per_call`` images at a time (bounded
    memory). ``options`` go to the method, ``batch_size`` among them (inputs per pass, as everywhere: the
    method's occluded or perturbed copies count); ``images_per_call`` is the number of images of one call.

    Examples
    --------
    >>> from vefi.book.models import build_model
    >>> _ = torch.manual_seed(0)
    >>> method_heatmaps("random", build_model("mnist"), torch.rand(5, 1, 28, 28), images_per_call=2).shape
    torch.Size([5, 28, 28])
    """
    from vefi.heatmaps import compute

    if int(images_per_call) < 1:
        raise ValueError(f"images_per_call must be >= 1, got {images_per_call}")
    n = images.shape[0]
    # checked once, for all the images, before any chunk runs (the method checks the range)
    target_all = None if target is None else resolve_target(target, n=n)
    chunks = []
    for start in progress(range(0, n, int(images_per_call)), desc=desc or method):
        stop = min(n, start + int(images_per_call))
        t = None if target_all is None else target_all[start:stop]
        opts = dict(options)
        if method == "random":  # a different draw per chunk, still seeded
            opts["seed"] = int(opts.get("seed", 0)) * 1_000_003 + start
        chunks.append(compute(method, model, images[start:stop], t, **opts))
    return torch.cat(chunks)
