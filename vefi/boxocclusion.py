"""Box occlusion guided by a heatmap: does hiding what the heatmap points at hurt the network? (Sec. 4.2)

The paper compares explanation methods by occluding image patches sampled from each method's heatmap until
30% of the image is covered, and measuring how much the network's confidence in its predicted class drops: a
heatmap that points at what the network uses should cause a larger drop than one that points elsewhere.

The sampler, per image: draw a box centre with probability proportional to the heatmap's value (the heatmap
min-max normalised to [0, 1]), *among the pixels not yet occluded*; occlude the ``box x box`` square around it
(clipped at the border); repeat until at least ``coverage`` of the image is occluded. Restricting the centres
to uncovered pixels keeps every draw useful (a peaked heatmap would otherwise draw the same pixel again and
again and never reach the coverage); when the heatmap is zero on every uncovered pixel, the centre is drawn
uniformly among them. All images advance together, one box each per step.

Occluded pixels are set to a baseline: by default each image's own mean colour (per channel), so that a box
removes structure without adding a colour the image does not have; ``"zero"`` (black) and a constant are
offered too.

Examples
--------
>>> import torch
>>> h = torch.zeros(1, 8, 8)
>>> h[0, :4, :4] = 1.0
>>> m = box_masks(h, coverage=0.25, box=2, seed=0)
>>> float(m.float().mean()) >= 0.25, bool(m[0, :4, :4].all())
(True, True)
"""

from __future__ import annotations


import numpy as np
import torch
from torch import nn

from vefi._model_state import preserved
from vefi._tensors import all_finite
from vefi.targets import class_indices

__all__ = ["BASELINES", "box_masks", "confidence_drop", "default_box", "occlude", "sample_centres"]


BASELINES = ("mean", "zero")


def _weights(heatmaps) -> torch.Tensor:
    h = torch.as_tensor(heatmaps)
    if h.dim() == 2:
        h = h.unsqueeze(0)
    if h.dim() != 3:
        raise ValueError(f"heatmaps must have shape (n, H, W) or (H, W), got {tuple(h.shape)}")
    h = h.detach().double()
    if not all_finite(h):
        raise ValueError("heatmaps contain NaN or Inf values")
    flat = h.flatten(1)
    low = flat.min(1, keepdim=True).values
    span = flat.max(1, keepdim=True).values - low
    # min-max to [0, 1]: signed maps (LRP) put their most negative pixel at zero probability
    return torch.where(span > 0, (flat - low) / span.clamp_min(1e-300), torch.zeros_like(flat)).view_as(h)


def _draw(weights: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` indices per row drawn with probability proportional to the row's non-negative ``weights``
    (with replacement), by inverting the cumulative sum: several times faster than ``torch.multinomial``
    on rows of ten thousand pixels. A pixel of weight zero is never drawn: the search returns the first
    index whose cumulative sum exceeds the uniform draw, and a zero weight does not raise the sum."""
    cumulative = torch.cumsum(weights, 1)
    u = torch.rand(weights.shape[0], k, dtype=cumulative.dtype, generator=generator) * cumulative[:, -1:]
    return torch.searchsorted(cumulative, u, right=True).clamp_(max=weights.shape[1] - 1)


def sample_centres(heatmaps, n_draws: int, *, seed: int = 0) -> torch.Tensor:
    """Draw pixel positions with probability proportional to each heatmap (min-max normalised to [0, 1]).

    Parameters
    ----------
    heatmaps : Tensor, shape (n, H, W) or (H, W)
    n_draws : int
        Independent draws (with replacement) per heatmap.
    seed : int

    Returns
    -------
    LongTensor, shape (n, n_draws, 2)
        ``(row, column)`` of every draw. A constant heatmap is sampled uniformly.

    Examples
    --------
    >>> sample_centres(torch.tensor([[0.0, 0.0], [0.0, 1.0]]), 3).tolist()
    [[[1, 1], [1, 1], [1, 1]]]
    """
    if int(n_draws) < 1:
        raise ValueError(f"n_draws must be >= 1, got {n_draws}")
    w = _weights(heatmaps)
    n, height, width = w.shape
    flat = w.flatten(1)
    flat = torch.where(flat.sum(1, keepdim=True) > 0, flat, torch.ones_like(flat))
    generator = torch.Generator().manual_seed(int(seed))
    draws = _draw(flat, int(n_draws), generator)
    return torch.stack([draws // width, draws % width], dim=-1)


def default_box(height: int, width: int) -> int:
    """Box side used by default: a seventh of the shorter image side (4 pixels on 28x28, 16 on 112x112)."""
    return max(1, int(round(min(height, width) / 7)))


def box_masks(heatmaps, *, coverage: float = 0.3, box: int | None = None, seed: int = 0,
              max_steps: int = 100_000) -> torch.Tensor:
    """Occlusion masks: boxes centred at pixels drawn from each heatmap until ``coverage`` is occluded.

    Parameters
    ----------
    heatmaps : Tensor, shape (n, H, W) or (H, W)
    coverage : float
        Fraction of the image to occlude, in (0, 1]; the masks cover at least this much (the last box may
        overshoot by less than one box).
    box : int, optional
        Side of the square boxes; default :func:`default_box`.
    seed : int
    max_steps : int
        Safety bound on the number of boxes per image.

    Returns
    -------
    BoolTensor, shape (n, H, W)
        True where occluded.

    Examples
    --------
    >>> box_masks(torch.rand(3, 10, 10), coverage=0.5, box=3).float().mean((1, 2)).ge(0.5).all().item()
    True
    """
    if not 0 < float(coverage) <= 1:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    w = _weights(heatmaps)
    n, height, width = w.shape
    box = default_box(height, width) if box is None else int(box)
    if not 1 <= box <= min(height, width):
        raise ValueError(f"box must be between 1 and the image side {min(height, width)}, got {box}")
    generator = torch.Generator().manual_seed(int(seed))
    covered = torch.zeros(n, height * width, dtype=torch.bool)
    need = int(np.ceil(float(coverage) * height * width - 1e-9))
    rows, cols = torch.arange(height), torch.arange(width)
    # The weights of the pixels still free; an occluded pixel's weight is set to zero.
    free_weight = w.flatten(1).float().clone()
    for _ in range(int(max_steps)):
        active = covered.sum(1) < need
        if not active.any():
            break
        empty = free_weight.sum(1) <= 0
        if (empty & active).any():  # nothing left where the heatmap is positive: uniform over free pixels
            free_weight[empty] = (~covered[empty]).float()
        centre = _draw(free_weight, 1, generator)[:, 0]
        top = (centre // width - box // 2).view(-1, 1)
        left = (centre % width - box // 2).view(-1, 1)
        in_rows = ((rows >= top) & (rows < top + box)) & active.view(-1, 1)
        in_cols = (cols >= left) & (cols < left + box)
        boxes = (in_rows[:, :, None] & in_cols[:, None, :]).flatten(1)
        covered |= boxes
        free_weight.masked_fill_(boxes, 0.0)
    else:
        raise RuntimeError(f"coverage {coverage} not reached in {max_steps} boxes")
    return covered.view(n, height, width)


def occlude(images: torch.Tensor, masks: torch.Tensor, baseline="mean") -> torch.Tensor:
    """The images with the masked pixels set to ``baseline``.

    Parameters
    ----------
    images : Tensor, shape (n, C, H, W)
    masks : BoolTensor, shape (n, H, W)
    baseline : {"mean", "zero"} or float
        ``"mean"``: each image's own mean per channel; ``"zero"``: 0 (black); a float: that value.

    Examples
    --------
    >>> x = torch.arange(4.0).view(1, 1, 2, 2)
    >>> occlude(x, torch.tensor([[[True, False], [False, False]]])).flatten().tolist()
    [1.5, 1.0, 2.0, 3.0]
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a (n, C, H, W) tensor, got shape {tuple(getattr(images, 'shape', ()))}")
    masks = torch.as_tensor(masks)
    if masks.dtype != torch.bool or masks.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"masks must be boolean of shape {(images.shape[0], *images.shape[2:])}, got "
                         f"{masks.dtype} {tuple(masks.shape)}")
    if isinstance(baseline, str):
        if baseline == "mean":
            fill = images.mean((2, 3), keepdim=True).expand_as(images)
        elif baseline == "zero":
            fill = torch.zeros_like(images)
        else:
            raise ValueError(f"baseline must be one of {BASELINES} or a number, got {baseline!r}")
    elif isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        fill = torch.full_like(images, float(baseline))
    else:
        raise TypeError(f"baseline must be one of {BASELINES} or a number, got {type(baseline).__name__}")
    return torch.where(masks.unsqueeze(1).to(images.device), fill, images)


@torch.no_grad()
def confidence_drop(model: nn.Module, images: torch.Tensor, occluded: torch.Tensor, target=None, *,
                    batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Softmax confidence in ``target`` (default: the class predicted on ``images``) before and after.

    Parameters
    ----------
    model : nn.Module
        Run in eval mode; left as it came.
    images : Tensor, shape (n, C, H, W)
    occluded : Tensor, shape (r * n, C, H, W)
        ``r`` occluded versions of every image, version-major (all images of draw 0, then draw 1, ...).
    target : None or LongTensor (n,)
    batch_size : int
        Inputs (intact or occluded images) per forward pass.

    Returns
    -------
    (numpy.ndarray (n,), numpy.ndarray (r, n))
        The confidence on the originals and the drop (original minus occluded) per draw and image.

    Examples
    --------
    >>> from vefi.book.models import build_model
    >>> _ = torch.manual_seed(0)
    >>> x = torch.rand(4, 1, 28, 28)
    >>> p, drop = confidence_drop(build_model("mnist"), x, torch.cat([x, x]))
    >>> drop.shape, bool(abs(drop).max() < 1e-6)
    ((2, 4), True)
    """
    n = images.shape[0]
    if occluded.shape[0] % n or occluded.shape[1:] != images.shape[1:]:
        raise ValueError(f"occluded must hold a whole number of versions of the {n} images, got shape "
                         f"{tuple(occluded.shape)}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")

    def probs(x):
        return torch.cat([torch.softmax(model(x[i:i + batch_size].to(device)), 1).cpu()
                          for i in range(0, x.shape[0], batch_size)])

    with preserved(model):
        model.eval()
        p0 = probs(images)
        target = p0.argmax(1) if target is None else class_indices(target)
        if target.shape[0] != n:
            raise ValueError(f"target must have one class per image ({n}), got {target.shape[0]}")
        p1 = probs(occluded).view(-1, n, p0.shape[1])
    before = p0.gather(1, target.view(-1, 1))[:, 0]
    after = p1.gather(2, target.view(1, -1, 1).expand(p1.shape[0], -1, 1))[..., 0]
    return before.numpy(), (before.unsqueeze(0) - after).numpy()
