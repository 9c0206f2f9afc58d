"""Back-projection of internal features to input space: backprop, deconvnet, guided backprop, stride fix.

A feature is one channel (or one unit) of one layer. Back-projecting it means sending a seed signal from
that layer back to the pixels with the *same weights* the forward pass used, and a rule at every ReLU that
decides which of the incoming signal ``R`` passes, given the ReLU's forward input ``x``:

=============  ===========================  =========================================
rule           ReLU backward                reference
=============  ===========================  =========================================
``backprop``   ``R * [x > 0]``              the plain gradient (Simonyan et al. 2014)
``deconvnet``  ``R * [R > 0]``              Zeiler & Fergus 2014
``guided``     ``R * [x > 0] * [R > 0]``    Springenberg et al. 2015
=============  ===========================  =========================================

**Activations of modern networks.** For an activation ``y = f(x)`` with local derivative ``f'(x)``:

==================  =================  ====================  ====================================
layer               ``backprop``       ``deconvnet``         ``guided``
==================  =================  ====================  ====================================
monotone            ``R * f'(x)``      ``R * [R > 0]``       ``R * [R > 0] * f'(x)``
non-monotone        ``R * f'(x)``      ``R * [R > 0]``       ``R * [R > 0] * max(f'(x), 0)``
gate ``x * g``      the gradient       ``R * g`` to ``x``    as deconvnet
layer/group norm    the gradient       ``R * w / sigma``     as deconvnet
==================  =================  ====================  ====================================

* monotone: ReLU, ReLU6 and Hardtanh, LeakyReLU of slope >= 0, Sigmoid, Hardsigmoid;
* non-monotone: Hardswish, SiLU, GELU (``approximate="none"`` or ``"tanh"``), LeakyReLU of negative slope;
* gate: a product one of whose factors ``g`` is the output of ``torch.sigmoid``/``F.hardsigmoid``
  (squeeze-and-excitation); the gradient runs through both factors, deconvnet and guided send ``R * g`` to
  ``x`` and nothing down the gate's branch;
* layer/group norm: ``F.layer_norm`` (``nn.LayerNorm``, ConvNeXt's ``LayerNorm2d``), ``F.group_norm``,
  with weight ``w`` and the statistics held constant, ``sigma = sqrt(var + eps)``.

Why these, and not others:

* ``backprop`` is the gradient everywhere, whatever the layer: the maps equal ``torch.autograd``'s.
* ``deconvnet`` never looks at the forward input of a nonlinearity (Zeiler & Fergus rectify the
  *reconstruction*): every activation, smooth or not, passes the positive part of the signal.
* ``guided`` is backprop gated by ``[R > 0]``. Where SiLU, GELU and Hardswish dip below zero their derivative
  is negative and would turn a positive (supporting) signal into a negative one; guided backprop keeps only
  what increases the feature through every layer, so the derivative is clamped at 0. The output of every
  guided activation is then ``>= 0``, as for a ReLU, for which the rule is Springenberg's exactly.
* A squeeze-and-excitation gate ``g`` (``torch.sigmoid``/``F.hardsigmoid``, also behind a view or reshape)
  rescales channels by weights in ``[0, 1]`` computed from the same image. deconvnet and guided reconstruct
  the *pattern* that drives a feature; they treat the gate like a weight (``R * g`` to ``x``, no sign change)
  and send nothing down the gate's branch, whose global average pool would smear the signal uniformly over
  the image. A product ``x * sigmoid(x)`` written out by hand is such a gate too (use ``F.silu`` for the
  SiLU rule). Products of two non-gate tensors go back by their gradient under every rule.
* The gradient of a LayerNorm/GroupNorm subtracts the signal's mean over the normalised axes and its
  projection on the normalised input, so a positive guided signal comes out with both signs. Holding the
  statistics (mean, ``sigma = sqrt(var + eps)``) constant makes the layer what an eval-mode BatchNorm is, an
  affine map, whose weight ``w / sigma`` the signal goes through.

Layers whose output is channel-last (after a ``Permute`` in a ConvNeXt block) or a sequence of tokens (a
ViT's encoder) cannot be seeded: their first axis is not a channel. They are refused, with the nearest
channel-first layer to pass instead; back-projection *through* them is fine.

Convolutions go back by the transposed convolution with the same weights and no bias (their gradient),
max-pools through the switches of the forward pass, every other layer by its gradient.

**Stride fix** (Oramas et al. 2019, Sec. 3.3, Eq. 2-3). A convolution of kernel ``M``, stride ``S > 1``,
padding ``O`` on an input of size ``A`` (per axis) has an output of size ``B``. Its transposed convolution
reaches some input pixels through more kernel taps than others, with period ``S``: a grid. The fix resamples
the incoming map (nearest neighbour, ``"nearest-exact"``, as MATLAB's ``imresize``) from ``B`` to the output
size of the *stride-1* version of the layer, ``A + 2*O - M + 1``, and back-projects it with stride 1, which
lands on exactly ``A`` pixels, each reached by the same number of taps. Every strided ``Conv2d`` is fixed with
its own input size per axis, depthwise and grouped ones included. A strided pool is fixed in one of two
ways (``pool_fix``):

* ``"stride1"``: resample the map the same way and route it through a stride-1 pool on the same input (the
  switches of a stride-1 max-pool; a stride-1 average pool): the analogue of the convolution fix;
* ``"switches"``: strided pools go back by their gradient (a max-pool's own switches), as the authors'
  released demo does.

The engine works at the level of torch functions (a :class:`~torch.overrides.TorchFunctionMode`), so it
sees ``nn.ReLU`` (in-place or not), ``torch.relu``/``F.relu``/``Tensor.relu`` called in a custom forward,
the activations above as modules or functions (``nn.SiLU``, ``F.silu``, ``torch.sigmoid``, ...),
``Conv2d``, pooling and normalisation modules and their functional forms alike. Activations called in place
are computed out of place (the returned tensor is what the model uses next). Every modified rule is a
function this one mode swaps in; no hook or mode outlives a call.

Batching: the n images go forward once; the backward pass runs once, vmapped (``torch.func``) over the k
seeds, one per feature (once per seed when the model carries hooks of the user, which ``torch.func`` cannot
run through). Two backward steps are hand-written for speed and tested against autograd: the
strided transposed convolution without the fix (as one stride-1 convolution and a pixel shuffle), and local
response normalisation.

Examples
--------
>>> import torch
>>> from vefi.book.models import build_model
>>> from vefi.backproject import backproject
>>> _ = torch.manual_seed(0)
>>> net = build_model("mnist")
>>> maps = backproject(net, torch.rand(2, 1, 28, 28), [("conv2", 5), (9, 17)])
>>> tuple(maps.shape)
(2, 2, 1, 28, 28)
"""

from __future__ import annotations

import inspect
import numbers
import weakref
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from vefi._model_state import gradients_on, preserved
from vefi._progress import progress
from vefi.layers import (Layer, channel_axes, channel_window, check_channel_first, check_images, layer_table,
                         local_response_norm, pair, resolve_layer, tapped)

__all__ = ["RULES", "POOL_FIXES", "SOURCES", "NonlinearityGuard", "backproject", "conv_backproject",
           "maxpool_backproject", "avgpool_backproject", "stride1_size", "strongest_channels", "heatmap"]

RULES = ("backprop", "deconvnet", "guided")
POOL_FIXES = ("stride1", "switches")
SOURCES = ("map", "unit")

# Torch functions (by name, trailing "_" stripped) that are nonlinear: NonlinearityGuard refuses them all (LRP);
# back-projection swaps those of _ACTIVATIONS for their rules first and refuses the rest.
_UNSUPPORTED_FUNCTIONS = frozenset({
    "sigmoid", "tanh", "gelu", "silu", "elu", "selu", "celu", "leaky_relu", "rrelu", "prelu", "softplus",
    "softsign", "hardtanh", "relu6", "hardswish", "hardsigmoid", "mish", "glu", "logsigmoid", "softmax",
    "log_softmax", "softmin", "threshold", "tanhshrink", "softshrink", "hardshrink",
})
_SUPPORTED = ("ReLU, ReLU6/Hardtanh, LeakyReLU, Hardswish, SiLU, GELU, Sigmoid and Hardsigmoid (modules or "
              "functions, in place or not), gate products, conv (grouped, depthwise), linear, pooling, batch/"
              "layer/group norm, dropout, flatten, local response norm")
_RELU_FUNCTIONS = (F.relu, torch.relu, torch.Tensor.relu)
_RELU_INPLACE_FUNCTIONS = (torch.relu_, torch.Tensor.relu_, F.relu_)


@dataclass(frozen=True)
class _Resolved:
    """A feature checked against the model: its layer, a channel (or unit), and optionally a position."""

    layer: Layer
    channel: int
    position: tuple[int, int] | None = None


# --------------------------------------------------------------------------------------------------------
# The two layer-level back-projections with the stride fix, public so that they can be tested on their own.

def stride1_size(input_size, kernel_size, padding=0, dilation=1) -> tuple[int, int]:
    """Output size ``A + 2*O - d*(M - 1)`` per axis of the stride-1 version of a conv or pool layer.

    This is the size the stride fix resamples the incoming map to (Eq. 2 of the paper, with ``d = 1``).

    Examples
    --------
    >>> stride1_size((112, 112), 11, padding=2)
    (106, 106)
    """
    a, m, o, d = (pair(input_size, "input_size"), pair(kernel_size, "kernel_size"),
                  pair(padding, "padding"), pair(dilation, "dilation"))
    return tuple(a[i] + 2 * o[i] - d[i] * (m[i] - 1) for i in range(2))


def _nearest(n_in: int, n_out: int, device=None) -> torch.Tensor:
    """Source index of each of ``n_out`` pixels resampled from ``n_in``: ``floor((i + 1/2) * n_in / n_out)``,
    as ``F.interpolate(mode="nearest-exact")``, but in exact integer arithmetic (PyTorch's float arithmetic
    rounds exact ties either way, depending on dtype and code path)."""
    i = torch.arange(n_out, device=device)
    return torch.div((2 * i + 1) * n_in, 2 * n_out, rounding_mode="floor").clamp(max=n_in - 1)


def _resample(signal: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resampling of the last two axes to ``size`` (``"nearest-exact"``, as MATLAB's
    ``imresize``), by indexing, so that it also runs batched under ``torch.func.vmap``."""
    for axis, n_out in ((-2, size[0]), (-1, size[1])):
        if signal.shape[axis] != n_out:
            signal = signal.index_select(axis, _nearest(signal.shape[axis], n_out, signal.device))
    return signal


def conv_backproject(signal: torch.Tensor, weight: torch.Tensor, input_size, *, stride=1, padding=0,
                     dilation=1, groups: int = 1, stride_fix: bool = True) -> torch.Tensor:
    """Back-project a signal through a ``Conv2d``: transposed convolution with the same weights, no bias.

    Parameters
    ----------
    signal : Tensor, shape (N, C_out, B_h, B_w)
        Signal at the layer's output.
    weight : Tensor, shape (C_out, C_in / groups, M_h, M_w)
        The layer's weights.
    input_size : pair of int
        ``(A_h, A_w)``, the layer's input size.
    stride, padding, dilation, groups
        As in :func:`torch.nn.functional.conv2d` (padding as int or pair).
    stride_fix : bool
        With ``stride > 1`` on an axis, resample the signal (nearest) to :func:`stride1_size` and
        back-project with stride 1 (Eq. 2-3). Without it, this is the plain gradient.

    Returns
    -------
    Tensor, shape (N, C_in, A_h, A_w)

    Examples
    --------
    >>> ones = torch.ones(1, 1, 26, 26)
    >>> cover = conv_backproject(ones, torch.ones(1, 1, 11, 11), (112, 112), stride=4)
    >>> int(cover[0, 0, 50, 50]), int(cover[0, 0, 51, 51])
    (121, 121)
    """
    size = pair(input_size, "input_size")
    stride, padding, dilation = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    if stride_fix and max(stride) > 1:
        target = stride1_size(size, weight.shape[-2:], padding, dilation)
        return F.conv_transpose2d(_resample(signal, target), weight, stride=1, padding=padding,
                                  dilation=dilation, groups=groups)
    if groups == 1 and dilation == (1, 1) and weight.shape[-2] * weight.shape[-1] >= 4 * stride[0] * stride[1]:
        return _subpixel_transposed_conv(signal, weight, size, stride, padding)
    shape = (signal.shape[0], weight.shape[1] * groups, *size)
    return torch.nn.grad.conv2d_input(shape, weight, signal, stride=stride, padding=padding,
                                      dilation=dilation, groups=groups)


def _subpixel_transposed_conv(signal, weight, size, stride, padding):
    """The strided transposed convolution as one stride-1 convolution and a pixel shuffle.

    Input pixel ``q = S*a + r`` (padded coordinates) receives ``sum_j w[S*j + r] * signal[a - j]``: for each
    phase ``r`` a small stride-1 convolution with the taps ``r, r + S, ...``. All phases of all channels run
    as one convolution, several times faster on CPU than PyTorch's strided transposed convolution for large
    kernels (11x11 stride 4); the result is the same, up to float rounding.
    """
    c_out, c_in, m_h, m_w = weight.shape
    (s_h, s_w), (p_h, p_w) = stride, padding
    j_h, j_w = -(-m_h // s_h), -(-m_w // s_w)
    taps = F.pad(weight, (0, s_w * j_w - m_w, 0, s_h * j_h - m_h)).view(c_out, c_in, j_h, s_h, j_w, s_w)
    taps = taps.permute(1, 3, 5, 0, 2, 4).flip(-1, -2).reshape(c_in * s_h * s_w, c_out, j_h, j_w)
    phases = F.conv2d(signal, taps, padding=(j_h - 1, j_w - 1))
    n, _, a_h, a_w = phases.shape
    full = phases.reshape(n, c_in, s_h, s_w, a_h, a_w).permute(0, 1, 4, 2, 5, 3).reshape(n, c_in, a_h * s_h,
                                                                                       a_w * s_w)
    short_h, short_w = max(0, p_h + size[0] - full.shape[-2]), max(0, p_w + size[1] - full.shape[-1])
    if short_h or short_w:  # pixels no tap reaches
        full = F.pad(full, (0, short_w, 0, short_h))
    return full[..., p_h:p_h + size[0], p_w:p_w + size[1]]


def maxpool_backproject(signal: torch.Tensor, inputs: torch.Tensor, kernel_size, *, stride=None, padding=0,
                        dilation=1, ceil_mode: bool = False, pool_fix: str | None = "stride1") -> torch.Tensor:
    """Back-project a signal through a ``MaxPool2d`` by its switches.

    Parameters
    ----------
    signal : Tensor, shape (N, C, B_h, B_w)
        Signal at the pool's output.
    inputs : Tensor, shape (N, C, A_h, A_w)
        The pool's forward input (it decides the switches).
    kernel_size, stride, padding, dilation, ceil_mode
        As in :func:`torch.nn.functional.max_pool2d`.
    pool_fix : {"stride1", "switches"} or None
        ``"stride1"``: when strided, resample the signal (nearest) to :func:`stride1_size` and route it through
        the switches of a stride-1 max-pool on the same input. ``"switches"`` or None: the standard switches of
        the strided pool (the gradient).

    Returns
    -------
    Tensor, shape (N, C, A_h, A_w)

    Examples
    --------
    >>> x = torch.arange(16.).reshape(1, 1, 4, 4)
    >>> maxpool_backproject(torch.ones(1, 1, 2, 2), x, 2, pool_fix="switches")[0, 0].tolist()
    [[0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 1.0]]
    """
    if pool_fix not in (*POOL_FIXES, None):
        raise ValueError(f"pool_fix must be one of {POOL_FIXES} or None, got {pool_fix!r}")
    stride = kernel_size if stride is None or (not isinstance(stride, int) and len(stride) == 0) else stride
    kernel, stride = pair(kernel_size, "kernel_size"), pair(stride, "stride")
    padding, dilation = pair(padding, "padding"), pair(dilation, "dilation")
    inputs = inputs.detach()
    if pool_fix == "stride1" and max(stride) > 1:
        target = stride1_size(inputs.shape[-2:], kernel, padding, dilation)
        signal = _resample(signal, target)
        _, switches = F.max_pool2d(inputs, kernel, 1, padding, dilation, return_indices=True)
    else:
        _, switches = F.max_pool2d(inputs, kernel, stride, padding, dilation, ceil_mode=ceil_mode,
                                   return_indices=True)
    n, c, h, w = inputs.shape
    zeros = torch.zeros((n, c, h * w), dtype=signal.dtype, device=signal.device)
    # scatter_add, not max_unpool: overlapping windows send several signals to one pixel, and they add up
    return zeros.scatter_add(2, switches.reshape(n, c, -1), signal.reshape(n, c, -1)).reshape(n, c, h, w)


def avgpool_backproject(signal: torch.Tensor, input_size, kernel_size, *, stride=None, padding=0,
                        ceil_mode: bool = False, count_include_pad: bool = True, divisor_override=None,
                        pool_fix: str | None = "stride1") -> torch.Tensor:
    """Back-project a signal through an ``AvgPool2d``.

    Parameters
    ----------
    signal : Tensor, shape (N, C, B_h, B_w)
        Signal at the pool's output.
    input_size : pair of int
        ``(A_h, A_w)``, the pool's input size.
    kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override
        As in :func:`torch.nn.functional.avg_pool2d`.
    pool_fix : {"stride1", "switches"} or None
        ``"stride1"``: when strided, resample the signal (nearest) to :func:`stride1_size` and back-project it
        through the stride-1 pool of the same kernel, padding and divisor. ``"switches"`` or None: the
        gradient of the strided pool.

    Returns
    -------
    Tensor, shape (N, C, A_h, A_w)

    Examples
    --------
    >>> cover = avgpool_backproject(torch.ones(1, 1, 4, 4), (12, 12), 3, stride=3)
    >>> [round(float(v) * 9) for v in cover[0, 0, 5, :6]]
    [3, 6, 9, 9, 9, 9]
    """
    if pool_fix not in (*POOL_FIXES, None):
        raise ValueError(f"pool_fix must be one of {POOL_FIXES} or None, got {pool_fix!r}")
    stride = kernel_size if stride is None or (not isinstance(stride, int) and len(stride) == 0) else stride
    size, kernel = pair(input_size, "input_size"), pair(kernel_size, "kernel_size")
    stride, padding = pair(stride, "stride"), pair(padding, "padding")
    n, c = signal.shape[:2]
    if pool_fix != "stride1" or max(stride) == 1:
        # the plain gradient, by autograd: not on the engine's path (which only swaps in strided fixed pools)
        with torch.inference_mode(False), torch.enable_grad():  # also when called under inference mode
            signal = signal.clone() if signal.is_inference() else signal
            x = torch.zeros((n, c, *size), dtype=signal.dtype, device=signal.device, requires_grad=True)
            y = F.avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)
            return torch.autograd.grad(y, x, signal)[0]
    signal = _resample(signal, stride1_size(size, kernel, padding))
    # stride 1: output o = (sum of the window of o) / D[o]; D from the pool itself, so that every divisor
    # option (count_include_pad, divisor_override) is the pool's own: mean of ones / count of inputs
    ones = torch.ones((1, 1, *size), dtype=signal.dtype, device=signal.device)
    box = torch.ones((1, 1, *kernel), dtype=signal.dtype, device=signal.device)
    inverse = F.avg_pool2d(ones, kernel, 1, padding, False, count_include_pad, divisor_override) / \
        F.conv2d(ones, box, padding=padding)
    return F.conv_transpose2d(signal * inverse, box.expand(c, 1, *kernel), padding=padding, groups=c)


# --------------------------------------------------------------------------------------------------------
# Autograd functions that the torch-function mode swaps in during the forward pass.

def _positive_part(signal: torch.Tensor) -> torch.Tensor:
    return signal.clamp(min=0)


def _relu(x: torch.Tensor, rule: str) -> torch.Tensor:
    """ReLU whose backward follows ``rule``. A tensor hook clamps the incoming signal (cheaper than a custom
    autograd function, and it runs under ``torch.func.vmap`` too); the ReLU's own gradient then applies
    ``[x > 0]``, which the deconvnet bypasses by passing the signal straight through."""
    y = torch.relu(x)
    if rule == "deconvnet":
        y = x + (y - x).detach()  # the value of relu(x), the gradient of the identity
    if rule != "backprop" and y.requires_grad:
        y.register_hook(_positive_part)
    return y


def _with_gradient(value: torch.Tensor, x: torch.Tensor, slope) -> torch.Tensor:
    """``value`` (exactly), whose gradient with respect to ``x`` is ``slope`` (a tensor or 1), elementwise."""
    return value.detach() + (x - x.detach()) * slope


def _activation(x: torch.Tensor, value, derivative, rule: str) -> torch.Tensor:
    """An elementwise activation ``value(x)`` whose backward follows ``rule`` (table of the module docstring).

    ``derivative`` is None for a monotone activation (its own gradient is >= 0, and guided is that gradient
    gated by ``[R > 0]``), else a function of ``x`` giving ``f'(x)``, which guided clamps at 0."""
    if rule == "backprop":
        return value(x)
    if rule == "deconvnet":
        y = _with_gradient(value(x.detach()), x, 1)
    elif derivative is None:
        y = value(x)
    else:
        xd = x.detach()
        y = _with_gradient(value(xd), x, derivative(xd).clamp(min=0))
    if y.requires_grad:
        y.register_hook(_positive_part)
    return y


def _gelu_derivative(x: torch.Tensor, approximate: str) -> torch.Tensor:
    if approximate == "tanh":  # 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3)
        c = (2 / torch.pi) ** 0.5
        t = torch.tanh(c * (x + 0.044715 * x ** 3))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)
    return 0.5 * (1 + torch.erf(x / 2 ** 0.5)) + x * torch.exp(-0.5 * x * x) / (2 * torch.pi) ** 0.5


def _silu_derivative(x: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def _hardswish_derivative(x: torch.Tensor) -> torch.Tensor:
    # x * relu6(x + 3) / 6; at the kinks, autograd's choice (0 at -3, 1/3 * x + 1/2 up to 3 inclusive)
    return torch.where(x < -3, torch.zeros_like(x), torch.where(x <= 3, x / 3 + 0.5, torch.ones_like(x)))


def _leaky_derivative(slope: float):
    if slope >= 0:
        return None  # monotone
    return lambda x: torch.where(x > 0, torch.ones_like(x), torch.full_like(x, slope))


# Activation functions the engine swaps: func -> (argument names, defaults, value(x, args), derivative(args)
# or None when monotone, whether its output is a gate). In-place variants are computed out of place.
_ACTIVATIONS = {}
for _funcs, _names, _defaults, _value, _derivative, _gate in (
    ((F.hardtanh, F.hardtanh_), ("input", "min_val", "max_val", "inplace"),
     {"min_val": -1.0, "max_val": 1.0}, lambda x, a: F.hardtanh(x, a["min_val"], a["max_val"]),
     lambda a: None, False),
    ((F.relu6,), ("input", "inplace"), {}, lambda x, a: F.relu6(x), lambda a: None, False),
    ((F.leaky_relu, F.leaky_relu_), ("input", "negative_slope", "inplace"), {"negative_slope": 0.01},
     lambda x, a: F.leaky_relu(x, a["negative_slope"]), lambda a: _leaky_derivative(a["negative_slope"]),
     False),
    ((F.hardswish,), ("input", "inplace"), {}, lambda x, a: F.hardswish(x), lambda a: _hardswish_derivative,
     False),
    ((F.silu,), ("input", "inplace"), {}, lambda x, a: F.silu(x), lambda a: _silu_derivative, False),
    ((F.gelu,), ("input", "approximate"), {"approximate": "none"},
     lambda x, a: F.gelu(x, approximate=a["approximate"]),
     lambda a: (lambda x: _gelu_derivative(x, a["approximate"])), False),
    ((torch.sigmoid, torch.Tensor.sigmoid, torch.sigmoid_, torch.Tensor.sigmoid_), ("input",), {},
     lambda x, a: torch.sigmoid(x), lambda a: None, True),
    ((F.hardsigmoid,), ("input", "inplace"), {}, lambda x, a: F.hardsigmoid(x), lambda a: None, True),
):
    for _func in _funcs:
        _ACTIVATIONS[_func] = (_names, _defaults, _value, _derivative, _gate)

_PRODUCTS = frozenset({"mul", "mul_", "multiply", "__mul__", "__rmul__", "__imul__"})
# shape-only functions through which a gate stays a gate (a gate reshaped to (n, c, 1, 1) before the product)
_GATE_KEEPERS = frozenset({"view", "reshape", "unsqueeze", "squeeze", "expand", "expand_as", "flatten",
                           "contiguous", "unflatten", "view_as", "reshape_as"})


def _frozen_norm(x: torch.Tensor, value: torch.Tensor, axes: tuple[int, ...], weight, eps: float,
                 channel_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """A normalisation's ``value``, whose gradient is ``w / sigma`` with the statistics held constant.

    ``axes``: the axes (of ``x``, or of its grouped view) the statistics run over; ``channel_shape``: the
    grouped view of ``x`` for group norm, else None."""
    xd = x.detach()
    grouped = xd if channel_shape is None else xd.reshape(channel_shape)
    sigma = (grouped.var(dim=axes, unbiased=False, keepdim=True) + eps).sqrt()
    slope = (1 / sigma).expand(grouped.shape).reshape(x.shape)
    if weight is not None:
        slope = slope * (weight.detach() if channel_shape is None else
                         weight.detach().reshape(-1, *([1] * (x.dim() - 2))))
    return _with_gradient(value, x, slope)


class _Conv2d(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, stride, padding, dilation, groups, stride_fix):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, stride, padding, dilation, groups, stride_fix = inputs
        ctx.save_for_backward(weight)
        ctx.conf = (tuple(x.shape[-2:]), stride, padding, dilation, groups, stride_fix)

    @staticmethod
    def backward(ctx, signal):
        (weight,) = ctx.saved_tensors
        size, stride, padding, dilation, groups, stride_fix = ctx.conf
        grad = conv_backproject(signal, weight, size, stride=stride, padding=padding, dilation=dilation,
                                groups=groups, stride_fix=stride_fix)
        return grad, None, None, None, None, None, None, None


class _MaxPool2d(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, kernel, stride, padding, dilation, ceil_mode):
        return F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode=ceil_mode)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, kernel, stride, padding, dilation, _ = inputs
        ctx.save_for_backward(x)
        ctx.conf = (kernel, stride, padding, dilation)

    @staticmethod
    def backward(ctx, signal):
        (x,) = ctx.saved_tensors
        kernel, stride, padding, dilation = ctx.conf
        grad = maxpool_backproject(signal, x, kernel, stride=stride, padding=padding, dilation=dilation,
                                   pool_fix="stride1")
        return grad, None, None, None, None, None


class _AvgPool2d(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override):
        return F.avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, kernel, stride, padding, _, count_include_pad, divisor_override = inputs
        ctx.conf = (tuple(x.shape[-2:]), kernel, stride, padding, count_include_pad, divisor_override)

    @staticmethod
    def backward(ctx, signal):
        size, kernel, stride, padding, count_include_pad, divisor_override = ctx.conf
        grad = avgpool_backproject(signal, size, kernel, stride=stride, padding=padding,
                                   count_include_pad=count_include_pad, divisor_override=divisor_override,
                                   pool_fix="stride1")
        return grad, None, None, None, None, None, None


class _LocalResponseNorm(torch.autograd.Function):
    """``F.local_response_norm`` (computed by :func:`vefi.layers.local_response_norm`) with a hand-written
    gradient: autograd's goes through ``avg_pool3d``, whose backward is slow on CPU, above all under vmap."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, size, alpha, beta, k):
        return local_response_norm(x, size, alpha, beta, k)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.conf = inputs[1:]

    @staticmethod
    def backward(ctx, signal):
        # out_c = x_c * d_c^-beta with d_c = k + alpha/size * (sum of x_c'^2 over the window of c), the
        # window of c being c - size//2 .. c + (size-1)//2; the chain rule sums over the transposed window
        (x,) = ctx.saved_tensors
        size, alpha, beta, k = ctx.conf
        window = channel_window(x.shape[-3], size // 2, (size - 1) // 2, x.dtype, x.device)
        d = torch.einsum("dc,nchw->ndhw", window, x * x).mul(alpha / size).add(k)
        scaled = d.pow(-beta)
        through = x * scaled / d  # everything that does not depend on the signal, computed once
        back = torch.einsum("cd,nchw->ndhw", window, signal * through)
        return signal * scaled - (2 * alpha * beta / size) * x * back, None, None, None, None


def _bind(args, kwargs, names, defaults):
    """Positional + keyword arguments of a functional call as a dict over ``names``."""
    bound = dict(defaults)
    bound.update(zip(names, args))
    bound.update(kwargs or {})
    return bound


_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_LRN_ARGS = ("input", "size", "alpha", "beta", "k")
_LRN_DEFAULTS = {"alpha": 1e-4, "beta": 0.75, "k": 1.0}
_POOL_DEFAULTS = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False}
_AVG_ARGS = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
_AVG_DEFAULTS = {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True,
                 "divisor_override": None}
_LAYER_NORM_ARGS = ("input", "normalized_shape", "weight", "bias", "eps")
_GROUP_NORM_ARGS = ("input", "num_groups", "weight", "bias", "eps")
_NORM_DEFAULTS = {"weight": None, "bias": None, "eps": 1e-5}


def _calling_module(model: nn.Module) -> str:
    """The innermost module of ``model`` whose forward is on the call stack (for error messages only)."""
    names = {id(m): name for name, m in model.named_modules()}
    frame = inspect.currentframe()
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            return f"module {names[id(owner)] or 'model'!r} ({type(owner).__name__})"
        frame = frame.f_back
    return "the model's forward"


class NonlinearityGuard(TorchFunctionMode):
    """While active (a context manager around a model's forward pass), refuse every torch function that is
    a nonlinearity without a rule here: ``F.gelu``, ``torch.sigmoid``, ``Tensor.tanh``, ``F.softmax``, ...

    Methods whose rules are attached to modules (forward hooks) do not see a function called in a custom
    ``forward``: without this guard they pass it by its plain gradient and give a wrong map without a word.
    Back-projection and LRP both run their forward pass under it.

    Parameters
    ----------
    model : torch.nn.Module
        The model whose forward runs (the error names the module that called the function).
    action : str
        What cannot be done, for the message: ``"back-project"``, ``"propagate LRP relevance"``.
    supported : str
        What is supported, for the message.
    """

    def __init__(self, model: nn.Module, action: str = "back-project", supported: str = _SUPPORTED):
        super().__init__()
        self.model, self.action, self.supported = model, action, supported

    def refuse(self, func) -> None:
        """Raise the ``TypeError`` if ``func`` is a nonlinearity without a rule."""
        name = getattr(func, "__name__", "").rstrip("_")
        if name in _UNSUPPORTED_FUNCTIONS:
            raise TypeError(f"cannot {self.action} through the nonlinearity {name!r} (called in "
                            f"{_calling_module(self.model)}); supported: {self.supported}")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.refuse(func)
        return func(*args, **(kwargs or {}))


class _BackprojectionMode(NonlinearityGuard):
    """The one engine of every modified rule: swap activations, gate products and layer/group norms (rules of
    the module docstring), strided conv and pools (under the fix) and LRN for the functions above; refuse
    nonlinearities without a rule."""

    def __init__(self, model: nn.Module, rule: str, stride_fix: bool, pool_fix: str):
        super().__init__(model)
        self.rule, self.stride_fix, self.pool_fix = rule, stride_fix, pool_fix
        self.gates: dict[int, weakref.ref] = {}  # id -> tensor: outputs of sigmoid/hardsigmoid

    def _is_gate(self, t) -> bool:
        ref = self.gates.get(id(t)) if isinstance(t, torch.Tensor) else None
        return ref is not None and ref() is t

    def _mark_gate(self, t: torch.Tensor) -> torch.Tensor:
        key = id(t)
        self.gates[key] = weakref.ref(t, lambda _, k=key: self.gates.pop(k, None))
        return t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RELU_FUNCTIONS or func in _RELU_INPLACE_FUNCTIONS:
            return _relu(args[0], self.rule)
        activation = _ACTIVATIONS.get(func)
        if activation is not None:
            names, defaults, value, derivative, gate = activation
            a = _bind(args, kwargs, names, defaults)
            y = _activation(a["input"], lambda x: value(x, a), derivative(a), self.rule)
            return self._mark_gate(y) if gate and self.rule != "backprop" else y
        name = getattr(func, "__name__", "")
        if self.gates and self.rule != "backprop":
            if name in _PRODUCTS and any(self._is_gate(t) for t in args[:2]):
                # a gate is a constant weight: the signal goes to the other factor only
                factors = [t.detach() if self._is_gate(t) else t for t in args[:2]]
                if name in ("mul_", "__imul__") and self._is_gate(args[0]):
                    return torch.mul(*factors)  # not in place on a detached gate, which would cut the signal
                return func(*factors, *args[2:], **kwargs)  # in place on x stays in place (x.mul_(g))
            if name in _GATE_KEEPERS and self._is_gate(args[0] if args else None):
                return self._mark_gate(func(*args, **kwargs))
        if func is torch.conv2d:
            a = _bind(args, kwargs, _CONV_ARGS, _CONV_DEFAULTS)
            if not isinstance(a["padding"], str) and max(pair(a["stride"], "stride")) > 1:
                return _Conv2d.apply(a["input"], a["weight"], a["bias"], pair(a["stride"], "stride"),
                                     pair(a["padding"], "padding"), pair(a["dilation"], "dilation"),
                                     a["groups"], self.stride_fix)
        elif func is F.local_response_norm:
            a = _bind(args, kwargs, _LRN_ARGS, _LRN_DEFAULTS)
            if a["input"].dim() == 4:
                return _LocalResponseNorm.apply(a["input"], int(a["size"]), float(a["alpha"]),
                                                float(a["beta"]), float(a["k"]))
        elif func is F.max_pool2d and self.stride_fix and self.pool_fix == "stride1":
            a = _bind(args, kwargs, _POOL_ARGS, _POOL_DEFAULTS)
            stride = a["stride"] if a["stride"] not in (None, (), []) else a["kernel_size"]
            if not a["return_indices"] and max(pair(stride, "stride")) > 1:
                return _MaxPool2d.apply(a["input"], pair(a["kernel_size"], "kernel_size"),
                                        pair(stride, "stride"), pair(a["padding"], "padding"),
                                        pair(a["dilation"], "dilation"), a["ceil_mode"])
        elif func is F.avg_pool2d and self.stride_fix and self.pool_fix == "stride1":
            a = _bind(args, kwargs, _AVG_ARGS, _AVG_DEFAULTS)
            stride = a["stride"] if a["stride"] not in (None, (), []) else a["kernel_size"]
            if a["input"].dim() == 4 and max(pair(stride, "stride")) > 1:
                return _AvgPool2d.apply(a["input"], pair(a["kernel_size"], "kernel_size"),
                                        pair(stride, "stride"), pair(a["padding"], "padding"),
                                        bool(a["ceil_mode"]), bool(a["count_include_pad"]),
                                        a["divisor_override"])
        elif func is F.layer_norm and self.rule != "backprop":
            a = _bind(args, kwargs, _LAYER_NORM_ARGS, _NORM_DEFAULTS)
            x = a["input"]
            shape = a["normalized_shape"]
            axes = tuple(range(x.dim() - (1 if isinstance(shape, int) else len(shape)), x.dim()))
            return _frozen_norm(x, func(*args, **kwargs), axes, a["weight"], float(a["eps"]))
        elif func is F.group_norm and self.rule != "backprop":
            a = _bind(args, kwargs, _GROUP_NORM_ARGS, _NORM_DEFAULTS)
            x, groups = a["input"], int(a["num_groups"])
            shape = (x.shape[0], groups, -1)
            return _frozen_norm(x, func(*args, **kwargs), (2,), a["weight"], float(a["eps"]), shape)
        else:
            self.refuse(func)
        return func(*args, **kwargs)


# --------------------------------------------------------------------------------------------------------
# The public entry point.

class _Stop(Exception):
    """Raised by the capture hook once the deepest feature layer has run: the rest of the net is not needed."""


def _is_feature(item) -> bool:
    return isinstance(item, (tuple, list)) and len(item) in (2, 3) and isinstance(item[0], (int, str, Layer, nn.Module)) \
        and not isinstance(item[0], bool)


_TABLES: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _layers(model: nn.Module, input_shape: tuple[int, ...]) -> list[Layer]:
    """:func:`vefi.layers.layer_table`, remembered per model while its modules (and their settings) and the
    input shape stay the same: a call on a few features should not pay an extra forward pass."""
    key = (input_shape, tuple((id(m), type(m), m.extra_repr()) for m in model.modules()))
    if not list(model.children()):  # a one-layer model: its table would keep it alive in the cache
        return layer_table(model, input_shape)
    cached = _TABLES.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    layers = layer_table(model, input_shape)
    _TABLES[model] = (key, layers)
    return layers



def _resolve_feature(layers: list[Layer], item, axes=lambda: {}) -> _Resolved:
    if not _is_feature(item):
        raise TypeError(f"a feature is (layer, channel) or (layer, channel, (y, x)), got {item!r}")
    layer = resolve_layer(layers, item[0])
    channel = item[1]
    if not isinstance(channel, numbers.Integral) or isinstance(channel, bool):
        raise TypeError(f"channel must be an int, got {channel!r} for layer {layer.label}")
    shape = layer.output_shape
    check_channel_first(layers, layer, axes)
    if len(shape) not in (1, 3):
        raise ValueError(f"layer {layer.label} has output shape {shape}; back-projection needs a map "
                         "(C, H, W) or a vector of units")
    if not 0 <= channel < shape[0]:
        raise ValueError(f"channel {channel} out of range for layer {layer.label} ({layer.name!r}), which has "
                         f"{shape[0]} {'channels' if len(shape) == 3 else 'units'} (0..{shape[0] - 1})")
    position = None
    if len(item) == 3 and item[2] is not None:
        if len(shape) != 3:
            raise ValueError(f"layer {layer.label} is a vector of units: a position makes no sense, got "
                             f"{item[2]!r}")
        position = tuple(int(p) for p in item[2])
        if len(position) != 2 or not (0 <= position[0] < shape[1] and 0 <= position[1] < shape[2]):
            raise ValueError(f"position must be (y, x) within {shape[1]}x{shape[2]} for layer {layer.label}, "
                             f"got {item[2]!r}")
    return _Resolved(layer, int(channel), position)


# Activation modules with a rule (through the functions they call); any other of torch.nn.modules.activation
# is refused before the forward pass
_RULED_MODULES = (nn.ReLU, nn.Hardtanh, nn.ReLU6, nn.LeakyReLU, nn.Hardswish, nn.SiLU, nn.GELU, nn.Sigmoid,
                  nn.Hardsigmoid)


def _check_invertible(layers: list[Layer], deepest: int) -> None:
    for layer in layers:
        if layer.number >= deepest:
            break
        m = layer.module
        nonlinear = type(m).__module__ == "torch.nn.modules.activation" and not isinstance(m, _RULED_MODULES)
        if nonlinear or layer.kind == "softmax":
            raise TypeError(f"cannot back-project through layer {layer.number} {layer.name!r} "
                            f"({type(m).__name__}): no rule for this nonlinearity; supported: {_SUPPORTED}")


def backproject(model: nn.Module, images: torch.Tensor, features, *, rule: str = "guided",
                stride_fix: bool = True, pool_fix: str = "stride1", source: str = "map",
                batch_size: int | None = None) -> torch.Tensor:
    """Back-project features of a model to input space, k features of n images in one backward pass.

    Parameters
    ----------
    model : torch.nn.Module
        A network of conv (grouped and depthwise too), linear, max/avg/adaptive pooling, batch, layer and
        group norm, dropout, flatten and local response norm layers, with ReLU, ReLU6/Hardtanh, LeakyReLU,
        Hardswish, SiLU, GELU, Sigmoid and Hardsigmoid activations (modules, in place or not, or functions
        in a custom forward) and squeeze-and-excitation gates: torchvision's MobileNets, EfficientNets and
        ConvNeXts, for instance. It is run in eval mode and left exactly as it was, also when this raises.
    images : Tensor, shape (n, C, H, W) or (C, H, W)
        Input images, finite floats.
    features : sequence
        Either k features shared by all images, or n sequences of k features (one per image). A feature is
        ``(layer, channel)`` or ``(layer, channel, (y, x))``, ``layer`` a number or name as in
        :func:`vefi.layers.layer_table` (or a :class:`~vefi.layers.Layer`), ``channel`` a channel of a conv
        map or a unit of a flat layer.
    rule : {"guided", "deconvnet", "backprop"}
        ReLU rule for incoming signal ``R`` and forward input ``x``: ``R*[x>0]*[R>0]``, ``R*[R>0]`` or
        ``R*[x>0]``; for other activations, gates and norms see the table of the module docstring.
    stride_fix : bool
        Apply the stride fix (Eq. 2-3) to every strided ``Conv2d`` and (see ``pool_fix``) max or average pool.
    pool_fix : {"stride1", "switches"}
        Under the stride fix, a strided pool goes back through a stride-1 pool on the resampled map
        (``"stride1"``: its switches for a max-pool) or by its own gradient (``"switches"``, the authors'
        choice).
    source : {"map", "unit"}
        ``"map"``: seed with the channel's actual activation map, all other channels zero (a flat layer: the
        unit's activation). ``"unit"``: seed 1 at one unit, the given ``(y, x)`` or else, per image, the
        position of the channel's largest response.
    batch_size : int, optional
        Inputs per backward pass, one per image and feature (a row); default all at once.

    Returns
    -------
    Tensor, shape (n, k, C, H, W)
        One map per image and feature, in the images' dtype.

    Raises
    ------
    ValueError
        Unknown layer, channel or position out of range, a layer whose output is not channel-first (tokens,
        or channel-last after a permute: the message names a layer to pass instead), images of the wrong
        shape, with NaN/Inf or on another device than the model, unknown rule/pool_fix/source, no features.
    TypeError
        A nonlinearity on the way back that has no rule (e.g. ``nn.Tanh``, ``F.elu``, ``F.softmax``), images
        of another dtype than the model's, or arguments of the wrong type.

    Notes
    -----
    A model carrying hooks of the user (forward hooks, full backward hooks) is back-projected with one
    backward pass per feature instead of one vmapped pass: ``torch.func`` cannot run through such hooks.
    The maps are the same; the hooks stay where they are and are called as in any backward pass.

    Examples
    --------
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 13 * 13, 3))
    >>> backproject(net, torch.rand(5, 1, 28, 28), [(1, 2), ("3", 1)], rule="deconvnet").shape
    torch.Size([5, 2, 1, 28, 28])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, value, allowed in (("rule", rule, RULES), ("pool_fix", pool_fix, POOL_FIXES),
                                 ("source", source, SOURCES)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    images = check_images(images, model)
    n = images.shape[0]
    layers = _layers(model, tuple(images.shape[1:]))

    if isinstance(features, (str, bytes)) or not isinstance(features, Sequence) or len(features) == 0:
        raise ValueError(f"features must be a non-empty sequence of (layer, channel) pairs, got {features!r}")
    if _is_feature(features[0]):
        per_image = [list(features)] * n
    elif not all(isinstance(f, (list, tuple)) and all(_is_feature(item) for item in f) for f in features):
        raise TypeError("features must be (layer, channel) or (layer, channel, (y, x)) items, or one list of "
                        f"them per image, got {features!r}")
    else:
        if len(features) != n:
            raise ValueError(f"per-image features need one list per image: {n} images, {len(features)} lists")
        per_image = [list(f) for f in features]
    k = len(per_image[0])
    if k == 0 or any(len(f) != k for f in per_image):
        raise ValueError(f"every image needs the same, non-zero number of features, got "
                         f"{[len(f) for f in per_image]}")
    axes_cache: list[dict[int, int]] = []

    def axes() -> dict[int, int]:  # the layout pass runs only when a seeded layer may be channel-last
        if not axes_cache:
            axes_cache.append(channel_axes(model, tuple(images.shape[1:])))
        return axes_cache[0]

    resolved = [[_resolve_feature(layers, item, axes) for item in f] for f in per_image]
    _check_invertible(layers, max(feat.layer.number for f in resolved for feat in f))

    rows_per_pass = n * k if batch_size is None else batch_size
    images_per_pass = max(1, rows_per_pass // k)
    starts = range(0, n, images_per_pass)
    chunks = progress(starts, desc="back-projecting", total=len(starts), disable=len(starts) == 1)
    out = [_backproject_rows(model, images[s:s + images_per_pass], resolved[s:s + images_per_pass], rule,
                             stride_fix, pool_fix, source) for s in chunks]
    return torch.cat(out)


def _backproject_rows(model, images, resolved, rule, stride_fix, pool_fix, source) -> torch.Tensor:
    """Maps (n, k, C, H, W) of n images and k features each, in one forward and one backward pass."""
    k = len(resolved[0])
    by_layer: dict[int, Layer] = {feat.layer.number: feat.layer for f in resolved for feat in f}
    numbers = sorted(by_layer)
    captured: dict[int, torch.Tensor] = {}

    def capture(layer, output):
        # a clone: a later in-place op in the model must not change what we seed
        captured[layer.number] = output.clone()
        if layer.number == numbers[-1]:
            raise _Stop

    def forward(x):
        captured.clear()
        with torch.enable_grad(), _BackprojectionMode(model, rule, stride_fix, pool_fix):
            try:
                model(x)
            except _Stop:
                pass
        missing = [number for number in numbers if number not in captured]
        if missing:
            raise RuntimeError(f"layers {missing} were not called in the forward pass")
        return tuple(captured[number] for number in numbers)

    def seeds_for(acts):
        """One seed per layer, shape (k, n, *layer output): row j of image i seeds feature j of image i."""
        seeds = []
        for number, act in zip(numbers, acts):
            values = act.detach()
            seed = torch.zeros((k, *values.shape), dtype=values.dtype, device=values.device)
            at = [(j, i, feat) for i, feats in enumerate(resolved) for j, feat in enumerate(feats)
                  if feat.layer.number == number]
            rows = torch.tensor([j for j, _, _ in at], device=seed.device)
            cols = torch.tensor([i for _, i, _ in at], device=seed.device)
            channels = torch.tensor([feat.channel for _, _, feat in at], device=seed.device)
            if source == "map":
                seed[rows, cols, channels] = values[cols, channels]
            elif values.dim() == 2:
                seed[rows, cols, channels] = 1
            else:
                strongest = values[cols, channels].flatten(1).argmax(1)
                ys, xs = strongest // values.shape[-1], strongest % values.shape[-1]
                for t, (_, _, feat) in enumerate(at):
                    if feat.position is not None:
                        ys[t], xs[t] = feat.position
                seed[rows, cols, channels, ys, xs] = 1
            seeds.append(seed)
        return seeds

    with preserved(model), gradients_on(model):
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        loop = _has_user_hooks(model)  # before ours are added
        with tapped(model, by_layer.values(), capture):
            x = images.detach().clone()  # inside gradients_on: a normal tensor even under inference mode
            if loop:
                # the user's hooks may not run under torch.func: the same backward pass, once per seed
                x.requires_grad_(True)
                acts = forward(x)
                seeds = seeds_for(acts)
                maps = torch.stack([torch.autograd.grad(acts, x, [seed[j] for seed in seeds],
                                                        retain_graph=j < k - 1)[0] for j in range(k)])
            else:
                # one forward pass of the n images; the backward pass is vmapped over the k seeds
                acts, pull = torch.func.vjp(forward, x)
                (maps,) = torch.func.vmap(pull)(tuple(seeds_for(acts)))
            return maps.detach().transpose(0, 1)


def _has_user_hooks(model: nn.Module) -> bool:
    """Whether the forward or backward pass through ``model`` runs hooks of the user that functorch's
    transforms cannot go through: full backward (pre-)hooks are autograd functions without a vmap rule, and
    a forward hook may register a tensor hook on its output, which a functorch-wrapped tensor refuses."""
    from torch.nn.modules import module as torch_module  # the global hooks live there only

    if getattr(torch_module, "_global_forward_hooks", None) or \
            getattr(torch_module, "_global_backward_pre_hooks", None) or \
            (getattr(torch_module, "_global_backward_hooks", None)
             and getattr(torch_module, "_global_is_full_backward_hook", False)):
        return True
    return any(m._forward_hooks or m._backward_pre_hooks
               or (m._backward_hooks and getattr(m, "_is_full_backward_hook", False)) for m in model.modules())


# --------------------------------------------------------------------------------------------------------
# Helpers to choose what to back-project and to show it.

def strongest_channels(model: nn.Module, images: torch.Tensor, layers, *, top: int = 1) -> list[list[tuple]]:
    """Per image, the ``top`` channels of each layer with the largest response (L2 norm over space; an fc
    unit: its absolute value), as features for :func:`backproject`.

    Zeiler & Fergus project the strongest activations; this picks them.

    Returns
    -------
    list of n lists of ``len(layers) * top`` features ``(layer number, channel)``, layer by layer.

    Examples
    --------
    >>> from vefi.book.models import build_model
    >>> _ = torch.manual_seed(0)
    >>> feats = strongest_channels(build_model("mnist"), torch.rand(2, 1, 28, 28), ["conv1", "fc1"], top=2)
    >>> len(feats), len(feats[0]), feats[0][0][0], feats[0][2][0]
    (2, 4, 1, 9)
    """
    from vefi.descriptors import descriptors  # descriptors computes exactly these norms

    images = check_images(images, getattr(model, "input_shape", None))
    if isinstance(layers, (int, str, Layer, nn.Module)):
        layers = [layers]
    table = _layers(model, tuple(images.shape[1:]))
    chosen = [resolve_layer(table, key) for key in layers]
    for layer in chosen:  # a channel-last layer's "channels" would be rows of the map
        check_channel_first(table, layer, lambda: channel_axes(model, tuple(images.shape[1:])))
    X, index, _ = descriptors(model, images, [layer.number for layer in chosen], show_progress=False)
    out = [[] for _ in range(images.shape[0])]
    for layer in chosen:
        block = torch.from_numpy(X[:, index.block(layer.number)])
        if not 1 <= top <= block.shape[1]:
            raise ValueError(f"top must be in 1..{block.shape[1]} for layer {layer.label}, got {top!r}")
        best = block.topk(top, dim=1).indices
        for i in range(images.shape[0]):
            out[i].extend((layer.number, int(c)) for c in best[i])
    return out


def heatmap(maps: torch.Tensor) -> torch.Tensor:
    """Back-projected maps (..., C, H, W) as heatmaps (..., H, W): the magnitude summed over colour channels,
    min-max normalised to [0, 1] per map (an all-zero map stays zero).

    Examples
    --------
    >>> heatmap(torch.tensor([[[[1.0, -3.0]], [[1.0, 0.0]]]])).tolist()
    [[[0.0, 1.0]]]
    """
    magnitude = maps.abs().sum(-3)
    low = magnitude.amin((-2, -1), keepdim=True)
    span = magnitude.amax((-2, -1), keepdim=True) - low
    return torch.where(span > 0, (magnitude - low) / span.clamp_min(torch.finfo(span.dtype).tiny),
                       torch.zeros_like(magnitude))
