"""One numbering of a model's layers, shared by every chapter and every tool of ``vefi``.

Layers are the *leaf* modules of a model (modules without children), numbered 1..L in the order a
forward pass calls them. Each gets a short type name (``conv``, ``relu``, ``pool``, ``fc``, ...), so that
"layer 7 (conv)" means the same thing in the descriptor index, in a heatmap title and in a table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vefi._model_state import preserved

__all__ = ["Layer", "layer_kind", "layer_table", "resolve_layer", "check_images", "check_scores", "pair"]

_KINDS: tuple[tuple[type, str], ...] = (
    (nn.Conv2d, "conv"),
    (nn.Linear, "fc"),
    (nn.ReLU, "relu"),
    (nn.MaxPool2d, "pool"),
    (nn.AvgPool2d, "pool"),
    (nn.AdaptiveAvgPool2d, "pool"),
    (nn.AdaptiveMaxPool2d, "pool"),
    (nn.LocalResponseNorm, "lrn"),
    (nn.BatchNorm2d, "bn"),
    (nn.BatchNorm1d, "bn"),
    (nn.Dropout, "dropout"),
    (nn.Flatten, "flatten"),
    (nn.Softmax, "softmax"),
)


def layer_kind(module: nn.Module) -> str:
    """Short type name of a leaf module: conv, fc, relu, pool, lrn, bn, dropout, flatten, softmax, other."""
    for cls, kind in _KINDS:
        if isinstance(module, cls):
            return kind
    return "other"


@dataclass(frozen=True)
class Layer:
    """One leaf module of a model, with its place in the forward pass.

    Attributes
    ----------
    number : int
        Position in the forward pass, from 1.
    name : str
        Qualified module name, as in ``model.named_modules()``.
    kind : str
        Short type name (see :func:`layer_kind`).
    module : torch.nn.Module
        The module itself.
    input_shape, output_shape : tuple of int
        Shapes of one sample (no batch axis) entering and leaving the layer.
    """

    number: int
    name: str
    kind: str
    module: nn.Module
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]

    @property
    def channels(self) -> int:
        """Number of channels (conv-like output) or units (flat output)."""
        return self.output_shape[0]

    @property
    def label(self) -> str:
        """Human-readable label such as ``"7 conv"``."""
        return f"{self.number} {self.kind}"


def layer_table(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> list[Layer]:
    """Number the leaf layers of ``model`` in forward order.

    Parameters
    ----------
    model : torch.nn.Module
        Any model whose forward takes one image batch.
    input_shape : tuple of int, optional
        Shape of one input sample, e.g. ``(3, 112, 112)``. Defaults to ``model.input_shape`` when the
        model has that attribute (all ``vefi`` models do).

    Returns
    -------
    list of Layer
        One entry per leaf module call, numbered from 1. The model is left exactly as it was.

    Examples
    --------
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 2))
    >>> [layer.label for layer in layer_table(net, (1, 28, 28))]
    ['1 conv', '2 relu', '3 flatten', '4 fc']
    """
    if input_shape is None:
        input_shape = getattr(model, "input_shape", None)
        if input_shape is None:
            raise ValueError("layer_table needs input_shape, e.g. (3, 112, 112): the model has no "
                             "'input_shape' attribute to take it from")
    input_shape = tuple(int(s) for s in input_shape)
    names = {id(m): n for n, m in model.named_modules()}
    leaves = [m for m in model.modules() if not list(m.children())]
    calls: list[tuple[nn.Module, tuple, tuple]] = []

    def hook(module, inputs, output):
        if any(m is module for m, _, _ in calls):
            return  # a module called twice keeps its first place
        x = inputs[0] if inputs else None
        shape_in = tuple(x.shape[1:]) if isinstance(x, torch.Tensor) else ()
        shape_out = tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else ()
        calls.append((module, shape_in, shape_out))

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    with preserved(model):
        handles = [m.register_forward_hook(hook) for m in leaves]
        try:
            model.eval()
            with torch.no_grad():
                model(torch.zeros((1, *input_shape), device=device, dtype=dtype))
        finally:
            for h in handles:
                h.remove()
    return [Layer(i + 1, names[id(m)], layer_kind(m), m, s_in, s_out)
            for i, (m, s_in, s_out) in enumerate(calls)]


def resolve_layer(layers: list[Layer], key: int | str | Layer) -> Layer:
    """Find a layer by number (1-based), qualified name, or the :class:`Layer` itself.

    Raises
    ------
    ValueError
        If no layer matches; the message lists the layers there are.
    """
    if isinstance(key, Layer):
        key = key.number
    for layer in layers:
        if (isinstance(key, int) and not isinstance(key, bool) and layer.number == key) or \
                (isinstance(key, str) and layer.name == key):
            return layer
    known = ", ".join(f"{layer.number}={layer.name!r} ({layer.kind})" for layer in layers)
    raise ValueError(f"unknown layer {key!r}; this model has layers {known}")


def _model_placement(model: nn.Module):
    """The (dtype, device) of a model's first floating parameter (else buffer), or None for neither."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype, tensor.device
    return None


def check_images(images, expected=None, *, model: nn.Module | None = None, convert: bool = False) -> torch.Tensor:
    """A batch of images as every tool of vefi takes it: a float tensor (n, C, H, W) of finite values.

    One image (C, H, W) becomes a batch of one.

    Parameters
    ----------
    images : Tensor
    expected : tuple of int, torch.nn.Module or None
        The shape of one image, ``(C, H, W)``, or a model with an ``input_shape`` attribute (then its shape
        is checked). A model given here is also the ``model`` whose dtype and device the images must match.
    model : torch.nn.Module, optional
        The model the images go to. Images of another floating dtype or on another device than the model's
        parameters are refused (torch's own error names neither), unless ``convert``.
    convert : bool
        Move the images to the model's dtype and device instead: the choice of tools that stream data
        batch by batch and return results on the CPU (descriptors, explain, the metrics), where the data
        come from a loader rather than from the model's device.

    Raises
    ------
    TypeError
        Not a tensor, not floating point, or another dtype than the model's.
    ValueError
        Wrong shape, empty, NaN or Inf, or another device than the model's.

    Examples
    --------
    >>> check_images(torch.zeros(1, 28, 28), (1, 28, 28)).shape
    torch.Size([1, 1, 28, 28])
    >>> check_images(torch.zeros(2, 3, 28, 28), (1, 28, 28))
    Traceback (most recent call last):
    ...
    ValueError: images must have shape (N, 1, 28, 28) for this model, got (2, 3, 28, 28)
    >>> check_images(torch.zeros(1, 1, 2, 2, dtype=torch.float64), model=nn.Linear(2, 2))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: images are torch.float64 but the model's parameters are torch.float32: pass images.to(...
    """
    if isinstance(expected, nn.Module):
        model = expected if model is None else model
        expected = getattr(expected, "input_shape", None)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor of shape (N, C, H, W), got {type(images).__name__}")
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4:
        raise ValueError(f"images must have shape (N, C, H, W) or (C, H, W), got {tuple(images.shape)}")
    if expected is not None and tuple(images.shape[1:]) != tuple(expected):
        raise ValueError(f"images must have shape (N, {', '.join(map(str, expected))}) for this model, "
                         f"got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("images is empty (no image in the batch)")
    if not images.is_floating_point():
        raise TypeError(f"images must be floating-point (pixels in [0, 1]), got dtype {images.dtype}")
    placement = _model_placement(model) if model is not None else None
    if placement is not None:
        dtype, device = placement
        if convert:
            images = images.to(device=device, dtype=dtype)
        elif images.dtype != dtype:
            raise TypeError(f"images are {images.dtype} but the model's parameters are {dtype}: pass "
                            f"images.to({dtype}) (or convert the model, e.g. model.to({images.dtype}))")
        elif images.device != device:
            raise ValueError(f"images are on device {images.device} but the model is on {device}: pass "
                             f"images.to({str(device)!r}) (or move the model, model.to({str(images.device)!r}))")
    if images.device.type != "meta" and not torch.isfinite(images).all():
        raise ValueError("images contain NaN or Inf values")
    return images


def check_scores(output, n: int | None = None) -> torch.Tensor:
    """What a model returned, as every tool of vefi needs it: a tensor of class scores (n, classes).

    Models that return a tuple (torchvision's GoogLeNet and Inception in training mode) or a dict (models in
    the style of Hugging Face's) are refused with a message saying what came and how to wrap the model.

    Examples
    --------
    >>> check_scores(torch.zeros(2, 10), 2).shape
    torch.Size([2, 10])
    >>> check_scores({"logits": torch.zeros(2, 10)})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: the model returned a dict with keys ['logits'] instead of a tensor of class scores (n, classes): ...
    """
    if not isinstance(output, torch.Tensor):
        if isinstance(output, dict):
            what, pick = f"a dict with keys {list(output)}", f"model(x)[{next(iter(output), 'logits')!r}]"
        elif isinstance(output, (tuple, list)):
            parts = ", ".join(f"Tensor {tuple(o.shape)}" if isinstance(o, torch.Tensor) else type(o).__name__
                              for o in output)
            what, pick = f"a {type(output).__name__} of {len(output)} ({parts})", "model(x)[0]"
        else:
            what, pick = f"a {type(output).__name__}", "model(x).logits"
        raise TypeError(f"the model returned {what} instead of a tensor of class scores (n, classes): wrap "
                        f"it in a module whose forward returns the logits tensor, e.g. {pick}")
    if output.dim() != 2 or (n is not None and output.shape[0] != n):
        rows = "n" if n is None else str(n)
        raise ValueError(f"the model must return class scores of shape ({rows}, classes), got "
                         f"{tuple(output.shape)}: wrap it in a module whose forward returns them")
    return output


def pair(value, name: str) -> tuple[int, int]:
    """An int or a pair of ints (a kernel size, stride, padding...) as a pair; ``name`` for the error."""
    if isinstance(value, int):
        return (value, value)
    value = tuple(int(v) for v in value)
    if len(value) == 1:
        return (value[0], value[0])
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return value
