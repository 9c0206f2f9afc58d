"""Interpreting relevant features by average images (Sec. 4.1, Fig. 5 of the paper).

What does a feature respond to? For a feature (a channel of a layer), rank a set of images by the feature's
response, its descriptor value (:func:`vefi.descriptors.descriptors`: the L2 norm of the channel's map; a
fully connected unit: its absolute value), take the ``top`` images (the paper: 100), crop each around the
position where the channel responds most, by the receptive field of that unit
(:mod:`vefi.receptive`), and average the crops. A fully connected unit sees the whole image, so its crops are
the whole images.

Crops are taken with the unit's *unclipped* receptive field, so that every crop of a feature has the same size
and the same pixel of the crop means the same offset from the unit; parts of the field outside the image are
black (zero). In deep layers the field is larger than the image (see the receptive-field table of the book's
chapter on average images).

Everything is streamed: one pass over the data for the descriptors, one pass over the union of the top
images for the positions of maximum response, both in batches, with a progress bar.
"""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from vefi._model_state import preserved
from vefi._progress import progress
from vefi._tensors import all_finite
from vefi.descriptors import Feature, descriptors
from vefi.layers import layer_table, resolve_layer, tapped
from vefi.plotting import LAYER_COLOURS, to_display
from vefi.receptive import receptive_fields

__all__ = ["AverageImage", "average_images", "average_images_figure"]


@dataclass
class AverageImage:
    """The average of the top images of one feature, cropped at its maximum response.

    Attributes
    ----------
    feature : Feature
    average : Tensor (C, h, w)
        Mean of the crops, pixel values in [0, 1]; ``(h, w)`` is the receptive field (the image for fc).
    indices : numpy.ndarray (top,)
        Indices of the top images in the data, strongest response first.
    responses : numpy.ndarray (top,)
        Their responses (descriptor values).
    positions : numpy.ndarray (top, 2)
        ``(y, x)`` of the maximum response in the layer's map (zeros for a fully connected unit).
    boxes : numpy.ndarray (top, 4)
        The unclipped receptive field boxes ``(top, left, bottom, right)`` in the image (bottom, right
        exclusive).
    whole_image : bool
        The feature sees the whole image (fully connected).
    """

    feature: Feature
    average: torch.Tensor
    indices: np.ndarray
    responses: np.ndarray
    positions: np.ndarray
    boxes: np.ndarray
    whole_image: bool


def _as_features(model, features, input_shape=None) -> list[tuple]:
    table = layer_table(model, input_shape)
    out = []
    for f in features:
        if not isinstance(f, (tuple, list)) or len(f) < 2:
            raise TypeError(f"a feature is a vefi Feature or (layer, channel), got {f!r}")
        layer_key, channel = (f.layer_number, f.channel) if isinstance(f, Feature) else (f[0], f[1])
        layer = resolve_layer(table, layer_key)
        if isinstance(channel, bool) or not isinstance(channel, (int, np.integer)):
            raise TypeError(f"channel must be an int, got {channel!r}")
        if not 0 <= channel < layer.channels:
            raise ValueError(f"channel {channel} out of range for layer {layer.label}, which has {layer.channels} "
                             f"channels (0..{layer.channels - 1})")
        out.append((layer, int(channel)))
    return out


def _indexable(data):
    """``data`` as something images can be taken from by index: a loader's dataset, or ``data`` itself."""
    if isinstance(data, DataLoader):
        data = data.dataset
    if not (isinstance(data, (torch.Tensor, np.ndarray)) or hasattr(data, "batch")
            or (hasattr(data, "__getitem__") and hasattr(data, "__len__"))):
        raise TypeError(f"data must be images (N, C, H, W), a Dataset of (image, label) items or a DataLoader "
                        f"over one (average images takes images back by index), got {type(data).__name__}")
    return data


def _get_images(data, idx: np.ndarray) -> torch.Tensor:
    if hasattr(data, "batch"):
        return data.batch(idx)
    if isinstance(data, (torch.Tensor, np.ndarray)):
        images = data[torch.as_tensor(idx)] if isinstance(data, torch.Tensor) else torch.as_tensor(data[idx])
    else:  # a Dataset of (image, label) items or of images
        items = [data[int(i)] for i in idx]
        images = torch.stack([torch.as_tensor(item[0] if isinstance(item, (tuple, list)) else item)
                              for item in items])
    return images.float() / 255 if images.dtype == torch.uint8 else images.float()


def average_images(model: nn.Module, data, features, *, top: int = 100, batch_size: int = 250,
                   input_shape: tuple[int, ...] | None = None, show_progress: bool = True) -> list[AverageImage]:
    """For each feature, the average of its ``top`` images cropped at its maximum response (Fig. 5).

    Parameters
    ----------
    model : torch.nn.Module
        Left exactly as it came.
    data : Tensor (N, C, H, W), Dataset or DataLoader
        The images to rank: float images in [0, 1] (uint8 ones are divided by 255), a Dataset of
        ``(image, label)`` items (or of images), or a DataLoader over such a Dataset (its order is the
        Dataset's; images are taken back from it by index).
    features : sequence of Feature or (layer, channel)
        E.g. ``relevant.per_class[c][:3]``.
    top : int
        How many images per feature (at most the number of images).
    batch_size : int
        Images per forward pass (a DataLoader keeps its own).
    input_shape : tuple of int, optional
        Shape of one image; default ``model.input_shape`` or the data's.
    show_progress : bool

    Returns
    -------
    list of AverageImage, one per feature, in the given order.

    Examples
    --------
    >>> import torch
    >>> from vefi.book.models import build_model
    >>> _ = torch.manual_seed(0)
    >>> avg = average_images(build_model("mnist"), torch.rand(20, 1, 28, 28), [("conv2", 3), ("fc1", 0)],
    ...                      top=5, show_progress=False)
    >>> tuple(avg[0].average.shape), tuple(avg[1].average.shape), avg[1].whole_image
    ((1, 11, 11), (1, 28, 28), True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 1:
        raise ValueError(f"top must be a positive int, got {top!r}")
    if isinstance(data, torch.Tensor):
        if data.dim() != 4:
            raise ValueError(f"data must be images (N, C, H, W), got shape {tuple(data.shape)}")
        if data.is_floating_point() and not all_finite(data):
            raise ValueError("data contain NaN or Inf values")
    data = _indexable(data)
    n = len(data)
    if n == 0:
        raise ValueError("no images: data is empty")
    if input_shape is None:
        input_shape = getattr(model, "input_shape", None) or tuple(_get_images(data, np.arange(1)).shape[1:])
    if top > n:
        raise ValueError(f"top={top} is more than the {n} images in data")
    chosen = _as_features(model, features, input_shape)
    if not chosen:
        raise ValueError("features is empty: name at least one (layer, channel)")
    fields = receptive_fields(model, input_shape)
    numbers = sorted({layer.number for layer, _ in chosen})

    # pass 1: responses of every image, only for the layers needed (each block is normalised on its own, so
    # these columns equal those of the full descriptor)
    source = data if not isinstance(data, torch.Tensor) or data.is_floating_point() else data.float() / 255
    X, index, _ = descriptors(model, source, numbers, batch_size=batch_size, input_shape=input_shape,
                              show_progress=show_progress)
    columns = [index.column(layer.number, channel) for layer, channel in chosen]
    order = np.argsort(-X[:, columns], axis=0, kind="stable")[:top]          # (top, F)
    responses = np.take_along_axis(X[:, columns], order, axis=0)

    # pass 2: where each channel peaks, for the union of the top images
    union = np.unique(order)
    peak = {number: np.zeros((len(union), fields[number].layer.output_shape[0]), dtype=np.int64)
            for number in numbers}
    current: dict[int, torch.Tensor] = {}

    def peak_of(layer, output):
        out = output.detach()
        # argmax now, before an in-place ReLU overwrites the map (it does not move a positive peak)
        current[layer.number] = out.flatten(2).argmax(2) if out.dim() == 4 else torch.zeros(out.shape, dtype=torch.long)

    param = next(model.parameters(), None)
    with preserved(model), tapped(model, [fields[number].layer for number in numbers], peak_of):
        try:
            model.eval()
            with torch.no_grad():
                starts = range(0, len(union), batch_size)
                for s in progress(starts, desc="peak positions", disable=not show_progress):
                    current.clear()
                    images = _get_images(data, union[s:s + batch_size])
                    if param is not None:
                        images = images.to(device=param.device, dtype=param.dtype)
                    model(images)
                    for number in numbers:
                        peak[number][s:s + batch_size] = current[number].cpu().numpy()
        finally:
            current.clear()

    results = []
    row_of = {int(i): r for r, i in enumerate(union)}
    for f, (layer, channel) in enumerate(chosen):
        field = fields[layer.number]
        idx = order[:, f]
        flat = np.array([peak[layer.number][row_of[int(i)], channel] for i in idx])
        if field.whole:
            positions = np.zeros((len(idx), 2), dtype=np.int64)
        else:
            width = layer.output_shape[-1]
            positions = np.stack([flat // width, flat % width], axis=1)
        boxes = np.stack(field.box(positions[:, 0], positions[:, 1], clip=False), axis=1)
        average = _average_crops(data, idx, boxes, batch_size)
        feature = Feature(layer.number, layer.name, layer.kind, channel)
        results.append(AverageImage(feature, average, idx, responses[:, f], positions, boxes, field.whole))
    return results


def _average_crops(data, idx: np.ndarray, boxes: np.ndarray, batch_size: int) -> torch.Tensor:
    """Mean of the crops ``image[:, top:bottom, left:right]`` (unclipped: outside the image is zero)."""
    h, w = int(boxes[0, 2] - boxes[0, 0]), int(boxes[0, 3] - boxes[0, 1])
    total = None
    for s in range(0, len(idx), batch_size):
        images = _get_images(data, idx[s:s + batch_size])
        H, W = images.shape[-2:]
        # pad by the crop size on every side, so that any unclipped box fits
        padded = torch.nn.functional.pad(images, (w, w, h, h))
        for image, (top, left, _, _) in zip(padded, boxes[s:s + batch_size]):
            crop = image[:, top + h: top + 2 * h, left + w: left + 2 * w]
            total = crop.double() if total is None else total + crop
    return (total / len(idx)).float()


def average_images_figure(rows: dict, *, classes=None, first_fc: int | None = None, size: float = 1.3):
    """Average images in a grid: one row per class (the dict's keys), one panel per feature, titled with its
    layer number and type (conv green, fully connected pink).

    Parameters
    ----------
    rows : dict of class -> list of AverageImage
    classes : sequence of str, optional
        Class names for the row labels.
    first_fc : int, optional
        The model's first fully connected layer; features before it are convolutional.
    """
    if not rows:
        raise ValueError("no average images to draw")
    ncols = max(len(v) for v in rows.values())
    fig, axes = plt.subplots(len(rows), ncols, figsize=(size * ncols + 0.8, size * 1.3 * len(rows)),
                             squeeze=False)
    for r, (c, averages) in enumerate(rows.items()):
        for j, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(averages):
                ax.axis("off")
                continue
            a = averages[j]
            shown = to_display(a.average)
            conv = not a.whole_image if first_fc is None else a.feature.layer_number < first_fc
            colour = LAYER_COLOURS["conv" if conv else "fc"]
            ax.imshow(shown, cmap="gray" if shown.ndim == 2 else None, vmin=0, vmax=1)
            ax.set_title(f"layer {a.feature.layer_number} #{a.feature.channel}", fontsize=8, color=colour)
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(2.5)
        name = classes[c] if classes is not None else str(c)
        axes[r, 0].set_ylabel(name, fontsize=8, rotation=0, ha="right", va="center")
        axes[r, 0].axis("on")
    fig.tight_layout()
    return fig
