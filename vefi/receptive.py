"""Receptive fields: which input pixels a unit of a layer can see, on any graph of layers.

For a unit at position ``(y, x)`` of a layer's output map, the receptive field is the box of input pixels
that can change its value: the bounding box of the support of ``d unit / d image`` for generic weights.
Along one axis, a chain of convolutions and pools gives every unit a field described by three numbers
(Araujo, Norris & Sim 2019, "Computing receptive fields of convolutional neural networks"):

* the **size** ``r`` (pixels),
* the **jump** ``j``: how many input pixels apart two neighbouring units are (the product of the strides),
* the **start**: the input coordinate of the centre of unit 0 (may be negative or fractional with padding or
  even kernels).

A layer of kernel ``M``, stride ``S``, padding ``O`` and dilation ``d`` on an input with ``(r, j, start)``
gives::

    r' = r + d*(M - 1)*j,    j' = S*j,    start' = start + (d*(M - 1)/2 - O)*j

Real networks are not chains. :func:`receptive_fields` runs the model once and follows every operation of
the forward pass (a ``torch.overrides.TorchFunctionMode`` sees functional calls, tensor methods, in-place
additions and reused modules, not only leaf modules), propagating per axis the interval of input pixels of
every position of every intermediate map:

* convolution and pooling (max, average, adaptive; padding, dilation, ``ceil_mode``): the rule above, and,
  per position, the union of the intervals of the taps that fall inside the input map;
* elementwise operations (activations, normalisation over channels, dropout, a linear layer over channels),
  residual additions and concatenations along channels (densenet, inception): the union of the inputs'
  intervals, position by position. The field of a layer is that of a *position* of its map, over all its
  channels: after a concatenation, the channels of one branch may see less;
* global operations (global or adaptive pooling to 1x1, flatten, fully connected layers, a squeeze-and-
  excitation gate that multiplies a map by a vector computed from the whole map, attention over tokens,
  normalisation over space): every unit sees the whole image. Such a field is flagged ``whole``; it has no
  jump and no start.

Merging branches whose jumps differ, or an adaptive pool whose windows differ in size, gives units fields of
different sizes: such a field is *irregular* (``size``, ``jump`` and ``start`` are ``None``); its clipped
boxes are still exact.

The box of unit ``(y, x)`` of a regular field runs (unclipped) from ``start + y*j - (r - 1)/2`` to
``start + y*j + (r - 1)/2``. The clipped box (:func:`receptive_box`, ``ReceptiveField.box``) is exact: at
every map on the way, taps that fall into padding or beyond the rows a floor-rounded output size uses are
left out, so it is the bounding box of the pixels that can change the unit.

Examples
--------
>>> import torch
>>> from torch import nn
>>> class Residual(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.conv1 = nn.Conv2d(1, 4, 3, stride=2, padding=1)
...         self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
...         self.down = nn.Conv2d(1, 4, 1, stride=2)
...     def forward(self, x):
...         return self.conv2(torch.relu(self.conv1(x))) + self.down(x)
>>> fields = receptive_fields(Residual(), (1, 16, 16))
>>> [(f.layer.name, f.size, f.jump, f.start) for f in fields.values()]
[('conv1', (3, 3), (2, 2), (0.0, 0.0)), ('conv2', (7, 7), (2, 2), (0.0, 0.0)), ('down', (1, 1), (2, 2), (0.0, 0.0))]
>>> fields[2].box(3, 3)
(3, 3, 10, 10)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field as dataclass_field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from vefi._model_state import preserved
from vefi.layers import Layer, layer_table, resolve_layer

__all__ = ["ReceptiveField", "receptive_fields", "receptive_box", "format_receptive_table"]

_EMPTY = np.iinfo(np.int64).max // 4  # lower end of an empty interval (its upper end is -_EMPTY)


@dataclass(frozen=True)
class ReceptiveField:
    """The receptive field of the units of one layer, per axis ``(height, width)``.

    Attributes
    ----------
    layer : Layer
        The layer (its output is what the field describes: one call of a module, or a block's output).
    size : tuple of int or None
        Receptive field size in input pixels; ``(H, W)`` of the image when ``whole``; ``None`` when irregular.
    jump : tuple of int or None
        Distance in input pixels between neighbouring units (the product of the strides so far); ``None``
        when ``whole`` (there are no positions to step between) or irregular.
    start : tuple of float or None
        Input coordinate of the centre of unit ``(0, 0)``; ``None`` when ``whole`` or irregular.
    whole : bool
        Every unit sees the whole image: fully connected layers, everything after ``flatten`` or a global
        pool, maps gated by a global vector (squeeze-and-excitation), tokens of a transformer.
    input_size : tuple of int
        ``(H, W)`` of the image.
    map_size : tuple of int or None
        ``(h, w)``: the positions ``(y, x)`` of the layer's output map; ``None`` for a vector of units (a
        fully connected layer) and for outputs that are not maps (tokens), which have no positions.
    """

    layer: Layer
    size: tuple[int, int] | None
    jump: tuple[int, int] | None
    start: tuple[float, float] | None
    whole: bool
    input_size: tuple[int, int]
    map_size: tuple[int, int] | None = None
    # exact clipped intervals per axis: (first, last + 1) arrays over the map's positions (length 1: whole)
    _bounds: tuple = dataclass_field(default=(), repr=False, compare=False)

    @property
    def regular(self) -> bool:
        """Whether every unit's unclipped field has the same size, one jump apart (false when ``whole``)."""
        return not self.whole and self.jump is not None

    def box(self, y, x, *, clip: bool = True):
        """Input box ``(top, left, bottom, right)`` of unit ``(y, x)``; bottom and right are exclusive, so that
        ``image[..., top:bottom, left:right]`` is the crop. ``y`` and ``x`` may be arrays (then so is each
        coordinate).

        With ``clip`` (the default) the box is exact: the bounding box of the input pixels that can change
        the unit, with every map on the way clipped (padding and the rows a floor-rounded output size leaves
        out are not seen). With ``clip=False`` it is the unit's full field, which may reach outside the image
        (negative or beyond ``H, W``); every unit's box then has the same size.

        For a layer whose units see the whole image, the box is the same whatever ``(y, x)``: the part of the
        image the network looks at (the whole image, unless floor-rounded output sizes leave out its last
        rows or columns); unclipped, the image.

        Raises
        ------
        ValueError
            The layer's output is not a map of positions nor a vector of units (tokens); ``(y, x)`` outside
            the map; ``clip=False`` for an irregular field.
        """
        H, W = self.input_size
        y, x = np.asarray(y), np.asarray(x)
        if not self._bounds:
            raise ValueError(f"layer {self.layer.label} ({self.layer.name}) has output of shape "
                             f"{self.layer.output_shape}, which is not a map of positions (C, h, w) nor a vector "
                             "of units: its units (e.g. tokens of a transformer) have no (y, x) and no box. "
                             "Every unit of it sees the whole image (field.whole is True)")
        shape = np.broadcast(y, x).shape
        if self.map_size is not None:
            for pos, n, name in ((y, self.map_size[0], "y"), (x, self.map_size[1], "x")):
                if np.any(pos < 0) or np.any(pos >= n):
                    raise ValueError(f"{name} = {pos} is outside the {self.map_size[0]}x{self.map_size[1]} "
                                     f"output map of layer {self.layer.label}")
        if self.whole:
            if clip:
                (top, bottom), (left, right) = self._bounds
                values = (top[0], left[0], bottom[0], right[0])
            else:
                values = (0, 0, H, W)
            out = [np.full(shape, v, dtype=np.int64) for v in values]
        elif clip:
            (top, bottom), (left, right) = self._bounds
            out = [np.broadcast_to(a[p], shape) for a, p in ((top, y), (left, x), (bottom, y), (right, x))]
            # a unit whose windows all fall into padding sees nothing: the empty box (0, 0, 0, 0)
            empty = (out[0] >= out[2]) | (out[1] >= out[3])
            out = [np.where(empty, 0, v) for v in out]
        else:
            if not self.regular:
                raise ValueError(f"layer {self.layer.label} ({self.layer.name}) has an irregular receptive field "
                                 "(branches merged with different jumps, or an adaptive pool with windows of "
                                 "different sizes): its units' fields differ in size, so there is no unclipped "
                                 "box of one size; use the clipped box (clip=True)")
            out = []
            for pos, axis in ((y, 0), (x, 1)):
                # start - (r - 1)/2 is an integer for every layer: the first input pixel unit 0 sees
                first = int(round(self.start[axis] - (self.size[axis] - 1) / 2))
                out.append(np.broadcast_to(first + pos.astype(np.int64) * self.jump[axis], shape))
            out = [out[0], out[1], out[0] + self.size[0], out[1] + self.size[1]]
        if len(shape) == 0:
            return tuple(int(v) for v in out)
        return tuple(np.array(v, dtype=np.int64) for v in out)


# --------------------------------------------------------------------------------------------------------
# What the trace attaches to every tensor that depends on the image


@dataclass(frozen=True)
class _Map:
    """Per axis (rows, columns), the input interval of every position of a tensor.

    ``lo[a][p]``, ``hi[a][p]``: first and last input pixel (inclusive) position ``p`` along axis ``a`` can
    see (``_EMPTY, -_EMPTY`` for none). ``dims``: which dimensions of the tensor (batch included) are the
    rows and columns. ``linear[a]``: ``(first, size, jump)`` of the unclipped field along ``a``, or None when
    irregular. A ``whole`` map has no dims: ``lo``, ``hi`` hold one interval, seen by every element.
    """

    whole: bool
    lo: tuple
    hi: tuple
    dims: tuple[int, int] | None = None
    linear: tuple | None = None


def _image_map(shape) -> _Map:
    H, W = shape[-2:]
    return _Map(False, (np.arange(H), np.arange(W)), (np.arange(H), np.arange(W)), (len(shape) - 2, len(shape) - 1),
                ((0, 1, 1), (0, 1, 1)))


def _whole(maps) -> _Map:
    """Every element sees the union of everything the given maps see."""
    lo = tuple(min(int(m.lo[a].min()) for m in maps) for a in range(2))
    hi = tuple(max(int(m.hi[a].max()) for m in maps) for a in range(2))
    return _Map(True, tuple(np.array([v]) for v in lo), tuple(np.array([v]) for v in hi))


class _Unknown(ValueError):
    pass


def _windows(m: _Map, n_out, kernel, stride, padding, dilation) -> _Map:
    """A convolution or pool over the last two dimensions."""
    lo, hi, linear = [], [], []
    for a in range(2):
        n_in = len(m.lo[a])
        taps = (np.arange(n_out[a])[:, None] * stride[a] - padding[a]
                + dilation[a] * np.arange(kernel[a])[None, :])
        valid = (taps >= 0) & (taps < n_in)
        taps = np.clip(taps, 0, n_in - 1)
        lo.append(np.where(valid, m.lo[a][taps], _EMPTY).min(1))
        hi.append(np.where(valid, m.hi[a][taps], -_EMPTY).max(1))
        if m.linear[a] is None:
            linear.append(None)
        else:
            first, size, jump = m.linear[a]
            linear.append((first - padding[a] * jump, size + dilation[a] * (kernel[a] - 1) * jump, stride[a] * jump))
    return _Map(False, tuple(lo), tuple(hi), m.dims, tuple(linear))


def _adaptive(m: _Map, n_out) -> _Map:
    """An adaptive pool: window ``p`` of ``n`` outputs over ``N`` inputs is ``[floor(pN/n), ceil((p+1)N/n))``."""
    lo, hi, linear = [], [], []
    for a in range(2):
        n_in = len(m.lo[a])
        p = np.arange(n_out[a])
        begin, end = (p * n_in) // n_out[a], -((-(p + 1) * n_in) // n_out[a])
        lo.append(np.array([m.lo[a][b:e].min() for b, e in zip(begin, end)]))
        hi.append(np.array([m.hi[a][b:e].max() for b, e in zip(begin, end)]))
        kernel, step = end - begin, np.diff(begin)
        if m.linear[a] is None or np.any(kernel != kernel[0]) or np.any(step != (step[0] if len(step) else 0)):
            linear.append(None)  # windows of different sizes (or steps): no single field size
        else:
            first, size, jump = m.linear[a]
            stride = int(step[0]) if len(step) else n_in
            linear.append((first, size + (int(kernel[0]) - 1) * jump, stride * jump))
    return _Map(False, tuple(lo), tuple(hi), m.dims, tuple(linear))


def _union(parts, out: torch.Tensor) -> _Map:
    """Elementwise combination (with broadcasting) of ``(tensor, map)`` pairs into ``out``."""
    maps = [m for _, m in parts]
    if any(m.whole for m in maps):
        return _whole(maps)
    K = out.dim()
    dims = {tuple(d + K - t.dim() for d in m.dims) for t, m in parts}
    if len(dims) != 1:
        raise _Unknown("combines maps whose rows and columns are different dimensions")
    dims = dims.pop()
    lo, hi, linear = [], [], []
    for a in range(2):
        n = out.shape[dims[a]]
        if any(len(m.lo[a]) not in (1, n) for m in maps):
            raise _Unknown("combines maps of different sizes")
        lo.append(np.min([np.broadcast_to(m.lo[a], n) for m in maps], axis=0))
        hi.append(np.max([np.broadcast_to(m.hi[a], n) for m in maps], axis=0))
        # a map broadcast along an axis gives every position the same field: jump 0
        forms = [None if m.linear[a] is None else
                 (m.linear[a][0], m.linear[a][1], m.linear[a][2] if len(m.lo[a]) == n or n == 1 else 0)
                 for m in maps]
        if any(f is None for f in forms) or len({f[2] for f in forms}) > 1:
            linear.append(None)  # branches with different jumps: fields of different sizes
        else:
            first = min(f[0] for f in forms)
            linear.append((first, max(f[0] + f[1] for f in forms) - first, forms[0][2]))
    return _Map(False, tuple(lo), tuple(hi), dims, tuple(linear))


def _moved(m: _Map, dims) -> _Map:
    return _Map(False, m.lo, m.hi, tuple(dims), m.linear)


def _reshaped(m: _Map, shape_in, shape_out) -> _Map:
    """A view or reshape: the rows and columns survive if the output has them as dimensions with the same
    number of elements before each; merged with other dimensions (flatten), every element is whole."""
    hd, wd = m.dims
    before, between = math.prod(shape_in[:hd]), math.prod(shape_in[hd + 1:wd])
    H, W = shape_in[hd], shape_in[wd]
    for i in range(len(shape_out)):
        if shape_out[i] != H or math.prod(shape_out[:i]) != before:
            continue
        for j in range(i + 1, len(shape_out)):
            if shape_out[j] == W and math.prod(shape_out[i + 1:j]) == between:
                return _moved(m, (i, j))
    return _whole([m])


def _arg(args, kwargs, index, name, default=None):
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def _pair(v):
    return (int(v), int(v)) if not isinstance(v, (tuple, list)) else (int(v[0]), int(v[-1]))


def _dim(d, nd):
    return int(d) % nd if nd else 0


def _dim_list(d, nd):
    if d is None:
        return None
    return [_dim(v, nd) for v in (d if isinstance(d, (tuple, list)) else [d])]


# names as they reach __torch_function__ (leading and trailing underscores stripped: __iadd__ -> iadd,
# relu_ -> relu); functions wrapped by torch.nn.functional's boolean_dispatch are recognised by identity
_BY_IDENTITY = {F.max_pool2d: "max_pool2d", F.adaptive_max_pool2d: "adaptive_max_pool2d"}
_WINDOWS = {"conv2d", "max_pool2d", "max_pool2d_with_indices", "avg_pool2d"}
_ADAPTIVE = {"adaptive_avg_pool2d", "adaptive_max_pool2d", "adaptive_max_pool2d_with_indices"}
_SAME = {  # one input, output of the same shape, each element from the same position
    "relu", "relu6", "hardtanh", "hardswish", "hardsigmoid", "silu", "gelu", "sigmoid", "tanh", "elu", "selu",
    "celu", "leaky_relu", "rrelu", "prelu", "mish", "softplus", "softsign", "tanhshrink", "threshold",
    "logsigmoid", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "batch_norm", "local_response_norm", "contiguous", "clone", "detach", "to", "type", "float", "double",
    "half", "bfloat16", "cpu", "cuda", "abs", "neg", "exp", "log", "sqrt", "rsqrt", "square", "reciprocal",
    "clamp", "clamp_min", "clamp_max", "clip", "sign", "erf", "sin", "cos", "requires_grad", "pos",
    "nan_to_num", "floor", "ceil", "round", "log1p", "expm1", "get",
}
_ELEMENTWISE = {  # several inputs, broadcast
    "add", "radd", "iadd", "sub", "rsub", "isub", "mul", "rmul", "imul", "div", "truediv", "rtruediv",
    "itruediv", "true_divide", "pow", "rpow", "ipow", "maximum", "minimum", "where", "addcmul", "addcdiv",
    "lerp", "fmax", "fmin", "hypot", "atan2",
}
_RESHAPES = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as",
             "expand", "expand_as"}
_ALONG_DIM = {"softmax", "log_softmax", "softmin", "normalize", "cumsum", "cumprod", "logcumsumexp"}
_REDUCTIONS = {"mean", "sum", "amax", "amin", "max", "min", "std", "var", "prod", "logsumexp", "nansum",
               "nanmean", "median", "norm", "argmax", "argmin", "all", "any", "std_mean", "var_mean"}
_GLOBAL = {"multi_head_attention_forward", "scaled_dot_product_attention", "group_norm", "instance_norm",
           "einsum", "bmm", "baddbmm"}
_CONSTANT = {"zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "new_zeros",
             "new_ones", "new_empty", "new_full", "new_tensor"}
_SPLITS = {"chunk", "split", "tensor_split", "unbind", "split_with_sizes"}


def _propagate(name, args, kwargs, map_of, out):
    """The map of every tensor ``out`` returns, from the maps of the traced inputs (``map_of(tensor)``, None
    for a tensor that does not depend on the image)."""
    tensors = [(t, map_of(t)) for t in _flat_tensors(args, kwargs) if map_of(t) is not None]
    if name in _CONSTANT:
        return None
    if all(m.whole for _, m in tensors):
        return _whole([m for _, m in tensors])  # whatever the operation, it cannot see more
    first = args[0] if args and map_of(args[0]) is not None else None
    m = map_of(first) if first is not None else None
    if name in _ELEMENTWISE or (name in ("max", "min") and len(args) > 1 and isinstance(args[1], torch.Tensor)):
        return _union(tensors, out)
    if name in ("cat", "concat", "concatenate", "stack"):
        seq = _arg(args, kwargs, 0, "tensors")
        nd = seq[0].dim() + (name == "stack")
        dim = _dim(_arg(args, kwargs, 1, "dim", 0), nd)
        parts = []
        for t in seq:
            tm = map_of(t)
            if tm is None:
                continue
            if not tm.whole and name == "stack":
                tm = _moved(tm, [d + (d >= dim) for d in tm.dims])
            elif not tm.whole and dim in tm.dims:
                raise _Unknown(f"concatenates along dimension {dim}, which is rows or columns of the map")
            parts.append((out, tm))
        return _union(parts, out)
    if m is None or m.whole:
        raise _Unknown("takes a map as a later argument")
    nd = first.dim()
    if name in _WINDOWS:
        if m.dims != (nd - 2, nd - 1):
            raise _Unknown("slides a window over dimensions that are not the map's rows and columns")
        if name == "conv2d":
            weight = _arg(args, kwargs, 1, "weight")
            kernel = tuple(weight.shape[-2:])
            stride, dilation = _pair(_arg(args, kwargs, 3, "stride", 1)), _pair(_arg(args, kwargs, 5, "dilation", 1))
            padding = _arg(args, kwargs, 4, "padding", 0)
            if isinstance(padding, str):  # "same" pads d*(M - 1) in total, the smaller half first
                padding = (0, 0) if padding == "valid" else tuple(d * (k - 1) // 2 for d, k in zip(dilation, kernel))
            padding = _pair(padding)
        else:
            kernel = _pair(_arg(args, kwargs, 1, "kernel_size"))
            stride = _arg(args, kwargs, 2, "stride")
            stride = kernel if stride is None or (isinstance(stride, (tuple, list)) and not stride) else _pair(stride)
            padding = _pair(_arg(args, kwargs, 3, "padding", 0))
            dilation = _pair(_arg(args, kwargs, 4, "dilation", 1)) if name != "avg_pool2d" else (1, 1)
        result = out[0] if isinstance(out, (tuple, list)) else out
        return _windows(m, tuple(result.shape[-2:]), kernel, stride, padding, dilation)
    if name in _ADAPTIVE:
        if m.dims != (nd - 2, nd - 1):
            raise _Unknown("pools over dimensions that are not the map's rows and columns")
        result = out[0] if isinstance(out, (tuple, list)) else out
        n_out = tuple(result.shape[-2:])
        return _whole([m]) if n_out == (1, 1) else _adaptive(m, n_out)
    if name in _SAME:
        if tuple(out.shape) != tuple(first.shape):
            raise _Unknown("changes the shape")
        return m
    if name in ("linear", "matmul"):  # acts on the last dimension
        return _whole([m]) if nd - 1 in m.dims or len(tensors) > 1 else m
    if name == "layer_norm":
        normalized = _arg(args, kwargs, 1, "normalized_shape")
        count = 1 if isinstance(normalized, int) else len(normalized)
        return _whole([m]) if any(d >= nd - count for d in m.dims) else m
    if name in _ALONG_DIM:
        dim = _arg(args, kwargs, 1, "dim", 1 if name == "normalize" else None)
        if name == "normalize":
            dim = _arg(args, kwargs, 2, "dim", 1)
        return _whole([m]) if dim is None or _dim(dim, nd) in m.dims else m
    if name in _REDUCTIONS:
        dim = _arg(args, kwargs, 2 if name == "norm" else 1, "dim")
        dims = _dim_list(dim, nd)
        if dims is None or set(dims) & set(m.dims):
            return _whole([m])
        keep = _arg(args, kwargs, 3 if name == "norm" else 2, "keepdim", False)
        return m if keep else _moved(m, [d - sum(r < d for r in dims) for d in m.dims])
    if name in _GLOBAL:
        return _whole([m])
    if name in _RESHAPES:
        result = out
        return _reshaped(m, tuple(first.shape), tuple(result.shape))
    if name in ("permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t"):
        perm = list(range(nd))
        if name == "permute":
            order = args[1:] if len(args) > 1 else [kwargs["dims"]]
            perm = [_dim(d, nd) for d in (order[0] if len(order) == 1 and isinstance(order[0], (tuple, list))
                                          else order)]
        elif name == "t":
            perm = perm[::-1]
        elif name in ("movedim", "moveaxis"):
            src = _dim_list(_arg(args, kwargs, 1, "source"), nd)
            dst = _dim_list(_arg(args, kwargs, 2, "destination"), nd)
            rest = iter(d for d in range(nd) if d not in src)
            placed = dict(zip(dst, src))
            perm = [placed[i] if i in placed else next(rest) for i in range(nd)]
        else:
            a, b = _dim(_arg(args, kwargs, 1, "dim0"), nd), _dim(_arg(args, kwargs, 2, "dim1"), nd)
            perm[a], perm[b] = perm[b], perm[a]
        return _moved(m, [perm.index(d) for d in m.dims])
    if name in _SPLITS or name in ("narrow", "select", "index_select"):
        dim = _dim(_arg(args, kwargs, 1 if name in ("narrow", "select", "index_select", "unbind") else 2, "dim", 0), nd)
        if dim in m.dims:
            raise _Unknown(f"splits or selects along dimension {dim}, which is rows or columns of the map")
        if name in ("unbind", "select"):
            return _moved(m, [d - (d > dim) for d in m.dims])
        return m
    if name == "getitem":
        return _indexed(m, first, _arg(args, kwargs, 1, "index"))
    if name == "pad":
        return _padded(m, first, out, _arg(args, kwargs, 1, "pad"), _arg(args, kwargs, 2, "mode", "constant"))
    raise _Unknown("is an operation whose receptive field is unknown")


def _indexed(m: _Map, tensor, index) -> _Map:
    """Basic indexing (ints, full slices, None, Ellipsis) on dimensions other than the rows and columns."""
    index = index if isinstance(index, tuple) else (index,)
    used = sum(1 for i in index if i is not None and i is not Ellipsis)
    dims_out, d_in, d_out = {}, 0, 0
    for item in index:
        if item is Ellipsis:
            for _ in range(tensor.dim() - used):
                dims_out[d_in], d_in, d_out = d_out, d_in + 1, d_out + 1
        elif item is None:
            d_out += 1
        elif isinstance(item, slice):
            if d_in in m.dims and item.indices(tensor.shape[d_in]) != (0, tensor.shape[d_in], 1):
                raise _Unknown("slices the rows or columns of the map")
            dims_out[d_in], d_in, d_out = d_out, d_in + 1, d_out + 1
        elif isinstance(item, int) and not isinstance(item, bool) and d_in not in m.dims:
            d_in += 1
        else:
            raise _Unknown("indexes the rows or columns of the map, or indexes with tensors")
    while d_in < tensor.dim():
        dims_out[d_in], d_in, d_out = d_out, d_in + 1, d_out + 1
    return _moved(m, [dims_out[d] for d in m.dims])


def _padded(m: _Map, tensor, out, pad, mode) -> _Map:
    """``F.pad`` with zeros: padded positions see nothing; the field moves like a conv's padding."""
    nd, lo, hi, linear = tensor.dim(), list(m.lo), list(m.hi), list(m.linear)
    for k in range(len(pad) // 2):
        d, before = nd - 1 - k, int(pad[2 * k])
        if d not in m.dims or before == 0 == int(pad[2 * k + 1]):
            continue
        if mode != "constant":
            raise _Unknown(f"pads the map in mode {mode!r}, which copies pixels")
        a = m.dims.index(d)
        source = np.arange(out.shape[d]) - before
        valid = (source >= 0) & (source < len(m.lo[a]))
        source = np.clip(source, 0, len(m.lo[a]) - 1)
        lo[a] = np.where(valid, m.lo[a][source], _EMPTY)
        hi[a] = np.where(valid, m.hi[a][source], -_EMPTY)
        if linear[a] is not None:
            first, size, jump = linear[a]
            linear[a] = (first - before * jump, size, jump)
    return _Map(False, tuple(lo), tuple(hi), m.dims, tuple(linear))


def _flat_tensors(args, kwargs):
    for value in [*args, *kwargs.values()]:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (tuple, list)):
            yield from (v for v in value if isinstance(v, torch.Tensor))


def _name(func) -> str:
    try:
        name = _BY_IDENTITY.get(func)
    except TypeError:  # an unhashable callable
        name = None
    return name or getattr(func, "__name__", "").strip("_")


class _Trace(TorchFunctionMode):
    """Follow the image through every torch function and tensor method of one forward pass."""

    def __init__(self, image: torch.Tensor):
        super().__init__()
        # id -> (tensor, map); holding the tensor keeps its id from being reused during the pass
        self.maps: dict[int, tuple[torch.Tensor, _Map]] = {id(image): (image, _image_map(image.shape))}
        self.modules: list[str] = []  # the modules being run, for error messages

    def map_of(self, tensor):
        entry = self.maps.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None
        return entry[1] if entry is not None else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not any(id(t) in self.maps for t in _flat_tensors(args, kwargs)):
            return out  # does not depend on the image (parameters, constants)
        outputs = [o for o in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(o, torch.Tensor)]
        name = _name(func)
        if not outputs:
            if name == "setitem" and isinstance(_arg(args, kwargs, 2, "value"), torch.Tensor) \
                    and self.map_of(args[2]) is not None and not self.map_of(args[2]).whole:
                raise self._error(name, args, "writes a map into part of a tensor")
            return out
        try:
            result = _propagate(name, args, kwargs, self.map_of, out)
        except _Unknown as why:
            raise self._error(name, args, str(why)) from None
        if result is not None:
            for o in outputs:
                self.maps[id(o)] = (o, result)
        return out

    def _error(self, name, args, why):
        shapes = [tuple(t.shape) for t in args if isinstance(t, torch.Tensor)]
        where = f" in module {self.modules[-1]}" if self.modules else ""
        return ValueError(f"the forward pass calls {name!r} on tensors of shapes {shapes}{where}, which {why}: "
                          "its receptive field is unknown. Supported: conv2d, max/avg/adaptive pools, elementwise "
                          "operations and activations, additions, concatenation along channels, normalisation, "
                          "reshapes and permutations that keep the rows and columns, global pools, flatten and "
                          "fully connected layers")


def receptive_fields(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> dict[int, ReceptiveField]:
    """The receptive field of every layer of ``model``, keyed by layer number (as in
    :func:`vefi.layers.layer_table`).

    Parameters
    ----------
    model : torch.nn.Module
        Any network on images made of convolutions, pools, elementwise operations, residual additions,
        concatenations, global pools, flatten, fully connected layers, gates and attention (the torchvision
        classifiers are). Run once on a zero image; left exactly as it came.
    input_shape : tuple of int, optional
        ``(C, H, W)``; default ``model.input_shape``.

    Returns
    -------
    dict of int to ReceptiveField

    Raises
    ------
    ValueError
        No image input, or an operation whose receptive field is unknown (e.g. upsampling); the message names
        the operation and the module that calls it.

    Examples
    --------
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.Conv2d(2, 2, 3, stride=2, padding=1))
    >>> [(f.size[0], f.jump[0], f.start[0]) for f in receptive_fields(net, (1, 16, 16)).values()]
    [(3, 1, 1.0), (4, 2, 1.5), (8, 4, 1.5)]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    table = layer_table(model, input_shape)
    if not table:
        raise ValueError("the model has no layers")
    image_shape = tuple(getattr(model, "input_shape", None) or input_shape or table[0].input_shape)
    if len(image_shape) != 3:
        raise ValueError(f"receptive fields need image input (C, H, W), got input shape {image_shape}")
    H, W = int(image_shape[-2]), int(image_shape[-1])
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    image = torch.zeros((1, *image_shape), device=device, dtype=dtype)
    trace = _Trace(image)
    names = {id(m): n for n, m in model.named_modules()}
    wanted = {(id(layer.module), layer.call) for layer in table}
    counts: dict[int, int] = {}
    seen: dict[tuple[int, int], _Map | None] = {}

    def pre_hook(module, inputs):
        trace.modules.append(f"{names.get(id(module), '?')!r} ({type(module).__name__})")

    def hook(module, inputs, output):
        trace.modules.pop()
        counts[id(module)] = call = counts.get(id(module), 0) + 1
        if (id(module), call) in wanted:  # each call of a module is its own layer
            seen[(id(module), call)] = trace.map_of(output)

    with preserved(model):
        handles = []
        try:
            for module in model.modules():
                handles.append(module.register_forward_pre_hook(pre_hook))
                handles.append(module.register_forward_hook(hook))
            model.eval()
            with torch.no_grad(), trace:
                model(image)
        finally:
            for h in handles:
                h.remove()
            trace.maps.clear()
    return {layer.number: _field(layer, seen.get((id(layer.module), layer.call)), (H, W)) for layer in table}


def _field(layer: Layer, m: _Map | None, image_size) -> ReceptiveField:
    shape = layer.output_shape
    if m is None or m.whole:
        if m is None:  # an output that does not depend on the image, or not a tensor: no box
            bounds = ()
        else:
            bounds = tuple((m.lo[a], m.hi[a] + 1) for a in range(2))
        if len(shape) == 3:
            map_size = (int(shape[1]), int(shape[2]))
        else:
            map_size = None
            if len(shape) != 1:
                bounds = ()  # tokens (or other non-map outputs): no positions, no box
        return ReceptiveField(layer, tuple(image_size), None, None, True, tuple(image_size), map_size, bounds)
    map_size = tuple(len(m.lo[a]) for a in range(2))
    empty = [m.lo[a] > m.hi[a] for a in range(2)]
    bounds = tuple((np.where(empty[a], 0, m.lo[a]), np.where(empty[a], 0, m.hi[a] + 1)) for a in range(2))
    if any(f is None for f in m.linear):
        size = jump = start = None
    else:
        size = tuple(int(f[1]) for f in m.linear)
        jump = tuple(int(f[2]) for f in m.linear)
        start = tuple(float(f[0] + (f[1] - 1) / 2) for f in m.linear)
    return ReceptiveField(layer, size, jump, start, False, tuple(image_size), map_size, bounds)


def receptive_box(model: nn.Module, layer: int | str | Layer, y: int, x: int, *,
                  input_shape: tuple[int, ...] | None = None) -> tuple[int, int, int, int]:
    """The input box ``(top, left, bottom, right)`` seen by unit ``(y, x)`` of ``layer``, clipped to the image
    (exact: see :meth:`ReceptiveField.box`); bottom and right are exclusive (``image[..., top:bottom,
    left:right]`` is the crop).

    A unit of a fully connected layer sees the whole image; pass ``y = x = 0``.

    Raises
    ------
    ValueError
        Unknown layer, ``(y, x)`` outside the layer's output map, or a layer whose units have no position
        (tokens).

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
    if field.map_size is not None:
        if not (0 <= int(y) < field.map_size[0] and 0 <= int(x) < field.map_size[1]):
            raise ValueError(f"unit (y, x) = ({y}, {x}) is outside the {field.map_size[0]}x{field.map_size[1]} "
                             f"output of layer {found.label}")
    elif len(found.output_shape) == 1 and (int(y), int(x)) != (0, 0):
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
        elif not f.regular:
            rows.append((str(number), f.layer.kind, f.layer.name, out, "irregular", "-", "-"))
        else:
            rows.append((str(number), f.layer.kind, f.layer.name, out, f"{f.size[0]}x{f.size[1]}",
                         f"{f.jump[0]}x{f.jump[1]}", f"{f.start[0]:g}, {f.start[1]:g}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)
