"""Ablation of relevant features: does the network need the features mu-Lasso selected? (Sec. 4.1, Fig. 4)

A feature is one channel of a layer's output (or one unit of a fully connected layer). *Ablating* it sets
that channel's whole map to zero, so that the next layer sees zeros there. If the selected features matter
for the decision, ablating them should hurt the network more than ablating as many features picked at random
from the same layers. The paper measures this by the *mean class accuracy* (the mean over classes of the
per-class accuracy) on the test set, for the features selected from every layer ("All"), from the
convolutional part only ("OnlyConv"), and random features.

Batching: several ablation configurations run in one forward pass. The images are repeated once per
configuration along the batch axis, and a forward hook on each touched layer multiplies the output of
configuration ``g`` by that configuration's channel mask. One pass over the test images measures them all.

A feature at a ReLU is the ReLU's *output*. Our ReLUs are in place, so a ReLU's output is the same tensor as
its input; the hook therefore returns a new, masked tensor (never edits the output in place), which is what
the next layer receives.

Examples
--------
>>> import torch
>>> from vefi.book.models import build_model
>>> _ = torch.manual_seed(0)
>>> net = build_model("mnist")
>>> x = torch.rand(2, 1, 28, 28)
>>> with ablated(net, [("relu1", 3)]) as seen:
...     out = seen(x)
>>> tuple(out.shape), len(net.conv1._forward_hooks)
((2, 10), 0)
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from vefi._model_state import preserved
from vefi._progress import progress
from vefi.descriptors import Feature, FeatureIndex
from vefi.layers import Layer, check_images, check_scores, layer_table, resolve_layer, tapped

__all__ = ["ablated", "ablation_accuracy", "feature_strength", "mean_class_accuracy", "random_like", "subsample"]


def mean_class_accuracy(predicted, labels, n_classes: int | None = None) -> float:
    """Mean over classes of the per-class accuracy (the fraction of each class's images predicted right).

    Classes without any image in ``labels`` are left out of the mean.

    Parameters
    ----------
    predicted, labels : array-like of int, shape (N,)
        Predicted and true class indices.
    n_classes : int, optional
        Number of classes; default ``max(labels) + 1``.

    Examples
    --------
    >>> mean_class_accuracy([0, 0, 1, 1], [0, 1, 1, 1])  # class 0: 1/1, class 1: 2/3
    0.8333333333333333
    """
    predicted = np.asarray(predicted).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if predicted.shape != labels.shape:
        raise ValueError(f"predicted and labels must have the same length, got {predicted.shape[0]} and "
                         f"{labels.shape[0]}")
    if labels.size == 0:
        raise ValueError("no labels: cannot compute an accuracy on zero images")
    if not (np.issubdtype(labels.dtype, np.integer) and np.issubdtype(predicted.dtype, np.integer)):
        raise TypeError(f"expected integer class indices, got {predicted.dtype} and {labels.dtype}")
    n_classes = int(labels.max()) + 1 if n_classes is None else int(n_classes)
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"labels must be in 0..{n_classes - 1}, got {int(labels.min())}..{int(labels.max())}")
    per_class = np.bincount(labels, minlength=n_classes).astype(float)
    right = np.bincount(labels[predicted == labels], minlength=n_classes).astype(float)
    present = per_class > 0
    return float(np.mean(right[present] / per_class[present]))


# ------------------------------------------------------------------------------------------------------------
# Masks and hooks

def _resolve(table: list[Layer], item) -> tuple[Layer, int]:
    """A feature (``Feature`` or ``(layer, channel)``) as its layer and channel, checked."""
    if isinstance(item, Feature):
        layer, channel = resolve_layer(table, item.layer_number), item.channel
        if layer.name != item.layer_name:
            raise ValueError(f"feature {item} does not belong to this model: its layer {item.layer_number} is "
                             f"{layer.name!r}, not {item.layer_name!r}")
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        layer, channel = resolve_layer(table, item[0]), item[1]
    else:
        raise TypeError(f"a feature must be a vefi Feature or a (layer, channel) pair, got {item!r}")
    if isinstance(channel, bool) or not isinstance(channel, (int, np.integer)):
        raise TypeError(f"channel must be an int, got {type(channel).__name__}")
    if not 0 <= int(channel) < layer.channels:
        raise ValueError(f"channel {int(channel)} out of range: layer {layer.number} ({layer.name}) has "
                         f"{layer.channels} channels")
    return layer, int(channel)


def _masks(table: list[Layer], configurations: Sequence[Iterable]) -> dict[int, tuple[Layer, torch.Tensor]]:
    """For each touched layer, a (G, C) mask: 0 where configuration g ablates channel c, else 1."""
    masks: dict[int, tuple[Layer, torch.Tensor]] = {}
    for g, features in enumerate(configurations):
        if isinstance(features, (Feature, str)) or (isinstance(features, tuple) and len(features) == 2
                                                     and isinstance(features[0], (int, str, np.integer, nn.Module))):
            raise TypeError("each configuration must be a sequence of features, got a single feature "
                            f"{features!r}; wrap it in a list")
        for item in features:
            layer, channel = _resolve(table, item)
            if layer.number not in masks:
                masks[layer.number] = (layer, torch.ones(len(configurations), layer.channels))
            masks[layer.number][1][g, channel] = 0.0
    return masks


def _masked(masks: dict[int, tuple[Layer, torch.Tensor]]):
    """The tap that multiplies each masked layer's output by its mask, group g of the batch by mask g."""

    def apply(layer, output):
        mask = masks[layer.number][1]
        groups = mask.shape[0]
        if not isinstance(output, torch.Tensor) or output.shape[0] % groups:
            raise RuntimeError(f"cannot ablate: expected a tensor output whose batch is a multiple of {groups}")
        # one mask row per batch row, broadcast over the positions: the product keeps the output's memory
        # layout (a channels-last map stays channels-last, where a reshape into groups would copy it to NCHW
        # and the layers after it would convert it back); a new tensor, not an in-place edit: with an
        # in-place ReLU the output aliases the layer's input
        rows = mask.to(device=output.device, dtype=output.dtype).repeat_interleave(output.shape[0] // groups, 0)
        return output * rows.reshape(*rows.shape, *([1] * (output.dim() - 2)))

    return apply


@contextmanager
def ablated(model: nn.Module, features: Iterable, *, input_shape: tuple[int, ...] | None = None
            ) -> Iterator[nn.Module]:
    """Context manager under which ``model`` runs with ``features`` set to zero.

    Parameters
    ----------
    model : torch.nn.Module
        Left exactly as it came on exit (hooks removed), also when the body raises.
    features : iterable
        Features as :class:`vefi.descriptors.Feature` or ``(layer, channel)`` pairs, ``layer`` a number or
        name of :func:`vefi.layers.layer_table`. A channel of a conv-like output is zeroed over its whole map;
        a unit of a flat output is zeroed. A feature at a ReLU is the ReLU's output.
    input_shape : tuple of int, optional
        For models without an ``input_shape`` attribute.

    Yields
    ------
    torch.nn.Module
        The model itself, hooked.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(3, 3), nn.ReLU(inplace=True))
    >>> with ablated(net, [(2, 0)], input_shape=(3,)):
    ...     float(net(torch.ones(1, 3))[0, 0])
    0.0
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    masks = _masks(layer_table(model, input_shape), [list(features)])
    with preserved(model), tapped(model, [layer for layer, _ in masks.values()], _masked(masks)):
        yield model


def ablation_accuracy(model: nn.Module, images: torch.Tensor, labels, configurations: Sequence[Iterable], *,
                      n_classes: int | None = None, max_rows: int = 4096, desc: str = "ablation",
                      return_predictions: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Mean class accuracy of ``model`` on ``images`` under each ablation configuration.

    Parameters
    ----------
    model : torch.nn.Module
        Run in eval mode under ``no_grad``; left as it came.
    images : Tensor, shape (N, C, H, W)
        Float images in [0, 1].
    labels : array-like of int, shape (N,)
    configurations : sequence of sequences of features
        One feature list per configuration (see :func:`ablated`); an empty list is the intact network.
    n_classes : int, optional
        Default: the model's ``classes`` or ``max(labels) + 1``.
    max_rows : int
        Images x configurations per forward pass: configurations are batched along the batch axis.
    desc : str
        Progress bar label.
    return_predictions : bool
        Also return the predicted class of every image under every configuration, (G, N), e.g. for paired
        comparisons between configurations over the images.

    Returns
    -------
    numpy.ndarray, shape (G,)
        Mean class accuracy per configuration (and the predictions, with ``return_predictions``).

    Examples
    --------
    >>> import torch
    >>> from vefi.book.models import build_model
    >>> _ = torch.manual_seed(0)
    >>> net = build_model("mnist")
    >>> acc = ablation_accuracy(net, torch.rand(20, 1, 28, 28), torch.arange(20) % 10, [[], [("fc2", 1)]])
    >>> acc.shape
    (2,)
    """
    images = check_images(images, getattr(model, "input_shape", None))  # moved to the model chunk by chunk
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    configurations = [list(c) for c in configurations]
    if not configurations:
        raise ValueError("configurations is empty: pass at least one (an empty list is the intact network)")
    if n_classes is None:
        classes = getattr(model, "classes", None)
        n_classes = len(classes) if classes is not None else int(labels.max()) + 1
    table = layer_table(model, tuple(images.shape[1:]))
    n = images.shape[0]
    per_pass = max(1, int(max_rows) // n) if n <= max_rows else 1
    image_chunk = n if n <= max_rows else int(max_rows)
    predicted = np.zeros((len(configurations), n), dtype=np.int64)
    steps = [(g, s) for g in range(0, len(configurations), per_pass) for s in range(0, n, image_chunk)]
    with preserved(model), torch.no_grad():
        model.eval()
        for g0, s0 in progress(steps, desc=desc):
            group = configurations[g0:g0 + per_pass]
            # chunks go to the model's device and dtype: the accuracies come back as numbers in any case
            x = check_images(images[s0:s0 + image_chunk], model=model, convert=True)
            masks = _masks(table, group)
            with tapped(model, [layer for layer, _ in masks.values()], _masked(masks)):
                out = check_scores(model(x.repeat(len(group), *([1] * (x.dim() - 1)))), len(group) * x.shape[0])
            predicted[g0:g0 + len(group), s0:s0 + x.shape[0]] = \
                out.argmax(1).reshape(len(group), x.shape[0]).cpu().numpy()
    accuracy = np.array([mean_class_accuracy(p, labels, n_classes) for p in predicted])
    return (accuracy, predicted) if return_predictions else accuracy


# ------------------------------------------------------------------------------------------------------------
# Which features: the selected ones by strength, and random controls

def feature_strength(coef: np.ndarray) -> np.ndarray:
    """Strength of each feature (column of ``coef``, shape (C, m)): its largest absolute weight over classes.

    Examples
    --------
    >>> feature_strength(np.array([[0.5, -2.0, 0.0], [1.0, 0.1, 0.0]])).tolist()
    [1.0, 2.0, 0.0]
    """
    coef = np.asarray(coef, dtype=float)
    if coef.ndim != 2:
        raise ValueError(f"coef must be (C, m), got shape {coef.shape}")
    return np.abs(coef).max(axis=0)


def random_like(features: Sequence[Feature], index: FeatureIndex, seed: int) -> list[Feature]:
    """As many random features as ``features`` has in each layer, drawn from the same layers.

    In each layer, the channels are drawn uniformly without replacement from all the layer's channels (the
    selected ones included), so the control keeps the layer distribution and nothing else.

    Parameters
    ----------
    features : sequence of Feature
    index : FeatureIndex
        Knows each layer's number of channels.
    seed : int
        Same seed, same draw.

    Examples
    --------
    >>> from vefi.book.models import build_model
    >>> from vefi.descriptors import default_layers
    >>> index = FeatureIndex.from_layers(default_layers(build_model("mnist")))
    >>> picked = [index[0], index[1], index[40]]
    >>> drawn = random_like(picked, index, seed=0)
    >>> [f.layer_name for f in drawn] == [f.layer_name for f in picked], drawn == random_like(picked, index, 0)
    (True, True)
    """
    if not isinstance(index, FeatureIndex):
        raise TypeError(f"expected a FeatureIndex, got {type(index).__name__}")
    rng = np.random.default_rng(int(seed))
    counts: dict[int, int] = defaultdict(int)
    for f in features:
        counts[f.layer_number] += 1
    by_number = {layer.number: layer for layer in index.layers}
    drawn = []
    for number in sorted(counts):
        if number not in by_number:
            raise ValueError(f"feature layer {number} is not in the index (layers "
                             f"{sorted(by_number)})")
        layer = by_number[number]
        if counts[number] > layer.channels:
            raise ValueError(f"{counts[number]} features asked from layer {number}, which has {layer.channels}")
        channels = np.sort(rng.choice(layer.channels, size=counts[number], replace=False))
        drawn += [Feature(layer.number, layer.name, layer.kind, int(c)) for c in channels]
    return drawn


def subsample(n_total: int, n: int | None, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded random subset of ``n`` of ``n_total`` test images (all when ``n`` is None
    or at least ``n_total``).

    Examples
    --------
    >>> subsample(10, 3, seed=0).tolist() == subsample(10, 3, seed=0).tolist(), len(subsample(10, None))
    (True, 10)
    """
    if n is None or n >= n_total:
        return np.arange(n_total)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return np.sort(np.random.default_rng(int(seed)).permutation(n_total)[:n])
