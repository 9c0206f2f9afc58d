"""Leave a user's model exactly as it came in: training flags and ``requires_grad`` restored; and compute
gradients whatever grad mode the caller is in."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

__all__ = ["preserved", "gradients_on"]


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
            if p.requires_grad != flag:  # a parameter made under inference mode refuses even a no-op set
                p.requires_grad_(flag)


@contextmanager
def gradients_on(model: nn.Module) -> Iterator[None]:
    """Autograd on for a gradient-based method, also when the caller is inside ``torch.no_grad()`` or
    ``torch.inference_mode()`` (a user explaining a prediction naturally is).

    Inference mode can be switched off inside, but a tensor created under it can never take part in a
    graph: tensors that need gradients (the input) must be created, e.g. by ``clone()``, *inside* this
    block. The model's own parameters cannot be re-created, so a model built or loaded under inference mode
    is refused with a ``RuntimeError`` that says what to do.
    """
    inference = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_inference()]
    if inference:
        raise RuntimeError(f"the model's parameters or buffers (e.g. {inference[0]!r}) were created under "
                           "torch.inference_mode(), so no gradient can flow through them: build or load the "
                           "model outside inference mode (torch.no_grad() is fine)")
    with torch.inference_mode(False), torch.enable_grad():
        yield
