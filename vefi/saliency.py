"""Gradient heatmaps: sensitivity analysis and gradient x input.

For a class score :math:`f_c(x)` the gradient :math:`\\partial f_c / \\partial x_p` says how much the score
would change if pixel :math:`p` changed a little.

* **Sensitivity analysis** (Simonyan et al. 2014; in the form of Montavon et al. 2018):
  :math:`R_p = \\sum_{k} (\\partial f_c / \\partial x_{k,p})^2`, the squared gradient summed over the colour
  channels :math:`k`. It says what would make the image *more or less* of class :math:`c`, not what in the
  image makes it class :math:`c`.
* **Gradient x input** (simple Taylor decomposition): :math:`R_p = \\sum_k x_{k,p}\\,
  \\partial f_c / \\partial x_{k,p}`. For a bias-free ReLU net it sums to the score (the net is
  positively homogeneous); it equals LRP with the epsilon rule as epsilon goes to 0.

Both take one forward and one backward pass for the whole batch. The model runs in evaluation mode
(dropout off) and is left exactly as it came: training flags and ``requires_grad`` restored, no parameter
gradient touched.

Examples
--------
>>> import torch
>>> from vefi.book.models import build_model
>>> from vefi.saliency import sensitivity, gradient_x_input
>>> _ = torch.manual_seed(0)
>>> net = build_model("mnist")
>>> x = torch.rand(4, 1, 28, 28)
>>> sensitivity(net, x).shape, gradient_x_input(net, x, target=7).shape
(torch.Size([4, 28, 28]), torch.Size([4, 28, 28]))
"""

from __future__ import annotations

import torch
from torch import nn

from vefi._model_state import gradients_on, preserved
from vefi.layers import check_images
from vefi.targets import resolve_target

__all__ = ["gradient", "sensitivity", "gradient_x_input"]


def gradient(model: nn.Module, images: torch.Tensor, target=None) -> torch.Tensor:
    """Gradient of the target class score with respect to the input, (n, C, H, W).

    Parameters
    ----------
    model : nn.Module
        Classifier returning scores (n, classes) for float images in [0, 1].
    images : Tensor (n, C, H, W) or (C, H, W)
    target : None, int or LongTensor (n,)
        Class whose score (the logit, before any softmax) is differentiated; None = predicted class.

    Returns
    -------
    Tensor (n, C, H, W)

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    >>> g = gradient(net, torch.rand(1, 1, 2, 2), target=1)
    >>> torch.allclose(g.flatten(), net[1].weight[1])
    True
    """
    images = check_images(images, model)
    with preserved(model), gradients_on(model):
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)  # the input gradient alone: no graph through the weights
        x = images.detach().clone().requires_grad_(True)  # created inside gradients_on, see there
        logits = model(x)
        target = resolve_target(target, logits)
        score = logits.gather(1, target[:, None]).sum()
        (grad,) = torch.autograd.grad(score, x)
    return grad


def sensitivity(model: nn.Module, images: torch.Tensor, target=None) -> torch.Tensor:
    """Sensitivity analysis: squared gradient of the class score, summed over channels, (n, H, W).

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    >>> h = sensitivity(net, torch.rand(1, 1, 2, 2), target=0)
    >>> torch.allclose(h.flatten(), net[1].weight[0] ** 2)
    True
    """
    return gradient(model, images, target).pow(2).sum(1)


def gradient_x_input(model: nn.Module, images: torch.Tensor, target=None, *,
                     sum_channels: bool = True) -> torch.Tensor:
    """Gradient x input: (n, H, W) summed over channels, or (n, C, H, W) with ``sum_channels=False``.

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2, bias=False))
    >>> x = torch.rand(1, 1, 2, 2)
    >>> torch.allclose(gradient_x_input(net, x, target=1).sum(), net(x)[0, 1])
    True
    """
    images = check_images(images, model)
    out = gradient(model, images, target) * images
    return out.sum(1) if sum_channels else out
