"""Figures shared by the chapters: image grids, masks, confusion matrices, layer tables.

Every function returns the matplotlib figure it drew, so a notebook can caption it (myst-nb ``glue``).
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

from vefi.layers import Layer

__all__ = ["to_display", "image_grid", "masks_figure", "confusion_figure", "format_layer_table",
           "LAYER_COLOURS"]

#: The paper colours heatmaps of convolutional features green and fully connected ones pink.
LAYER_COLOURS = {"conv": "#2ca02c", "fc": "#e377c2"}


def to_display(image) -> np.ndarray:
    """An image as matplotlib wants it: (H, W) for one channel, (H, W, 3) for colour; floats in [0, 1]."""
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.dtype == np.uint8:
        array = array / 255.0
    if array.ndim == 3 and array.shape[0] in (1, 3):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return np.clip(array, 0.0, 1.0)


def image_grid(images: Sequence, titles: Sequence[str] | None = None, *, ncols: int = 10,
               size: float = 1.2, cmap: str = "gray"):
    """A grid of images with optional titles."""
    n = len(images)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows * 1.15), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(to_display(images[i]), cmap=cmap, vmin=0, vmax=1)
            if titles is not None:
                ax.set_title(titles[i], fontsize=8)
    fig.tight_layout()
    return fig


def masks_figure(images, masks, parts, part_names: Sequence[str], titles: Sequence[str]):
    """One row per image: the image, its discriminative-part mask, and every part in its own colour."""
    part_colours = np.array([(0.95, 0.55, 0.75), (0.95, 0.85, 0.1), (0.2, 0.6, 0.2), (0.5, 0.85, 0.4),
                             (0.6, 0.6, 0.9), (0.9, 0.6, 0.3)])[: len(part_names)]
    n = len(images)
    fig, axes = plt.subplots(n, 3, figsize=(6.3, 2.1 * n), squeeze=False)
    for i in range(n):
        image = to_display(images[i])
        mask = np.asarray(masks[i], dtype=bool)
        overlay = image * 0.35
        overlay[mask] = image[mask]
        labels = np.zeros(mask.shape + (3,))
        for p, colour in enumerate(part_colours):
            labels[np.asarray(parts[i][p], dtype=bool)] = colour
        for ax, shown, title in zip(axes[i], (image, overlay, labels),
                                    (titles[i], "discriminative part", "parts")):
            ax.imshow(shown)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in part_colours]
    fig.legend(handles, part_names, loc="lower center", ncol=len(part_names), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def confusion_figure(confusions: dict[str, np.ndarray], classes: dict[str, Sequence[str]]):
    """Row-normalised confusion matrices side by side (rows: true class, columns: predicted)."""
    fig, axes = plt.subplots(1, len(confusions), figsize=(4.2 * len(confusions), 4.4), squeeze=False)
    for ax, (name, confusion) in zip(axes[0], confusions.items()):
        rates = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
        ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        ticks = np.arange(len(classes[name]))
        ax.set_xticks(ticks, classes[name], rotation=90, fontsize=6)
        ax.set_yticks(ticks, classes[name], fontsize=6)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(name, fontsize=10)
    fig.tight_layout()
    return fig


def format_layer_table(layers: Sequence[Layer]) -> str:
    """The layer numbering as a text table: number, type, name, output shape, parameters, and the blocks each
    layer's output is also the output of (when there are any). A later call of a module shows its parameters
    as "shared" (they are the first call's)."""
    aliases = any(layer.aliases for layer in layers)
    rows = [("#", "type", "name", "output", "params") + (("also the output of",) if aliases else ())]
    for layer in layers:
        params = sum(p.numel() for p in layer.module.parameters(recurse=False))
        rows.append((str(layer.number), layer.kind, layer.name, "x".join(map(str, layer.output_shape)),
                     f"{params:,}" if layer.call == 1 else "shared")
                    + ((", ".join(layer.aliases),) if aliases else ()))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if i in (0, 4) else cell.ljust(w) for i, (cell, w) in
                       enumerate(zip(row, widths))).rstrip() for row in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)
