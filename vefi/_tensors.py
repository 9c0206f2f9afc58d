"""Small tensor checks shared by every tool."""

from __future__ import annotations

import torch

__all__ = ["all_finite"]


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value of ``tensor`` is finite (no NaN, no infinity).

    ``x - x`` is 0 for a finite value and NaN for an infinite or NaN one, so the sum of ``tensor - tensor`` is
    NaN exactly when a value is not finite (a sum of zeros cannot overflow). Why not
    ``torch.isfinite(t).all()``: the reduction of a boolean tensor is slow on a multi-threaded CPU (20 ms
    for a batch of 250 MNIST images on 2 threads, against 0.8 ms on one), and every tool checks every batch.

    Examples
    --------
    >>> all_finite(torch.tensor([1.0, -2.0])), all_finite(torch.tensor([1.0, float("inf")]))
    (True, False)
    """
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return True
    return not bool(torch.isnan((tensor - tensor).sum()))
