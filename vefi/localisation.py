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

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from vefi._cache import check_arrays, load_arrays, save_arrays
from vefi._progress import progress
from vefi.config import data_dir
from vefi.data import load_dataset

__all__ = ["PAPER_MEAN_IOU", "THRESHOLDS", "LocalisationResult", "area_under_curve", "book_options", "iou_curve",
           "localisation_study", "method_heatmaps"]

#: Mean IoU of the paper's Fig. 9 (an8Flower single-6c, double-12c).
PAPER_MEAN_IOU = {
    "upsampled-activations": {"an8flower-single": 0.15, "an8flower-double": 0.19},
    "deconv-gb": {"an8flower-single": 0.22, "an8flower-double": 0.20},
    "ours": {"an8flower-single": 0.23, "an8flower-double": 0.21},
}

#: The default thresholds: 0 to 1 in steps of 0.05.
THRESHOLDS = np.round(np.linspace(0.0, 1.0, 21), 10)

_RESULT_VERSION = 1


def _as_heatmaps(heatmaps) -> torch.Tensor:
    h = torch.as_tensor(heatmaps)
    if h.dim() == 2:
        h = h.unsqueeze(0)
    if h.dim() != 3:
        raise ValueError(f"heatmaps must have shape (n, H, W) or (H, W), got {tuple(h.shape)}")
    if not h.is_floating_point():
        h = h.float()
    if not torch.isfinite(h).all():
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
    if t.numel() == 0 or not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1:
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


def book_options(method: str, name: str) -> dict:
    """Options the book passes to a heatmap method on dataset ``name``: for occlusion on 112x112 an8Flower,
    a 16-pixel window moved by 16 (49 occluded copies per image instead of 729 with the default 8/4).

    Examples
    --------
    >>> book_options("occlusion", "an8flower-single")
    {'window': 16, 'stride': 16}
    """
    if method == "occlusion" and name.startswith("an8flower"):
        return {"window": 16, "stride": 16}
    return {}


def method_heatmaps(method: str, model, images: torch.Tensor, target=None, *, batch_size: int = 50,
                    desc: str | None = None, **options) -> torch.Tensor:
    """:func:`vefi.heatmaps.compute` over a large set of images, in chunks of ``batch_size`` (bounded memory).

    Examples
    --------
    >>> from vefi.models import build_model
    >>> _ = torch.manual_seed(0)
    >>> method_heatmaps("random", build_model("mnist"), torch.rand(5, 1, 28, 28), batch_size=2).shape
    torch.Size([5, 28, 28])
    """
    from vefi.heatmaps import compute

    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = images.shape[0]
    target_all = None if target is None else torch.as_tensor(target).reshape(-1)
    chunks = []
    for start in progress(range(0, n, int(batch_size)), desc=desc or method):
        stop = min(n, start + int(batch_size))
        t = None if target_all is None else (target_all if target_all.numel() == 1 else target_all[start:stop])
        opts = dict(options)
        if method == "random":  # a different draw per chunk, still seeded
            opts["seed"] = int(opts.get("seed", 0)) * 1_000_003 + start
        chunks.append(compute(method, model, images[start:stop], t, **opts))
    return torch.cat(chunks)


@dataclass
class LocalisationResult:
    """IoU of one heatmap method on an8Flower (what :func:`localisation_study` returns).

    Attributes
    ----------
    dataset, method : str
    mu : float or None
        The selection budget for the paper's three methods, None for the others.
    thresholds : numpy.ndarray (T,)
    iou : numpy.ndarray (n, T)
        Per image and threshold.
    n_images : int
    seconds : float
        Time to compute the heatmaps and IoUs (when first computed).
    cached : bool
    """

    dataset: str
    method: str
    mu: float | None
    thresholds: np.ndarray
    iou: np.ndarray
    n_images: int
    seconds: float
    cached: bool

    @property
    def curve(self) -> np.ndarray:
        """Mean IoU over the images at each threshold, (T,)."""
        return self.iou.mean(0)

    @property
    def mean_iou(self) -> float:
        """Mean over images and thresholds."""
        return float(self.iou.mean())

    @property
    def auc(self) -> float:
        """Area under the image-averaged curve."""
        return area_under_curve(self.curve, self.thresholds)

    @property
    def best_iou(self) -> float:
        """Largest value of the image-averaged curve."""
        return float(self.curve.max())

    @property
    def best_threshold(self) -> float:
        return float(self.thresholds[int(self.curve.argmax())])

    @property
    def sem(self) -> float:
        """Standard error of the mean IoU over images (of the per-image means over thresholds)."""
        per_image = self.iou.mean(1)
        return float(per_image.std(ddof=1) / np.sqrt(len(per_image))) if len(per_image) > 1 else float("nan")


_NEEDS_RELEVANT = ("ours", "deconv-gb", "upsampled-activations")



@dataclass
class _Study:
    """What every cached heatmap study of the book starts from: the trained model, the seeded test subset,
    the method's options, and the cache file its parameters name."""

    model: torch.nn.Module
    data: object
    idx: np.ndarray
    options: dict
    uses_mu: bool
    path: object

    def heatmaps(self, name: str, method: str, mu: float, images, target, batch_size: int):
        from vefi.relevant import relevant_features

        options = dict(self.options)
        if self.uses_mu:
            options["relevant"] = relevant_features(name, mu)
        return method_heatmaps(method, self.model, images, target, batch_size=batch_size,
                               desc=f"{method} {name}", **options)


def _study(what: str, prefix: str, name: str, method: str, mu: float, n_images, seed: int, options: dict,
           **params) -> _Study:
    """Set up a study: model, subset, options, and a cache path keyed by the weights and every parameter."""
    from vefi.ablation import book_images, subsample
    from vefi.relevant import model_fingerprint
    from vefi.train import pretrained

    options = {**book_options(method, name), **options}
    model = pretrained(name)
    data = load_dataset(name, "test")
    if n_images == "book":
        n_images = book_images(name, "heatmaps")
    idx = subsample(len(data), n_images, seed)
    uses_mu = method in _NEEDS_RELEVANT
    if method == "random":
        options.setdefault("seed", seed)
    params = {"what": what, "v": _RESULT_VERSION, "dataset": name, "method": method,
              "model": model_fingerprint(model), "mu": float(mu) if uses_mu else None, "n_test": len(data),
              "n_images": len(idx), "seed": int(seed),
              "options": {k: repr(v) for k, v in sorted(options.items())}, **params}
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    return _Study(model, data, idx, options, uses_mu, data_dir() / "results" / f"{prefix}-{name}-{method}-{key}.npz")

def localisation_study(name: str, method: str, *, mu: float = 10.0, n_images: int | str | None = "book", seed: int = 0,
                       target: str = "label", thresholds: Sequence[float] = THRESHOLDS, batch_size: int = 50,
                       use_cache: bool = True, **options) -> LocalisationResult:
    """IoU curves of ``method``'s heatmaps with the discriminative-part masks of an8Flower's test set, cached.

    Parameters
    ----------
    name : {"an8flower-single", "an8flower-double"}
    method : str
        A method of :data:`vefi.heatmaps.METHODS`.
    mu : float
        Selection budget for ``ours``, ``deconv-gb`` and ``upsampled-activations`` (the same relevant
        features for the three); ignored by the others.
    n_images : int, optional
        A seeded random subset of the test set; "book" (default): :func:`vefi.ablation.book_images`; None: all.
    seed : int
        Seeds the subset (and the ``random`` control).
    target : {"label", "predicted"}
        Explain the true class (whose discriminative part the mask is; default) or the predicted one.
    thresholds : sequence of float
    batch_size : int
        Images per heatmap call.
    use_cache : bool
        Read and write ``data/results`` (keyed by the model's weights and every parameter).
    **options
        Passed to the heatmap method.

    Examples
    --------
    >>> res = localisation_study("an8flower-single", "ours")  # doctest: +SKIP
    >>> res.mean_iou, res.auc  # doctest: +SKIP
    """
    from vefi.heatmaps import METHODS

    if not name.startswith("an8flower"):
        raise ValueError(f"localisation needs ground-truth masks: an8flower-single or an8flower-double, got "
                         f"{name!r}")
    if method not in METHODS:
        raise ValueError(f"unknown heatmap method {method!r}; expected one of {', '.join(METHODS)}")
    if target not in ("label", "predicted"):
        raise ValueError(f"target must be 'label' or 'predicted', got {target!r}")
    thresholds = np.asarray(thresholds, dtype=float)
    study = _study("localisation", "iou", name, method, mu, n_images, seed, options, target=target,
                   thresholds=[round(float(t), 10) for t in thresholds])
    idx, uses_mu = study.idx, study.uses_mu
    spec = {"iou": (np.float64, (len(idx), len(thresholds))), "seconds": (np.float64, ())}
    stored = load_arrays(study.path, lambda arrays: check_arrays(arrays, spec)) if use_cache else None
    if stored is not None:
        return LocalisationResult(name, method, float(mu) if uses_mu else None, thresholds, stored["iou"],
                                  len(idx), float(stored["seconds"]), True)
    start = time.perf_counter()
    rows = torch.from_numpy(idx)
    images, masks = study.data.batch(rows), study.data.masks[rows]
    labels = study.data.labels[rows] if target == "label" else None
    h = study.heatmaps(name, method, mu, images, labels, batch_size)
    iou = iou_curve(h, masks, thresholds)
    seconds = time.perf_counter() - start
    if use_cache:
        save_arrays(study.path, iou=iou, seconds=np.array(seconds))
    return LocalisationResult(name, method, float(mu) if uses_mu else None, thresholds, iou, len(idx), seconds,
                              False)
