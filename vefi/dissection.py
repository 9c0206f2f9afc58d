"""Network dissection (Bau et al. 2017): which units of a layer detect which annotated part.

For every channel ("unit") of a layer with a spatial output: its activation maps over a dataset are upsampled
(bilinear) to the image and thresholded at the unit's top quantile ``T_k`` (Bau: ``P(a_k > T_k) = 0.005``,
taken, as Bau did, over the low-resolution activations of all images); the binary map's IoU with each part mask
is accumulated over the dataset, ``IoU_{k,c} = sum_x |M_k(x) & L_c(x)| / sum_x |M_k(x) | L_c(x)|``. A unit
*detects* part ``c`` when ``IoU_{k,c}`` exceeds a threshold (Bau: 0.04).

On an8Flower the concepts are its parts (petals, centre, stem, leaves) and, as an extra concept,
``"discriminative"``: each image's own discriminative part (the centre for single-6c, centre or petals for
double-12c).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vefi._model_state import preserved
from vefi._progress import progress
from vefi._tensors import all_finite
from vefi.layers import Layer, layer_table, resolve_layer, tapped

__all__ = ["Dissection", "dissect", "iou_from_masks", "unit_thresholds", "detectors"]

DISCRIMINATIVE = "discriminative"


@dataclass
class Dissection:
    """The IoU of every unit of one layer with every concept.

    Attributes
    ----------
    layer : Layer
    concepts : tuple of str
        Column names of ``iou``: the part names, then ``"discriminative"`` when it was included.
    iou : np.ndarray
        (K, P) accumulated IoU of unit k with concept p.
    thresholds : np.ndarray
        (K,) each unit's activation threshold ``T_k``.
    quantile : float
    n_images : int
    """

    layer: Layer
    concepts: tuple
    iou: np.ndarray
    thresholds: np.ndarray
    quantile: float
    n_images: int

    def column(self, concept: str) -> np.ndarray:
        """The (K,) IoU of every unit with one concept."""
        if concept not in self.concepts:
            raise ValueError(f"unknown concept {concept!r}; this dissection has {self.concepts}")
        return self.iou[:, self.concepts.index(concept)]

    def best(self) -> tuple[np.ndarray, np.ndarray]:
        """Each unit's best concept (index into ``concepts``) and its IoU."""
        return self.iou.argmax(1), self.iou.max(1)


def unit_thresholds(activations: torch.Tensor, quantile: float) -> np.ndarray:
    """(K,) per-unit quantile of activations (N, K, h, w) over images and positions.

    Examples
    --------
    >>> a = torch.arange(8.0).reshape(2, 1, 2, 2)
    >>> unit_thresholds(a, 0.5).tolist()
    [3.5]
    """
    values = activations.transpose(0, 1).reshape(activations.shape[1], -1).double().numpy()
    return np.quantile(values, quantile, axis=1)


def iou_from_masks(unit_masks: torch.Tensor, concept_masks: torch.Tensor) -> np.ndarray:
    """Dataset IoU (K, P) of binary unit maps (N, K, H, W) with concept masks (N, P, H, W).

    Intersections and unions are summed over all images before dividing; an empty union gives 0.

    Examples
    --------
    >>> u = torch.tensor([[[[1, 1], [0, 0]]]], dtype=torch.bool)
    >>> c = torch.tensor([[[[1, 0], [1, 0]]]], dtype=torch.bool)
    >>> iou_from_masks(u, c).round(4).tolist()
    [[0.3333]]
    """
    inter, union = _intersections(unit_masks, concept_masks)
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def _intersections(unit_masks: torch.Tensor, concept_masks: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    n, k = unit_masks.shape[:2]
    p = concept_masks.shape[1]
    a = unit_masks.reshape(n, k, -1).float()
    b = concept_masks.reshape(n, p, -1).float()
    # float32 counts are exact up to 2^24 per image and unit: far above any image's pixel count
    inter = torch.bmm(a, b.transpose(1, 2)).sum(0).double()
    union = a.sum(2).sum(0).double()[:, None] + b.sum(2).sum(0).double()[None, :] - inter
    return inter.numpy(), union.numpy()


def _spatial_layer(layers: list[Layer], key) -> Layer:
    layer = resolve_layer(layers, key)
    if len(layer.output_shape) != 3:
        raise ValueError(f"layer {layer.label} ({layer.name!r}) has output shape {layer.output_shape}; dissection "
                         "needs a spatial map (C, H, W)")
    return layer


def _activations(model, data, index, layers: list[Layer], batch_size, show_progress) -> dict[int, torch.Tensor]:
    """Activation maps (N, K, h, w) of each layer, one forward pass per batch for all layers."""
    captured: dict[int, list[torch.Tensor]] = {layer.number: [] for layer in layers}

    def keep(layer, output):  # clone: an in-place ReLU after this layer would overwrite its output
        captured[layer.number].append(output.detach().float().cpu().clone())

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    with preserved(model), tapped(model, layers, keep):
        model.eval()
        with torch.no_grad():
            for lo in progress(range(0, len(index), batch_size), desc="dissection: activations",
                               disable=not show_progress):
                images = data.batch(index[lo:lo + batch_size]).to(device)
                if not all_finite(images):
                    raise ValueError("images contain NaN or Inf values")
                model(images)
    return {number: torch.cat(chunks) for number, chunks in captured.items()}


def dissect(model: nn.Module, data, layers, *, quantile: float = 0.995, index=None,
            include_discriminative: bool = True, batch_size: int = 50,
            show_progress: bool = True) -> list[Dissection]:
    """Dissect one or several layers of ``model`` on an ImageSet with part masks (an8Flower).

    Parameters
    ----------
    model : torch.nn.Module
        Left exactly as it came.
    data : vefi.book.data.ImageSet
        With ``.parts`` (N, P, H, W) and ``.part_names``; ``.masks`` (N, H, W) adds the "discriminative"
        concept when ``include_discriminative``.
    layers : int, str or list of them
        Layers with a spatial output (by number or name).
    quantile : float
        Each unit's threshold is this quantile of its activations over all images and positions.
    index : array-like of int, optional
        The images to use (default all).
    batch_size : int
        Images per forward pass (and per upsampling).

    Returns
    -------
    list of Dissection, one per layer, in the order given.

    Examples
    --------
    >>> from vefi.book.data import load_dataset  # doctest: +SKIP
    >>> from vefi.book.train import pretrained  # doctest: +SKIP
    >>> [d.iou.shape for d in dissect(pretrained("an8flower-single"), load_dataset("an8flower-single", "test"),
    ...                               ["conv2"])]  # doctest: +SKIP
    [(64, 5)]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not (isinstance(quantile, numbers.Real) and 0 < quantile < 1):
        raise ValueError(f"quantile must be in (0, 1), got {quantile!r}")
    parts = getattr(data, "parts", None)
    if parts is None:
        raise ValueError("data has no part masks (.parts); dissection needs an an8Flower ImageSet")
    images = data.images
    if images.dim() != 4 or parts.dim() != 4 or parts.shape[0] != images.shape[0] \
            or parts.shape[2:] != images.shape[2:]:
        raise ValueError(f"images (N, C, H, W) and parts (N, P, H, W) must agree, got {tuple(images.shape)} "
                         f"and {tuple(parts.shape)}")
    shape = getattr(model, "input_shape", None)
    if shape is not None and tuple(images.shape[1:]) != tuple(shape):
        raise ValueError(f"images must have shape (N, {', '.join(map(str, shape))}) for this model, "
                         f"got {tuple(images.shape)}")
    concepts = tuple(data.part_names)
    if include_discriminative:
        if getattr(data, "masks", None) is None:
            raise ValueError("include_discriminative needs data.masks")
        concepts = concepts + (DISCRIMINATIVE,)
    index = np.arange(len(images)) if index is None else np.asarray(index, dtype=np.int64).reshape(-1)
    if index.size == 0:
        raise ValueError("index is empty: no image to dissect")
    if not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(layers, (numbers.Integral, str, Layer)):
        layers = [layers]
    table = layer_table(model, tuple(images.shape[1:]))
    chosen = [_spatial_layer(table, key) for key in layers]
    unique = list({layer.number: layer for layer in chosen}.values())
    acts = _activations(model, data, index, unique, batch_size, show_progress)
    height, width = images.shape[2:]
    index_t = torch.as_tensor(index)
    out = {}
    for layer in unique:
        a = acts[layer.number]
        thresholds = unit_thresholds(a, quantile)
        t = torch.as_tensor(thresholds, dtype=torch.float32).view(1, -1, 1, 1)
        inter = union = 0.0
        for lo in progress(range(0, len(index), batch_size), desc=f"dissection: IoU {layer.label}",
                           disable=not show_progress):
            rows = index_t[lo:lo + batch_size]
            up = F.interpolate(a[lo:lo + batch_size], size=(height, width), mode="bilinear", align_corners=False)
            concept = parts[rows]
            if include_discriminative:
                concept = torch.cat([concept, data.masks[rows][:, None]], 1)
            i, u = _intersections(up > t, concept)
            inter, union = inter + i, union + u
        iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
        out[layer.number] = Dissection(layer, concepts, iou, thresholds, float(quantile), int(index.size))
    return [out[layer.number] for layer in chosen]


def detectors(dissection: Dissection, threshold: float = 0.04) -> dict[str, list[int]]:
    """For each concept, the units whose best concept it is and whose IoU with it exceeds ``threshold``
    (Bau et al.'s labelling: one label per unit)."""
    best, value = dissection.best()
    return {c: [int(k) for k in np.flatnonzero((best == j) & (value > threshold))]
            for j, c in enumerate(dissection.concepts)}
