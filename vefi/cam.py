"""Class activation maps: CAM, Grad-CAM, and plain upsampled activation maps.

A convolutional layer's output :math:`A \\in \\mathbb{R}^{K \\times h \\times w}` is a stack of coarse maps,
one per channel, each still aligned with the image. These methods weigh the maps and blow them up to the
image's size (bilinear interpolation).

* **CAM** (Zhou et al. 2016), for nets that end in global average pooling and one linear layer
  :math:`y_c = \\sum_k w_{ck} \\frac{1}{hw}\\sum_{u} A_k(u) + b_c`: :math:`M_c = \\sum_k w_{ck} A_k`, the class
  score before pooling, location by location. The maps are found wherever the net pools them (a module or a
  function call in its ``forward``, as densenet and shufflenet do). Other nets have no such map: :func:`cam`
  refuses them.
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
>>> from vefi.book.models import build_model
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
from torch.overrides import TorchFunctionMode

from vefi._model_state import gradients_on, preserved
from vefi.layers import Layer, check_images, check_scores, layer_table, resolve_layer, tapped
from vefi.targets import resolve_target

__all__ = ["default_layer", "grad_cam", "grad_cam_parts", "cam", "upsampled_activations"]


# what Grad-CAM may look at by default: convolutions, normalisations, activations and block outputs (a
# residual sum, a concatenation of branches), not pools, which only coarsen the map before them
_MAP_KINDS = ("conv", "bn", "gn", "ln", "block", "relu", "relu6", "leakyrelu", "hardswish", "silu", "gelu")


def default_layer(model: nn.Module, input_shape) -> Layer:
    """The last layer whose output is still a map (C, h, w) and which is a convolution, a normalisation, an
    activation or a block output: Grad-CAM's usual choice (the last block of a ResNet, ``features.norm5`` of a
    DenseNet, the last ReLU of a VGG's or of the book's nets).

    Examples
    --------
    >>> from vefi.book.models import build_model
    >>> default_layer(build_model("an8flower-single"), (3, 112, 112)).name
    'relu4'
    """
    candidates = [layer for layer in layer_table(model, tuple(input_shape))
                  if layer.kind in _MAP_KINDS and len(layer.output_shape) == 3]
    if not candidates:
        raise ValueError("the model has no convolution, normalisation, activation or block with a spatial "
                         "(C, h, w) output")
    return candidates[-1]


def _layer(model, images, layer) -> Layer:
    if layer is None:
        return default_layer(model, images.shape[1:])
    found = resolve_layer(layer_table(model, tuple(images.shape[1:])), layer)
    if len(found.output_shape) != 3:
        raise ValueError(f"layer {found.name!r} ({found.kind}) has output shape {found.output_shape}, "
                         "expected a map (C, h, w)")
    return found


def _activations(model, images, layer: Layer, with_grad: bool):
    """Logits and the layer's output; the tap hands a copy on, so a later in-place ReLU cannot touch it.
    With ``with_grad``, call it inside :func:`vefi._model_state.gradients_on`."""
    store = {}

    def keep(_, output):
        store["a"] = output
        return output.clone()

    with tapped(model, [layer], keep):
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.set_grad_enabled(with_grad):
            x = images.detach().clone().requires_grad_(with_grad)
            logits = model(x)
    if "a" not in store:
        raise ValueError(f"layer {layer.label} {layer.name!r} was not called in the forward pass")
    return logits, store["a"]


def _upsample(maps: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)


def grad_cam_parts(model: nn.Module, images: torch.Tensor, target=None, *, layer=None
                   ) -> tuple[Layer, torch.Tensor, torch.Tensor]:
    """What Grad-CAM weighs: the layer, its maps :math:`A` (n, K, h, w) and the weights :math:`\\alpha^c`
    (n, K), each map's average gradient of the target's score. :func:`grad_cam` is
    :math:`\\mathrm{ReLU}(\\sum_k \\alpha_k A_k)`, upsampled; the parts tell why a map is blank (the weighted
    sum negative everywhere, so that the ReLU keeps nothing). Arguments as :func:`grad_cam`.

    Examples
    --------
    >>> import torch
    >>> from vefi.book.models import build_model
    >>> _ = torch.manual_seed(0)
    >>> layer, maps, weights = grad_cam_parts(build_model("mnist"), torch.rand(1, 1, 28, 28), layer="conv2")
    >>> layer.name, tuple(maps.shape), tuple(weights.shape)
    ('conv2', (1, 64, 7, 7), (1, 64))
    """
    images = check_images(images, model)
    with preserved(model):
        chosen = _layer(model, images, layer)
        with gradients_on(model):
            logits, a = _activations(model, images, chosen, with_grad=True)
            target = resolve_target(target, logits)
            (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), a)
    return chosen, a.detach(), grad.mean((2, 3))


def grad_cam(model: nn.Module, images: torch.Tensor, target=None, *, layer=None,
             upsample: bool = True) -> torch.Tensor:
    """Grad-CAM heatmap, (n, H, W) (or (n, h, w) at the layer's resolution with ``upsample=False``).

    Parameters
    ----------
    model : nn.Module
    images : Tensor (n, C, H, W) or (C, H, W)
    target : None, int or LongTensor (n,)
    layer : None, int, str or Layer
        Layer number or name (see :func:`vefi.layers.layer_table`): a module's call (``"layer4.1.relu:2"``) or
        a block (``"layer4"``); default :func:`default_layer`.
    upsample : bool
        Bilinear upsampling to the image's size.

    Examples
    --------
    >>> import torch
    >>> from vefi.book.models import build_model
    >>> _ = torch.manual_seed(0)
    >>> grad_cam(build_model("mnist"), torch.rand(1, 1, 28, 28), layer="conv2", upsample=False).shape
    torch.Size([1, 7, 7])
    """
    images = check_images(images, model)
    _, a, weights = grad_cam_parts(model, images, target, layer=layer)
    maps = (weights[:, :, None, None] * a).sum(1, keepdim=True).clamp(min=0)
    return (_upsample(maps, images.shape[2:]) if upsample else maps)[:, 0]


_CAM_NEEDS = ("CAM needs a net that ends in global average pooling and one linear layer, its class scores "
              "the linear layer applied to the spatial average of its last feature maps (e.g. ... conv, ReLU, "
              "AdaptiveAvgPool2d(1), Flatten, Linear, or a forward that calls F.adaptive_avg_pool2d or "
              "x.mean((2, 3)) before the classifier); use grad_cam for other nets")


def _global_average(func, args, kwargs):
    """The (n, K, h, w) input of a call that averages it over space, or None: ``F.adaptive_avg_pool2d`` to
    1x1 (also what ``nn.AdaptiveAvgPool2d(1)`` calls), ``mean`` over the two spatial axes, ``F.avg_pool2d``
    with a kernel as large as the map."""
    x = args[0] if args else kwargs.get("input")
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        return None
    if func is F.adaptive_avg_pool2d:
        size = args[1] if len(args) > 1 else kwargs.get("output_size")
        return x if size in (1, (1, 1), [1, 1]) else None
    if func in (torch.mean, torch.Tensor.mean):
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        if isinstance(dim, (tuple, list)) and sorted(int(d) % 4 for d in dim) == [2, 3]:
            return x
        return None
    if func is F.avg_pool2d:
        kernel = args[1] if len(args) > 1 else kwargs.get("kernel_size")
        kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
        padding = args[3] if len(args) > 3 else kwargs.get("padding", 0)
        return x if kernel == tuple(x.shape[2:]) and padding in (0, (0, 0)) else None
    return None


class _CamRecorder(TorchFunctionMode):
    """Watch a forward pass for the calls CAM is made of: global average pools and linear layers (modules
    and functional forms alike: densenet pools with ``F.adaptive_avg_pool2d`` in its forward, shufflenet
    with ``x.mean([2, 3])``)."""

    def __init__(self):
        super().__init__()
        self.pools = []  # (maps (n, K, h, w), pooled output)
        self.linears = []  # (input, weight, output)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        maps = _global_average(func, args, kwargs)
        if maps is not None:
            self.pools.append((maps.detach().clone(), out))
        elif func is F.linear:
            x = args[0] if args else kwargs["input"]
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            self.linears.append((x, weight, out))
        return out


def _cam_parts(recorder: _CamRecorder, logits: torch.Tensor):
    """The maps (n, K, h, w) and the classifier's weights (classes, K) of a CAM net, or a ValueError why not.

    The last linear call must produce the logits, and its input must be, value for value, the global average
    of the last such pool before it (a flatten or an evaluation-mode dropout in between changes nothing)."""
    if not recorder.linears:
        raise ValueError(f"{_CAM_NEEDS}; this one calls no linear layer")
    x, weight, out = recorder.linears[-1]
    if out.shape != logits.shape or not torch.equal(out, logits):
        raise ValueError(f"{_CAM_NEEDS}; the class scores are not the output of its last linear layer")
    n, k = logits.shape[0], weight.shape[1]
    for maps, pooled in reversed(recorder.pools):
        if maps.shape[:2] == (n, k) and pooled.numel() == x.numel() and torch.equal(pooled.reshape(x.shape), x):
            return maps, weight.detach()
    raise ValueError(f"{_CAM_NEEDS}; the input of its last linear layer is no global average pool of maps")


def cam(model: nn.Module, images: torch.Tensor, target=None, *, upsample: bool = True) -> torch.Tensor:
    """Class activation map (Zhou et al. 2016), (n, H, W): the class weights applied to the last maps.

    The maps are the ones the net averages over space right before its last linear layer, wherever that
    happens: a module (``nn.AdaptiveAvgPool2d(1)``) or a function in ``forward`` (densenet121's
    ``F.relu`` + ``F.adaptive_avg_pool2d``, shufflenet_v2's ``x.mean([2, 3])``); found by watching the torch
    functions of one forward pass, and checked value for value against the classifier's input.

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
    recorder = _CamRecorder()
    with preserved(model):
        model.eval()
        with torch.no_grad(), recorder:
            logits = model(images)
    logits = check_scores(logits, images.shape[0])
    maps, weight = _cam_parts(recorder, logits)
    target = resolve_target(target, logits)
    out = torch.einsum("nk,nkhw->nhw", weight[target], maps)[:, None]
    return (_upsample(out, images.shape[2:]) if upsample else out)[:, 0]


def upsampled_activations(model: nn.Module, images: torch.Tensor, layer, channel=None) -> torch.Tensor:
    """Activation maps of ``layer`` upsampled to the image: (n, H, W) for one channel, (n, K, H, W) for all.

    Examples
    --------
    >>> import torch
    >>> from vefi.book.models import build_model
    >>> _ = torch.manual_seed(0)
    >>> upsampled_activations(build_model("mnist"), torch.rand(2, 1, 28, 28), "relu2", channel=5).shape
    torch.Size([2, 28, 28])
    """
    images = check_images(images, model)
    with preserved(model):
        chosen = _layer(model, images, layer)
        _, a = _activations(model, images, chosen, with_grad=False)
    if channel is not None:
        if not 0 <= int(channel) < a.shape[1]:
            raise ValueError(f"channel must lie in [0, {a.shape[1] - 1}] for layer {chosen.name!r}, got {channel}")
        a = a[:, int(channel):int(channel) + 1]
    up = _upsample(a.detach(), images.shape[2:])
    return up[:, 0] if channel is not None else up
