"""Sensitivity and gradient x input against captum's ``Saliency`` and ``InputXGradient``, the model left as it
was, in-place ReLU, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from vefi.book.models import build_model
from vefi.saliency import gradient, gradient_x_input, sensitivity

pytestmark = pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")


def seeded_model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name).double().eval()


def twin(model):
    other = copy.deepcopy(model)
    for m in other.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    return other


@pytest.mark.parametrize("name", ["mnist", "an8flower-single"])
def test_matches_captum(peer, name):
    captum_attr = peer("captum.attr")
    model = seeded_model(name)
    images = torch.rand((3,) + model.input_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 3, 5])
    grad = captum_attr.Saliency(twin(model)).attribute(images, target=target, abs=False)
    assert grad.abs().max() > 0
    assert torch.allclose(gradient(model, images, target), grad)
    assert torch.allclose(sensitivity(model, images, target), (grad ** 2).sum(1))
    gxi = captum_attr.InputXGradient(twin(model)).attribute(images, target=target)
    assert torch.allclose(gradient_x_input(model, images, target), gxi.sum(1))
    assert torch.allclose(gradient_x_input(model, images, target, sum_channels=False), gxi)


def test_predicted_class_is_default_and_rows_independent():
    model = seeded_model("mnist")
    images = torch.rand(4, 1, 28, 28, dtype=torch.float64)
    predicted = model(images).argmax(1)
    together = sensitivity(model, images)
    assert torch.allclose(together, sensitivity(model, images, predicted))
    alone = torch.cat([sensitivity(model, images[i:i + 1], int(predicted[i])) for i in range(4)])
    assert torch.allclose(together, alone)


def test_bias_free_relu_net_conserves():
    model = seeded_model("mnist")
    for m in model.modules():
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)
    images = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    scores = model(images)[:, 2]
    assert torch.allclose(gradient_x_input(model, images, 2).sum((1, 2)), scores)


def test_model_unchanged():
    model = build_model("mnist")
    model.train()
    model.conv1.weight.requires_grad_(False)
    before = [p.detach().clone() for p in model.parameters()]
    flags = ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()])
    sensitivity(model, torch.rand(2, 1, 28, 28))
    with pytest.raises(ValueError):
        gradient_x_input(model, torch.rand(2, 1, 28, 28), target=-1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert flags == ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()])
    assert all(p.grad is None for p in model.parameters())


def test_bad_input():
    model = seeded_model("mnist")
    with pytest.raises(ValueError, match="NaN"):
        sensitivity(model, torch.full((1, 1, 28, 28), float("inf"), dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        sensitivity(model, torch.rand(1, 28, 28, dtype=torch.float64).unsqueeze(0).unsqueeze(0))
    with pytest.raises(ValueError, match="one per image"):
        sensitivity(model, torch.rand(3, 1, 28, 28, dtype=torch.float64), torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="integer"):
        sensitivity(model, torch.rand(1, 1, 28, 28, dtype=torch.float64), torch.tensor([1.0]))
