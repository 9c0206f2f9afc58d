"""Class activation maps: CAM, Grad-CAM, and plain upsampled activation maps.

A convolutional layer's output :math:`A \\in \\mathbb{R}^{K \\times h \\times w}` is a stack of coarse maps,
one per channel, each still aligned with the image. These methods weigh the maps and blow them up to the
image's size (bilinear interpolation).

* **CAM** (Zhou et al. 2016), for nets that end in global average pooling and one linear layer
  :math:`y_c = \\sum_k w_{ck} \\frac{1}{hw}\\sum_{u} A_k(u) + b_c`: :math:`M_c = \\sum_k w_{ck} A_k`, the class
  score before pooling, location by location. Other nets have no such map: :func:`cam` refuses them.
* **Grad-CAM** (Selvaraju et al. 2017), for any net: weigh each channel by its average gradient,
  :math:`\\alpha_k^c = \\frac{1}{hw}\\sum_u \\partial y_c / \\partial A_k(u)`, and keep the positive part,
  :math:`M_c = \\mathrm{ReLU}(\\sum_k \\alpha_k^c A_k)`. On a CAM net at the last convolutional block,
  Grad-CAM is CAM up to a constant factor and the ReLU.
* **Upsampled activations**: the activation map of one channel, upsampled; the paper's weakest baseline.

Every function runs one forward (and for Grad-CAM one backward) pass for the whole batch, in evaluation
mode; its hooks are removed in ``finally`` and the model is left as it came.

Examples
--------
>>> import torch
>>> from vefi.models import build_model
>>> from vefi.cam import grad_cam
>>> _ = torch.manual_seed(0)
>>> net = build_model("mnist")
>>> grad_cam(net, torch.rand(2, 1, 28, 28), target=3).shape
torch.Size([2, 28, 28])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vefi._model_state import gradients_on, preserved
from vefi.heatmaps import _resolve_target
from vefi.layers import Layer, check_images, layer_table, resolve_layer

__all__ = ["default_layer", "grad_cam", "cam", "upsampled_activations"]


def default_layer(model: nn.Module, input_shape) -> Layer:
    """The last convolution or ReLU whose output is still a map (C, h, w): Grad-CAM's usual choice.

    Examples
    --------
    >>> from vefi.models import build_model
    >>> default_layer(build_model("an8flower-single"), (3, 112, 112)).name
    'relu4'
    """
    candidates = [layer for layer in layer_table(model, tuple(input_shape))
                  if layer.kind in ("conv", "relu") and len(layer.output_shape) == 3]
    if not candidates:
        raise ValueError("the model has no convolution or ReLU with a spatial (C, h, w) output")
    return candidates[-1]


def _layer(model, images, layer) -> Layer:
    if layer is None:
        return default_layer(model, images.shape[1:])
    found = resolve_layer(layer_table(model, tuple(images.shape[1:])), layer)
    if len(found.output_shape) != 3:
        raise ValueError(f"layer {found.name!r} ({found.kind}) has output shape {found.output_shape}, "
                         "expected a map (C, h, w)")
    return found


def _activations(model, images, module, with_grad: bool):
    """Logits and the module's output; the hook hands a copy on, so a later in-place ReLU cannot touch it.
    With ``with_grad``, call it inside :func:`vefi._model_state.gradients_on`."""
    store = {}

    def hook(_, inputs, output):
        store["a"] = output
        return output.clone()

    handle = module.register_forward_hook(hook)
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.set_grad_enabled(with_grad):
            x = images.detach().clone().requires_grad_(with_grad)
            logits = model(x)
    finally:
        handle.remove()
    if "a" not in store:
        raise ValueError("the chosen layer was not called in the forward pass")
    return logits, store["a"]


def _upsample(maps: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)


def grad_cam(model: nn.Module, images: torch.Tensor, target=None, *, layer=None,
             upsample: bool = True) -> torch.Tensor:
    """Grad-CAM heatmap, (n, H, W) (or (n, h, w) at the layer's resolution with ``upsample=False``).

    Parameters
    ----------
    model : nn.Module
    images : Tensor (n, C, H, W) or (C, H, W)
    target : None, int or LongTensor (n,)
    layer : None, int or str
        Layer number or name (see :func:`vefi.layers.layer_table`); default :func:`default_layer`.
    upsample : bool
        Bilinear upsampling to the image's size.

    Examples
    --------
    >>> import torch
    >>> from vefi.models import build_model
    >>> _ = torch.manual_seed(0)
    >>> grad_cam(build_model("mnist"), torch.rand(1, 1, 28, 28), layer="conv2", upsample=False).shape
    torch.Size([1, 7, 7])
    """
    images = check_images(images, model)
    with preserved(model):
        chosen = _layer(model, images, layer)
        with gradients_on(model):
            logits, a = _activations(model, images, chosen.module, with_grad=True)
            target = _resolve_target(target, logits)
            (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), a)
    weights = grad.mean((2, 3), keepdim=True)
    maps = (weights * a.detach()).sum(1, keepdim=True).clamp(min=0)
    return (_upsample(maps, images.shape[2:]) if upsample else maps)[:, 0]


def _cam_head(model: nn.Module):
    """The global average pool and the linear layer a CAM net ends with, or a ValueError saying why not."""
    leaves = [m for m in model.modules() if not list(m.children())]
    tail = [m for m in leaves if not isinstance(m, (nn.Flatten, nn.Dropout, nn.Identity))]
    why = ("CAM needs a net that ends in global average pooling and one linear layer "
           "(e.g. ... conv, ReLU, AdaptiveAvgPool2d(1), Flatten, Linear); use grad_cam for other nets")
    if len(tail) < 2 or not isinstance(tail[-1], nn.Linear):
        raise ValueError(f"{why}; this one ends in {[type(m).__name__ for m in tail[-2:]]}")
    pool = tail[-2]
    if not (isinstance(pool, nn.AdaptiveAvgPool2d) and pool.output_size in (1, (1, 1))):
        raise ValueError(f"{why}; the layer before the last linear one is {type(pool).__name__}")
    return pool, tail[-1]


def cam(model: nn.Module, images: torch.Tensor, target=None, *, upsample: bool = True) -> torch.Tensor:
    """Class activation map (Zhou et al. 2016), (n, H, W): the class weights applied to the last maps.

    Raises
    ------
    ValueError
        The model does not end in global average pooling + one linear layer.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    ...                     nn.Linear(8, 4))
    >>> cam(net, torch.rand(2, 3, 16, 16)).shape
    torch.Size([2, 16, 16])
    """
    images = check_images(images, model)
    pool, linear = _cam_head(model)
    store = {}

    def hook(_, inputs, output):
        store["a"] = inputs[0].detach()

    with preserved(model):
        handle = pool.register_forward_hook(hook)
        try:
            model.eval()
            with torch.no_grad():
                logits = model(images)
        finally:
            handle.remove()
    target = _resolve_target(target, logits)
    weights = linear.weight.detach()[target]  # (n, K)
    maps = torch.einsum("nk,nkhw->nhw", weights, store["a"])[:, None]
    return (_upsample(maps, images.shape[2:]) if upsample else maps)[:, 0]


def upsampled_activations(model: nn.Module, images: torch.Tensor, layer, channel=None) -> torch.Tensor:
    """Activation maps of ``layer`` upsampled to the image: (n, H, W) for one channel, (n, K, H, W) for all.

    Examples
    --------
    >>> import torch
    >>> from vefi.models import build_model
    >>> _ = torch.manual_seed(0)
    >>> upsampled_activations(build_model("mnist"), torch.rand(2, 1, 28, 28), "relu2", channel=5).shape
    torch.Size([2, 28, 28])
    """
    images = check_images(images, model)
    with preserved(model):
        chosen = _layer(model, images, layer)
        _, a = _activations(model, images, chosen.module, with_grad=False)
    if channel is not None:
        if not 0 <= int(channel) < a.shape[1]:
            raise ValueError(f"channel must lie in [0, {a.shape[1] - 1}] for layer {chosen.name!r}, got {channel}")
        a = a[:, int(channel):int(channel) + 1]
    up = _upsample(a.detach(), images.shape[2:])
    return up[:, 0] if channel is not None else up
