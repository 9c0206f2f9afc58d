"""Targets, one vocabulary for every method: which class of each image to explain or to measure.

A *target* is None (each image's predicted class, the argmax of the model's scores), an int (one class for
every image), or a sequence, array or integer tensor of one class per image. A class is an output unit of the
model, ``0..C-1``; a class index is never rounded (``2.7`` is refused, not class 2). :func:`resolve_target`
turns any of these into a LongTensor (n,) on the scores' device, checking the number and the range; every
method of vefi that takes ``target=`` calls it.

Examples
--------
>>> import torch
>>> scores = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
>>> resolve_target(None, scores).tolist(), resolve_target(1, scores).tolist()
([1, 0, 1], [1, 1, 1])
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
from torch import nn

from vefi._model_state import preserved
from vefi.layers import check_images, check_scores

__all__ = ["class_indices", "model_scores", "resolve_target", "target_classes"]


def class_indices(target) -> torch.Tensor:
    """A target given as class indices, as a 1-D LongTensor: an int, an integer tensor or array, or a
    sequence of ints. Anything else, floats above all, is refused: a class index is never rounded
    (``target=2.7`` is not class 2).

    The conversion under :func:`resolve_target`; None (the predicted class), the number of rows and the range
    of classes are :func:`resolve_target`'s business.

    Examples
    --------
    >>> class_indices(3).tolist(), class_indices([1, 2]).tolist()
    ([3], [1, 2])
    >>> class_indices([2.7])
    Traceback (most recent call last):
    ...
    TypeError: target must be class indices (an int, an integer tensor or a sequence of ints), got [2.7]
    """
    def refuse():
        shown = repr(target) if not isinstance(target, torch.Tensor) else f"a tensor of dtype {target.dtype}"
        return TypeError("target must be class indices (an int, an integer tensor or a sequence of ints), got "
                         f"{shown[:200]}")

    if isinstance(target, bool):
        raise refuse()
    if isinstance(target, numbers.Integral):
        return torch.tensor([int(target)], dtype=torch.long)
    if isinstance(target, torch.Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise refuse()
        return target.detach().reshape(-1).long()
    if hasattr(target, "__array__") and not isinstance(target, (list, tuple)):  # a numpy array
        array = np.asarray(target)
        if array.dtype.kind not in "iu":
            raise refuse()
        return torch.as_tensor(array.reshape(-1), dtype=torch.long)
    if isinstance(target, (list, tuple, range)):
        items = [t.item() if isinstance(t, torch.Tensor) and t.numel() == 1 and not t.is_floating_point()
                 and t.dtype != torch.bool else t for t in target]
        if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in items):
            raise refuse()
        return torch.tensor([int(t) for t in items], dtype=torch.long)
    raise refuse()


def resolve_target(target, scores: torch.Tensor | None = None, *, n: int | None = None) -> torch.Tensor:
    """The target class of every image as a LongTensor (n,), on the device of ``scores``.

    Parameters
    ----------
    target : None, int, sequence of int, array or integer tensor
        None: the predicted class (``scores.argmax(1)``); an int: that class for every image; otherwise one
        class per image.
    scores : Tensor (n, C), optional
        The model's scores (logits) of the images; needed when ``target`` is None, and used to check the range
        ``0..C-1``.
    n : int, optional
        Number of images, when ``scores`` is not given.

    Raises
    ------
    TypeError
        A target that is not class indices (floats, booleans, strings).
    ValueError
        Not one class or one per image, or a class out of range.
    """
    if scores is not None:
        scores = check_scores(scores)
        n = scores.shape[0] if n is None else n
    if target is None:
        if scores is None:
            raise ValueError("target=None means the predicted class: resolve_target needs the scores")
        return scores.detach().argmax(1)
    indices = class_indices(target)
    if scores is not None:
        indices = indices.to(scores.device)
    if n is not None:
        if indices.numel() == 1:
            indices = indices.expand(n).clone()
        elif indices.numel() != n:
            raise ValueError(f"target must be one class or one per image ({n}), got {indices.numel()}")
    if scores is not None and indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= scores.shape[1]):
        raise ValueError(f"target classes must lie in 0..{scores.shape[1] - 1} (this model has {scores.shape[1]} "
                         f"classes), got {indices.tolist()[:20]}")
    return indices


def model_scores(model: nn.Module, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Scores (logits) of ``images`` in eval mode and without gradients, in chunks, on the CPU as float32; the
    model is left as it came."""
    out = []
    with preserved(model), torch.no_grad():
        model.eval()
        for start in range(0, images.shape[0], batch_size):
            # each chunk goes to the model's device and dtype, as a data loader's batch would
            chunk = check_images(images[start:start + batch_size], model=model, convert=True)
            out.append(check_scores(model(chunk), chunk.shape[0]).float().cpu())
    return torch.cat(out)


def target_classes(model: nn.Module, images: torch.Tensor, target, batch_size: int = 1024) -> torch.Tensor:
    """:func:`resolve_target` for ``images`` under ``model``, running the model only when ``target`` is None
    (on the CPU). The range of an explicit target is checked by the caller's forward pass."""
    if target is None:
        return resolve_target(None, model_scores(model, images, batch_size))
    return resolve_target(target, n=images.shape[0]).cpu()
