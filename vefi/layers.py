"""One numbering of a model's layers, shared by every chapter and every tool of ``vefi``.

A layer is one *call* of a module in a forward pass, numbered 1..L in the order the calls end:

- every call of a leaf module (a module without children: a conv, a ReLU, a pool, ...). A module called
  several times (ResNet's ``relu``, called two or three times in each block) gives one layer per call,
  named ``"layer1.0.relu"`` for the first call and ``"layer1.0.relu:2"``, ``"layer1.0.relu:3"`` for the next;
- the output of a named block (a residual block after its addition, an inception or dense block, a stage,
  any module with children but the model itself), kind ``"block"``. A block whose output *is* the output of
  a layer already listed (a ``Sequential`` ending in a ReLU, a ResNet block ending in its second ReLU call) is
  not listed twice: its name is an alias of that layer (:attr:`Layer.aliases`), so ``"layer4"`` of a ResNet
  resolves to the last ReLU call of ``layer4.1``.

Each layer gets a short type name (``conv``, ``relu``, ``pool``, ``fc``, ``block``, ...), so that "layer 7
(conv)" means the same thing in the descriptor index, in a heatmap title and in a table. Functional
activations (``F.relu`` inside a forward) are not modules and so not layers; the tools that change backward
rules see them all the same. Every tool that reads or changes a layer's output does it through
:func:`tapped`, which knows which call of a module a layer is.
"""

from __future__ import annotations

import difflib
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from vefi._model_state import preserved
from vefi._tensors import all_finite

__all__ = ["Layer", "layer_kind", "layer_table", "resolve_layer", "tapped", "channel_axes", "check_channel_first",
           "check_images", "check_scores", "pair", "channel_window", "local_response_norm"]

_KINDS: tuple[tuple[type, str], ...] = (
    (nn.Conv2d, "conv"),
    (nn.Linear, "fc"),
    (nn.ReLU, "relu"),
    (nn.ReLU6, "relu6"),
    (nn.LeakyReLU, "leakyrelu"),
    (nn.Hardswish, "hardswish"),
    (nn.SiLU, "silu"),
    (nn.GELU, "gelu"),
    (nn.Sigmoid, "sigmoid"),
    (nn.Hardsigmoid, "hardsigmoid"),
    (nn.MaxPool2d, "pool"),
    (nn.AvgPool2d, "pool"),
    (nn.AdaptiveAvgPool2d, "pool"),
    (nn.AdaptiveMaxPool2d, "pool"),
    (nn.LocalResponseNorm, "lrn"),
    (nn.BatchNorm2d, "bn"),
    (nn.BatchNorm1d, "bn"),
    (nn.LayerNorm, "ln"),
    (nn.GroupNorm, "gn"),
    (nn.Dropout, "dropout"),
    (nn.Flatten, "flatten"),
    (nn.Softmax, "softmax"),
)


def layer_kind(module: nn.Module) -> str:
    """Short type name of a module: conv, fc, relu (and relu6, leakyrelu, hardswish, silu, gelu, sigmoid,
    hardsigmoid), pool, lrn, bn, ln, gn, dropout, flatten, softmax; block for a module with children; else
    other."""
    if list(module.children()):
        return "block"
    for cls, kind in _KINDS:
        if isinstance(module, cls):
            return kind
    return "other"


@dataclass(frozen=True)
class Layer:
    """One call of a module of a model, with its place in the forward pass.

    Attributes
    ----------
    number : int
        Position in the forward pass, from 1.
    name : str
        Qualified module name, as in ``model.named_modules()``, followed by ``":k"`` for the k-th call of a
        module called several times (``"layer1.0.relu:2"``); the first call has the bare name.
    kind : str
        Short type name (see :func:`layer_kind`); ``"block"`` for the output of a module with children.
    module : torch.nn.Module
        The module itself.
    input_shape, output_shape : tuple of int
        Shapes of one sample (no batch axis) entering and leaving the layer.
    call : int
        Which call of ``module`` in a forward pass this layer is, from 1.
    aliases : tuple of str
        Names of the blocks whose output is this layer's output (see the module's docstring); they resolve
        to this layer too.
    """

    number: int
    name: str
    kind: str
    module: nn.Module
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    call: int = 1
    aliases: tuple[str, ...] = ()
    # the blocks named in ``aliases`` (so that a block module resolves to this layer too)
    alias_modules: tuple[nn.Module, ...] = field(default=(), repr=False, compare=False)

    @property
    def module_name(self) -> str:
        """The module's qualified name, without the call suffix (``"layer1.0.relu"`` for
        ``"layer1.0.relu:2"``)."""
        return self.name if self.call == 1 else self.name.rsplit(":", 1)[0]

    @property
    def channels(self) -> int:
        """Number of channels (conv-like output) or units (flat output)."""
        return self.output_shape[0]

    @property
    def label(self) -> str:
        """Human-readable label such as ``"7 conv"``."""
        return f"{self.number} {self.kind}"


def layer_table(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> list[Layer]:
    """Number the layers of ``model``, the calls of its modules (see the module's docstring), in forward order.

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
        One entry per call of a leaf module and per block output that is not already one, numbered from 1 in
        the order the calls end (a block after its contents). The model is left exactly as it was.

    Examples
    --------
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 2))
    >>> [layer.label for layer in layer_table(net, (1, 28, 28))]
    ['1 conv', '2 relu', '3 flatten', '4 fc']

    A module called twice is two layers; a block ending in a layer is that layer's alias:

    >>> class Twice(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.body = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.ReLU())
    ...         self.relu = nn.ReLU()
    ...     def forward(self, x):
    ...         return self.relu(self.body(self.relu(x)) + x)
    >>> [(layer.label, layer.name, layer.aliases) for layer in layer_table(Twice(), (1, 8, 8))]
    [('1 relu', 'relu', ()), ('2 conv', 'body.0', ()), ('3 relu', 'body.1', ('body',)), ('4 relu', 'relu:2', ())]
    """
    if input_shape is None:
        input_shape = getattr(model, "input_shape", None)
        if input_shape is None:
            raise ValueError("layer_table needs input_shape, e.g. (3, 112, 112): the model has no "
                             "'input_shape' attribute to take it from")
    input_shape = tuple(int(s) for s in input_shape)
    names = {id(m): n for n, m in model.named_modules()}
    counts: dict[int, int] = {}
    # (module, call, input shape, output shape, output tensor or None, aliases, its version counter)
    calls: list[list] = []
    latest: dict[int, int] = {}  # id(output tensor) -> index in calls of the last call that returned it

    def hook(module, inputs, output):
        counts[id(module)] = call = counts.get(id(module), 0) + 1
        is_block = bool(list(module.children()))
        if is_block and not isinstance(output, torch.Tensor):
            return  # a block that returns a tuple or dict has no one output to be a layer
        # the same tensor, not changed in place since (ConvNeXt adds its shortcut in place to the output of
        # its last leaf): then the block's output is that layer's output
        if is_block and id(output) in latest and calls[latest[id(output)]][4] is output \
                and calls[latest[id(output)]][6] == output._version:
            alias = names[id(module)] + ("" if call == 1 else f":{call}")
            calls[latest[id(output)]][5].append((alias, module))
            return
        x = inputs[0] if inputs else None
        shape_in = tuple(x.shape[1:]) if isinstance(x, torch.Tensor) else ()
        shape_out = tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else ()
        if isinstance(output, torch.Tensor):
            latest[id(output)] = len(calls)
        tensor = output if isinstance(output, torch.Tensor) else None
        calls.append([module, call, shape_in, shape_out, tensor, [], None if tensor is None else tensor._version])

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    with preserved(model):
        handles = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
        try:
            model.eval()
            # out of inference mode (the caller's): its tensors keep no version counter
            with torch.inference_mode(False), torch.no_grad():
                model(torch.zeros((1, *input_shape), device=device, dtype=dtype))
        finally:
            for h in handles:
                h.remove()
    return [Layer(i + 1, names[id(m)] + ("" if call == 1 else f":{call}"), layer_kind(m), m, s_in, s_out,
                  call, tuple(a for a, _ in aliases), tuple(b for _, b in aliases))
            for i, (m, call, s_in, s_out, _, aliases, _) in enumerate(calls)]


def resolve_layer(layers: list[Layer], key: int | str | nn.Module | Layer) -> Layer:
    """Find a layer by number (1-based), name (with its call suffix, ``"relu:2"``, for a later call of a
    module), the name of a block that is its alias, the module itself (a module called once), or the
    :class:`Layer` itself.

    Raises
    ------
    ValueError
        If no layer matches; the message lists the layers there are.
    """
    if isinstance(key, Layer):
        key = key.number
    if isinstance(key, nn.Module):
        found = [layer for layer in layers if layer.module is key or any(m is key for m in layer.alias_modules)]
        if len(found) == 1:
            return found[0]
        if found:
            raise ValueError(f"the module {type(key).__name__} is called {len(found)} times in a forward pass, "
                             f"each call its own layer: pass one of the names {[layer.name for layer in found]}")
        raise ValueError(f"the module {type(key).__name__} is not called in a forward pass of this model (or "
                         "returns no tensor): pass a module of the model, or a layer name of layer_table")
    for layer in layers:
        if (isinstance(key, int) and not isinstance(key, bool) and layer.number == key) or \
                (isinstance(key, str) and (layer.name == key or key in layer.aliases)):
            return layer
    raise ValueError(f"unknown layer {key!r}; " + _known_layers(layers, key))


def _known_layers(layers: list[Layer], key, most: int = 20) -> str:
    """The layers there are, for an error: all of them in a small model; in a large one the names closest
    to ``key`` and where to find the rest."""
    def show(layer):
        return f"{layer.number}={layer.name!r} ({layer.kind})"

    if len(layers) <= most:
        return f"this model has layers {', '.join(map(show, layers))}"
    by_name = {name: layer for layer in layers for name in (layer.name, *layer.aliases)}
    close = difflib.get_close_matches(str(key), list(by_name), n=5, cutoff=0.5)
    near = f"the closest names: {', '.join(show(by_name[n]) for n in dict.fromkeys(close))}; " if close else ""
    return (f"{near}this model has {len(layers)} layers, numbered 1 to {len(layers)}: vefi.layer_table(model, "
            "input_shape) lists them all")


@contextmanager
def tapped(model: nn.Module, layers: Iterable[Layer],
           fn: Callable[[Layer, torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """Within the block, every forward pass of ``model`` calls ``fn(layer, output)`` when the call that *is*
    ``layer`` ends (the k-th call of its module for a layer with ``call == k``); a return value other than
    None replaces that output, as a forward hook's does.

    The one way vefi reads or changes a layer's output: the calls of a module are counted from the start of
    each forward pass of ``model``. The hooks are removed on leaving the block, also on an error.

    Examples
    --------
    >>> from torch import nn
    >>> relu = nn.ReLU()
    >>> net = nn.Sequential(relu, nn.Identity(), relu)
    >>> seen = []
    >>> with tapped(net, layer_table(net, (2,))[2:], lambda layer, out: seen.append(layer.name)):
    ...     _ = net(torch.zeros(1, 2)); _ = net(torch.zeros(1, 2))
    >>> seen
    ['0:2', '0:2']
    """
    wanted: dict[int, tuple[nn.Module, dict[int, Layer]]] = {}
    for layer in layers:
        wanted.setdefault(id(layer.module), (layer.module, {}))[1][layer.call] = layer
    counts: dict[int, int] = {}

    def restart(module, inputs):
        counts.clear()

    def make_hook(key: int, by_call: dict[int, Layer]):
        def hook(module, inputs, output):
            counts[key] = call = counts.get(key, 0) + 1
            layer = by_call.get(call)
            return None if layer is None else fn(layer, output)
        return hook

    handles = [model.register_forward_pre_hook(restart)]
    try:
        for key, (module, by_call) in wanted.items():
            handles.append(module.register_forward_hook(make_hook(key, by_call)))
        yield
    finally:
        for h in handles:
            h.remove()


# Functions that move axes: where the channel axis lands is read off a marker tensor they are applied to.
_AXIS_MOVERS = frozenset({"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis"})


class _LayoutMode(TorchFunctionMode):
    """Follow the channel axis (axis 1 of an image batch) through a forward pass: tensors whose channel axis
    a permute/transpose moved (ConvNeXt's ``Permute``, a ViT's tokens), and everything computed from them at
    the same rank, are recorded with the axis it is on now (-1: unknown, after a reshape)."""

    def __init__(self):
        super().__init__()
        self.moved: dict[int, tuple[weakref.ref, int]] = {}

    def axis(self, t: torch.Tensor) -> int:
        """The channel axis of ``t`` in its batch (1 unless moved)."""
        entry = self.moved.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else 1

    def _first_moved(self, args, kwargs):
        for t in (*args, *kwargs.values()):
            for u in (t if isinstance(t, (list, tuple)) else (t,)):
                if isinstance(u, torch.Tensor) and self.axis(u) != 1:
                    return u
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not isinstance(out, torch.Tensor):
            return out
        name = getattr(func, "__name__", "")
        axis = 1
        if name in _AXIS_MOVERS and args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 3:
            before = self.axis(args[0])
            if before < 0:
                axis = before
            else:
                marker = torch.empty([2 if i == before else 1 for i in range(args[0].dim())])
                sizes = [i for i, n in enumerate(func(marker, *args[1:], **kwargs).shape) if n == 2]
                axis = sizes[0] if len(sizes) == 1 else -1
        else:
            source = self._first_moved(args, kwargs)
            if source is not None:
                before = self.axis(source)
                if out.dim() == source.dim():
                    axis = before
                elif out.dim() == 4 and 0 < before < source.dim() - 2 and out.shape[0] == source.shape[0] \
                        and out.shape[-2:] == source.shape[-2:]:
                    # the moved axis merged back into axis 1 with the rows and columns kept: a channel
                    # shuffle (ShuffleNet's view, transpose, view), whose channels are channels again
                    axis = 1
                else:
                    axis = -1
        if axis != 1:
            key = id(out)
            self.moved[key] = (weakref.ref(out, lambda _, k=key: self.moved.pop(k, None)), axis)
        return out


_AXES: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def channel_axes(model: nn.Module, input_shape: tuple[int, ...]) -> dict[int, int]:
    """Layer number -> the axis of its output batch that holds the channels: 1 for channel-first, another
    axis after a permute (ConvNeXt's channel-last blocks), -1 when a reshape lost it.

    One forward pass of a zero image, remembered per model while its modules and the input shape stay the
    same."""
    key = (input_shape, tuple((id(m), type(m), m.extra_repr()) for m in model.modules()))
    cached = _AXES.get(model) if list(model.children()) else None
    if cached is not None and cached[0] == key:
        return cached[1]
    axes: dict[int, int] = {}
    mode = _LayoutMode()

    def record(layer, output):
        if isinstance(output, torch.Tensor):
            axes[layer.number] = mode.axis(output)

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    with preserved(model), tapped(model, layer_table(model, input_shape), record):
        model.eval()
        with torch.no_grad(), mode:
            model(torch.zeros((1, *input_shape), device=device, dtype=dtype))
    if list(model.children()):
        _AXES[model] = (key, axes)
    return axes


def check_channel_first(layers: list[Layer], layer: Layer, axes, action: str = "back-project") -> None:
    """Refuse a layer whose first axis is not a channel, where a tool needs channels: tokens, or a map whose
    channels moved. ``axes`` is a callable returning :func:`channel_axes` (called only when needed);
    ``action`` names what the tool does, for the message."""
    shape = layer.output_shape
    if len(shape) == 2:
        before = [other for other in layers if other.number < layer.number and len(other.output_shape) == 3
                  and axes().get(other.number, 1) == 1]
        instead = (f", e.g. layer {before[-1].number} {before[-1].name!r} ({type(before[-1].module).__name__},"
                   f" output {before[-1].output_shape})" if before else "")
        raise ValueError(f"layer {layer.label} {layer.name!r} ({type(layer.module).__name__}) has output shape "
                         f"{shape}, a sequence of tokens (or a 1-D signal), not a channel-first map (C, H, W) "
                         f"nor a vector of units, so its first axis is no channel: {action} a layer before "
                         f"the image is cut into tokens{instead}, or wrap the model so that this layer's output "
                         "is reshaped to (C, H, W)")
    if len(shape) == 3 and layer.kind != "conv":
        axis = axes().get(layer.number, 1)
        if axis != 1:
            after = [other for other in layers if other.number > layer.number and len(other.output_shape) == 3
                     and axes().get(other.number, 1) == 1]
            where = f"on axis {axis - 1} of {shape}" if axis > 0 else f"lost in a reshape of {shape}"
            instead = (f", e.g. the next one, layer {after[0].number} {after[0].name!r} "
                       f"({type(after[0].module).__name__}, output {after[0].output_shape})" if after else "")
            raise ValueError(f"layer {layer.label} {layer.name!r} ({type(layer.module).__name__}) is channel-last:"
                             f" the model moved the channel axis (a permute, as in a ConvNeXt block) and its "
                             f"channels are {where}, so axis 0 is not a channel and to {action} it would "
                             "take the wrong thing: pass a layer whose output is a channel-first map "
                             f"(C, H, W){instead}")


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
    if images.device.type != "meta" and not all_finite(images):
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


def channel_window(channels: int, before: int, after: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Matrix ``W`` (channels x channels) with ``W[d, c] = 1`` when ``c`` is in ``d - before .. d + after``:
    ``W @ v`` sums ``v`` over each channel's window, as local response normalisation does."""
    c = torch.arange(channels, device=device)
    offset = c[None, :] - c[:, None]
    return ((offset >= -before) & (offset <= after)).to(dtype)


def local_response_norm(input: torch.Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75,
                        k: float = 1.0) -> torch.Tensor:
    """``torch.nn.functional.local_response_norm`` over the channels of an (n, C, H, W) input, with the window
    sum written as a 1x1 convolution by :func:`channel_window`: the same function (the window of channel ``d``
    is ``d - size//2 .. d + (size-1)//2``, as PyTorch's), about twice as fast on CPU, where PyTorch's goes
    through a 3-D average pool. Its autograd gradient is exact; other inputs go to PyTorch's function.
    """
    if input.dim() != 4:
        return F.local_response_norm(input, size, alpha, beta, k)
    window = channel_window(input.shape[1], size // 2, (size - 1) // 2, input.dtype, input.device)
    total = F.conv2d(input * input, (window * (alpha / size))[:, :, None, None])
    return input * (total + k).pow(-beta)
