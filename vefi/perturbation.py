"""Meaningful perturbation (Fong & Vedaldi 2017): the smallest blurred region that changes the decision.

A mask ``m`` in [0, 1] (1 = keep the pixel, 0 = replace it by its blurred version) composes the perturbed
image ``x_m = m * x + (1 - m) * blur(x)``. Two games learn ``m`` by gradient descent:

- **deletion**: the smallest region whose blurring destroys the target score,
  ``min_m  l1 * mean(1 - m) + tv * TV(m) + p_c(x_m)``; the heatmap is ``1 - m``;
- **preservation**: the smallest region that, left sharp with everything else blurred, keeps the score,
  ``min_m  l1 * mean(m) + tv * TV(m) - p_c(x_m)``; the heatmap is ``m``.

The mask lives at low resolution and is upsampled (bilinear) to the image, which together with the total
variation term ``TV(m) = mean |grad m|^beta`` keeps it blob-like instead of adversarial. Adam, a fixed number
of steps, the mask clipped to [0, 1] after each step, an optional random jitter of the composite. One
optimisation for the whole batch: each image has its own mask and its own loss, and the losses are summed,
so the masks do not interact (Adam's updates are per element).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.v2.functional import gaussian_blur

from vefi._model_state import gradients_on, preserved
from vefi._progress import progress
from vefi.layers import check_images, check_scores
from vefi.targets import class_indices

__all__ = ["GAMES", "PerturbationResult", "blur", "perturbation_masks", "meaningful_perturbation"]

GAMES = ("deletion", "preservation")
_SCORES = ("probability", "logit")


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of a batch (N, C, H, W) with standard deviation ``sigma`` pixels (reflected borders).

    The kernel spans +-3 sigma, cut to the image so that the reflection stays inside it.

    Examples
    --------
    >>> x = torch.zeros(1, 1, 9, 9); x[0, 0, 4, 4] = 1.0
    >>> y = blur(x, 1.0)
    >>> round(float(y.sum()), 4), bool(y[0, 0, 4, 4] < 1)
    (1.0, True)
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    h, w = images.shape[-2:]
    sizes = []
    for side in (h, w):
        radius = min(int(math.ceil(3 * sigma)), side - 1)
        sizes.append(2 * radius + 1)
    return gaussian_blur(images, sizes, [float(sigma), float(sigma)])


@dataclass
class PerturbationResult:
    """What :func:`perturbation_masks` learned.

    Attributes
    ----------
    game : str
        ``"deletion"`` or ``"preservation"``.
    mask : torch.Tensor
        (N, H, W) in [0, 1], at image resolution; 1 keeps the pixel, 0 blurs it.
    heatmap : torch.Tensor
        (N, H, W) in [0, 1], higher = more important: ``1 - mask`` for deletion, ``mask`` for preservation.
    target : torch.Tensor
        (N,) the class whose score the game plays with.
    score_before, score_after : torch.Tensor
        (N,) the score (probability or logit) of ``target`` on the image and on the final composite.
    perturbed : torch.Tensor
        (N, C, H, W) the final composite image.
    trace : torch.Tensor
        (steps, N) the loss of each image at each step.
    """

    game: str
    mask: torch.Tensor
    heatmap: torch.Tensor
    target: torch.Tensor
    score_before: torch.Tensor
    score_after: torch.Tensor
    perturbed: torch.Tensor
    trace: torch.Tensor



def _targets(target, logits: torch.Tensor) -> torch.Tensor:
    n, classes = check_scores(logits).shape
    if target is None:
        return logits.argmax(1)
    target = class_indices(target)
    if target.numel() == 1:
        target = target.expand(n)
    if target.numel() != n:
        raise ValueError(f"target must have one class per image ({n}), got {target.numel()}")
    if (target < 0).any() or (target >= classes).any():
        raise ValueError(f"target classes must be in 0..{classes - 1}, got {target.tolist()}")
    return target.to(logits.device)


def _total_variation(mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-image mean of |dm/dy|^beta + |dm/dx|^beta over a (N, 1, h, w) mask."""
    dy = (mask[..., 1:, :] - mask[..., :-1, :]).abs().pow(beta).flatten(1).mean(1)
    dx = (mask[..., :, 1:] - mask[..., :, :-1]).abs().pow(beta).flatten(1).mean(1)
    return dy + dx


def perturbation_masks(model: nn.Module, images: torch.Tensor, target=None, *, game: str = "deletion",
                       steps: int = 150, lr: float = 0.1, l1: float = 0.05, tv: float = 0.2,
                       tv_beta: float = 3.0, mask_size: int | None = None, sigma: float | None = None,
                       score: str = "probability", jitter: int = 0, init: float | None = None,
                       seed: int = 0, show_progress: bool = True) -> PerturbationResult:
    """Learn a deletion or preservation mask per image, all images in one optimisation.

    Parameters
    ----------
    model : torch.nn.Module
        A classifier taking (N, C, H, W) images; left exactly as it came (eval mode inside, no parameter
        update, no gradient stored on a parameter).
    images : torch.Tensor
        (N, C, H, W) or (C, H, W) float images in [0, 1].
    target : None, int or LongTensor (N,)
        The class to explain; None takes the predicted class of each image.
    game : {"deletion", "preservation"}
    steps, lr : int, float
        Adam steps and learning rate.
    l1, tv, tv_beta : float
        Weights of the area term (mean over the mask) and of the total variation term, and TV's exponent.
    mask_size : int, optional
        Side of the low-resolution mask; default a quarter of the image side (28 for 112, 7 for 28).
    sigma : float, optional
        Blur standard deviation in pixels; default a tenth of the image side (as 10 px for 224 in the paper).
    score : {"probability", "logit"}
        What the game plays with: the softmax probability (the paper) or the logit of the target.
    jitter : int
        If > 0, roll the composite by a random shift of up to ``jitter`` pixels each step (the paper's remedy
        against artefacts).
    init : float, optional
        Starting value of the mask; default 1 (keep everything) for both games.
    seed : int
        Seeds the jitter; the result is deterministic for a given seed.
    show_progress : bool
        Show a progress bar over the steps.

    Returns
    -------
    PerturbationResult

    Examples
    --------
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16 * 16, 3))
    >>> res = perturbation_masks(net, torch.rand(2, 1, 16, 16), steps=5, show_progress=False)
    >>> res.mask.shape, bool(res.mask.min() >= 0), bool(res.mask.max() <= 1)
    (torch.Size([2, 16, 16]), True, True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if game not in GAMES:
        raise ValueError(f"game must be one of {GAMES}, got {game!r}")
    if score not in _SCORES:
        raise ValueError(f"score must be one of {_SCORES}, got {score!r}")
    if not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    for name, value in (("lr", lr), ("sigma", sigma if sigma is not None else 1.0)):
        if not (isinstance(value, numbers.Real) and value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    for name, value in (("l1", l1), ("tv", tv)):
        if not (isinstance(value, numbers.Real) and value >= 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if not isinstance(jitter, numbers.Integral) or jitter < 0:
        raise ValueError(f"jitter must be an int >= 0, got {jitter!r}")
    images = check_images(images, model, convert=True)  # the result comes back on the CPU in any case
    n, _, height, width = images.shape
    if mask_size is None:
        mask_size = max(2, min(height, width) // 4)
    if not isinstance(mask_size, numbers.Integral) or not 1 <= mask_size <= min(height, width):
        raise ValueError(f"mask_size must be an int in 1..{min(height, width)}, got {mask_size!r}")
    if sigma is None:
        sigma = min(height, width) / 10
    if init is None:
        init = 1.0
    if not 0 <= init <= 1:
        raise ValueError(f"init must be in [0, 1], got {init!r}")

    device = images.device
    generator = torch.Generator().manual_seed(int(seed))
    sign = 1.0 if game == "deletion" else -1.0

    def measure(x, classes):
        logits = model(x)
        if score == "probability":
            return F.softmax(logits, 1).gather(1, classes[:, None])[:, 0]
        return logits.gather(1, classes[:, None])[:, 0]

    with preserved(model):
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            logits = model(images)
            classes = _targets(target, logits)
            before = measure(images, classes)
            blurred = blur(images, sigma)
        with gradients_on(model):
            # every tensor of the graph (and the trace, written in place) is made in here, so that it is a
            # normal one under inference mode too
            sharp, smooth = images.detach().clone(), blurred.clone()
            trace = torch.empty(steps, n)
            small = torch.full((n, 1, mask_size, mask_size), float(init), device=device, dtype=images.dtype,
                               requires_grad=True)
            optimiser = torch.optim.Adam([small], lr=lr)
            for step in progress(range(steps), desc=f"meaningful perturbation ({game})",
                                 disable=not show_progress):
                mask = F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)
                composite = mask * sharp + (1 - mask) * smooth
                if jitter:
                    dy, dx = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=generator))
                    composite = torch.roll(composite, (dy, dx), dims=(-2, -1))
                area = (1 - small).flatten(1).mean(1) if game == "deletion" else small.flatten(1).mean(1)
                loss = l1 * area + tv * _total_variation(small, tv_beta) + sign * measure(composite, classes)
                optimiser.zero_grad()
                loss.sum().backward()
                optimiser.step()
                with torch.no_grad():
                    small.clamp_(0.0, 1.0)
                trace[step] = loss.detach().cpu()
        with torch.no_grad():
            mask = F.interpolate(small.detach(), size=(height, width), mode="bilinear", align_corners=False)
            mask = mask.clamp(0.0, 1.0)
            composite = mask * images + (1 - mask) * blurred
            after = measure(composite, classes)
    mask = mask[:, 0].float()
    heat = 1 - mask if game == "deletion" else mask
    return PerturbationResult(game, mask.cpu(), heat.cpu(), classes.cpu(), before.cpu(), after.cpu(),
                              composite.cpu(), trace)


def meaningful_perturbation(model: nn.Module, images: torch.Tensor, target=None, *, game: str = "deletion",
                            **options) -> torch.Tensor:
    """Meaningful-perturbation heatmaps (N, H, W) in [0, 1], higher = more important for ``target``.

    Deletion: ``1 - mask`` (what must be blurred to destroy the score); preservation: ``mask`` (what must stay
    sharp to keep it). ``options`` go to :func:`perturbation_masks` (steps, lr, l1, tv, mask_size, sigma,
    score, jitter, seed, ...).

    Examples
    --------
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    >>> meaningful_perturbation(net, torch.rand(3, 1, 8, 8), steps=3, show_progress=False).shape
    torch.Size([3, 8, 8])
    """
    return perturbation_masks(model, images, target, game=game, **options).heatmap
