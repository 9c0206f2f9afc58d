"""Leave a user's model exactly as it came in: training flags and ``requires_grad`` restored."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

__all__ = ["preserved"]


@contextmanager
def preserved(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager that restores every module's ``training`` flag and every parameter's
    ``requires_grad`` on exit, also when the body raises.

    Hooks are not tracked here: whoever registers a hook removes it in its own ``finally``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    training = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield model
    finally:
        for m, flag in training:
            m.training = flag
        for p, flag in grads:
            p.requires_grad_(flag)
