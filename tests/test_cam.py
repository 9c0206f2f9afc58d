"""Grad-CAM against captum's ``LayerGradCam`` + bilinear upsampling, CAM against Grad-CAM on a CAM net and
against a direct computation on torchvision's resnet18, densenet121 and shufflenet_v2 (whose global pools are
function calls in ``forward``), the model left as it was (no hooks), and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from vefi.cam import cam, default_layer, grad_cam, grad_cam_parts, upsampled_activations
from vefi.book.models import build_model


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
    # a global pool, but more than one linear layer after it
    two_heads = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                              nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ValueError, match="no global average pool"):
        cam(two_heads, torch.rand(1, 3, 16, 16))

    class Softmaxed(nn.Module):  # scores that are not the linear layer's output
        def __init__(self):
            super().__init__()
            self.net = gap_net().float()

        def forward(self, x):
            return self.net(x).softmax(1)

    with pytest.raises(ValueError, match="not the output of its last linear layer"):
        cam(Softmaxed(), torch.rand(1, 3, 16, 16))


def torchvision_net(name: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(models, name)(weights=None).double().eval()


def last_maps(name: str, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, nn.Linear]:
    """The maps each net averages before its classifier, computed by hand from its modules, and the classifier."""
    with torch.no_grad():
        if name == "densenet121":
            return F.relu(model.features(x)), model.classifier
        if name == "shufflenet_v2_x0_5":
            for part in (model.conv1, model.maxpool, model.stage2, model.stage3, model.stage4, model.conv5):
                x = part(x)
            return x, model.fc
        for part in list(model.children())[:-2]:  # resnet18: everything before avgpool and fc
            x = part(x)
        return x, model.fc


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "shufflenet_v2_x0_5"])
def test_cam_on_torchvision_nets_is_the_direct_computation(name):
    model = torchvision_net(name).train()
    before = ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()])
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([3, 917])
    coarse = cam(model, x, target, upsample=False)
    maps, classifier = last_maps(name, model.eval(), x)
    expected = torch.einsum("nk,nkhw->nhw", classifier.weight.detach()[target], maps)
    assert coarse.shape == expected.shape and expected.abs().max() > 0
    assert torch.allclose(coarse, expected, rtol=1e-10, atol=1e-12 * float(expected.abs().max()))
    # CAM's defining property: its spatial mean plus the bias is the class score
    with torch.no_grad():
        scores = model(x).gather(1, target[:, None])[:, 0]
    assert torch.allclose(coarse.mean((1, 2)) + classifier.bias.detach()[target], scores, rtol=1e-9)
    assert cam(model, x, target).shape == (2, 64, 64)
    model.train()
    assert all(torch.equal(before[0][k], v) for k, v in model.state_dict().items())
    assert before[1] == [m.training for m in model.modules()]
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0


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


def test_grad_cam_parts_are_the_maps_and_their_mean_gradients():
    """Against a slow reference: the layer's output kept by a hook and the gradient of the predicted class's
    score with respect to it, by autograd on a plain forward pass."""
    torch.manual_seed(0)
    net = build_model("mnist").eval()
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    layer, maps, weights = grad_cam_parts(net, x, layer="conv2")
    kept = {}
    # the layer's output kept, a copy handed on: the in-place ReLU after conv2 must not overwrite it
    handle = dict(net.named_modules())["conv2"].register_forward_hook(
        lambda m, i, o: kept.setdefault("a", o).clone())
    try:
        logits = net(x)
    finally:
        handle.remove()
    score = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
    (grad,) = torch.autograd.grad(score, kept["a"])
    assert layer.name == "conv2"
    torch.testing.assert_close(maps, kept["a"].detach())
    torch.testing.assert_close(weights, grad.mean((2, 3)))
    torch.testing.assert_close(grad_cam(net, x, layer="conv2", upsample=False),
                               (weights[:, :, None, None] * maps).sum(1).clamp(min=0))
