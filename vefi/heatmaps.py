"""One registry of heatmap methods with a single calling convention.

Every method answers the same question, "which pixels speak for class ``target``?", with a map of the image's
size: ``compute(method, model, images, target) -> (n, H, W)``, higher meaning more evidence for the target.
Some maps are signed (LRP, gradient x input, occlusion), some are not (sensitivity, Grad-CAM, the paper's
method); :func:`normalise` brings any of them to [0, 1] per image for display or thresholding.

==========================  ====================================================================  ==============
name                        what it is                                                            module
==========================  ====================================================================  ==============
``ours``                    the paper's method: relevant features, guided backprop + stride fix   vefi.explain
``deconv-gb``               the same without the stride fix (the paper's "Deconv+GB" baseline)    vefi.explain
``upsampled-activations``   the relevant features' activation maps, upsampled (paper baseline)    vefi.explain
``gradient``                sensitivity: squared gradient of the class score, summed over colour  vefi.saliency
``gradient-x-input``        gradient times input (simple Taylor), summed over colour              vefi.saliency
``lrp-epsilon``             LRP, epsilon rule everywhere                                          vefi.lrp
``lrp-zplus``               LRP, z+ rule everywhere                                               vefi.lrp
``lrp-alpha1beta0``         LRP, alpha=1 beta=0                                                   vefi.lrp
``lrp-alpha2beta1``         LRP, alpha=2 beta=1                                                   vefi.lrp
``lrp-composite``           LRP, z^B first layer, alpha1-beta0 convolutions, epsilon dense        vefi.lrp
``occlusion``               drop of the class score when a sliding window is greyed out           vefi.occlusion
``grad-cam``                Grad-CAM at the last convolutional block, upsampled                   vefi.cam
``meaningful-perturbation`` the smallest blur mask that deletes the class (Fong & Vedaldi 2017)   vefi.perturbation
``random``                  uniform noise from a seeded generator: the control                    (here)
==========================  ====================================================================  ==============

LRP maps are the relevance summed over colour channels. The first three need ``relevant=`` a
:class:`vefi.relevant.RelevantFeatures`; other options go to the method's own function.

Examples
--------
>>> import torch
>>> from vefi.book.models import build_model
>>> from vefi.heatmaps import compute, normalise
>>> _ = torch.manual_seed(0)
>>> net = build_model("mnist")
>>> h = compute("lrp-epsilon", net, torch.rand(2, 1, 28, 28), target=3)
>>> tuple(h.shape)
(2, 28, 28)
>>> float(normalise(h).max())
1.0
"""

from __future__ import annotations

import torch
from torch import nn

from vefi.layers import check_images

__all__ = ["METHODS", "compute", "normalise"]


METHODS = ("ours", "deconv-gb", "upsampled-activations", "gradient", "gradient-x-input", "lrp-epsilon",
           "lrp-zplus", "lrp-alpha1beta0", "lrp-alpha2beta1", "lrp-composite", "occlusion", "grad-cam",
           "meaningful-perturbation", "random")

_LRP_RULES = {"lrp-epsilon": "epsilon", "lrp-zplus": "zplus", "lrp-alpha1beta0": "alpha1beta0",
              "lrp-alpha2beta1": "alpha2beta1", "lrp-composite": "composite"}
_EXPLAIN = {"ours": {"stride_fix": True, "maps": "backproject"},
            "deconv-gb": {"stride_fix": False, "maps": "backproject"},
            "upsampled-activations": {"stride_fix": True, "maps": "upsampled"}}



def normalise(h: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each heatmap to [0, 1]; a constant map becomes all zeros.

    Parameters
    ----------
    h : Tensor (n, H, W) or (H, W)

    Returns
    -------
    Tensor of the same shape, float32.

    Examples
    --------
    >>> normalise(torch.tensor([[[-1.0, 1.0], [0.0, 3.0]]])).tolist()
    [[[0.0, 0.5], [0.25, 1.0]]]
    """
    if not isinstance(h, torch.Tensor):
        h = torch.as_tensor(h)
    single = h.dim() == 2
    if single:
        h = h.unsqueeze(0)
    if h.dim() != 3:
        raise ValueError(f"heatmaps must have shape (n, H, W) or (H, W), got {tuple(h.shape)}")
    h = h.detach().float()
    flat = h.reshape(h.shape[0], -1)
    low = flat.min(1).values.view(-1, 1, 1)
    span = (flat.max(1).values.view(-1, 1, 1) - low)
    out = torch.where(span > 0, (h - low) / span.clamp_min(torch.finfo(h.dtype).tiny), torch.zeros_like(h))
    return out[0] if single else out


def compute(method: str, model: nn.Module, images: torch.Tensor, target=None, **options) -> torch.Tensor:
    """The heatmap of ``method`` for every image, as float32 (n, H, W); higher = more evidence for ``target``.

    Parameters
    ----------
    method : str
        One of :data:`METHODS`.
    model : nn.Module
        A classifier taking float images in [0, 1]; left exactly as it came.
    images : Tensor (n, C, H, W) or (C, H, W)
    target : None, int or LongTensor (n,)
        The class to explain; None means the predicted class.
    **options
        Passed to the method: ``relevant=`` (required by ``ours``, ``deconv-gb``, ``upsampled-activations``),
        ``epsilon=`` (LRP), ``window=``, ``stride=``, ``baseline=`` (occlusion), ``layer=`` (Grad-CAM),
        ``seed=`` (random), ...

    Raises
    ------
    ValueError
        Unknown method (the message lists :data:`METHODS`), NaN/Inf in the images, images on another device
        than the model, a class out of range.
    TypeError
        A target that is not class indices (a float is never rounded), images of another dtype than the
        model's, a model that does not return a tensor of class scores (wrap it so that it does).

    Every method works under the caller's ``torch.no_grad()`` or ``torch.inference_mode()`` too.

    Examples
    --------
    >>> import torch
    >>> from vefi.book.models import build_model
    >>> _ = torch.manual_seed(0)
    >>> net = build_model("mnist")
    >>> compute("random", net, torch.rand(2, 1, 28, 28), seed=1).shape
    torch.Size([2, 28, 28])
    """
    if method not in METHODS:
        raise ValueError(f"unknown heatmap method {method!r}; expected one of {', '.join(METHODS)}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    images = check_images(images, model)
    if method in _EXPLAIN:
        if "relevant" not in options:
            raise ValueError(f"method {method!r} needs relevant= a vefi.relevant.RelevantFeatures")
        from vefi.explain import explain  # lazy: vefi.explain builds on much of the package
        relevant = options.pop("relevant")
        out = explain(model, images, relevant, target=target, **_EXPLAIN[method], **options).heatmap
    elif method in ("gradient", "gradient-x-input"):
        from vefi import saliency
        fn = saliency.sensitivity if method == "gradient" else saliency.gradient_x_input
        out = fn(model, images, target, **options)
    elif method in _LRP_RULES:
        from vefi.lrp import lrp
        out = lrp(model, images, target, rule=_LRP_RULES[method], **options).sum(1)
    elif method == "occlusion":
        from vefi.occlusion import occlusion
        out = occlusion(model, images, target, **options)
    elif method == "grad-cam":
        from vefi.cam import grad_cam
        out = grad_cam(model, images, target, **options)
    elif method == "meaningful-perturbation":
        from vefi.perturbation import meaningful_perturbation
        out = meaningful_perturbation(model, images, target, **options)
    else:  # random
        seed = options.pop("seed", 0)
        if options:
            raise TypeError(f"method 'random' takes only seed=, got {sorted(options)}")
        generator = torch.Generator().manual_seed(int(seed))
        n, _, height, width = images.shape
        out = torch.rand(n, height, width, generator=generator).to(images.device)
    out = torch.as_tensor(out).detach().float()
    if out.shape != (images.shape[0],) + tuple(images.shape[2:]):
        raise RuntimeError(f"method {method!r} returned shape {tuple(out.shape)}, expected "
                           f"{(images.shape[0],) + tuple(images.shape[2:])}")
    return out
