"""Receptive fields: which input pixels a unit of a layer can see.

For a unit at position ``(y, x)`` of a layer's output, the receptive field is the box of input pixels that
can change its value. Along one axis it is fixed by three numbers per layer, computed layer by layer from the
input (Araujo, Norris & Sim 2019, "Computing receptive fields of convolutional neural networks"):

* the **size** ``r`` (pixels),
* the **jump** ``j``: how many input pixels apart two neighbouring units are (the product of the strides),
* the **start**: the input coordinate of the centre of unit 0 (may be negative or fractional with padding or
  even kernels).

A layer of kernel ``M``, stride ``S``, padding ``O`` and dilation ``d`` on an input with ``(r, j, start)``
gives::

    r' = r + d*(M - 1)*j,    j' = S*j,    start' = start + (d*(M - 1)/2 - O)*j

Convolutions and pools (max, average, padded or not) follow this rule; ReLU, normalisation (LRN, batch norm)
and dropout act per position and keep the field; after ``flatten`` and in fully connected layers every unit
sees the whole image. The box of unit ``(y, x)`` runs from ``start + y*j - (r - 1)/2`` to
``start + y*j + (r - 1)/2``; :func:`receptive_box` clips it to the image.

Examples
--------
>>> from vefi.models import build_model
>>> fields = receptive_fields(build_model("mnist"))
>>> f = fields[4]                        # conv2, after conv1 (5x5) and pool1 (3x3, stride 2)
>>> f.size, f.jump, f.start
((11, 11), (4, 4), (0.0, 0.0))
>>> receptive_box(build_model("mnist"), "conv2", 3, 3)
(7, 7, 18, 18)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from vefi.layers import Layer, layer_table, resolve_layer

__all__ = ["ReceptiveField", "receptive_fields", "receptive_box", "format_receptive_table"]

# Kinds that act on each position on its own (or across channels only): the field passes unchanged.
_POINTWISE = ("relu", "lrn", "bn", "dropout", "softmax")


@dataclass(frozen=True)
class ReceptiveField:
    """The receptive field of the units of one layer, per axis ``(height, width)``.

    Attributes
    ----------
    layer : Layer
        The layer (its output is what the field describes).
    size : tuple of int
        Receptive field size in input pixels.
    jump : tuple of int
        Distance in input pixels between neighbouring units (the product of the strides so far).
    start : tuple of float
        Input coordinate of the centre of unit ``(0, 0)``.
    whole : bool
        Every unit sees the whole image (fully connected layers and everything after ``flatten``).
    input_size : tuple of int
        ``(H, W)`` of the image, for clipping.
    chain : tuple
        ``(kernel, stride, padding, dilation, input size)`` per axis of every conv and pool layer up to this
        one, for clipping the box layer by layer.
    """

    layer: Layer
    size: tuple[int, int]
    jump: tuple[int, int]
    start: tuple[float, float]
    whole: bool
    input_size: tuple[int, int]
    chain: tuple = ()

    def box(self, y, x, *, clip: bool = True):
        """Input box ``(top, left, bottom, right)`` of unit ``(y, x)``; bottom and right are exclusive, so that
        ``image[..., top:bottom, left:right]`` is the crop. ``y`` and ``x`` may be arrays (then so is each
        coordinate). With ``clip=False`` the box may reach outside the image (negative or beyond ``H, W``).
        For a layer whose units see the whole image, the box is the image whatever ``(y, x)``.

        Clipping walks back layer by layer and clips at every map, not only at the image: a layer whose
        windows do not reach the last rows of its input (``floor`` in its output size) never sees the input
        pixels only those rows see. For a field without holes (every kernel at least its stride, no
        dilation) the clipped box is then exactly the set of pixels with a nonzero gradient."""
        H, W = self.input_size
        y, x = np.asarray(y), np.asarray(x)
        if self.whole:
            shape = np.broadcast(y, x).shape
            out = [np.full(shape, v, dtype=np.int64) for v in (0, 0, H, W)]
        elif clip:
            out = [None] * 4
            for pos, axis in ((y, 0), (x, 1)):
                lo = hi = pos.astype(np.int64)
                for kernel, stride, padding, dilation, size in reversed(self.chain):
                    lo = np.clip(lo * stride[axis] - padding[axis], 0, size[axis] - 1)
                    hi = np.clip(hi * stride[axis] - padding[axis] + dilation[axis] * (kernel[axis] - 1), 0,
                                 size[axis] - 1)
                out[axis], out[axis + 2] = lo, hi + 1
        else:
            out = []
            for pos, axis in ((y, 0), (x, 1)):
                # start - (r - 1)/2 is an integer for every layer: the first input pixel unit 0 sees
                first = int(round(self.start[axis] - (self.size[axis] - 1) / 2))
                out.append(first + pos.astype(np.int64) * self.jump[axis])
            out = [out[0], out[1], out[0] + self.size[0], out[1] + self.size[1]]
        if out[0].ndim == 0:
            return tuple(int(v) for v in out)
        return tuple(out)


def _geometry(module: nn.Module, input_shape, output_shape):
    """``(kernel, stride, padding, dilation)`` per axis of a conv or pool layer, as pairs of ints."""
    def pair(v):
        return (int(v), int(v)) if not isinstance(v, (tuple, list)) else (int(v[0]), int(v[-1]))

    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        # the windows of an adaptive pool vary in size; the widest window and the mean step are the field
        size_in, size_out = input_shape[-2:], output_shape[-2:]
        stride = tuple(max(a // b, 1) for a, b in zip(size_in, size_out))
        kernel = tuple(-(-a // b) + (1 if a % b else 0) if b > 1 else a for a, b in zip(size_in, size_out))
        return kernel, stride, (0, 0), (1, 1)
    kernel = pair(module.kernel_size)
    stride = pair(module.stride if module.stride is not None else module.kernel_size)
    dilation = pair(getattr(module, "dilation", 1))
    padding = module.padding
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        else:  # "same": PyTorch pads the total d*(M - 1) with the smaller half first
            padding = tuple(d * (m - 1) // 2 for d, m in zip(dilation, kernel))
    return kernel, stride, pair(padding), dilation


def receptive_fields(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> dict[int, ReceptiveField]:
    """The receptive field of every layer of ``model``, keyed by layer number (as in
    :func:`vefi.layers.layer_table`).

    Parameters
    ----------
    model : torch.nn.Module
        A sequential network of conv, pool, pointwise (ReLU, LRN, batch norm, dropout), flatten and fully
        connected layers. Left exactly as it came.
    input_shape : tuple of int, optional
        ``(C, H, W)``; default ``model.input_shape``.

    Returns
    -------
    dict of int to ReceptiveField

    Raises
    ------
    ValueError
        A layer of a kind whose receptive field is unknown (e.g. an upsampling layer).

    Examples
    --------
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.Conv2d(2, 2, 3, stride=2, padding=1))
    >>> [(f.size[0], f.jump[0], f.start[0]) for f in receptive_fields(net, (1, 16, 16)).values()]
    [(3, 1, 1.0), (4, 2, 1.5), (8, 4, 1.5)]
    """
    table = layer_table(model, input_shape)
    if not table:
        raise ValueError("the model has no layers")
    image_shape = tuple(getattr(model, "input_shape", None) or input_shape or table[0].input_shape)
    if len(image_shape) != 3:
        raise ValueError(f"receptive fields need image input (C, H, W), got input shape {image_shape}")
    H, W = int(image_shape[-2]), int(image_shape[-1])
    size, jump, start, whole, chain = [1.0, 1.0], [1.0, 1.0], [0.0, 0.0], False, []
    fields: dict[int, ReceptiveField] = {}
    for layer in table:
        if whole or layer.kind in ("fc", "flatten") or len(layer.output_shape) != 3:
            whole = True
        elif layer.kind in ("conv", "pool") or isinstance(layer.module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            kernel, stride, padding, dilation = _geometry(layer.module, layer.input_shape, layer.output_shape)
            chain.append((kernel, stride, padding, dilation, tuple(int(v) for v in layer.input_shape[-2:])))
            for a in range(2):
                span = dilation[a] * (kernel[a] - 1)
                start[a] = start[a] + (span / 2 - padding[a]) * jump[a]
                size[a] = size[a] + span * jump[a]
                jump[a] = jump[a] * stride[a]
        elif layer.kind in _POINTWISE or layer.input_shape == layer.output_shape:
            pass
        else:
            raise ValueError(f"layer {layer.label} ({type(layer.module).__name__}) changes the map from "
                             f"{layer.input_shape} to {layer.output_shape} in a way whose receptive field is "
                             "unknown; supported: conv, pool, pointwise layers, flatten, fc")
        if whole:
            fields[layer.number] = ReceptiveField(layer, (H, W), (H, W), ((H - 1) / 2, (W - 1) / 2), True, (H, W))
        else:
            fields[layer.number] = ReceptiveField(layer, (int(size[0]), int(size[1])), (int(jump[0]), int(jump[1])),
                                                  (float(start[0]), float(start[1])), False, (H, W),
                                                  tuple(chain))
    return fields


def receptive_box(model: nn.Module, layer: int | str | Layer, y: int, x: int, *,
                  input_shape: tuple[int, ...] | None = None) -> tuple[int, int, int, int]:
    """The input box ``(top, left, bottom, right)`` seen by unit ``(y, x)`` of ``layer``, clipped to the image;
    bottom and right are exclusive (``image[..., top:bottom, left:right]`` is the crop).

    A unit of a fully connected layer sees the whole image; pass ``y = x = 0``.

    Raises
    ------
    ValueError
        Unknown layer, or ``(y, x)`` outside the layer's output map.

    Examples
    --------
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 2, 5, stride=2, padding=2))
    >>> receptive_box(net, 1, 0, 0, input_shape=(1, 16, 16)), receptive_box(net, 1, 7, 3, input_shape=(1, 16, 16))
    ((0, 0, 3, 3), (12, 4, 16, 9))
    """
    fields = receptive_fields(model, input_shape)
    found = resolve_layer([f.layer for f in fields.values()], layer)
    field = fields[found.number]
    shape = found.output_shape
    if len(shape) == 3:
        if not (0 <= int(y) < shape[1] and 0 <= int(x) < shape[2]):
            raise ValueError(f"unit (y, x) = ({y}, {x}) is outside the {shape[1]}x{shape[2]} output of layer "
                             f"{found.label}")
    elif (int(y), int(x)) != (0, 0):
        raise ValueError(f"layer {found.label} is a vector of units, each seeing the whole image: pass y = x = 0, "
                         f"got ({y}, {x})")
    return field.box(int(y), int(x))


def format_receptive_table(fields: dict[int, ReceptiveField]) -> str:
    """The receptive fields as a text table: layer number, type, name, output, size, jump, start."""
    rows = [("#", "type", "name", "output", "field", "jump", "start")]
    for number, f in fields.items():
        out = "x".join(map(str, f.layer.output_shape))
        if f.whole:
            rows.append((str(number), f.layer.kind, f.layer.name, out, "whole image", "-", "-"))
        else:
            rows.append((str(number), f.layer.kind, f.layer.name, out, f"{f.size[0]}x{f.size[1]}",
                         f"{f.jump[0]}x{f.jump[1]}", f"{f.start[0]:g}, {f.start[1]:g}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)
