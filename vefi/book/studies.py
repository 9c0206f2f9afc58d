"""The book's cached studies: the paper's evaluations (Sec. 4) on the book's trained networks.

Each study takes a dataset name, loads the book's network and test set, measures with the general metrics
(:mod:`vefi.ablation`, :mod:`vefi.localisation`, :mod:`vefi.boxocclusion`) and caches the result under
``data/results``, keyed by the model's weights and every parameter. The paper's own numbers, for comparison,
are here too.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from vefi.ablation import ablation_accuracy, feature_strength, mean_class_accuracy, random_like, subsample
from vefi.book._cache import check_arrays, code_hash, load_arrays, save_arrays
from vefi.book.config import data_dir, quick_mode
from vefi.book.data import load_dataset
from vefi.boxocclusion import box_masks, confidence_drop, occlude
from vefi.localisation import THRESHOLDS, area_under_curve, iou_curve, method_heatmaps

__all__ = ["BOOK_DRAWS", "BOOK_IMAGES", "PAPER_DROP_DIFFERENCE", "PAPER_FEATURE_COUNTS", "PAPER_MEAN_IOU",
           "AblationCurve", "AblationResult", "LocalisationResult", "OcclusionResult", "ablation_curve",
           "ablation_study", "book_images", "book_options", "box_occlusion_study", "localisation_study"]



#: Features mu-Lasso selected at mu=10 in the paper (Fig. 4 of Oramas et al. 2019), All | OnlyConv, for its
#: Sec. 4.1 datasets, in the order the text lists them (which pair belongs to which dataset follows Fig. 4's panel
#: order, which the text does not spell out). The paper gives no count for an8Flower; of these datasets the book
#: has MNIST only (Fashion-MNIST is not Fashion144k).
PAPER_FEATURE_COUNTS = {
    "MNIST": (92, 101),
    "Fashion144k": (46, 28),
    "ImageNet": (104, 111),
    "ImageNet-cats": (248, 180),
}


#: Mean IoU of the paper's Fig. 9 (an8Flower single-6c, double-12c).
PAPER_MEAN_IOU = {
    "upsampled-activations": {"an8flower-single": 0.15, "an8flower-double": 0.19},
    "deconv-gb": {"an8flower-single": 0.22, "an8flower-double": 0.20},
    "ours": {"an8flower-single": 0.23, "an8flower-double": 0.21},
}


#: The paper (Sec. 4.2): the mean confidence drop of its method and of Deconv+GB differ by about 2%.
PAPER_DROP_DIFFERENCE = 0.02


#: Test images the book measures on (a seeded subset), per study and dataset family: (full mode, quick mode).
#: Heatmap studies are costlier per image than ablation (one backward pass per image and method).
BOOK_IMAGES = {
    "ablation": {"mnist": (2000, 300), "an8flower": (600, 60)},
    "heatmaps": {"mnist": (300, 40), "an8flower": (120, 24)},
}


#: Random draws per random control of the ablation study: (full mode, quick mode).
BOOK_DRAWS = (30, 10)


def book_images(name: str, study: str) -> int:
    """Number of test images the book's chapters use for ``study`` ("ablation" or "heatmaps") on dataset
    ``name``, in the current mode (see :data:`BOOK_IMAGES`).

    Examples
    --------
    >>> book_images("fashion-mnist", "ablation") in (2000, 500)
    True
    """
    if study not in BOOK_IMAGES:
        raise ValueError(f"study must be one of {sorted(BOOK_IMAGES)}, got {study!r}")
    family = "an8flower" if name.startswith("an8flower") else "mnist"
    return BOOK_IMAGES[study][family][1 if quick_mode() else 0]


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


def _test_subset(name: str, study: str, n_images, seed: int):
    """The test set of ``name`` and the seeded subset of it a study measures on: ``n_images`` rows ("book":
    :func:`book_images` for ``study``; None: all)."""
    data = load_dataset(name, "test")
    if n_images == "book":
        n_images = book_images(name, study)
    return data, subsample(len(data), n_images, seed)


def _key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------------------
# Ablation (Sec. 4.1, Fig. 4)


@dataclass
class AblationResult:
    """Mean class accuracies of one network under ablation (what :func:`ablation_study` returns).

    Attributes
    ----------
    dataset : str
    mu : float
    n_images : int
        Test images measured on.
    n_all, n_onlyconv : int
        Features selected from every layer / from the convolutional part.
    candidates_all, candidates_onlyconv : int
        Features they were selected from (the descriptor's length, All / OnlyConv).
    original : float
        The intact network.
    all, onlyconv : float
        The selected features ablated.
    random_all, random_onlyconv : numpy.ndarray, shape (n_random,)
        As many random features from the same layers, one value per seeded draw.
    counts_all, counts_onlyconv : dict
        Selected features per layer (``"7 conv"`` -> count).
    labels : numpy.ndarray of int, shape (n_images,)
        True classes of the images measured on.
    predicted : numpy.ndarray of int, shape (3, n_images)
        Predicted classes of the intact network, with "All" ablated and with "OnlyConv" ablated, for paired
        comparisons over the images (:meth:`bootstrap_difference`).
    network : int
        Seed of the trained network (:data:`vefi.book.train.NETWORK_SEEDS`).
    seconds : float
        Time the measurement took when it was computed (also when this result came from the cache).
    cached : bool
        Whether this result was read from the disk cache.
    """

    dataset: str
    mu: float
    n_images: int
    n_all: int
    n_onlyconv: int
    original: float
    all: float
    onlyconv: float
    random_all: np.ndarray
    random_onlyconv: np.ndarray
    labels: np.ndarray
    predicted: np.ndarray
    network: int = 0
    counts_all: dict = field(default_factory=dict)
    counts_onlyconv: dict = field(default_factory=dict)
    candidates_all: int = 0
    candidates_onlyconv: int = 0
    seconds: float = 0.0
    cached: bool = False

    def random_share_below(self, which: str = "all") -> float:
        """The fraction of the random draws whose ablation leaves an accuracy at or below the selected one's
        (``which``: "all" or "onlyconv"): the selected ablation's percentile in the random distribution."""
        value, draws = (self.all, self.random_all) if which == "all" else (self.onlyconv, self.random_onlyconv)
        return float(np.mean(draws <= value))

    def bootstrap_difference(self, a: int = 1, b: int = 2, n_boot: int = 2000, seed: int = 0
                             ) -> tuple[float, float, float]:
        """Mean class accuracy of configuration ``a`` minus that of ``b`` (0 intact, 1 All, 2 OnlyConv), with a
        95% percentile-bootstrap interval over the images (resampled together for both: a paired
        comparison): ``(difference, low, high)``."""
        n_classes = int(max(self.labels.max(), self.predicted.max())) + 1
        rng = np.random.default_rng(seed)
        diffs = np.empty(int(n_boot))
        for i in range(int(n_boot)):
            rows = rng.integers(0, len(self.labels), len(self.labels))
            y = self.labels[rows]
            diffs[i] = (mean_class_accuracy(self.predicted[a, rows], y, n_classes)
                        - mean_class_accuracy(self.predicted[b, rows], y, n_classes))
        point = (mean_class_accuracy(self.predicted[a], self.labels, n_classes)
                 - mean_class_accuracy(self.predicted[b], self.labels, n_classes))
        low, high = np.percentile(diffs, [2.5, 97.5])
        return float(point), float(low), float(high)


def _curve_points(n_features: int, n_points: int) -> np.ndarray:
    """``n_points`` numbers of features from 0 to ``n_features``, denser at the start (geometric)."""
    if n_features == 0:
        return np.array([0])
    inner = np.unique(np.round(np.geomspace(1, n_features, max(2, n_points - 1))).astype(int))
    return np.unique(np.concatenate([[0], inner, [n_features]]))


def ablation_study(name: str, *, mu: float = 10.0, network: int = 0, architecture: str | None = None,
                   squared: bool = False, n_images: int | str | None = "book", n_random: int | str = "book",
                   seed: int = 0, max_rows: int = 4096, use_cache: bool = True) -> AblationResult:
    """The paper's ablation (Fig. 4) for the book's network of dataset ``name``, cached on disk.

    Measures the mean class accuracy on (a seeded subset of) the test set of: the intact network; the
    network with the mu-Lasso features of every layer ablated ("All") and of the convolutional part only
    ("OnlyConv"); and ``n_random`` seeded draws of as many random features from the same layers. The curve of
    accuracy against the number of ablated features is :func:`ablation_curve`.

    Parameters
    ----------
    name : str
        A dataset of :data:`vefi.book.data.DATASETS`.
    mu : float
        L1 budget of the selection (the paper: 10).
    n_images : int, "book" or None
        Test images to measure on (a seeded random subset); "book" (default): :func:`book_images`; None: all.
    network : int
        Seed of the book's trained network (:data:`vefi.book.train.NETWORK_SEEDS`).
    architecture : str, optional
        Another architecture of :data:`vefi.book.models.ARCHITECTURES` (default the book's net for ``name``).
    squared : bool
        Select on the authors' demo's descriptor (squared L2 norms) instead of the paper's.
    n_random : int or "book"
        Random draws per random control (seeds ``seed, seed + 1, ...``): enough to place the selected ablation
        as a percentile of the random distribution. "book" (default): :data:`BOOK_DRAWS` (30; fewer in quick
        mode, which only checks that the pages run).
    seed : int
        Seeds the test subset and the random draws.
    max_rows : int
        Images x configurations per forward pass.
    use_cache : bool
        Read and write the result under ``data/results`` (keyed by the model's weights and every parameter).

    Examples
    --------
    >>> result = ablation_study("mnist", n_images=2000)  # doctest: +SKIP
    >>> result.original, result.all, result.random_all.mean()  # doctest: +SKIP
    """
    from vefi.relevant import model_fingerprint
    from vefi.book.relevant import relevant_features

    if n_random == "book":
        n_random = BOOK_DRAWS[1 if quick_mode() else 0]
    if int(n_random) < 1:
        raise ValueError(f"n_random must be >= 1, got {n_random}")
    rel_all = relevant_features(name, mu, network=network, architecture=architecture, squared=squared)
    rel_conv = relevant_features(name, mu, only_conv=True, network=network, architecture=architecture,
                                 squared=squared)
    model = rel_all.model
    data, idx = _test_subset(name, "ablation", n_images, seed)
    params = {"what": "ablation", "dataset": name, "model": model_fingerprint(model),
              "code": code_hash("vefi.book.studies"), "squared": bool(squared), "mu": float(mu),
              "n_test": len(data), "n_images": len(idx), "n_random": int(n_random), "seed": int(seed)}
    path = data_dir() / "results" / f"ablation-{name}-{_key(params)}.npz"
    counts_all = rel_all.index.count_per_layer(rel_all.selector.get_support())
    counts_conv = rel_conv.index.count_per_layer(rel_conv.selector.get_support())
    n = len(idx)
    scalar = (np.float64, ())
    spec = {"n_all": (np.int64, ()), "n_onlyconv": (np.int64, ()), "original": scalar, "all": scalar,
            "onlyconv": scalar, "random_all": (np.float64, (int(n_random),)),
            "random_onlyconv": (np.float64, (int(n_random),)), "labels": (np.int64, (n,)),
            "predicted": (np.int64, (3, n)), "seconds": scalar}
    stored = load_arrays(path, lambda arrays: check_arrays(arrays, spec)) if use_cache else None
    if stored is not None:
        return AblationResult(name, float(mu), n, int(stored["n_all"]), int(stored["n_onlyconv"]),
                              float(stored["original"]), float(stored["all"]), float(stored["onlyconv"]),
                              stored["random_all"], stored["random_onlyconv"], stored["labels"],
                              stored["predicted"], int(network), counts_all, counts_conv, len(rel_all.index),
                              len(rel_conv.index), float(stored["seconds"]), True)

    start = time.perf_counter()
    sel_all, sel_conv = rel_all.features, rel_conv.features
    seeds = [int(seed) + r for r in range(int(n_random))]
    configs = [[], sel_all, sel_conv]
    configs += [random_like(sel_all, rel_all.index, s) for s in seeds]
    configs += [random_like(sel_conv, rel_conv.index, s) for s in seeds]
    labels = data.labels[idx].numpy().astype(np.int64)
    acc, predicted = ablation_accuracy(model, data.batch(torch.from_numpy(idx)), labels, configs,
                                       n_classes=len(data.classes), max_rows=max_rows, desc=f"ablation {name}",
                                       return_predictions=True)
    r = len(seeds)
    random_all, random_conv = acc[3:3 + r], acc[3 + r:3 + 2 * r]
    seconds = time.perf_counter() - start
    arrays = dict(n_all=np.array(len(sel_all)), n_onlyconv=np.array(len(sel_conv)), original=np.array(acc[0]),
                  all=np.array(acc[1]), onlyconv=np.array(acc[2]), random_all=random_all,
                  random_onlyconv=random_conv, labels=labels, predicted=predicted[:3], seconds=np.array(seconds))
    if use_cache:
        save_arrays(path, **arrays)
    return AblationResult(name, float(mu), n, len(sel_all), len(sel_conv), float(acc[0]), float(acc[1]),
                          float(acc[2]), random_all, random_conv, labels, predicted[:3], int(network), counts_all,
                          counts_conv, len(rel_all.index), len(rel_conv.index), seconds, False)


@dataclass
class AblationCurve:
    """Mean class accuracy against the number of ablated features (what :func:`ablation_curve` returns).

    Attributes
    ----------
    dataset : str
    mu : float
    n_images : int
    k : numpy.ndarray of int
        Numbers of ablated features: the strongest ``k`` of the All selection.
    selected : numpy.ndarray, shape (len(k),)
        With the strongest ``k`` selected features ablated.
    random : numpy.ndarray, shape (len(k), n_random)
        With as many random features from the same layers as those ``k``, one column per draw.
    seconds : float
    cached : bool
    """

    dataset: str
    mu: float
    n_images: int
    k: np.ndarray
    selected: np.ndarray
    random: np.ndarray
    seconds: float = 0.0
    cached: bool = False


def ablation_curve(name: str, *, mu: float = 10.0, network: int = 0, n_images: int | str | None = "book",
                   n_points: int = 7, n_random: int = 5, seed: int = 0, max_rows: int = 4096,
                   use_cache: bool = True) -> AblationCurve:
    """The strongest ``k`` features of the All selection (by :func:`feature_strength`) ablated, for about
    ``n_points`` values of ``k`` from 0 to all of them, beside ``n_random`` draws of random features from the
    same layers as those ``k``; on the test images of :func:`ablation_study`, cached on disk the same way.

    Examples
    --------
    >>> curve = ablation_curve("mnist")  # doctest: +SKIP
    >>> curve.k, curve.selected  # doctest: +SKIP
    """
    from vefi.book.relevant import relevant_features
    from vefi.relevant import model_fingerprint

    if int(n_random) < 1 or int(n_points) < 1:
        raise ValueError(f"n_points and n_random must be >= 1, got {n_points} and {n_random}")
    rel = relevant_features(name, mu, network=network)
    model = rel.model
    data, idx = _test_subset(name, "ablation", n_images, seed)
    params = {"what": "ablation-curve", "dataset": name, "model": model_fingerprint(model),
              "code": code_hash("vefi.book.studies"), "mu": float(mu), "n_test": len(data), "n_images": len(idx),
              "n_points": int(n_points), "n_random": int(n_random), "seed": int(seed)}
    path = data_dir() / "results" / f"ablation-curve-{name}-{_key(params)}.npz"
    spec = {"k": (np.int64, ("k",)), "selected": (np.float64, ("k",)),
            "random": (np.float64, ("k", int(n_random))), "seconds": (np.float64, ())}
    stored = load_arrays(path, lambda arrays: check_arrays(arrays, spec)) if use_cache else None
    if stored is not None:
        return AblationCurve(name, float(mu), len(idx), stored["k"], stored["selected"], stored["random"],
                             float(stored["seconds"]), True)
    start = time.perf_counter()
    strength = feature_strength(rel.selector.coef_)
    support = np.flatnonzero(rel.selector.get_support())
    ordered = [rel.index[j] for j in support[np.argsort(-strength[support], kind="stable")]]
    ks = _curve_points(len(ordered), n_points)
    configs = []
    for k in ks:
        configs.append(ordered[:k])
        configs += [random_like(ordered[:k], rel.index, 1000 * (int(k) + 1) + int(seed) + r)
                    for r in range(int(n_random))]
    labels = data.labels[idx].numpy().astype(np.int64)
    acc = ablation_accuracy(model, data.batch(torch.from_numpy(idx)), labels, configs,
                            n_classes=len(data.classes), max_rows=max_rows, desc=f"ablation curve {name}")
    curve = np.asarray(acc).reshape(len(ks), 1 + int(n_random))
    seconds = time.perf_counter() - start
    if use_cache:
        save_arrays(path, k=ks.astype(np.int64), selected=curve[:, 0], random=curve[:, 1:],
                    seconds=np.array(seconds))
    return AblationCurve(name, float(mu), len(idx), ks.astype(np.int64), curve[:, 0], curve[:, 1:], seconds,
                         False)


# ------------------------------------------------------------------------------------------------------------
# Localisation on an8Flower (Sec. 4.3, Fig. 8-9) and box occlusion (Sec. 4.2)


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
    network: int = 0

    def heatmaps(self, name: str, method: str, mu: float, images, target, images_per_call: int):
        from vefi.book.relevant import relevant_features

        options = dict(self.options)
        if self.uses_mu:
            options["relevant"] = relevant_features(name, mu, network=self.network)
        return method_heatmaps(method, self.model, images, target, images_per_call=images_per_call,
                               desc=f"{method} {name}", **options)


def _study(what: str, prefix: str, name: str, method: str, mu: float, n_images, seed: int, options: dict,
           network: int = 0, **params) -> _Study:
    """Set up a study: model, subset, options, and a cache path keyed by the weights, the code and every
    parameter."""
    from vefi.book.train import pretrained
    from vefi.relevant import model_fingerprint

    options = {**book_options(method, name), **options}
    model = pretrained(name, network)
    data, idx = _test_subset(name, "heatmaps", n_images, seed)
    uses_mu = method in _NEEDS_RELEVANT
    if method == "random":
        options.setdefault("seed", seed)
    params = {"what": what, "code": code_hash("vefi.book.studies"), "dataset": name, "method": method,
              "model": model_fingerprint(model), "mu": float(mu) if uses_mu else None, "n_test": len(data),
              "n_images": len(idx), "seed": int(seed),
              "options": {k: repr(v) for k, v in sorted(options.items())}, **params}
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    return _Study(model, data, idx, options, uses_mu,
                  data_dir() / "results" / f"{prefix}-{name}-{method}-{key}.npz", int(network))


def localisation_study(name: str, method: str, *, mu: float = 10.0, network: int = 0,
                       n_images: int | str | None = "book", seed: int = 0, target: str = "label", thresholds: Sequence[float] = THRESHOLDS, images_per_call: int = 50,
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
    network : int
        Seed of the book's trained network (:data:`vefi.book.train.NETWORK_SEEDS`).
    n_images : int, optional
        A seeded random subset of the test set; "book" (default): :func:`vefi.book.studies.book_images`; None: all.
    seed : int
        Seeds the subset (and the ``random`` control).
    target : {"label", "predicted"}
        Explain the true class (whose discriminative part the mask is; default) or the predicted one.
    thresholds : sequence of float
    images_per_call : int
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
    study = _study("localisation", "iou", name, method, mu, n_images, seed, options, network, target=target,
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
    h = study.heatmaps(name, method, mu, images, labels, images_per_call)
    iou = iou_curve(h, masks, thresholds)
    seconds = time.perf_counter() - start
    if use_cache:
        save_arrays(study.path, iou=iou, seconds=np.array(seconds))
    return LocalisationResult(name, method, float(mu) if uses_mu else None, thresholds, iou, len(idx), seconds,
                              False)


@dataclass
class OcclusionResult:
    """Confidence drops under heatmap-guided box occlusion (what :func:`box_occlusion_study` returns).

    Attributes
    ----------
    dataset, method : str
    confidence : numpy.ndarray (n,)
        Softmax confidence of the predicted class on the intact images.
    drop : numpy.ndarray (r, n)
        Confidence drop per sampler draw and image.
    coverage : numpy.ndarray (r, n)
        Fraction of each image actually occluded.
    n_images : int
    seconds : float
    cached : bool
    """

    dataset: str
    method: str
    confidence: np.ndarray
    drop: np.ndarray
    coverage: np.ndarray
    n_images: int
    seconds: float
    cached: bool

    @property
    def mean_drop(self) -> float:
        return float(self.drop.mean())

    @property
    def sem(self) -> float:
        """Standard error of the mean drop over images (each image's drop averaged over the draws)."""
        per_image = self.drop.mean(0)
        return float(per_image.std(ddof=1) / np.sqrt(len(per_image))) if len(per_image) > 1 else float("nan")


def box_occlusion_study(name: str, method: str, *, mu: float = 10.0, network: int = 0,
                        n_images: int | str | None = "book",
                        n_draws: int = 3, coverage: float = 0.3, box: int | None = None, baseline="mean",
                        seed: int = 0, images_per_call: int = 50, use_cache: bool = True, **options
                        ) -> OcclusionResult:
    """Mean confidence drop when boxes sampled from ``method``'s heatmaps occlude ``coverage`` of each image.

    The heatmaps explain the class the network predicts on the intact image; the drop is measured for that
    class. Cached under ``data/results`` (keyed by the model's weights and every parameter).

    Parameters
    ----------
    name : str
        A dataset of :data:`vefi.book.data.DATASETS`.
    method : str
        A method of :data:`vefi.heatmaps.METHODS` (``ours``, ``deconv-gb`` and ``upsampled-activations``
        use the features selected at ``mu``).
    network : int
        Seed of the book's trained network (:data:`vefi.book.train.NETWORK_SEEDS`).
    n_images : int, optional
        A seeded random subset of the test set; "book" (default): :func:`vefi.book.studies.book_images`; None: all.
    n_draws : int
        Sampler draws per image (the drop is averaged over them).
    coverage, box, baseline
        See :func:`box_masks` and :func:`occlude`.
    seed : int
    images_per_call : int
        Images per heatmap call.

    Examples
    --------
    >>> box_occlusion_study("mnist", "ours").mean_drop  # doctest: +SKIP
    """
    if int(n_draws) < 1:
        raise ValueError(f"n_draws must be >= 1, got {n_draws}")
    study = _study("boxocclusion", "boxocc", name, method, mu, n_images, seed, options, network,
                   n_draws=int(n_draws),
                   coverage=float(coverage), box=box, baseline=repr(baseline))
    idx = study.idx
    n = len(idx)
    spec = {"confidence": (np.float32, (n,)), "drop": (np.float32, (int(n_draws), n)),
            "coverage": (np.float32, (int(n_draws), n)), "seconds": (np.float64, ())}
    stored = load_arrays(study.path, lambda arrays: check_arrays(arrays, spec)) if use_cache else None
    if stored is not None:
        return OcclusionResult(name, method, stored["confidence"], stored["drop"], stored["coverage"], len(idx),
                               float(stored["seconds"]), True)
    start = time.perf_counter()
    images = study.data.batch(torch.from_numpy(idx))
    model = study.model
    h = study.heatmaps(name, method, mu, images, None, images_per_call)
    masks = torch.cat([box_masks(h, coverage=coverage, box=box, seed=seed * 7919 + r) for r in range(n_draws)])
    occluded = occlude(images.repeat(n_draws, 1, 1, 1), masks, baseline)
    confidence, drop = confidence_drop(model, images, occluded)
    cover = masks.float().mean((1, 2)).view(n_draws, -1).numpy()
    seconds = time.perf_counter() - start
    if use_cache:
        save_arrays(study.path, confidence=confidence, drop=drop, coverage=cover, seconds=np.array(seconds))
    return OcclusionResult(name, method, confidence, drop, cover, len(idx), seconds, False)

