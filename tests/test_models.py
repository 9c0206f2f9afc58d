"""The book's networks: channels-last weights and the fast local response normalisation change speed only."""

import copy

import pytest
import torch
from torch import nn

from vefi.backproject import backproject
from vefi.book.models import FastLocalResponseNorm, build_model
from vefi.heatmaps import compute


@pytest.mark.parametrize("size,channels", [(5, 32), (4, 7), (5, 3), (1, 6)])
def test_fast_local_response_norm_is_pytorchs_function_and_gradient(size, channels):
    torch.manual_seed(size + channels)
    x = (3 * torch.randn(4, channels, 6, 5, dtype=torch.float64)).requires_grad_()
    ours, theirs = (cls(size, alpha=0.3, beta=0.75, k=1.5) for cls in (FastLocalResponseNorm, nn.LocalResponseNorm))
    y_ours, y_theirs = ours(x), theirs(x)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-12, atol=1e-12)
    signal = torch.randn_like(y_ours)
    (g_ours,) = torch.autograd.grad(y_ours, x, signal)
    (g_theirs,) = torch.autograd.grad(y_theirs, x, signal)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-10, atol=1e-12)
    flat = torch.randn(3, channels, 4, dtype=torch.float64)  # not 4-D: PyTorch's own path
    torch.testing.assert_close(ours(flat), theirs(flat))


def _plain(model):
    """The same net in the default layout with PyTorch's own LocalResponseNorm: the reference."""
    plain = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    for name, module in plain.named_children():
        if isinstance(module, FastLocalResponseNorm):
            setattr(plain, name, nn.LocalResponseNorm(module.size, module.alpha, module.beta, module.k))
    return plain


@pytest.mark.parametrize("name", ["mnist", "an8flower-single"])
def test_the_books_nets_compute_what_the_plain_layout_computes(name):
    torch.manual_seed(0)
    model = build_model(name).eval()
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.dim() == 4)
    images = torch.rand(3, *model.input_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(images), _plain(model)(images), rtol=1e-5, atol=1e-5)
    # in float64 the rounding of either layout is far below the tolerance, and no ReLU decides otherwise
    model, images = model.double(), images.double()
    plain = _plain(model)
    target = torch.tensor([0, 1, 2])
    deep = [("conv2", 3), ("fc1", 5)]  # back-projections cross the pools, and the LRN on an8Flower
    pairs = [(compute(m, model, images, target), compute(m, plain, images, target)) for m in ("gradient", "lrp-epsilon")]
    pairs += [(backproject(model, images, deep, rule=rule), backproject(plain, images, deep, rule=rule))
              for rule in ("guided", "deconvnet")]
    for ours, reference in pairs:
        assert ours.shape == reference.shape
        scale = reference.abs().max()
        assert scale > 0
        assert (ours - reference).abs().max() <= 1e-9 * scale
