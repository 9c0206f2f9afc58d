"""The mu-Lasso's statistics streamed from a model and its data, at any size and across processes.

The selection of Sec. 3.1 needs only ``Q = X X^T`` (m x m), ``q = X L^T`` (m x C) and ``||l_j||^2``. This
module computes them without ever holding the (N, m) descriptor matrix:

* :func:`gram_statistics` streams the descriptors of ``data`` under ``model`` batch by batch into the Gram
  pair (float64), after checking that the m x m matrix fits in memory.
* :func:`fit_relevant` fits a :class:`~vefi.selection.RelevantFeatureSelector` from the stream: from the
  dense Gram pair when it fits in memory, otherwise by a *working set* that never forms the m x m matrix.
  Deep networks have m in the tens of thousands (densenet121's default descriptor: about 94,000 features, a
  70 GB Gram matrix); the working-set fit needs memory linear in m.
* Under ``torch.distributed`` (e.g. ``torchrun``), or with a ``process_group``, each process streams its
  own shard of the data and the float64 sums are all-reduced, so every process fits the same selection.

The working-set fit (one more use of the duality gap that certifies :func:`vefi.lasso.solve_mu_lasso`):

1. one pass streams ``q``, ``diag(Q)`` and ``||l_j||^2``;
2. a working set ``U`` is screened: per class, the features most correlated with the class (largest
   ``|q_ic| / sqrt(Q_ii)``) and those with the largest ``|q_ic|`` (the homotopy's first entries);
3. a pass streams the new rows of ``Q_UU`` (only the columns ``X_U`` of each batch);
   :func:`vefi.lasso.solve_mu_lasso` solves the problem restricted to ``U``;
4. a pass streams the gradient of the full problem over all m features, ``g_c = Q w_c - q_c =
   X (X_U^T w_{U,c}) - q_c`` (a product with the (n, C) residual-like matrix of each batch), which gives the
   duality gap of the *full* problem, ``w_c^T g_c + mu ||g_c||_inf``, in the scaling of :mod:`vefi.lasso`;
5. a class whose full gap is above ``tol`` has features outside ``U`` with ``|g_ic|`` above its
   ``lambda_c = max_{i in U} |g_ic|`` (the optimality condition the restricted problem cannot see): the
   strongest violators join ``U``, and 3-5 repeat until every class is certified at the same ``tol`` as the
   dense fit.

The answer is certified over all m features to the same ``tol`` as the dense fit, so it is the dense fit's
optimum (the tests check the same support and weights within tolerance, single- and multi-process); the
selector records the passes over the data and the working set.

Under ``torchrun`` each process gives its own shard, e.g. ``torchrun --nproc-per-node 4 fit.py`` with::

    import torch.distributed as dist
    dist.init_process_group("gloo")  # or "nccl"
    rank, world = dist.get_rank(), dist.get_world_size()
    shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    selector, index = fit_relevant(model, DataLoader(shard, batch_size=64), mu=10)

Memory. Before allocating, the memory a fit needs (:func:`estimate_memory`) is compared with
``max_memory``, by default ``MEMORY_FRACTION`` (one half) of the memory available now
(:func:`available_memory`, from ``/proc/meminfo`` or ``os.sysconf``), divided among the processes of a job
on the same machine (``LOCAL_WORLD_SIZE``, which ``torchrun`` sets); under torch.distributed the smallest
budget of the processes applies to all, so that they all take the same path. A fit that does not fit raises
:class:`StatisticsMemoryError` (a ``MemoryError`` and a ``ValueError``) saying m, the bytes needed and what to
do.
"""

from __future__ import annotations

import itertools
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy import sparse
from scipy.linalg.blas import dsyrk
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vefi._model_state import preserved
from vefi.descriptors import DescriptorStream, FeatureIndex
from vefi.lasso import FIT_FLOOR, ConvergenceWarning, GramAccumulator, MuLassoResult, check_radius, solve_mu_lasso
from vefi.layers import Layer, check_scores
from vefi.selection import RelevantFeatureSelector

__all__ = ["ArrayStream", "MEMORY_FRACTION", "StatisticsMemoryError", "available_memory", "estimate_memory",
           "fit_relevant", "gram_statistics", "peek_image_shape"]

#: Fraction of the available memory a fit may use when ``max_memory`` is not given.
MEMORY_FRACTION = 0.5

# Working set: per class, this many features by each screening score to start with, and at least this many
# of the strongest violators added per round (more when a class's support is larger).
_SCREEN = 32
# The relative-gap floor of vefi.lasso (gap <= tol * max(objective, floor * ||L||_F^2)), so that the
# working-set fit certifies exactly what the dense fit does.


class StatisticsMemoryError(MemoryError, ValueError):
    """A fit would need more memory than allowed; the message says m, the bytes needed and what to do.

    A ``MemoryError`` (it is one, raised before allocating) and a ``ValueError`` (the input is too large for
    the method asked for), so either ``except`` catches it.
    """


# --- memory ---------------------------------------------------------------------------------------------------

def available_memory() -> int:
    """Bytes of memory available to a new allocation now: ``MemAvailable`` of ``/proc/meminfo`` on Linux,
    else ``os.sysconf`` (available physical pages), else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    for pages in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):
        try:
            return int(os.sysconf(pages)) * int(os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            continue
    raise OSError("cannot tell the available memory on this system: pass max_memory (bytes) explicitly")


def estimate_memory(n_features: int, n_targets: int, *, batch_size: int = 128, method: str = "dense",
                    working_set: int = 0) -> int:
    """Bytes a fit from streamed descriptors needs, beyond the model and the data loader.

    ``dense``: ``8 m^2`` (the Gram matrix ``Q``) ``+ 8 m (4 C + 512)`` (``q``, the weights and gradient, and
    the columns of ``Q`` the solver keeps for up to 512 active features) ``+ 12 n m`` (one batch of ``n``
    descriptors in float32 and float64).

    ``working_set`` (``k`` = size of the working set): ``8 m (4 C + 2)`` (``q``, ``diag Q``, the weights and
    the streamed gradient) ``+ 12 n m + 8 n k`` (a batch and its working-set columns) ``+ 24 k^2`` (``Q_UU``,
    its assembly, the solver's factor and columns).

    Examples
    --------
    >>> round(estimate_memory(93_824, 10) / 2**30, 1)  # densenet121's default descriptor, dense: GiB
    66.1
    >>> round(estimate_memory(93_824, 10, method="working_set", working_set=2000) / 2**20)  # MiB
    261
    """
    m, C, n = int(n_features), int(n_targets), int(batch_size)
    if method == "dense":
        return 8 * m * m + 8 * m * (4 * C + min(m, 512)) + 12 * n * m
    if method == "working_set":
        k = int(working_set)
        return 8 * m * (4 * C + 2) + 12 * n * m + 8 * n * k + 24 * k * k
    raise ValueError(f"method must be 'dense' or 'working_set', got {method!r}")


def _budget(max_memory) -> int:
    if max_memory is None:
        # processes of one job on the same machine (torchrun sets LOCAL_WORLD_SIZE) share its memory
        local = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1), 1)
        return int(MEMORY_FRACTION * available_memory() / local)
    try:
        value = float(max_memory)
    except (TypeError, ValueError):
        raise TypeError(f"max_memory must be a number of bytes, got {max_memory!r}") from None
    if not value > 0:
        raise ValueError(f"max_memory must be a positive number of bytes, got {max_memory!r}")
    return int(value)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


# --- sources: what is streamed ---------------------------------------------------------------------------------

class ArrayStream:
    """Stream a descriptor matrix held elsewhere (an array, a ``numpy.memmap`` on disk) in batches.

    Iterating gives ``(X_batch, labels)`` pairs, as :class:`~vefi.descriptors.DescriptorStream` does, so that
    descriptors computed once and saved can be fitted by :func:`fit_relevant` without loading them whole.

    Parameters
    ----------
    X : array_like of shape (N, m)
        Descriptors, rows are images; read one batch at a time.
    y : array_like of shape (N,), optional
        Labels; without them the stream yields None and a fit refuses it.
    batch_size : int
        Descriptor rows (images) per batch.
    index : FeatureIndex, optional
        What the columns are; default one block of m columns (layer 1, named ``"descriptor"``).

    Examples
    --------
    >>> import numpy as np
    >>> stream = ArrayStream(np.ones((5, 3)), np.arange(5) % 2, batch_size=2)
    >>> [x.shape for x, _ in stream], len(stream.index), stream.n_batches
    ([(2, 3), (2, 3), (1, 3)], 3, 3)
    """

    def __init__(self, X, y=None, *, batch_size: int = 1024, index: FeatureIndex | None = None):
        if not hasattr(X, "shape") or len(X.shape) != 2:
            raise ValueError(f"X must be a 2-D array (n_samples, n_features), got {getattr(X, 'shape', X)!r}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if y is not None:
            y = np.asarray(y)
            if y.shape != (X.shape[0],):
                raise ValueError(f"X has {X.shape[0]} rows but y has shape {y.shape}; expected ({X.shape[0]},)")
        m = int(X.shape[1])
        if index is None:
            index = FeatureIndex.from_layers([Layer(1, "descriptor", "other", nn.Identity(), (m,), (m,))])
        if len(index) != m:
            raise ValueError(f"the index describes {len(index)} features but X has {m} columns")
        self.X, self.y, self.batch_size, self.index = X, y, int(batch_size), index
        self.n_batches = -(-int(X.shape[0]) // self.batch_size)

    def __iter__(self):
        for start in range(0, self.X.shape[0], self.batch_size):
            stop = start + self.batch_size
            yield np.asarray(self.X[start:stop]), (None if self.y is None else self.y[start:stop])


def _is_stream(obj) -> bool:
    """A DescriptorStream-like object: has an ``index`` and iterates ``(X_batch, labels)``."""
    if obj is None or isinstance(obj, (nn.Module, torch.Tensor, np.ndarray, Dataset, DataLoader, list, tuple)):
        return False
    index = getattr(obj, "index", None)  # not list.index
    return hasattr(obj, "__iter__") and index is not None and not callable(index) and hasattr(index, "__len__")


class _Labelled:
    """A stream over a tensor of images, with the labels given beside it attached batch by batch."""

    def __init__(self, stream, labels):
        self.stream, self.labels, self.index = stream, labels, stream.index
        self.n_batches = getattr(stream, "n_batches", None)

    def __iter__(self):
        start, inner = 0, iter(self.stream)
        try:
            for X, _ in inner:
                stop = start + X.shape[0]
                yield X, self.labels[start:stop]
                start = stop
        finally:
            close = getattr(inner, "close", None)
            if close is not None:
                close()  # abandoned: the descriptor stream's hooks come off now


def peek_image_shape(data):
    """``(shape of one image of data or None, data)``: ``data`` is rebuilt when a one-shot iterator was
    peeked, so pass the returned one on. A tensor, a Dataset (its item 0), a DataLoader or an iterable of
    batches (its first batch)."""
    if isinstance(data, (torch.Tensor, np.ndarray)):
        return (tuple(data.shape[1:]) if data.ndim >= 2 else None), data
    if isinstance(data, Dataset) and not isinstance(data, DataLoader):
        if hasattr(data, "__len__") and len(data) == 0:
            raise ValueError("no images: the dataset is empty")
        try:
            item = data[0]
        except (IndexError, KeyError, TypeError):
            return None, data
        image = item[0] if isinstance(item, (tuple, list)) else item
        return (tuple(image.shape) if hasattr(image, "shape") else None), data
    try:
        it = iter(data)
    except TypeError:
        raise TypeError(f"data must be a tensor of images, a Dataset, a DataLoader or an iterable of (images, "
                        f"labels) batches, got {type(data).__name__}") from None
    try:
        batch = next(it)
    except StopIteration:
        raise ValueError("no images: the data yielded no batch (an empty loader?)") from None
    if it is data:  # a one-shot iterator: put the batch back
        data = itertools.chain([batch], it)
    images = batch[0] if isinstance(batch, (tuple, list)) else batch
    return (tuple(images.shape[1:]) if hasattr(images, "shape") and len(images.shape) >= 2 else None), data


def _n_outputs(model: nn.Module, input_shape) -> int:
    """Number of output units (classes) of ``model``, from one forward pass of a zero image."""
    param = next(model.parameters())
    dtype = param.dtype if param.is_floating_point() else torch.float32
    with preserved(model), torch.no_grad():
        model.eval()
        out = model(torch.zeros((1, *input_shape), device=param.device, dtype=dtype))
    try:
        scores = check_scores(out, 1)
    except TypeError as error:
        raise TypeError(f"{error}; or pass classes=[...] (the label values of interest), which needs no "
                        "output") from None
    return int(scores.shape[1])


@dataclass
class _Source:
    stream: object
    index: object
    m: int
    n_outputs: int | None  # the model's output units, when the labels are those (classes=None)
    classes: np.ndarray | None  # the label values of interest, in target order
    one_shot: bool


def _source(model, data, layers, labels, classes, batch_size, input_shape, show_progress, options) -> _Source:
    """Resolve the arguments of :func:`gram_statistics` / :func:`fit_relevant` to a stream of descriptors."""
    if classes is not None:
        classes = np.asarray(classes)
        if classes.ndim != 1 or classes.size == 0:
            raise ValueError(f"classes must be a non-empty 1-D sequence of label values, got shape {classes.shape}")
        if not np.issubdtype(classes.dtype, np.integer):
            if np.issubdtype(classes.dtype, np.floating) and np.all(classes == np.round(classes)):
                classes = classes.astype(np.int64)
            else:
                raise TypeError(f"classes must be integer label values, got dtype {classes.dtype}")
        if np.unique(classes).size != classes.size:
            raise ValueError(f"classes has repeated values: {classes.tolist()}")
    if _is_stream(model) or _is_stream(data):
        stream = model if _is_stream(model) else data
        other = data if stream is model else model
        if stream is model and other is not None:
            raise TypeError("with a descriptor stream as first argument, data must be None (the stream is the data)")
        if other is not None and not isinstance(other, nn.Module):
            raise TypeError(f"with a descriptor stream as data, model must be None or a torch.nn.Module, got "
                            f"{type(other).__name__}")
        if layers is not None or options:
            raise TypeError("layers and descriptor options belong to the stream: pass them to DescriptorStream")
        if labels is not None:
            raise TypeError("labels= goes with a tensor of images; a descriptor stream yields its labels")
        m = len(stream.index)
        n_out = None
        if other is None and isinstance(getattr(stream, "model", None), nn.Module):
            other = stream.model  # a DescriptorStream knows its model: its outputs are the classes
        if classes is None and isinstance(other, nn.Module):
            shape = input_shape or getattr(stream, "input_shape", None) or getattr(other, "input_shape", None)
            if shape is None:
                raise ValueError("to take the classes from the model's outputs give input_shape=, or pass "
                                 "classes=[...]")
            n_out = _n_outputs(other, shape)
        if classes is None and n_out is None:
            n_out = getattr(stream, "n_classes", None)
        return _Source(stream, stream.index, m, n_out, classes, hasattr(stream, "__next__"))
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module (or a descriptor stream), got {type(model).__name__}")
    if next(model.parameters(), None) is None:
        raise ValueError("the model has no parameters: the selection needs a trained network (its layers "
                         "before the classifier make the descriptor, its outputs the classes)")
    if data is None:
        raise TypeError("data is missing: pass images (a tensor with labels=), a Dataset, a DataLoader or an "
                        "iterable of (images, labels) batches")
    if labels is not None:
        if not isinstance(data, (torch.Tensor, np.ndarray)):
            raise TypeError("labels= goes with a tensor of images; a Dataset or DataLoader carries its labels")
        labels = torch.as_tensor(labels).reshape(-1).cpu().numpy() if isinstance(labels, torch.Tensor) \
            else np.asarray(labels).reshape(-1)
        if labels.shape[0] != data.shape[0]:
            raise ValueError(f"{data.shape[0]} images but {labels.shape[0]} labels")
    if input_shape is None:
        input_shape = getattr(model, "input_shape", None)
    if input_shape is None:
        input_shape, data = peek_image_shape(data)
        if input_shape is None:
            raise ValueError("cannot tell the image shape: pass input_shape=, e.g. (3, 224, 224)")
    if len(tuple(input_shape)) != 3:
        raise ValueError(f"images must be batches (N, C, H, W), so one image has a shape (C, H, W); got "
                         f"input_shape {tuple(input_shape)}: pass input_shape=, e.g. (3, 224, 224)")
    one_shot = hasattr(data, "__next__")  # an iterator (a generator): it can be streamed only once
    n_out = _n_outputs(model, input_shape) if classes is None else None
    stream = DescriptorStream(model, data, layers, batch_size=batch_size, input_shape=tuple(input_shape),
                              show_progress=show_progress, **options)
    if labels is not None:
        stream = _Labelled(stream, labels)
    return _Source(stream, stream.index, len(stream.index), n_out, classes, one_shot)


# --- targets ---------------------------------------------------------------------------------------------------

class _Targets:
    """Labels to the one-hot target columns: the label values of interest, or the model's output units, or
    (a stream with neither) 0..max label, growing as labels come."""

    def __init__(self, source: _Source):
        self.classes, self.fixed = source.classes, source.n_outputs
        self.C = len(self.classes) if self.classes is not None else (self.fixed or 0)
        if self.classes is not None:
            self.order = np.argsort(self.classes, kind="stable")
            self.sorted = self.classes[self.order]

    def columns(self, labels, k: int) -> np.ndarray:
        """Target column of every label of batch ``k``."""
        y = np.asarray(labels)
        if y.ndim != 1:
            y = y.reshape(-1)
        if not np.issubdtype(y.dtype, np.integer):
            if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
                y = y.astype(np.int64)
            else:
                raise TypeError(f"batch {k}: labels must be integer class labels, got dtype {y.dtype}")
        if self.classes is not None:
            pos = np.clip(np.searchsorted(self.sorted, y), 0, len(self.sorted) - 1)
            bad = self.sorted[pos] != y
            if bad.any():
                raise ValueError(f"batch {k}: label(s) {np.unique(y[bad])[:5].tolist()} are not among the classes "
                                 f"of interest {self.classes.tolist()}: filter the data to those classes (e.g. a "
                                 "torch.utils.data.Subset), or add the labels to classes")
            return self.order[pos]
        if y.size and y.min() < 0:
            raise ValueError(f"batch {k}: label {int(y.min())} is negative; labels are the model's output units "
                             "0..C-1, or pass classes=[...] (the label values of interest)")
        if self.fixed is not None and y.size and y.max() >= self.fixed:
            raise ValueError(f"batch {k}: label {int(y.max())} is outside the model's {self.fixed} output units "
                             f"(0..{self.fixed - 1}); pass classes=[...] (the label values of interest) if the "
                             "labels are numbered otherwise")
        if self.fixed is None and y.size:
            self.C = max(self.C, int(y.max()) + 1)
        return y.astype(np.intp)

    def values(self) -> np.ndarray:
        return self.classes if self.classes is not None else np.arange(self.C)


def _grow(a: np.ndarray, C: int) -> np.ndarray:
    """``a`` with its last axis padded by zeros to ``C`` entries (the classes a stream revealed so far)."""
    if a.shape[-1] >= C:
        return a
    out = np.zeros(a.shape[:-1] + (C,))
    out[..., :a.shape[-1]] = a
    return out


def _one_pass(source: _Source, targets: _Targets, fn, what: str) -> int:
    """Stream the descriptors once, calling ``fn(X float64 (n, m), columns (n,))`` per batch; the number of
    images. Each batch is checked (shape, labels, finite); an error says which batch."""
    it = iter(source.stream)
    try:
        return _stream_batches(source, targets, fn, what, it)
    finally:
        # a pass abandoned on an error (ours, between two batches) closes the stream now, so that its hooks
        # come off and the model is restored at once, not when the generator is collected
        close = getattr(it, "close", None)
        if close is not None:
            close()


def _stream_batches(source, targets, fn, what, it) -> int:
    n, k = 0, 0
    while True:
        try:
            batch = next(it)
        except StopIteration:
            break
        except (ValueError, TypeError) as error:
            kind = TypeError if isinstance(error, TypeError) else ValueError
            raise kind(f"batch {k} of the data ({what}): {error}") from error
        X, labels = batch
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != source.m:
            raise ValueError(f"batch {k} of the data ({what}): descriptors of shape {X.shape}, expected "
                             f"(n, {source.m}); the loader yields images of another shape or the stream changed")
        if labels is None:
            raise ValueError(f"batch {k} of the data came without labels: pass labels= with a tensor of images, or "
                             "data that yields (images, labels) pairs (a Dataset of (image, label) items, a "
                             "DataLoader over one)")
        if np.asarray(labels).size != X.shape[0]:
            raise ValueError(f"batch {k}: {X.shape[0]} descriptors but {np.asarray(labels).size} labels")
        cols = targets.columns(labels, k)
        X = X.astype(np.float64, copy=False)
        if not np.all(np.isfinite(X)):
            raise ValueError(f"batch {k}: descriptors contain NaN or Inf (images with NaN/Inf, or a model "
                             "that overflows)")
        if X.shape[0]:
            fn(X, cols)
        n += X.shape[0]
        k += 1
    return n


# --- processes -------------------------------------------------------------------------------------------------

class _Group:
    """The processes that share a fit: none, torch.distributed's default group, or a given one."""

    def __init__(self, process_group):
        import torch.distributed as dist

        self.dist = dist
        if process_group is not None:
            self.active, self.group = True, process_group
        else:
            self.active = dist.is_available() and dist.is_initialized()
            self.group = None
        self.rank = dist.get_rank(self.group) if self.active else 0

    def run(self, fn):
        """``fn()`` on every process; if any of them raises, every process raises (instead of waiting for the
        failed one in the next all-reduce)."""
        error = None
        try:
            out = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the other processes are told
            error, out = exc, None
        if self.active:
            flag = torch.tensor([0 if error is None else 1], dtype=torch.int64)
            self.dist.all_reduce(flag, op=self.dist.ReduceOp.MAX, group=self.group)
            if error is None and int(flag) > 0:
                raise RuntimeError("another process of the group failed while streaming its shard of the data; "
                                   "see its error")
        if error is not None:
            raise error
        return out

    def sum(self, *arrays: np.ndarray, chunk: int = 1 << 23) -> None:
        """All-reduce (sum) contiguous float64 arrays in place, in chunks of ``chunk`` entries (64 MB), so
        that the backend's buffers for a large Gram matrix stay small."""
        if not self.active:
            return
        for a in arrays:
            flat = a.reshape(-1)  # a view: every array summed here was made contiguous
            for start in range(0, flat.size, chunk):
                self.dist.all_reduce(torch.from_numpy(flat[start:start + chunk]), group=self.group)

    def max_int(self, value: int) -> int:
        return self._reduce_int(value, "MAX")

    def min_int(self, value: int) -> int:
        return self._reduce_int(value, "MIN")

    def _reduce_int(self, value: int, op: str) -> int:
        if not self.active:
            return int(value)
        t = torch.tensor([int(value)], dtype=torch.int64)
        self.dist.all_reduce(t, op=getattr(self.dist.ReduceOp, op), group=self.group)
        return int(t)

    def broadcast(self, a: np.ndarray) -> np.ndarray:
        """Rank 0's copy of ``a`` (same shape and dtype on every process): decisions taken once."""
        if not self.active:
            return a
        t = torch.from_numpy(np.ascontiguousarray(a))
        src = self.dist.get_global_rank(self.group, 0) if self.group is not None else 0
        self.dist.broadcast(t, src=src, group=self.group)
        return t.numpy()

    def broadcast_indices(self, idx: np.ndarray) -> np.ndarray:
        if not self.active:
            return idx
        size = self.broadcast(np.array([idx.size], dtype=np.int64))[0]
        buf = np.asarray(idx, dtype=np.int64) if self.rank == 0 else np.zeros(int(size), dtype=np.int64)
        return self.broadcast(buf).astype(np.intp)


def _check_counts(n: int, lsq: np.ndarray, targets: _Targets) -> None:
    if n == 0:
        raise ValueError("no images: the data yielded no batch (an empty loader?)")
    empty = np.flatnonzero(lsq <= 0)
    if empty.size:
        values = targets.values()[empty].tolist()
        raise ValueError(f"class(es) {values} have no example in the data: every class of interest needs at "
                         "least one image; pass classes=[...] with the classes the data has")


def _check_memory(need: int, budget: int, m: int, what: str, advice: str) -> None:
    if need > budget:
        raise StatisticsMemoryError(
            f"{what} for m={m} features needs about {need:,} bytes ({_gib(need)}), more than max_memory="
            f"{budget:,} bytes ({_gib(budget)}; default {MEMORY_FRACTION:g} of the available memory): {advice}")


# --- the dense Gram pair ---------------------------------------------------------------------------------------

def gram_statistics(model, data=None, layers=None, *, labels=None, classes=None, batch_size: int = 128,
                    input_shape=None, show_progress: bool = True, max_memory=None, process_group=None,
                    **options) -> tuple[GramAccumulator, FeatureIndex]:
    """The Gram pair of the mu-Lasso, streamed from the descriptors of ``data`` under ``model``.

    The descriptors (:class:`~vefi.descriptors.DescriptorStream`) flow batch by batch into ``Q = X X^T``
    (float64, updated in place by a symmetric rank-n update), ``q = X L^T`` and ``||l_j||^2``; the (N, m)
    matrix is never formed. Under ``torch.distributed`` (or with ``process_group``) every process streams its
    own shard and the sums are all-reduced: every process returns the statistics of all the shards.

    Parameters
    ----------
    model : torch.nn.Module or descriptor stream
        The network (left exactly as it came), or a DescriptorStream-like object (it has an ``index`` and
        yields ``(X_batch (n, m), labels)`` per batch, e.g. :class:`ArrayStream`); then ``data`` is None.
    data : Tensor, Dataset, DataLoader, iterable of (images, labels) batches, or descriptor stream
        The images of this process (its shard, under torch.distributed: the data are not split here; a
        ``DistributedSampler`` pads the shards with repeated images unless ``drop_last=True``, shard with a
        ``Subset`` to count every image once). A tensor of images takes its labels from ``labels``.
    layers : iterable of int, str or Layer, optional
        Layers of the descriptor (default :func:`vefi.descriptors.default_layers`).
    labels : array_like of shape (N,), optional
        Labels of a tensor of images.
    classes : sequence of int, optional
        The label values of interest, in target-column order (e.g. 5 classes of a 1000-class network); every
        label must be one of them. Default: the model's output units ``0..C-1`` (C = its number of outputs;
        for a stream without model, ``0..max label``). Every class needs an example.
    batch_size : int
        Images per forward pass for a tensor or Dataset (a DataLoader keeps its own).
    input_shape : tuple of int, optional
        Shape of one image, when the model has no ``input_shape`` attribute (default: read off the data).
    show_progress : bool
    max_memory : int, optional
        Bytes the statistics may use (default: :data:`MEMORY_FRACTION` of :func:`available_memory`, divided by
        ``LOCAL_WORLD_SIZE``); under torch.distributed, the smallest over the processes.
    process_group : torch.distributed.ProcessGroup, optional
        Sum over this group instead of the default one.
    **options
        Descriptor options of :class:`~vefi.descriptors.DescriptorStream` (``squared``, ``normalize``,
        ``l2_normalize``).

    Returns
    -------
    (GramAccumulator, FeatureIndex)

    Raises
    ------
    StatisticsMemoryError
        The m x m matrix does not fit in ``max_memory``: use fewer layers, or :func:`fit_relevant`, which
        never forms it.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    >>> images, labels = torch.rand(10, 1, 8, 8), torch.arange(10) % 2
    >>> gram, index = gram_statistics(net, images, labels=labels, batch_size=4, show_progress=False)
    >>> gram.Q.shape, gram.q.shape, gram.n_samples, len(index)
    ((8, 8), (8, 2), 10, 8)
    """
    group = _Group(process_group)
    source = group.run(lambda: _source(model, data, layers, labels, classes, batch_size, input_shape,
                                       show_progress, options))
    # the smallest budget of the processes, so that all take the same decisions
    return _dense_gram(source, batch_size, group.min_int(_budget(max_memory)), group), source.index


#: Above this many features the dense Gram update runs its BLAS call on one thread: the threaded ``dsyrk`` of
#: scipy's OpenBLAS (0.3.30, 32-bit integers) writes out of bounds from m = 26,000 (a segmentation fault,
#: measured here with 64 rows and 2 threads; 24,000 passed, and one thread passed at 34,000).
SYRK_THREADED_MAX = 16384


def _add_outer(Q: np.ndarray, X: np.ndarray) -> None:
    """Add ``X^T X`` to the lower triangle of the C-ordered (m, m) float64 matrix ``Q``, in place, with no m x m
    temporary (``Q.T`` is a Fortran view: ``dsyrk`` updates its upper triangle). The upper triangle is left
    as it was: mirror it once when done. Above :data:`SYRK_THREADED_MAX` features the call is
    single-threaded, to keep clear of an OpenBLAS threading fault.

    Examples
    --------
    >>> Q, X = np.zeros((3, 3)), np.arange(6.0).reshape(2, 3)
    >>> _add_outer(Q, X)
    >>> bool(np.allclose(np.tril(Q), np.tril(X.T @ X)))
    True
    """
    if Q.shape[0] <= SYRK_THREADED_MAX:
        dsyrk(1.0, X.T, beta=1.0, c=Q.T, trans=0, lower=0, overwrite_c=1)
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"):
        dsyrk(1.0, X.T, beta=1.0, c=Q.T, trans=0, lower=0, overwrite_c=1)


def _dense_gram(source: _Source, batch_size: int, budget: int, group: "_Group") -> GramAccumulator:
    targets = _Targets(source)
    m = source.m
    _check_memory(estimate_memory(m, max(targets.C, 1), batch_size=batch_size), budget, m,
                  "the dense Gram matrix",
                  "choose fewer layers (layers=[...]), or fit with vefi.statistics.fit_relevant(..., "
                  "working_set=True), which never forms the m x m matrix")
    Q = np.zeros((m, m))
    sums = _ClassSums(m, targets)

    def add(X, cols):
        _add_outer(Q, X)
        sums.add(X, cols)

    n = group.run(lambda: _one_pass(source, targets, add, "Gram pair"))
    q, lsq, n = sums.reduce(group, n)
    _mirror_lower(Q)
    group.sum(Q)
    _check_counts(n, lsq, targets)
    gram = GramAccumulator()
    gram.Q, gram.q, gram.lsq, gram.n_samples = Q, q, lsq, n
    return gram


class _ClassSums:
    """``q = X L^T`` and the class counts ``||l_j||^2`` of one pass, growing with the classes a stream
    reveals; reduced over the processes at the end."""

    def __init__(self, m: int, targets: "_Targets"):
        self.targets = targets
        self.q = np.zeros((m, targets.C))
        self.lsq = np.zeros(targets.C)

    def add(self, X, cols):
        C = self.targets.C
        self.q, self.lsq = _grow(self.q, C), _grow(self.lsq, C)
        # L^T X as a sparse (C, n) one-hot product: O(n m) whatever the number of classes
        onehot = sparse.csr_matrix((np.ones(cols.size), (cols, np.arange(cols.size))), shape=(C, cols.size))
        self.q += np.asarray(onehot @ X).T
        self.lsq += np.bincount(cols, minlength=C)

    def reduce(self, group: "_Group", n: int):
        C = self.targets.C = group.max_int(self.targets.C)
        self.targets.fixed = C  # later passes must not reveal new classes
        q, lsq = _grow(self.q, C), _grow(self.lsq, C)
        count = np.array([float(n)])
        group.sum(q, lsq, count)
        return q, lsq, int(count[0])


def _mirror_lower(Q: np.ndarray, block: int = 1024) -> None:
    """Copy the lower triangle of ``Q`` onto its upper one, in place, a block of columns at a time."""
    m = Q.shape[0]
    for start in range(0, m, block):
        stop = min(start + block, m)
        Q[start:stop, stop:] = Q[stop:, start:stop].T
        sub = Q[start:stop, start:stop]
        iu = np.triu_indices(stop - start, 1)
        sub[iu] = sub.T[iu]


# --- the fit ----------------------------------------------------------------------------------------------------

def fit_relevant(model, data=None, mu: float = 10.0, *, layers=None, labels=None, classes=None,
                 working_set="auto", max_memory=None, tol: float = 1e-8, max_iter: int = 10000,
                 max_rounds: int = 30, threshold: float = 1e-6, batch_size: int = 128, input_shape=None,
                 show_progress: bool = True, process_group=None, **options):
    """The relevant features of ``model`` on ``data`` (mu-Lasso, Sec. 3.1), from streamed descriptors.

    Dense when the m x m Gram matrix fits in ``max_memory`` (:func:`gram_statistics`, then
    :meth:`RelevantFeatureSelector.fit <vefi.selection.RelevantFeatureSelector.fit>`), otherwise by a
    working set that never forms it (see the module's description): ``1 + 2 r`` passes over the data for
    ``r`` rounds of the working set (often 1 or 2), memory linear in m. Both are certified by the duality gap of the full
    problem at the same ``tol``, and give the same selection. Under ``torch.distributed`` (or with
    ``process_group``) every process streams its shard and gets the same fitted selector.

    Parameters
    ----------
    model, data, layers, labels, classes, batch_size, input_shape, show_progress, process_group, **options
        As in :func:`gram_statistics`. The working-set fit streams the data several times: give a re-iterable
        source (a tensor, Dataset, DataLoader or stream), which must yield the same images on every pass (no
        random augmentation).
    mu : float
        L1 budget per class.
    working_set : "auto", bool
        ``"auto"``: dense when it fits in ``max_memory``; ``True``: always the working set; ``False``: always
        dense (:class:`StatisticsMemoryError` when it does not fit).
    max_memory : int, optional
        Bytes the fit may use (default: :data:`MEMORY_FRACTION` of :func:`available_memory`, divided by
        ``LOCAL_WORLD_SIZE``); under torch.distributed, the smallest over the processes.
    tol, max_iter, threshold
        As in :class:`~vefi.selection.RelevantFeatureSelector` (``max_iter``: per solve).
    max_rounds : int
        Most rounds of the working set (each: two passes over the data).

    Returns
    -------
    (RelevantFeatureSelector, FeatureIndex)
        The fitted selector: ``coef_`` (C, m) over all m features, its certificate (``converged_``,
        ``gap_``, ``relative_gap_``, ``status_``, ``message_``) that of the full problem; also
        ``method_`` (``"dense"`` or ``"working_set"``), ``n_passes_`` (passes over the data),
        ``working_set_`` (the columns of the final working set; all m when dense) and ``class_labels_``
        (the label value of each row of ``coef_``).

    Warns
    -----
    ConvergenceWarning
        When some class is not certified; the message says why and what to do.

    Examples
    --------
    >>> from vefi.descriptors import synthetic_descriptors
    >>> X, y = synthetic_descriptors(400, [30, 20], n_classes=3)
    >>> sel, index = fit_relevant(ArrayStream(X, y, batch_size=100), mu=2, working_set=True)
    >>> dense, _ = fit_relevant(ArrayStream(X, y, batch_size=100), mu=2, working_set=False)
    >>> sel.method_, sel.converged_, bool(np.array_equal(sel.get_support(), dense.get_support()))
    ('working_set', True, True)
    """
    mu = check_radius(mu)
    if working_set not in ("auto", True, False):
        raise ValueError(f"working_set must be 'auto', True or False, got {working_set!r}")
    if int(max_rounds) < 1:
        raise ValueError(f"max_rounds must be >= 1, got {max_rounds!r}")
    group = _Group(process_group)
    budget = group.min_int(_budget(max_memory))  # the smallest of the processes: all decide alike
    source = group.run(lambda: _source(model, data, layers, labels, classes, batch_size, input_shape,
                                       show_progress, options))
    C_guess = max(len(classes) if classes is not None else (source.n_outputs or 1), 1)
    dense_fits = estimate_memory(source.m, C_guess, batch_size=batch_size) <= budget
    params = dict(threshold=threshold, max_iter=max_iter)
    if working_set is False or (working_set == "auto" and dense_fits):
        gram = _dense_gram(source, batch_size, budget, group)
        with warnings.catch_warnings():  # warned once, below, from the caller's line
            warnings.simplefilter("ignore", ConvergenceWarning)
            sel = RelevantFeatureSelector(mu=mu, tol=tol, **params).fit(gram)
        sel.method_, sel.n_passes_, sel.working_set_ = "dense", 1, np.arange(source.m)
        sel.class_labels_ = source.classes if source.classes is not None else np.arange(gram.n_targets)
    else:
        if source.one_shot:
            raise TypeError("the working-set fit streams the data several times, but data is a one-shot "
                            "iterator (a generator?): pass a tensor, a Dataset, a DataLoader or a re-iterable")
        sel = _fit_working_set(source, mu, tol, int(max_iter), int(max_rounds), budget, batch_size, group,
                               params)
    if not sel.converged_:
        warnings.warn(f"fit_relevant(mu={mu:g}): {sel.message_}", ConvergenceWarning, stacklevel=2)
    return sel, source.index


def _fit_working_set(source, mu, tol, max_iter, max_rounds, budget, batch_size, group, params):
    targets = _Targets(source)
    m = source.m

    def check(k):
        _check_memory(estimate_memory(m, max(targets.C, 1), batch_size=batch_size, method="working_set",
                                      working_set=k), budget, m, f"the working-set fit (working set of {k})",
                      "choose fewer layers or classes, or a smaller mu (fewer relevant features), or raise "
                      "max_memory")

    check(min(m, 2 * _SCREEN * max(targets.C, 1)))
    # pass 1: q, diag(Q), ||l||^2
    sums = _ClassSums(m, targets)
    d = np.zeros(m)

    def first(X, cols):
        sums.add(X, cols)
        d[:] += np.einsum("ij,ij->j", X, X)

    n_local = group.run(lambda: _one_pass(source, targets, first, "pass 1: q and diag(Q)"))

    def again(fn, what):
        """Another pass; the data must yield the same images as on the first."""
        def run():
            n_pass = _one_pass(source, targets, fn, what)
            if n_pass != n_local:
                raise ValueError(f"the data yielded {n_local} images on the first pass but {n_pass} on {what}: the "
                                 "working-set fit streams the data several times and needs the same images on "
                                 "every pass (not a one-shot iterator; no sampler that changes the images)")
        group.run(run)

    q, lsq, n = sums.reduce(group, n_local)
    C = targets.C
    group.sum(d)
    _check_counts(n, lsq, targets)
    passes = 1
    floor = FIT_FLOOR * lsq.sum()  # of the objective ||X^T w - l||^2 (no 1/2)

    # the first working set: per class, the most correlated features and the largest |q|
    eligible = d > 0
    corr = np.where(eligible[:, None], np.abs(q) / np.sqrt(np.where(eligible, d, 1.0))[:, None], -1.0)
    raw = np.where(eligible[:, None], np.abs(q), -1.0)
    k0 = min(_SCREEN, int(eligible.sum()))
    first_set = set()
    for score in (corr, raw):
        if k0 > 0:
            top = np.argpartition(-score, k0 - 1, axis=0)[:k0]
            first_set.update(top[score[top, np.arange(C)] >= 0].ravel().tolist())
    new = group.broadcast_indices(np.array(sorted(first_set), dtype=np.intp))
    U = np.zeros(0, dtype=np.intp)
    QUU = np.zeros((0, 0))
    W = np.zeros((m, C))
    n_iter, rounds = 0, 0
    status, message, res = "max_iter", "", None
    gap = rel = obj = np.zeros(C)
    while True:
        rounds += 1
        # pass: the rows of Q of the new features, against the whole new working set
        U_next = np.sort(np.concatenate([U, new]))
        check(U_next.size)
        block = np.zeros((new.size, U_next.size))

        def rows(X, cols, block=block, new=new, U_next=U_next):
            block += X[:, new].T @ X[:, U_next]

        again(rows, f"round {rounds}: Gram block of {new.size} features")
        group.sum(block)
        passes += 1
        QUU = _assemble(QUU, U, block, new, U_next)
        U = U_next
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            res = solve_mu_lasso(QUU, mu, q=q[U], lsq=lsq, tol=tol, max_iter=max_iter)
        n_iter += res.n_iter
        WU = group.broadcast(np.ascontiguousarray(res.W))
        W[:] = 0.0
        W[U] = WU
        # pass: the gradient of the full problem over all m features
        G = np.zeros((m, C))
        S = np.flatnonzero(np.any(WU != 0, axis=1))
        cols_S, W_S = U[S], WU[S]

        def grad(X, cols, G=G):
            G += X.T @ (X[:, cols_S] @ W_S)

        again(grad, f"round {rounds}: gradient over all features")
        group.sum(G)
        passes += 1
        G -= q
        obj = res.objective  # exact for the full problem: w is zero outside U
        half_gap = np.maximum(np.einsum("ij,ij->j", W, G) + mu * np.abs(G).max(axis=0), 0.0)
        gap = 2.0 * half_gap
        rel = gap / np.maximum(obj, floor)
        unfinished = np.flatnonzero(rel > tol)
        if unfinished.size == 0:
            status = "converged"
            message = (f"certified over all {m} features: relative duality gap {rel.max(initial=0):.1e} <= "
                       f"tol={tol:g}, from a working set of {U.size} features after {rounds} round(s), "
                       f"{passes} passes over the data")
            break
        # violators of the optimality condition |g_i| <= lambda_c outside U, strongest first
        outside = np.ones(m, dtype=bool)
        outside[U] = False
        lam = np.abs(G[U]).max(axis=0)
        picked = set()
        for c in unfinished:
            g = np.where(outside & eligible, np.abs(G[:, c]), 0.0)
            viol = np.flatnonzero(g > lam[c])
            if viol.size:
                k = min(viol.size, max(_SCREEN, 2 * int(np.count_nonzero(W[:, c]))))
                picked.update(viol[np.argsort(-g[viol], kind="stable")[:k]].tolist())
        new = group.broadcast_indices(np.array(sorted(picked), dtype=np.intp))
        if new.size == 0:
            # nothing outside U violates optimality: the gap left is the restricted solve's own
            status = res.status if not res.converged else "stalled"
            message = (f"the working set ({U.size} features) holds every violator of optimality but the solve on "
                       f"it is not certified (relative duality gap {rel.max():.2e} > tol={tol:g}): "
                       f"{res.message}")
            break
        if rounds >= max_rounds:
            message = (f"the working set reached max_rounds={max_rounds} rounds ({U.size} features, {passes} passes) "
                       f"with a relative duality gap of {rel.max():.2e} > tol={tol:g} over all features for "
                       f"class(es) {unfinished.tolist()}: raise max_rounds")
            break
    full = MuLassoResult(W=W, objective=obj, gap=gap, relative_gap=rel, n_iter=n_iter,
                         converged=status == "converged", mu=mu, tol=tol, n_working=int(U.size),
                         status=status, message=message)
    sel = RelevantFeatureSelector.from_result(full, **params)
    sel.method_, sel.n_passes_, sel.working_set_ = "working_set", passes, U
    sel.class_labels_ = targets.values()
    return sel


def _assemble(QUU, U, block, new, U_next):
    """``Q_UU`` of the sorted working set ``U_next`` from the old block (rows/columns ``U``) and the rows of
    the ``new`` features against ``U_next``."""
    out = np.zeros((U_next.size, U_next.size))
    pos_old = np.searchsorted(U_next, U)
    pos_new = np.searchsorted(U_next, new)
    out[np.ix_(pos_old, pos_old)] = QUU
    out[pos_new, :] = block
    out[:, pos_new] = block.T
    return out
