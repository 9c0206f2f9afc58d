"""Activation maximisation (Erhan et al. 2009; Simonyan et al. 2014): the input a unit likes best.

Gradient ascent in input space on a class logit or on a unit (a channel of a layer: the mean of its map or
its centre unit; an fc unit), from a seeded start, with the usual image priors as regularisers (Yosinski et
al. 2015): L2 decay towards mid grey, a Gaussian blur every few steps, a random roll (jitter) before each
forward pass, pixels clipped to [0, 1]. Several targets are optimised at once, one image per target, in one
batch: one forward and one backward per step.

Two things make the climb start and make it visible when it does not:

* **Dead units.** A unit behind a ReLU (or a max-pool of ReLUs) that is off on the grey start image has a
  zero gradient: plain ascent cannot move, and the image stays grey. While a ReLU passes no gradient at all
  for an image, its backward lets through the part of the incoming gradient that would switch units *on*
  (the "redirected ReLU" of Olah et al.'s Lucid library, Feature Visualization, Distill 2017); as soon as any
  gradient passes, the ReLU's true gradient is used again. The forward pass is untouched.
* **Stalls.** A target whose response did not rise by a meaningful margin (``min_rise``) gets a
  :class:`StalledWarning` (or a :class:`StalledError` with ``on_stall="raise"``) that names it, and
  ``ActMaxResult.moved`` says which targets moved: a flat image is never returned without a word.

Also here: the first layer's filters as images, and the maximally activating patches of a unit over a dataset
(its top-k images, each cropped to the unit's receptive field around its strongest location).
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from vefi._model_state import gradients_on, preserved
from vefi._progress import progress
from vefi._tensors import all_finite
from vefi.layers import Layer, check_images, check_scores, layer_table, resolve_layer, tapped
from vefi.perturbation import blur

__all__ = ["ActMaxResult", "Patches", "StalledError", "StalledWarning", "activation_maximisation", "filters",
           "top_patches", "unit_responses"]

_REDUCTIONS = ("mean", "centre")
_ON_STALL = ("warn", "raise", "ignore")


class StalledWarning(UserWarning):
    """:func:`activation_maximisation` did not raise a target's response by ``min_rise``: its image is close to
    the start and shows nothing about the target. The message names the targets and what to try."""


class StalledError(RuntimeError):
    """Raised instead of :class:`StalledWarning` when ``on_stall="raise"``."""


@dataclass
class ActMaxResult:
    """Images that maximise their targets.

    Attributes
    ----------
    images : torch.Tensor
        (n, C, H, W) in [0, 1], one per target.
    start : torch.Tensor
        (n, C, H, W) the seeded start images.
    trace : torch.Tensor
        (steps, n) the objective each step was computed on (on the jittered input when ``jitter > 0``).
    initial, final : torch.Tensor
        (n,) the objective of the start image and of the final image (no jitter).
    targets : list
        The targets, as given.
    moved : torch.Tensor
        (n,) bool: the response rose by more than ``min_rise`` (see :func:`activation_maximisation`).
    labels : list of str
        A short name per target (``"class 3"``, ``"5 conv #7"``).
    """

    images: torch.Tensor
    start: torch.Tensor
    trace: torch.Tensor
    initial: torch.Tensor
    final: torch.Tensor
    targets: list
    moved: torch.Tensor
    labels: list


@dataclass(frozen=True)
class _Target:
    layer: Layer | None  # None: the output logits
    channel: int
    label: str


def _input_shape(model, input_shape):
    shape = input_shape if input_shape is not None else getattr(model, "input_shape", None)
    if shape is None:
        raise ValueError("input_shape is needed, e.g. (3, 112, 112): the model has no 'input_shape' attribute")
    return tuple(int(s) for s in shape)


def _resolve_targets(layers: list[Layer], targets) -> list[_Target]:
    if isinstance(targets, (numbers.Integral, tuple)) and not isinstance(targets, bool):
        targets = [targets]
    targets = list(targets)
    if not targets:
        raise ValueError("targets is empty: give class indices and/or (layer, channel) pairs")
    classes = layers[-1].output_shape
    out = []
    for t in targets:
        if isinstance(t, numbers.Integral) and not isinstance(t, bool):
            if len(classes) != 1 or not 0 <= int(t) < classes[0]:
                raise ValueError(f"class {t} out of range: the model has {classes[0]} outputs (0..{classes[0] - 1})")
            out.append(_Target(None, int(t), f"class {int(t)}"))
            continue
        if hasattr(t, "layer_number") and hasattr(t, "channel"):  # a vefi Feature
            t = (t.layer_number, t.channel)
        if not (isinstance(t, tuple) and len(t) == 2):
            raise TypeError(f"a target is a class index (int) or a (layer, channel) pair, got {t!r}")
        layer = resolve_layer(layers, t[0])
        channel = t[1]
        if not isinstance(channel, numbers.Integral) or isinstance(channel, bool):
            raise TypeError(f"channel must be an int, got {channel!r} for layer {layer.label}")
        if len(layer.output_shape) not in (1, 3):
            raise ValueError(f"layer {layer.label} has output shape {layer.output_shape}; a unit needs a map "
                             "(C, H, W) or a vector")
        if not 0 <= channel < layer.output_shape[0]:
            raise ValueError(f"channel {channel} out of range for layer {layer.label} ({layer.name!r}), which has "
                             f"{layer.output_shape[0]} channels (0..{layer.output_shape[0] - 1})")
        out.append(_Target(layer, int(channel), f"{layer.label} #{int(channel)}"))
    return out


def _reduce(act: torch.Tensor, reduction: str) -> torch.Tensor:
    """(n, h, w) or (n,) activations -> (n,) objective."""
    if act.dim() == 1:
        return act
    if reduction == "mean":
        return act.flatten(1).mean(1)
    return act[:, act.shape[1] // 2, act.shape[2] // 2]


class _RedirectedReLU(torch.autograd.Function):
    """ReLU whose backward, for an image (row) through which the true gradient passes nothing, lets through
    the incoming gradient where it points upwards (would switch a unit on); otherwise the true gradient."""

    @staticmethod
    def forward(x):
        return x.clamp_min(0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0] > 0)  # a mask, not x: x may be changed in place afterwards

    @staticmethod
    def backward(ctx, grad):
        (on,) = ctx.saved_tensors
        passed = grad * on
        if grad.dim() == 0:
            return passed
        blocked = passed.flatten(1).abs().amax(1) == 0  # per image: nothing gets through
        redirected = grad * (on | (grad > 0))
        return torch.where(blocked.view(-1, *(1,) * (grad.dim() - 1)), redirected, passed)


_RELU_FUNCTIONS = (F.relu, torch.relu, torch.Tensor.relu, F.relu_, torch.relu_, torch.Tensor.relu_)


class _RedirectedReLUs(TorchFunctionMode):
    """Every ReLU of the forward pass (module, ``F.relu``, ``torch.relu``, ``Tensor.relu``, in place or not)
    becomes :class:`_RedirectedReLU`. In-place calls are computed out of place: the returned tensor is what
    the model uses next (as ``nn.ReLU(inplace=True)`` does)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _RELU_FUNCTIONS:
            x = args[0]
            if isinstance(x, torch.Tensor) and x.requires_grad:
                return _RedirectedReLU.apply(x)
        return func(*args, **(kwargs or {}))


def _objective(model: nn.Module, x: torch.Tensor, targets: list[_Target], reduction: str) -> torch.Tensor:
    """One forward pass; the objective of row i is its own target's response."""
    layers = {t.layer.number: t.layer for t in targets if t.layer is not None}
    captured: dict[int, torch.Tensor] = {}

    def keep(layer, output):
        # clone: an in-place ReLU right after would overwrite the very tensor we keep
        captured[layer.number] = output.clone()

    with tapped(model, layers.values(), keep):
        logits = check_scores(model(x), x.shape[0])
    values = []
    for i, t in enumerate(targets):
        if t.layer is None:
            values.append(logits[i, t.channel])
        else:
            act = captured[t.layer.number][i:i + 1, t.channel]
            values.append(_reduce(act, reduction)[0])
    return torch.stack(values)


def activation_maximisation(model: nn.Module, targets, *, steps: int = 200, lr: float = 0.05,
                            l2: float = 0.01, blur_every: int = 4, blur_sigma: float = 0.5, jitter: int = 2,
                            clip: bool = True, reduction: str = "mean", start=None, seed: int = 0,
                            input_shape: tuple[int, ...] | None = None, redirect: bool = True,
                            min_rise: float = 0.05, on_stall: str = "warn",
                            show_progress: bool = True) -> ActMaxResult:
    """Gradient ascent on the input for each target, all targets in one batch.

    Parameters
    ----------
    model : torch.nn.Module
        Left exactly as it came (eval mode inside, no parameter touched, hooks removed).
    targets : int, (layer, channel), Feature, or a list of these
        A class index maximises that logit; ``(layer, channel)`` (layer by number or name) a unit: a conv
        channel by the mean of its map (``reduction="mean"``) or its centre unit (``"centre"``), an fc unit
        by its value.
    steps, lr : int, float
        Number of ascent steps; step size, in pixel units: each step moves the pixels the target sees (those
        with a nonzero gradient) by ``lr`` on average, whatever the scale of the target. The mean is over that
        support, not the whole image, so a unit with a small receptive field takes the same steps as a class
        logit instead of steps as many times larger as the image is larger than its field.
    l2 : float
        L2 decay: after each step the image moves a fraction ``l2`` of the way back to mid grey 0.5
        (Simonyan's ``- lambda ||x||^2`` prior for images centred on 0.5). 0 switches it off.
    blur_every, blur_sigma : int, float
        Blur the image with a Gaussian of ``blur_sigma`` pixels every ``blur_every`` steps; 0 switches it off.
    jitter : int
        Roll the image by a random shift of up to ``jitter`` pixels before each forward pass; 0 switches it off.
    clip : bool
        Clip pixels to [0, 1] after each step.
    reduction : {"mean", "centre"}
        How a conv channel's map becomes one number.
    start : torch.Tensor, optional
        (n, C, H, W) or (C, H, W) start images; default mid grey plus seeded Gaussian noise (std 0.05).
    seed : int
        Seeds the start noise and the jitter.
    input_shape : tuple of int, optional
        (C, H, W); default ``model.input_shape``.
    redirect : bool
        Let ReLUs that block all gradient of an image pass its upward part (module docstring), so that a unit
        that is off on the start image can still be climbed. False: plain gradient ascent.
    min_rise : float
        A target *moved* when its final response exceeds its start by more than ``min_rise`` times the larger
        of the two magnitudes (a unit stuck at 0 never moves).
    on_stall : {"warn", "raise", "ignore"}
        What to do when a target did not move: a :class:`StalledWarning`, a :class:`StalledError`, or nothing
        (``ActMaxResult.moved`` says it in every case).
    show_progress : bool

    Returns
    -------
    ActMaxResult

    Warns
    -----
    StalledWarning
        A target did not move (``on_stall="warn"``).

    Raises
    ------
    StalledError
        A target did not move (``on_stall="raise"``).

    Examples
    --------
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    >>> res = activation_maximisation(net, [0, (1, 2)], steps=20, input_shape=(1, 8, 8), show_progress=False)
    >>> res.images.shape, bool((res.final > res.initial).all())
    (torch.Size([2, 1, 8, 8]), True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    for name, value, low in (("steps", steps, 1), ("blur_every", blur_every, 0), ("jitter", jitter, 0)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    for name, value in (("lr", lr), ("blur_sigma", blur_sigma)):
        if not (isinstance(value, numbers.Real) and value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if not (isinstance(l2, numbers.Real) and 0 <= l2 < 1):
        raise ValueError(f"l2 must be in [0, 1), got {l2!r}")
    if not (isinstance(min_rise, numbers.Real) and 0 <= min_rise and math.isfinite(min_rise)):
        raise ValueError(f"min_rise must be a finite number >= 0, got {min_rise!r}")
    if on_stall not in _ON_STALL:
        raise ValueError(f"on_stall must be one of {_ON_STALL}, got {on_stall!r}")
    shape = _input_shape(model, input_shape)
    layers = layer_table(model, shape)
    resolved = _resolve_targets(layers, targets)
    n = len(resolved)
    generator = torch.Generator().manual_seed(int(seed))
    if start is None:
        start = 0.5 + 0.05 * torch.randn((n, *shape), generator=generator)
        start = start.clamp(0, 1) if clip else start
    else:
        if not isinstance(start, torch.Tensor):
            raise TypeError(f"start must be a torch.Tensor, got {type(start).__name__}")
        if start.dim() == 3:
            start = start.unsqueeze(0).expand(n, *start.shape)
        if tuple(start.shape) != (n, *shape):
            raise ValueError(f"start must have shape {(n, *shape)} (one image per target), got {tuple(start.shape)}")
        if not start.is_floating_point() or not all_finite(start):
            raise ValueError("start must be floating point without NaN or Inf")
    # the images come back on the CPU: the start goes to the model's device and dtype
    start = check_images(start.detach(), shape, model=model, convert=True)
    with preserved(model), gradients_on(model):
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        x = start.clone()  # created inside gradients_on, see there; so is the trace, written in place
        trace = torch.empty(steps, n)
        with torch.no_grad():
            initial = _objective(model, start, resolved, reduction)
        for step in progress(range(steps), desc="activation maximisation", disable=not show_progress):
            x.requires_grad_(True)
            seen = x
            if jitter:
                dy, dx = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=generator))
                seen = torch.roll(x, (dy, dx), dims=(-2, -1))
            if redirect:
                with _RedirectedReLUs():
                    value = _objective(model, seen, resolved, reduction)
            else:
                value = _objective(model, seen, resolved, reduction)
            (grad,) = torch.autograd.grad(value.sum(), x)
            trace[step] = value.detach().cpu()
            with torch.no_grad():
                # mean |gradient| over the pixels the target sees; a zero gradient gives a zero step
                magnitude = grad.abs().flatten(1)
                support = (magnitude > 0).sum(1).clamp_min(1)
                scale = (magnitude.sum(1) / support).clamp_min(1e-30).view(-1, 1, 1, 1)
                x = x.detach() + lr * grad / scale
                if l2:
                    x = 0.5 + (1 - l2) * (x - 0.5)
                if blur_every and (step + 1) % blur_every == 0:
                    x = blur(x, blur_sigma)
                if clip:
                    x = x.clamp(0.0, 1.0)
        with torch.no_grad():
            final = _objective(model, x, resolved, reduction)
    initial, final = initial.cpu(), final.cpu()
    moved = (final - initial) > min_rise * torch.maximum(initial.abs(), final.abs())
    labels = [t.label for t in resolved]
    if not moved.all() and on_stall != "ignore":
        stuck = ", ".join(f"{labels[i]} ({float(initial[i]):.3g} -> {float(final[i]):.3g})"
                          for i in torch.nonzero(~moved).flatten().tolist())
        message = (f"activation maximisation did not raise the response of {int((~moved).sum())} of {n} "
                   f"targets by more than min_rise={min_rise:g} of its magnitude: {stuck}. Its image shows "
                   "nothing about the target. A response stuck at 0 is a unit that no gradient reaches from "
                   f"this start (try another start, e.g. a data image{'' if redirect else ', or redirect=True'}); "
                   "else try more steps, a larger lr or weaker regularisers (l2, blur)")
        if on_stall == "raise":
            raise StalledError(message)
        warnings.warn(message, StalledWarning, stacklevel=2)
    return ActMaxResult(x.detach().cpu(), start.cpu(), trace, initial, final, list(targets)
                        if not isinstance(targets, (numbers.Integral, tuple)) else [targets], moved, labels)


def filters(model: nn.Module, layer=None, *, input_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """A conv layer's weights (out, in, kh, kw) as images in [0, 1], each min-max normalised on its own.

    ``layer`` (number or name) defaults to the first convolution; its input must have 1 or 3 channels to be
    seen as an image.

    Examples
    --------
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 5), nn.ReLU())
    >>> w = filters(net, input_shape=(3, 12, 12))
    >>> w.shape, float(w.min()), float(w.max())
    (torch.Size([4, 3, 5, 5]), 0.0, 1.0)
    """
    layers = layer_table(model, _input_shape(model, input_shape))
    if layer is None:
        convs = [lay for lay in layers if lay.kind == "conv"]
        if not convs:
            raise ValueError("the model has no convolution layer")
        chosen = convs[0]
    else:
        chosen = resolve_layer(layers, layer)
    if not isinstance(chosen.module, nn.Conv2d):
        raise ValueError(f"layer {chosen.label} ({chosen.name!r}) is not a Conv2d")
    weight = chosen.module.weight.detach().cpu().float().clone()
    if weight.shape[1] not in (1, 3):
        raise ValueError(f"layer {chosen.label} has {weight.shape[1]} input channels; only 1 or 3 show as images")
    low = weight.amin((1, 2, 3), keepdim=True)
    span = weight.amax((1, 2, 3), keepdim=True) - low
    return torch.where(span > 0, (weight - low) / span.clamp_min(1e-12), torch.full_like(weight, 0.5))


@dataclass
class Patches:
    """The images a unit responds to most, and where.

    Attributes
    ----------
    index : torch.Tensor
        (k,) dataset indices of the top-k images, strongest first.
    response : torch.Tensor
        (k,) the unit's maximum response in each.
    position : torch.Tensor
        (k, 2) (y, x) of that maximum in the layer's map.
    boxes : list of tuple
        (top, left, bottom, right) input boxes (receptive field, clipped to the image; bottom/right exclusive).
    patches : list of torch.Tensor
        The crops (C, h, w); border crops are smaller.
    """

    index: torch.Tensor
    response: torch.Tensor
    position: torch.Tensor
    boxes: list
    patches: list


def unit_responses(model: nn.Module, data, layer, channel: int, *, batch_size: int = 200,
                   show_progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximum response of one channel over each image of ``data`` (an ImageSet), and its (y, x) location.

    Returns ``(response (N,), position (N, 2))``; an fc unit has position (0, 0).
    """
    layers = layer_table(model, tuple(data.images.shape[1:]))
    target = _resolve_targets(layers, [(layer, channel)])[0]
    responses, positions = [], []
    captured = []

    def keep(_, output):
        captured.append(output[:, target.channel].detach().clone())

    with preserved(model), tapped(model, [target.layer], keep):
        model.eval()
        with torch.no_grad():
            for lo in progress(range(0, len(data), batch_size), desc=f"responses of {target.label}",
                               disable=not show_progress):
                captured.clear()
                model(check_images(data.batch(slice(lo, lo + batch_size)), model=model, convert=True))
                act = captured[0]
                if act.dim() == 1:
                    responses.append(act.cpu())
                    positions.append(torch.zeros(act.shape[0], 2, dtype=torch.long))
                    continue
                flat = act.flatten(1)
                best, where = flat.max(1)
                responses.append(best.cpu())
                positions.append(torch.stack([where // act.shape[2], where % act.shape[2]], 1).cpu())
    return torch.cat(responses), torch.cat(positions)


def top_patches(model: nn.Module, data, layer, channel: int, *, k: int = 9, batch_size: int = 200,
                show_progress: bool = True) -> Patches:
    """The top-k images of ``data`` by a unit's maximum response, cropped to its receptive field there.

    The box comes from :func:`vefi.receptive.receptive_box`.
    """
    from vefi.receptive import receptive_box

    if not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    response, position = unit_responses(model, data, layer, channel, batch_size=batch_size,
                                        show_progress=show_progress)
    k = min(int(k), len(response))
    best = response.topk(k).indices
    layers = layer_table(model, tuple(data.images.shape[1:]))
    number = resolve_layer(layers, layer).number
    boxes, crops = [], []
    for i in best.tolist():
        y, x = (int(v) for v in position[i])
        top, left, bottom, right = receptive_box(model, number, y, x)
        boxes.append((top, left, bottom, right))
        crops.append(data.batch([i])[0, :, top:bottom, left:right])
    return Patches(best, response[best], position[best], boxes, crops)
