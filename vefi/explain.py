"""Explaining a prediction by its relevant features (Sec. 3.2 of the paper).

For an image with descriptor ``x`` (one entry per channel of the layers the selector was fitted on, computed
by :func:`vefi.descriptors.descriptors` with its default settings, exactly like the training descriptors) and
a class ``c`` with mu-Lasso weights ``w_c`` (the row of ``relevant.selector.coef_`` for ``c``), the paper's
*contribution* of feature ``i`` is the weighted response (``score="paper"``, the default)::

    r_i = w_ci * x_i

The authors' released demo divides by the sum of the class's weights, ``x_i * w_ci / sum_j w_cj``
(``score="demo"``). Where ``sum_j w_cj > 0`` that only rescales the scores of the class, so both forms pick
the same features; where it is negative the division flips every sign, and the demo keeps the features that
speak *against* the class.

The explanation keeps the features with a positive contribution, takes the ``k`` largest (the paper: 3), back-projects
each one from its actual activation map (all other channels zero) with guided backprop and the stride fix
(:func:`vefi.backproject.backproject`), min-max normalises each map to [0, 1]
(:func:`vefi.backproject.heatmap`), and combines them by their pixel-wise maximum.

Two baselines of the paper come out of the same function: ``stride_fix=False`` is "Deconv+GB" (guided
backprop without the fix), and ``maps="upsampled"`` replaces back-projection by the features' own activation
maps, upsampled bilinearly to the image ("upsampled activations").

If an image has fewer than ``k`` features with a positive contribution it gets fewer: its feature list is
shorter and the maps of the missing slots are zero (they never win the pixel-wise maximum).
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vefi._model_state import preserved
from vefi.backproject import backproject, heatmap
from vefi.descriptors import Feature, descriptors
from vefi.layers import check_images, check_scores, layer_table, tapped
from vefi.plotting import LAYER_COLOURS, to_display
from vefi.relevant import model_fingerprint
from vefi.targets import class_indices

__all__ = ["MAPS", "SCORES", "Explanation", "explain", "contributions", "check_compatible", "feature_colour",
           "background_share", "background_ratio", "explanation_figure", "upsampled_maps"]

MAPS = ("backproject", "upsampled")


@dataclass
class Explanation:
    """What :func:`explain` returns: for n images, the class explained and its top features with their maps.

    Attributes
    ----------
    images : Tensor (n, C, H, W)
        The images explained.
    target : Tensor (n,)
        The class each explanation is for.
    predicted : Tensor (n,)
        The model's predicted class.
    features : list of n lists of Feature
        The top (at most k) features per image, largest contribution first.
    scores : list of n lists of float
        Their contributions (``w_c * x``, or the demo's ``x * w_c / sum(w_c)``), same order.
    maps : Tensor (n, k, H, W)
        Each feature's map, min-max normalised to [0, 1]; zero where an image has fewer than k features.
    heatmap : Tensor (n, H, W)
        The pixel-wise maximum of ``maps``: the explanation.
    classes : list of str
        Class names (the model's, or numbers).
    first_fc : int or None
        Number of the model's first fully connected layer: features before it count as convolutional.
    method : str
        How the maps were made, for titles (e.g. ``"guided backprop + stride fix"``).
    """

    images: torch.Tensor
    target: torch.Tensor
    predicted: torch.Tensor
    features: list
    scores: list
    maps: torch.Tensor
    heatmap: torch.Tensor
    classes: list = field(default_factory=list)
    first_fc: int | None = None
    method: str = ""

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return (f"Explanation({len(self)} image(s), k={self.maps.shape[1]}, {self.method}; features of image 0: "
                f"{[f.label for f in self.features[0]] if len(self) else []})")

    def is_conv(self, feature: Feature) -> bool:
        """A feature counts as convolutional when its layer comes before the first fully connected layer."""
        return self.first_fc is None or feature.layer_number < self.first_fc

    def class_name(self, c: int) -> str:
        c = int(c)
        return self.classes[c] if 0 <= c < len(self.classes) else str(c)

    def plot(self, i: int = 0, ax=None, *, fig=None, size: float = 1.9):
        """Draw explanation ``i``: the image with its predicted label, the combined map, and one map per
        feature titled with its layer number and type (conv green, fully connected pink, as in the paper).

        Parameters
        ----------
        i : int
            Which image.
        ax : sequence of matplotlib Axes, optional
            At least ``2 + len(features[i])`` axes to draw into, e.g. a row of a larger figure.
        fig : matplotlib Figure, optional
            A figure to draw into (new axes are added); default a new figure.

        Returns
        -------
        matplotlib.figure.Figure
        """
        if not -len(self) <= i < len(self):
            raise IndexError(f"explanation {i} out of range: there are {len(self)}")
        n_panels = 2 + max(len(self.features[i]), 1)
        if ax is None:
            if fig is None:
                fig = plt.figure(figsize=(size * n_panels, size * 1.25))
            ax = fig.subplots(1, n_panels, squeeze=False)[0]
        else:
            ax = np.atleast_1d(ax).ravel()
            fig = ax[0].figure
        _draw_row(list(ax), self, i)
        return fig


def feature_colour(explanation: Explanation, feature: Feature) -> str:
    """The paper's colour of a feature: green for convolutional, pink for fully connected."""
    return LAYER_COLOURS["conv" if explanation.is_conv(feature) else "fc"]


def _draw_row(axes, expl: Explanation, i: int, *, label: str | None = None, show_combined: bool = True) -> None:
    image = to_display(expl.images[i])
    cmap = "gray" if image.ndim == 2 else None
    pred, target = int(expl.predicted[i]), int(expl.target[i])
    title = label if label is not None else f"predicted: {expl.class_name(pred)}"
    if target != pred:
        title += f"\nexplained: {expl.class_name(target)}"
    axes[0].imshow(image, cmap=cmap, vmin=0, vmax=1)
    axes[0].set_title(title, fontsize=8)
    panels = list(axes[1:])
    if show_combined:
        panels[0].imshow(expl.heatmap[i].numpy(), cmap="magma", vmin=0, vmax=1)
        panels[0].set_title("combined", fontsize=8)
        panels = panels[1:]
    for j, ax in enumerate(panels):
        if j < len(expl.features[i]):
            feature = expl.features[i][j]
            colour = feature_colour(expl, feature)
            ax.imshow(expl.maps[i, j].numpy(), cmap="magma", vmin=0, vmax=1)
            # the layer's kind in words, the part of the network (convolutional or fully connected) in colour
            ax.set_title(f"layer {feature.layer_number} {feature.kind}\n#{feature.channel}", fontsize=8, color=colour)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(3)
        else:
            ax.axis("off")
    for ax in axes[: 2 if show_combined else 1]:
        ax.axis("off")


def explanation_figure(rows, *, labels=None, k: int | None = None, show_combined: bool = True,
                       size: float = 1.6, title: str | None = None):
    """Explanations in the style of the paper's Fig. 1 and 6: one row per image (the image and its predicted
    label, the combined map, one map per feature titled with its layer number, conv green and fc pink).

    Parameters
    ----------
    rows : Explanation or sequence of (Explanation, int)
        All images of one explanation, or chosen images of several (e.g. different networks).
    labels : sequence of str, optional
        Replaces the title above each image (default: the predicted label).
    k : int, optional
        Feature columns; default the largest number of features in any row.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if isinstance(rows, Explanation):
        rows = [(rows, i) for i in range(len(rows))]
    rows = list(rows)
    if not rows:
        raise ValueError("no explanation to draw: rows is empty")
    if k is None:
        k = max(1, max(len(e.features[i]) for e, i in rows))
    ncols = 1 + int(show_combined) + k
    fig, axes = plt.subplots(len(rows), ncols, figsize=(size * ncols, size * 1.3 * len(rows)), squeeze=False)
    for r, (expl, i) in enumerate(rows):
        _draw_row(list(axes[r]), expl, i, label=None if labels is None else labels[r],
                  show_combined=show_combined)
    handles = [plt.Rectangle((0, 0), 1, 1, color=LAYER_COLOURS[kind]) for kind in ("conv", "fc")]
    fig.legend(handles, ["convolutional feature", "fully connected feature"], loc="lower center", ncol=2,
               fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def check_compatible(model: nn.Module, relevant) -> list:
    """Check that ``relevant`` (a :class:`vefi.relevant.RelevantFeatures`) was fitted on ``model``; return the
    model's layer table.

    The index's layers must be the model's (number, name, type and shapes), the selector's weights must have
    one column per descriptor feature and one row per class of ``relevant.classes``, each an output of the
    model, and if ``relevant.model`` is a different object its weights must equal ``model``'s
    (:func:`vefi.relevant.model_fingerprint`).

    Raises
    ------
    TypeError
        ``relevant`` is not a fitted RelevantFeatures.
    ValueError
        Any mismatch, saying which.
    """
    for attribute in ("index", "selector", "classes", "input_shape"):
        if not hasattr(relevant, attribute):
            raise TypeError(f"relevant must be a vefi.relevant.RelevantFeatures (from vefi.select_features), got "
                            f"{type(relevant).__name__}")
    coef = getattr(relevant.selector, "coef_", None)
    if coef is None:
        raise TypeError("relevant.selector is not fitted (it has no coef_)")
    try:
        table = layer_table(model, relevant.input_shape)
    except RuntimeError as error:
        raise ValueError(f"the selector was fitted on another model: its images of shape "
                         f"{tuple(relevant.input_shape)} do not run through this one ({error})") from error
    for layer in relevant.index.layers:
        if not 1 <= layer.number <= len(table):
            raise ValueError(f"the selector was fitted on another model: its layer {layer.label} "
                             f"({layer.name!r}) does not exist in this model of {len(table)} layers")
        mine = table[layer.number - 1]
        if (mine.name, mine.kind, mine.input_shape, mine.output_shape) != \
                (layer.name, layer.kind, layer.input_shape, layer.output_shape):
            raise ValueError(f"the selector was fitted on another model: its layer {layer.number} is "
                             f"{layer.name!r} ({layer.kind}, output {layer.output_shape}) but this model's is "
                             f"{mine.name!r} ({mine.kind}, output {mine.output_shape})")
    if coef.shape[1] != len(relevant.index):
        raise ValueError(f"the selector's weights have {coef.shape[1]} columns but its index describes "
                         f"{len(relevant.index)} features")
    outputs = table[-1].output_shape
    # the last layer's output, flattened (squeezenet ends in a pool to (classes, 1, 1) and a torch.flatten)
    if coef.shape[0] != len(relevant.classes) or not all(0 <= c < math.prod(outputs) for c in relevant.classes):
        raise ValueError(f"the selector has weights for {coef.shape[0]} classes {list(relevant.classes)[:10]} but "
                         f"the model outputs {outputs}")
    other = getattr(relevant, "model", None)
    if other is not None and other is not model and model_fingerprint(other) != model_fingerprint(model):
        raise ValueError("the selector was fitted on another model: relevant.model has different weights from "
                         "the model given (compare vefi.relevant.model_fingerprint)")
    return table


def _check_target(target, n: int, n_classes: int, predicted: torch.Tensor) -> torch.Tensor:
    """``target`` as one class index per image (LongTensor (n,) on the CPU); None: ``predicted``."""
    if target is None:
        return predicted.clone()
    shape = tuple(target.shape) if isinstance(target, (torch.Tensor, np.ndarray)) else None
    target = class_indices(target).cpu()
    if target.numel() == 1:
        target = target.expand(n)
    if target.shape != (n,) or (shape is not None and len(shape) > 1):
        raise ValueError(f"target must be None, an int or have shape ({n},) (one class per image), got "
                         f"shape {shape or tuple(target.shape)}")
    bad = (target < 0) | (target >= n_classes)
    if bad.any():
        raise ValueError(f"class index {int(target[bad][0])} out of range: this model has {n_classes} classes "
                         f"(0..{n_classes - 1})")
    return target.cpu()


SCORES = ("paper", "demo")


def contributions(X: np.ndarray, coef: np.ndarray, rows, support: np.ndarray | None = None, *,
                  score: str = "paper") -> np.ndarray:
    """Contribution of every feature ``i`` to the class of weight row ``c = rows[r]``, for every row ``r`` of
    the descriptors ``X`` (N, m): the paper's ``w_ci * x_i`` (``score="paper"``) or the authors' demo's
    ``x_i * w_ci / sum_j w_cj`` (``score="demo"``; every feature of a class whose weights sum to 0 gets 0).
    Features outside ``support`` (m,) get 0.

    Examples
    --------
    >>> X, coef = np.array([[1.0, 2.0, 0.5]]), np.array([[1.0, 3.0, 0.0]])
    >>> contributions(X, coef, [0]).tolist(), contributions(X, coef, [0], score="demo").tolist()
    ([[1.0, 6.0, 0.0]], [[0.25, 1.5, 0.0]])

    When the weights sum to a negative number, the demo's division flips the ranking:

    >>> contributions(X, -coef, [0]).tolist(), contributions(X, -coef, [0], score="demo").tolist()
    ([[-1.0, -6.0, -0.0]], [[0.25, 1.5, 0.0]])
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    X = np.asarray(X, dtype=np.float64)
    W = np.asarray(coef, dtype=np.float64)[np.asarray(rows, dtype=np.int64)]
    if score == "paper":
        scores = X * W
    else:
        total = W.sum(1, keepdims=True)
        scores = np.divide(X * W, total, out=np.zeros_like(X), where=total != 0)
    if support is not None:
        scores = scores * np.asarray(support, dtype=bool)
    return scores


def upsampled_maps(model: nn.Module, images: torch.Tensor, features: list[list[tuple]], table) -> torch.Tensor:
    """The features' own activation maps, upsampled bilinearly to the image and min-max normalised;
    a fully connected unit has no map and gets zero."""
    n, k = len(features), len(features[0])
    H, W = images.shape[-2:]
    numbers = sorted({number for row in features for number, _ in row})
    captured: dict[int, torch.Tensor] = {}

    def keep(layer, output):
        captured[layer.number] = output.detach().clone()  # before any in-place ReLU changes it

    maps = torch.zeros(n, k, H, W)
    with preserved(model), tapped(model, [table[number - 1] for number in numbers], keep):
        model.eval()
        with torch.no_grad():
            model(images)
    for i, row in enumerate(features):
        for j, (number, channel) in enumerate(row):
            act = captured[number][i, channel]
            if act.dim() == 2:
                up = F.interpolate(act[None, None].float(), size=(H, W), mode="bilinear", align_corners=False)
                maps[i, j] = up[0, 0]
    low = maps.amin((-2, -1), keepdim=True)
    span = maps.amax((-2, -1), keepdim=True) - low
    return torch.where(span > 0, (maps - low) / span.clamp_min(1e-30), torch.zeros_like(maps))


def explain(model: nn.Module, images: torch.Tensor, relevant, *, target=None, k: int = 3, stride_fix: bool = True,
            maps: str = "backproject", score: str = "paper") -> Explanation:
    """Explain the model's decision for each image by its top-k relevant features (Sec. 3.2).

    Parameters
    ----------
    model : torch.nn.Module
        The network ``relevant`` was fitted on. Left exactly as it came, also when this raises.
    images : Tensor (n, C, H, W) or (C, H, W)
        Float images in [0, 1], of the model's input shape.
    relevant : vefi.relevant.RelevantFeatures
        The selected features and their weights (:func:`vefi.select_features`).
    target : None, int, sequence of int or LongTensor (n,)
        The class to explain (an output of the model, one of ``relevant.classes``): default each image's
        predicted class among ``relevant.classes``.
    k : int
        Most features per image (the paper: 3). A ``k`` larger than the number of features the selector kept
        is lowered to that number (``maps`` then has that many slots).
    stride_fix : bool
        Back-project with the stride fix (the method); ``False`` gives the "Deconv+GB" baseline.
    maps : {"backproject", "upsampled"}
        ``"upsampled"``: the features' activation maps upsampled to the image (bilinear) instead of
        back-projected, the paper's "upsampled activations" baseline (an fc feature's map is then zero).
    score : {"paper", "demo"}
        How features are ranked (:func:`contributions`): the paper's ``w_c * x`` or the demo's
        ``x * w_c / sum(w_c)``.

    Returns
    -------
    Explanation

    Raises
    ------
    ValueError
        Images of the wrong shape or channels, NaN/Inf, ``k < 1``, a class out of range, an unknown ``maps``,
        or a selector fitted on another model.
    TypeError
        Arguments of the wrong type.

    Examples
    --------
    >>> from vefi.book.relevant import relevant_features
    >>> from vefi.book.train import pretrained
    >>> from vefi.book.data import load_dataset
    >>> model, rel = pretrained("mnist"), relevant_features("mnist")  # doctest: +SKIP
    >>> e = explain(model, load_dataset("mnist", "test").batch(range(4)), rel)  # doctest: +SKIP
    >>> e.heatmap.shape  # doctest: +SKIP
    torch.Size([4, 28, 28])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int, got {k!r}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if maps not in MAPS:
        raise ValueError(f"maps must be one of {MAPS}, got {maps!r}")
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    table = check_compatible(model, relevant)
    # the result comes back on the CPU: images are moved to the model's device and dtype, as descriptors does
    images = check_images(images, relevant.input_shape, model=model, convert=True)
    n = images.shape[0]
    coef = relevant.selector.coef_
    # no image can have more features than the selector kept: a larger k would only allocate empty maps
    k = max(1, min(int(k), int(np.count_nonzero(relevant.selector.get_support()))))

    X, _, _ = descriptors(model, images, [layer.number for layer in relevant.index.layers],
                          input_shape=relevant.input_shape, show_progress=False)
    classes_of_interest = torch.as_tensor(relevant.classes, dtype=torch.long)
    with preserved(model):
        model.eval()
        with torch.no_grad():
            scores_out = check_scores(model(images), n).cpu()
    # the prediction among the classes the features were selected for (all outputs, usually)
    predicted = classes_of_interest[scores_out[:, classes_of_interest].argmax(1)]
    target = _check_target(target, n, scores_out.shape[1], predicted)

    scores = contributions(X, coef, relevant.row(target.numpy()), relevant.selector.get_support(), score=score)
    chosen_features, chosen_scores = [], []
    for row in scores:
        order = np.argsort(-row, kind="stable")[:k]
        order = order[row[order] > 0]
        chosen_features.append([relevant.index[j] for j in order])
        chosen_scores.append([float(row[j]) for j in order])

    width = max((len(f) for f in chosen_features), default=0)
    H, W = images.shape[-2:]
    out = torch.zeros(n, k, H, W)
    if width > 0:
        # backproject wants the same number of features per image: pad short rows with the row's first
        # feature (or any), and zero those maps afterwards
        filler = next(f for f in chosen_features if f)[0]
        pairs = [[(f.layer_number, f.channel) for f in row] for row in chosen_features]
        padded = [row + [row[0] if row else (filler.layer_number, filler.channel)] * (width - len(row))
                  for row in pairs]
        if maps == "backproject":
            raw = backproject(model, images, padded, rule="guided", stride_fix=stride_fix, source="map")
            normalised = heatmap(raw).float().cpu()
        else:
            normalised = upsampled_maps(model, images, padded, table)
        for i, row in enumerate(pairs):
            out[i, : len(row)] = normalised[i, : len(row)]
    combined = out.amax(1)

    first_fc = next((layer.number for layer in table if layer.kind == "fc"), None)
    classes = list(getattr(model, "classes", None) or range(scores_out.shape[1]))
    if maps == "upsampled":
        method = "upsampled activations"
    else:
        method = "guided backprop + stride fix" if stride_fix else "guided backprop, no stride fix (Deconv+GB)"
    return Explanation(images.detach().cpu(), target, predicted, chosen_features, chosen_scores, out, combined,
                       [str(c) for c in classes], first_fc, method)


def _ink(images: torch.Tensor, threshold: float, margin: int) -> torch.Tensor:
    """Pixels brighter than ``threshold`` (mean over colour channels), grown by ``margin`` pixels; (n, 1, H, W)."""
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be a brightness in [0, 1], got {threshold!r}")
    if isinstance(margin, bool) or not isinstance(margin, int) or margin < 0:
        raise ValueError(f"margin must be a non-negative int, got {margin!r}")
    ink = (images.mean(1, keepdim=True) > threshold).float()
    if margin:
        ink = F.max_pool2d(ink, 2 * margin + 1, stride=1, padding=margin)
    return ink


def background_ratio(explanation: Explanation, threshold: float = 0.1, margin: int = 2) -> torch.Tensor:
    """How strongly each feature map lights up empty space, relative to the strokes, shape (n, k).

    The mean of the map over background pixels (at most ``threshold`` bright and more than ``margin`` pixels
    from any brighter pixel) divided by its mean over ink pixels (brighter than ``threshold``). Unlike the
    share of mass (:func:`background_share`), this does not grow with the amount of background: a thin digit
    is mostly background but its maps still sit on the stroke. Slots without a feature, and images without
    ink or without background, get 0.

    Examples
    --------
    >>> images = torch.zeros(1, 1, 1, 8)
    >>> images[..., :2] = 1.0
    >>> maps = torch.tensor([[[[1.0, 1.0, 0.0, 0.5, 0.5, 0.5, 0.5, 0.5]]]])
    >>> e = Explanation(images, torch.zeros(1), torch.zeros(1), [[None]], [[1.0]], maps, maps[:, 0])
    >>> background_ratio(e, margin=1).tolist()
    [[0.5]]
    """
    ink = _ink(explanation.images, threshold, 0)
    background = 1.0 - _ink(explanation.images, threshold, margin)
    on_ink = (explanation.maps * ink).sum((-2, -1)) / ink.sum((-2, -1)).clamp_min(1)
    on_background = (explanation.maps * background).sum((-2, -1)) / background.sum((-2, -1)).clamp_min(1)
    valid = (on_ink > 0) & (ink.sum((-2, -1)) > 0) & (background.sum((-2, -1)) > 0)
    return torch.where(valid, on_background / on_ink.clamp_min(1e-30), torch.zeros_like(on_ink))


def background_share(explanation: Explanation, threshold: float = 0.1, margin: int = 0) -> torch.Tensor:
    """Share of each feature map's mass that falls on background pixels, shape (n, k).

    Background: pixels whose brightness (mean over colour channels) is at most ``threshold``, e.g. the
    ink-free pixels of an MNIST digit, and that are more than ``margin`` pixels (in either direction) from any
    brighter pixel: back-projections light up the edges of strokes, which are background by brightness but
    belong to the stroke. A share near 1 means the feature speaks for empty space: the gaps and openings
    that tell one digit from another. Slots without a feature get 0.

    Examples
    --------
    >>> e = Explanation(torch.zeros(1, 1, 2, 2), torch.zeros(1), torch.zeros(1), [[None]], [[1.0]],
    ...                 torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]]), torch.zeros(1, 2, 2))
    >>> e.images[0, 0, 0, 0] = 1.0
    >>> background_share(e).tolist()
    [[0.5]]
    """
    background = 1.0 - _ink(explanation.images, threshold, margin)
    mass = explanation.maps.sum((-2, -1))
    on_background = (explanation.maps * background).sum((-2, -1))
    return torch.where(mass > 0, on_background / mass.clamp_min(1e-30), torch.zeros_like(mass))
