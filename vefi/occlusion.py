"""Occlusion: grey out a window, see how much the class score drops.

Zeiler & Fergus (2014) slid a grey square over the image and watched the classifier. For a window
:math:`W` at each position, the drop of the class score :math:`\\Delta_W = f_c(x) - f_c(x_{W \\to b})`, where
:math:`x_{W \\to b}` is the image with the window's pixels (all channels) set to the baseline :math:`b`. A
pixel's heatmap value is the mean drop over the windows that cover it:

.. math:: R_p = \\frac{1}{|\\{W \\ni p\\}|} \\sum_{W \\ni p} \\Delta_W .

Positive where hiding the region hurts the class, negative where it helps. Windows start at 0, ``stride``,
``2*stride``, ... and the last one is placed so that it reaches the image's edge (cut there if it overhangs):
the same positions as captum's ``Occlusion`` with ``sliding_window_shapes=(C, window, window)`` and
``strides=(C, stride, stride)``, so the two maps agree. A pixel no window covers (``stride > window``) gets 0.

Cost: one forward pass per window position, run as batches of occluded copies (``batch_size`` images per
forward pass) rather than one by one; the resolution of the map is set by the window and the stride.

Examples
--------
>>> import torch
>>> from vefi.book.models import build_model
>>> from vefi.occlusion import occlusion
>>> _ = torch.manual_seed(0)
>>> net = build_model("mnist")
>>> occlusion(net, torch.rand(2, 1, 28, 28), target=3, window=7, stride=7).shape
torch.Size([2, 28, 28])
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from vefi._model_state import preserved
from vefi._progress import progress
from vefi._tensors import all_finite
from vefi.layers import check_images
from vefi.targets import resolve_target

__all__ = ["occlusion", "window_positions"]


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (int(value), int(value))
    if not (isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(value) < 1:
        raise ValueError(f"{name} must be at least 1, got {tuple(value)}")
    return int(value[0]), int(value[1])


def window_positions(size: int, window: int, stride: int) -> list[int]:
    """Start of every window along one axis: 0, stride, ... up to the first that reaches the edge.

    Examples
    --------
    >>> window_positions(28, 8, 5)
    [0, 5, 10, 15, 20]
    >>> window_positions(28, 8, 6)  # the last window is cut at the edge
    [0, 6, 12, 18, 24]
    """
    if window > size:
        raise ValueError(f"the occlusion window ({window}) is larger than the image ({size})")
    return [i * stride for i in range(math.ceil((size - window) / stride) + 1)]


def occlusion(model: nn.Module, images: torch.Tensor, target=None, *, window=8, stride=4, baseline=0.5,
              batch_size: int = 256) -> torch.Tensor:
    """Mean drop of the target class score over the occluding windows that cover each pixel, (n, H, W).

    Parameters
    ----------
    model : nn.Module
        Classifier; its logits are the scores. Left unchanged (run in evaluation mode).
    images : Tensor (n, C, H, W) or (C, H, W)
    target : None, int or LongTensor (n,)
        Class to explain; None = predicted class of the unoccluded image.
    window, stride : int or (int, int)
        Side of the square (or height, width) occluder and its step, in pixels.
    baseline : float or Tensor broadcastable to (C, H, W)
        Value the occluded pixels take (0.5: mid grey).
    batch_size : int
        Occluded copies per forward pass.

    Returns
    -------
    Tensor (n, H, W)

    Raises
    ------
    ValueError
        Window larger than the image, window/stride/batch_size < 1, NaN/Inf, bad target.

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2)).double()
    >>> x = torch.rand(1, 1, 4, 4, dtype=torch.float64)
    >>> h = occlusion(net, x, target=0, window=1, stride=1, baseline=0.0)
    >>> torch.allclose(h.flatten(), net[1].weight[0] * x.flatten())  # linear model: drop = w * x
    True
    """
    images = check_images(images, model)
    (wh, ww), (sh, sw) = _pair(window, "window"), _pair(stride, "stride")
    if not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    n, channels, height, width = images.shape
    if wh > height or ww > width:
        raise ValueError(f"the occlusion window {(wh, ww)} is larger than the image {(height, width)}")
    baseline = torch.as_tensor(baseline, dtype=images.dtype, device=images.device)
    if not all_finite(baseline):
        raise ValueError("baseline contains NaN or Inf")
    baseline = baseline.expand(channels, height, width)
    masks = torch.zeros(len(window_positions(height, wh, sh)) * len(window_positions(width, ww, sw)),
                        height, width, dtype=torch.bool, device=images.device)
    for k, (top, left) in enumerate((t, l) for t in window_positions(height, wh, sh)
                                    for l in window_positions(width, ww, sw)):
        masks[k, top:top + wh, left:left + ww] = True
    positions = masks.shape[0]
    drops = torch.empty(n, positions, dtype=images.dtype, device=images.device)
    with preserved(model), torch.no_grad():
        model.eval()
        logits = model(images)
        target = resolve_target(target, logits)
        base = logits.gather(1, target[:, None])[:, 0]
        # every (image, window) pair as one row, batch_size rows per forward pass
        rows = n * positions
        for start in progress(range(0, rows, batch_size), desc="occlusion", total=math.ceil(rows / batch_size)):
            idx = torch.arange(start, min(start + batch_size, rows), device=images.device)
            img, pos = idx // positions, idx % positions
            m = masks[pos][:, None]
            occluded = torch.where(m, baseline, images[img])
            scores = model(occluded).gather(1, target[img][:, None])[:, 0]
            drops[img, pos] = base[img] - scores
    flat = masks.reshape(positions, -1).to(images.dtype)
    count = flat.sum(0)
    heat = (drops @ flat) / count.clamp(min=1)
    return heat.reshape(n, height, width)
