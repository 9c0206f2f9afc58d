"""Grad-CAM against captum's ``LayerGradCam`` + bilinear upsampling, CAM against Grad-CAM on a CAM net, the
model left as it was (no hooks), and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vefi.cam import cam, default_layer, grad_cam, upsampled_activations
from vefi.models import build_model


def seeded_model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name).double().eval()


def gap_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 6, 3, stride=2),
                         nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)).double()


@pytest.mark.parametrize("name,layer", [("mnist", None), ("mnist", "conv2"), ("an8flower-single", None),
                                        ("an8flower-single", "conv2")])
def test_matches_captum(peer, name, layer):
    captum_attr = peer("captum.attr")
    model = seeded_model(name)
    other = copy.deepcopy(model)
    for m in other.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    chosen = layer or default_layer(model, model.input_shape).name
    images = torch.rand((3,) + model.input_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 3, 5])
    ours = grad_cam(model, images, target, layer=layer)
    coarse = captum_attr.LayerGradCam(other, dict(other.named_modules())[chosen]).attribute(
        images, target=target, relu_attributions=True)
    theirs = captum_attr.LayerAttribution.interpolate(coarse, model.input_shape[1:], interpolate_mode="bilinear")
    assert theirs.abs().max() > 0
    assert torch.allclose(ours, theirs[:, 0]), float((ours - theirs[:, 0]).abs().max())


def test_default_layer_is_last_spatial_conv_or_relu():
    assert default_layer(build_model("mnist"), (1, 28, 28)).name == "relu3"
    assert default_layer(build_model("an8flower-single"), (3, 112, 112)).name == "relu4"


def test_cam_is_grad_cam_on_a_gap_net():
    net = gap_net()
    images = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    c = cam(net, images, target=1, upsample=False)
    g = grad_cam(net, images, target=1, layer=4, upsample=False)  # layer 4: the last ReLU
    # alpha_k = w_k / (h w): Grad-CAM = ReLU(CAM) / (h w)
    hw = c.shape[1] * c.shape[2]
    assert torch.allclose(g, c.clamp(min=0) / hw)
    assert cam(net, images, target=1).shape == (2, 16, 16)


def test_cam_refuses_other_nets():
    with pytest.raises(ValueError, match="global average pooling"):
        cam(build_model("mnist"), torch.rand(1, 1, 28, 28))


def test_upsampled_activations():
    model = seeded_model("mnist")
    images = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    maps = upsampled_activations(model, images, "conv2")
    with torch.no_grad():
        coarse = nn.Sequential(*list(model)[:4])(images.clone())
    assert torch.allclose(maps, F.interpolate(coarse, size=(28, 28), mode="bilinear", align_corners=False))
    assert torch.allclose(upsampled_activations(model, images, "conv2", channel=3), maps[:, 3])
    with pytest.raises(ValueError, match="channel"):
        upsampled_activations(model, images, "conv2", channel=64)


def test_model_unchanged_and_no_hooks():
    model = build_model("mnist")
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    flags = ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()])
    grad_cam(model, torch.rand(2, 1, 28, 28))
    with pytest.raises(ValueError):
        grad_cam(model, torch.rand(2, 1, 28, 28), target=99)
    with pytest.raises(ValueError, match="unknown layer"):
        grad_cam(model, torch.rand(2, 1, 28, 28), layer="conv9")
    with pytest.raises(ValueError, match="map"):
        grad_cam(model, torch.rand(2, 1, 28, 28), layer="fc1")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert flags == ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()])
    assert sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules()) == 0


def test_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        grad_cam(build_model("mnist"), torch.full((1, 1, 28, 28), float("nan")))
