"""Descriptors of internal responses (Sec. 3.1): one vector per image, one entry per channel of chosen layers.

For every chosen layer output and every channel, the L2 norm of that channel's response over space (a fully
connected unit: its absolute value); each layer's block is L1-normalised so that no layer dominates by the
scale of its activations; the blocks are concatenated. The authors' demo squares the norm before the
per-layer normalisation (``squared=True``) and L2-normalises the whole vector at test time
(``l2_normalize=True``); the paper's text is the default.

Which layers (:func:`default_layers`): the demo takes every layer output of the sequential net except the
last two, the classifier and the softmax, so the classifier output is never a feature. Our nets end with the
classifier ``fc`` and no softmax module, so the default is every layer *before the classifier* (the last
layer with weights) -- conv, ReLU, LRN, pool and hidden fc outputs -- except dropout and flatten: in
evaluation mode a dropout output is its input, and a flatten output is its input's values rearranged, so
their blocks would only duplicate the block before them (flatten would also turn every pixel into a
"unit"). Name them explicitly to include them anyway.

In-place ReLUs: a ReLU with ``inplace=True`` overwrites the tensor its conv returned. The descriptor is
reduced to per-channel norms inside the forward hook, which runs before the next layer, so a conv's
descriptor is that of its pre-ReLU response.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vefi._model_state import preserved
from vefi._progress import progress
from vefi.layers import Layer, channel_axes, check_channel_first, check_images, layer_table, resolve_layer, tapped

__all__ = ["Feature", "FeatureIndex", "Descriptors", "DescriptorStream", "default_layers", "descriptors", "synthetic_descriptors"]

_DUPLICATING_KINDS = ("dropout", "flatten", "block")


class Feature(NamedTuple):
    """One column of a descriptor: a channel (or fc unit) of a layer output."""

    layer_number: int
    layer_name: str
    kind: str
    channel: int

    @property
    def label(self) -> str:
        """Readable label such as ``"7 conv #12"``."""
        return f"{self.layer_number} {self.kind} #{self.channel}"


@dataclass(frozen=True)
class FeatureIndex:
    """Maps each descriptor column to ``(layer number, layer name, layer type, channel)``.

    Attributes
    ----------
    layers : tuple of Layer
        The layers whose outputs make the descriptor, in forward order.
    starts : tuple of int
        First column of each layer's block; the block of ``layers[i]`` is ``starts[i]:starts[i] + channels``.

    Examples
    --------
    >>> from vefi.book.models import build_model
    >>> index = FeatureIndex.from_layers(default_layers(build_model("mnist"))[:2])
    >>> len(index), index[33]
    (64, Feature(layer_number=2, layer_name='relu1', kind='relu', channel=1))
    """

    layers: tuple[Layer, ...]
    starts: tuple[int, ...]

    @classmethod
    def from_layers(cls, layers: Sequence[Layer]) -> "FeatureIndex":
        starts, total = [], 0
        for layer in layers:
            starts.append(total)
            total += layer.channels
        return cls(tuple(layers), tuple(starts))

    def __len__(self) -> int:
        return self.starts[-1] + self.layers[-1].channels if self.layers else 0

    def __getitem__(self, column: int) -> Feature:
        column = int(column)
        if not -len(self) <= column < len(self):
            raise IndexError(f"column {column} out of range for a descriptor of {len(self)} features")
        column %= len(self)
        i = int(np.searchsorted(self.starts, column, side="right")) - 1
        layer = self.layers[i]
        return Feature(layer.number, layer.name, layer.kind, column - self.starts[i])

    def __iter__(self):
        return (self[j] for j in range(len(self)))

    def block(self, layer: int | str | Layer) -> slice:
        """Columns of one layer, by number, name or :class:`~vefi.layers.Layer`."""
        found = resolve_layer(list(self.layers), layer)
        i = self.layers.index(found)
        return slice(self.starts[i], self.starts[i] + found.channels)

    def columns(self, layers: Iterable[int | str | Layer]) -> np.ndarray:
        """Column numbers of the blocks of ``layers``, in the given order (e.g. to take a sub-descriptor)."""
        blocks = [self.block(layer) for layer in layers]
        return np.concatenate([np.arange(b.start, b.stop) for b in blocks]) if blocks else np.zeros(0, int)

    def column(self, layer: int | str | Layer, channel: int) -> int:
        """Column of ``channel`` of ``layer``."""
        cols = self.block(layer)
        if not 0 <= channel < cols.stop - cols.start:
            raise ValueError(f"channel {channel} out of range: layer {layer!r} has {cols.stop - cols.start} "
                             "channels")
        return cols.start + channel

    @property
    def layer_numbers(self) -> np.ndarray:
        """Layer number of every column, shape (m,)."""
        return np.repeat([layer.number for layer in self.layers], [layer.channels for layer in self.layers])

    def count_per_layer(self, mask) -> dict[str, int]:
        """Number of columns selected by the boolean ``mask`` (m,) in each layer, keyed by ``"7 conv"``."""
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (len(self),):
            raise ValueError(f"mask must have shape ({len(self)},), got {mask.shape}")
        return {layer.label: int(mask[self.starts[i]:self.starts[i] + layer.channels].sum())
                for i, layer in enumerate(self.layers)}

    @property
    def kinds(self) -> np.ndarray:
        """Layer type of every column, shape (m,)."""
        return np.repeat([layer.kind for layer in self.layers], [layer.channels for layer in self.layers])


class Descriptors(NamedTuple):
    """What :func:`descriptors` returns: ``X, index, y = descriptors(...)``.

    Attributes
    ----------
    X : numpy.ndarray of shape (N, m), float32
        One descriptor per image (rows), scikit-learn orientation.
    index : FeatureIndex
        What each column is.
    y : numpy.ndarray of shape (N,) or None
        The labels the data yielded next to the images, if any.
    """

    X: np.ndarray
    index: FeatureIndex
    y: np.ndarray | None


def default_layers(model: nn.Module, input_shape: tuple[int, ...] | None = None, *,
                   only_conv: bool = False) -> list[Layer]:
    """The layers whose outputs make the default descriptor.

    Every layer before the classifier (the last layer that has parameters, e.g. the final ``fc``; a softmax
    after it is excluded with it), except dropout and flatten, whose outputs only repeat their input, and
    except block outputs (kind ``"block"``: a residual sum, a concatenation of branches), which combine layers
    already there; name blocks in ``layers`` to have them (``layers=[..., "layer3", "layer4"]``); and except
    layers whose first axis is no channel (a transformer's tokens, a ConvNeXt block's channel-last maps),
    which :func:`descriptors` refuses when they are named. With
    ``only_conv=True``, only the convolutional part: the layers before the first fully connected one (the
    paper's "OnlyConv" setting of Fig. 4).

    Examples
    --------
    >>> from vefi.book.models import build_model
    >>> [layer.name for layer in default_layers(build_model("mnist"))]  # doctest: +NORMALIZE_WHITESPACE
    ['conv1', 'relu1', 'pool1', 'conv2', 'relu2', 'conv3', 'relu3', 'fc1', 'relu4', 'fc2', 'relu5']
    """
    table = layer_table(model, input_shape)
    with_params = [i for i, layer in enumerate(table)
                   if layer.kind != "block" and any(True for _ in layer.module.parameters())]
    if not with_params:
        raise ValueError("cannot find the classifier: the model has no layer with parameters")
    chosen = [layer for layer in table[:with_params[-1]] if layer.kind not in _DUPLICATING_KINDS]
    shape = input_shape if input_shape is not None else model.input_shape  # layer_table checked there is one
    chosen = _describable(model, shape, table, chosen, refuse=False)
    if only_conv:
        first_fc = next((layer.number for layer in chosen if layer.kind == "fc"), None)
        chosen = [layer for layer in chosen if first_fc is None or layer.number < first_fc]
    return chosen


def _describable(model: nn.Module, input_shape, table: list[Layer], layers: list[Layer], *,
                 refuse: bool) -> list[Layer]:
    """The layers whose first axis is a channel (a map (C, H, W) or a vector of units): a descriptor entry per
    channel means nothing for a token of a transformer or a row of a channel-last map. With ``refuse``, any
    other layer is an error that says which layer to take instead; else it is left out."""
    axes_cache: list[dict[int, int]] = []

    def axes() -> dict[int, int]:
        if not axes_cache:
            axes_cache.append(channel_axes(model, tuple(input_shape)))
        return axes_cache[0]

    kept = []
    for layer in layers:
        try:
            if len(layer.output_shape) not in (1, 2, 3):
                raise ValueError(f"layer {layer.label} {layer.name!r} has output shape {layer.output_shape}: a "
                                 "descriptor needs a map (C, H, W) or a vector of units")
            check_channel_first(table, layer, axes, action="describe")
        except ValueError:
            if refuse:
                raise
            continue
        kept.append(layer)
    return kept


def _batches(data, batch_size: int):
    """Yield ``(images, labels or None)`` from a tensor, a Dataset, a DataLoader or any iterable of batches."""
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(data)
    if isinstance(data, torch.Tensor):
        for start in range(0, data.shape[0], batch_size):
            yield data[start:start + batch_size], None
        return
    if isinstance(data, Dataset) and not isinstance(data, DataLoader):
        data = DataLoader(data, batch_size=batch_size, shuffle=False)
    for batch in data:
        if isinstance(batch, (tuple, list)):
            images = batch[0]
            labels = batch[1] if len(batch) > 1 else None
        else:
            images, labels = batch, None
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"expected batches of image tensors (or (images, labels) pairs), got "
                            f"{type(images).__name__}")
        yield images, labels


def _length(data, batch_size: int) -> int | None:
    try:
        n = len(data)
    except TypeError:
        return None
    if isinstance(data, (torch.Tensor, np.ndarray)) or (isinstance(data, Dataset)
                                                        and not isinstance(data, DataLoader)):
        return -(-n // batch_size)
    return n


class DescriptorStream:
    """Descriptors of ``data`` under ``model``, batch by batch: iterate for ``(X_batch, labels)`` pairs.

    Each iteration is one pass over ``data`` (so a re-iterable source, a tensor, Dataset or DataLoader, can be
    streamed several times), yielding the (n, m) float32 descriptors of each batch and its labels (or None);
    only one batch is held at a time. The hooks are in place during a pass only, and the model is left as
    it came when the pass ends, also when it is abandoned or raises. Parameters as :func:`descriptors`.

    Attributes
    ----------
    index : FeatureIndex
        What each descriptor column is.
    n_batches : int or None
        Batches per pass, when ``data`` has a length.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    >>> stream = DescriptorStream(model, torch.rand(10, 1, 8, 8), batch_size=4, show_progress=False)
    >>> [x.shape for x, _ in stream], len(stream.index)
    ([(4, 8), (4, 8), (2, 8)], 8)
    """

    def __init__(self, model: nn.Module, data, layers: Iterable[int | str | Layer] | None = None, *,
                 squared: bool = False, normalize: bool = True, l2_normalize: bool = False, batch_size: int = 128,
                 input_shape: tuple[int, ...] | None = None, show_progress: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if input_shape is None:
            input_shape = getattr(model, "input_shape", None)
            if input_shape is None and isinstance(data, (torch.Tensor, np.ndarray)) and data.ndim >= 2:
                input_shape = tuple(data.shape[1:])
        table = layer_table(model, input_shape)
        if layers is None:
            chosen = default_layers(model, input_shape)
        else:
            if isinstance(layers, (int, str, Layer, nn.Module)):
                layers = [layers]
            chosen = [resolve_layer(table, key) for key in layers]
            if not chosen:
                raise ValueError("layers is empty: name at least one layer, or pass None for the default")
            numbers = [layer.number for layer in chosen]
            if len(set(numbers)) != len(numbers):
                raise ValueError(f"layers named more than once: "
                                 f"{sorted(n for n in set(numbers) if numbers.count(n) > 1)}")
            chosen = sorted(_describable(model, input_shape, table, chosen, refuse=True), key=lambda layer: layer.number)
        self.model, self.data, self.input_shape = model, data, input_shape
        self.layers = chosen
        self.index = FeatureIndex.from_layers(chosen)
        self.squared, self.normalize, self.l2_normalize = bool(squared), bool(normalize), bool(l2_normalize)
        self.batch_size, self.show_progress = int(batch_size), bool(show_progress)
        self.n_batches = _length(data, self.batch_size)

    def __iter__(self):
        model, chosen, squared = self.model, self.layers, self.squared
        per_batch: dict[int, torch.Tensor] = {}

        def reduce(layer: Layer, output):
            out = output.detach()
            # Reduced right here, before any later in-place op (ReLU) can overwrite ``out``.
            if out.dim() > 2:
                flat = out.flatten(2)
                value = flat.square().sum(2) if squared else torch.linalg.vector_norm(flat, dim=2)
            else:
                value = out.square() if squared else out.abs()
            per_batch[layer.number] = value.to(torch.float32)

        with preserved(model), tapped(model, chosen, reduce):
            try:
                model.eval()
                with torch.no_grad():
                    extra = {} if self.show_progress else {"disable": True}
                    bar = progress(_batches(self.data, self.batch_size), desc="descriptors",
                                   total=self.n_batches, **extra)
                    for images, batch_labels in bar:
                        # batches of a loader come on the CPU, often as float64 from numpy: moved to the
                        # model's device and dtype, after the checks every tool makes (shape, NaN/Inf)
                        images = check_images(images, self.input_shape, model=model, convert=True)
                        per_batch.clear()
                        model(images)
                        missing = [layer.label for layer in chosen if layer.number not in per_batch]
                        if missing:
                            raise RuntimeError(f"layers {missing} were not called in this forward pass")
                        blocks = []
                        for layer in chosen:
                            block = per_batch[layer.number]
                            if self.normalize:
                                # A block that is all zero (a dead layer) stays zero instead of becoming NaN.
                                block = block / block.sum(1, keepdim=True).clamp_min(torch.finfo(block.dtype).tiny)
                            blocks.append(block)
                        x = torch.cat(blocks, 1)
                        if self.l2_normalize:
                            x = x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-30)
                        labels = (None if batch_labels is None
                                  else torch.as_tensor(batch_labels).reshape(-1).cpu().numpy())
                        yield x.cpu().numpy(), labels
            finally:
                per_batch.clear()


def descriptors(model: nn.Module, data, layers: Iterable[int | str | Layer] | None = None, *,
                squared: bool = False, normalize: bool = True, l2_normalize: bool = False, batch_size: int = 128,
                input_shape: tuple[int, ...] | None = None, show_progress: bool = True) -> Descriptors:
    """Descriptors of internal responses of ``model`` for every image in ``data``.

    Parameters
    ----------
    model : torch.nn.Module
        Any model; run in evaluation mode under ``no_grad`` and left exactly as it came (hooks removed,
        ``training`` flags and ``requires_grad`` restored, also on error).
    data : torch.Tensor, numpy.ndarray, Dataset, DataLoader or iterable of batches
        Images ``(N, C, H, W)`` (a tensor or array), a Dataset of ``(image, label)`` items, or a loader of
        ``(images, labels)`` batches or of image batches. Streamed in batches; only the descriptors are kept.
        Each batch is checked as :func:`vefi.layers.check_images` does (float, the model's image shape, no
        NaN/Inf) and moved to the model's device and dtype.
    layers : iterable of int, str or Layer, optional
        Layers by number or name (see :func:`vefi.layers.layer_table`). Default: :func:`default_layers`.
    squared : bool
        Squared L2 norm per channel (the demo's variant) instead of the L2 norm.
    normalize : bool
        L1-normalise each layer's block (the method). ``False`` gives the raw per-channel norms, e.g. to see
        how differently scaled the layers are.
    l2_normalize : bool
        L2-normalise each whole descriptor after concatenation (the demo does this at test time).
    batch_size : int
        Images per forward pass when ``data`` is a tensor, array or Dataset (a DataLoader keeps its own).
    input_shape : tuple of int, optional
        Shape of one image, for models without an ``input_shape`` attribute.
    show_progress : bool
        Show a progress bar.

    Returns
    -------
    Descriptors
        ``(X, index, y)``: the (N, m) float32 matrix, the column index and the labels (or None).

    Examples
    --------
    >>> import torch
    >>> from vefi.book.models import build_model
    >>> X, index, y = descriptors(build_model("mnist"), torch.rand(5, 1, 28, 28), show_progress=False)
    >>> X.shape, index[0]
    ((5, 1120), Feature(layer_number=1, layer_name='conv1', kind='conv', channel=0))
    """
    stream = DescriptorStream(model, data, layers, squared=squared, normalize=normalize,
                              l2_normalize=l2_normalize, batch_size=batch_size, input_shape=input_shape,
                              show_progress=show_progress)
    rows, labels, n_unlabelled = [], [], 0
    for x, batch_labels in stream:
        rows.append(x)
        if batch_labels is None:
            n_unlabelled += 1
        else:
            labels.append(batch_labels)
    if not rows:
        raise ValueError("no images: the data yielded no batch")
    X = np.concatenate(rows, axis=0)
    y = np.concatenate(labels) if labels and n_unlabelled == 0 else None
    return Descriptors(X, stream.index, y)


def synthetic_descriptors(n_samples: int, block_sizes: Sequence[int], n_classes: int = 10, *,
                          seed: int = 0, informative: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Random data shaped like descriptors, for tests and benchmarks: ``(X, y)``.

    Non-negative, sparse like ReLU outputs, L1-normalised per block, with a fraction ``informative`` of the
    features whose mean depends on the class.

    Examples
    --------
    >>> X, y = synthetic_descriptors(100, [8, 4], n_classes=3)
    >>> X.shape, bool(np.allclose(X[:, :8].sum(1), 1))
    ((100, 12), True)
    """
    rng = np.random.default_rng(seed)
    m = int(sum(block_sizes))
    y = np.arange(n_samples) % n_classes
    rng.shuffle(y)
    base = rng.gamma(2.0, 1.0, size=m)
    profile = np.tile(base, (n_classes, 1))
    tuned = rng.random(m) < informative
    profile[:, tuned] *= np.exp(rng.normal(0.0, 1.0, size=(n_classes, int(tuned.sum()))))
    X = profile[y] * rng.gamma(4.0, 0.25, size=(n_samples, m))
    X[rng.random((n_samples, m)) < 0.3] = 0.0
    start = 0
    for size in block_sizes:
        block = X[:, start:start + size]
        block /= np.maximum(block.sum(1, keepdims=True), 1e-30)
        start += size
    return X, y
