"""Layers are calls: a reused module is one layer per call, a block's output is a layer.

The reference for a reused module is its *unshared twin*: the same network with a separate copy of the
module for each call, whose layers are ordinary. Every tool must give the same result on the k-th call of
the shared module as on the k-th copy of the twin. The reference for a block is autograd and arithmetic on
the block's output, captured by hand.
"""

import copy

import pytest
import torch
import torchvision
from torch import nn

from vefi.ablation import ablated, ablation_accuracy
from vefi.backproject import backproject
from vefi.cam import grad_cam, upsampled_activations
from vefi.descriptors import default_layers, descriptors
from vefi.layers import layer_table, resolve_layer, tapped
from vefi.receptive import receptive_fields


class Block(nn.Module):
    """A residual block: conv, ReLU, conv, addition; the ReLU module is called twice, the second time after
    the addition (as in torchvision's BasicBlock); ``shared=False`` gives each call its own ReLU."""

    def __init__(self, channels, shared=True):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.relu = nn.ReLU()
        self.relu_b = self.relu if shared else nn.ReLU()

    def forward(self, x):
        return self.relu_b(self.conv2(self.relu(self.conv1(x))) + x)


class Net(nn.Module):
    def __init__(self, shared=True):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.act = nn.ReLU()
        self.block = Block(4, shared)
        self.mix = MixBlock(4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.mix(self.block(self.act(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


class MixBlock(nn.Module):
    """A block whose output is no leaf's: x + conv(x), nothing after the addition (MobileNetV2's)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x)


def twins():
    torch.manual_seed(0)
    shared = Net(shared=True).eval()
    unshared = Net(shared=False).eval()
    unshared.load_state_dict(shared.state_dict())
    return shared, unshared


IMAGES = torch.rand(3, 1, 12, 12, generator=torch.Generator().manual_seed(1))


def test_a_reused_module_is_one_layer_per_call_and_a_block_is_a_layer():
    shared, unshared = twins()
    table = layer_table(shared, (1, 12, 12))
    names = [layer.name for layer in table]
    assert names == ["stem", "act", "block.conv1", "block.relu", "block.conv2", "block.relu:2", "mix.conv",
                     "mix", "pool", "fc"]
    second = resolve_layer(table, "block.relu:2")
    assert second.call == 2 and second.module is shared.block.relu and second.module_name == "block.relu"
    # the residual block ends in the second ReLU call: "block" is its alias, no layer of its own
    assert resolve_layer(table, "block") is second and second.aliases == ("block",)
    mix = resolve_layer(table, "mix")
    assert mix.kind == "block" and mix.output_shape == (4, 6, 6) and mix.module is shared.mix
    twin = layer_table(unshared, (1, 12, 12))
    assert [(a.number, a.kind, a.output_shape) for a in table] == [(b.number, b.kind, b.output_shape) for b in twin]
    # blocks are not in the default descriptor (they combine layers already there), but can be named
    assert "mix" not in [layer.name for layer in default_layers(shared, (1, 12, 12))]


def test_the_layer_of_a_ResNet_stage_is_its_last_block_after_the_addition():
    net = torchvision.models.resnet18(weights=None).eval()
    table = layer_table(net, (3, 64, 64))
    stage = resolve_layer(table, "layer4")
    assert stage.name == "layer4.1.relu:2" and stage.aliases == ("layer4.1", "layer4")
    # every call of every ReLU module: two per BasicBlock, eight blocks, and the stem's
    assert sum(layer.kind == "relu" for layer in table) == 17
    captured = []
    handle = net.layer4.register_forward_hook(lambda m, i, o: captured.append(o.clone()))
    try:
        out = []
        with tapped(net, [stage], lambda layer, o: out.append(o.clone())), torch.no_grad():
            net(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    finally:
        handle.remove()
    assert torch.equal(out[0], captured[0])


def test_descriptors_of_each_call_match_the_unshared_twin():
    shared, unshared = twins()
    layers = ["block.relu", "block.relu:2", "mix"]
    twin_layers = ["block.relu", "block.relu_b", "mix"]
    a = descriptors(shared, IMAGES, layers, show_progress=False)
    b = descriptors(unshared, IMAGES, twin_layers, show_progress=False)
    assert torch.equal(torch.from_numpy(a.X), torch.from_numpy(b.X))
    assert [f.layer_name for f in a.index][4] == "block.relu:2"
    # the block's column is the L2 norm of each channel of its output, L1-normalised, computed by hand
    with torch.no_grad():
        mixed = shared.mix(shared.block(shared.act(shared.stem(IMAGES))))
    norms = mixed.flatten(2).norm(dim=2)
    assert torch.allclose(torch.from_numpy(a.X[:, 8:]), norms / norms.sum(1, keepdim=True), atol=1e-6)


@pytest.mark.parametrize("rule", ["guided", "backprop"])
def test_backprojection_from_a_later_call_matches_the_twin(rule):
    shared, unshared = twins()
    for channel in range(4):
        a = backproject(shared, IMAGES, [("block.relu:2", channel)], rule=rule)
        b = backproject(unshared, IMAGES, [("block.relu_b", channel)], rule=rule)
        assert torch.allclose(a, b, atol=1e-7), channel
    # the first call is another layer, with another map
    first = backproject(shared, IMAGES, [("block.relu", 0)], rule=rule)
    assert not torch.allclose(first, backproject(shared, IMAGES, [("block.relu:2", 0)], rule=rule))


def test_backprojection_from_a_block_is_its_gradient():
    shared, _ = twins()
    x = IMAGES.clone().requires_grad_(True)
    mixed = shared.mix(shared.block(shared.act(shared.stem(x))))
    for channel in range(4):
        # the seed is the channel's own map: the plain backward of sum(map * map.detach())
        (expected,) = torch.autograd.grad((mixed[:, channel] * mixed[:, channel].detach()).sum(), x,
                                          retain_graph=True)
        got = backproject(shared, IMAGES, [("mix", channel)], rule="backprop", stride_fix=False)[:, 0]
        assert torch.allclose(got, expected, atol=1e-6), channel


def test_grad_cam_and_activations_of_a_call_and_a_block():
    shared, unshared = twins()
    assert torch.allclose(grad_cam(shared, IMAGES, layer="block.relu:2"),
                          grad_cam(unshared, IMAGES, layer="block.relu_b"), atol=1e-7)
    assert torch.equal(upsampled_activations(shared, IMAGES, "block.relu:2"),
                       upsampled_activations(unshared, IMAGES, "block.relu_b"))
    # Grad-CAM on the block by hand: channel weights are the spatial mean of the score's gradient
    x = IMAGES.clone()
    mixed = shared.mix(shared.block(shared.act(shared.stem(x))))
    logits = shared.fc(shared.pool(mixed).flatten(1))
    target = logits.argmax(1)
    (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), mixed)
    by_hand = (grad.mean((2, 3), keepdim=True) * mixed).sum(1).clamp(min=0)
    assert torch.allclose(grad_cam(shared, IMAGES, layer="mix", upsample=False), by_hand.detach(), atol=1e-6)


def test_ablating_a_call_or_a_block_matches_the_twin():
    shared, unshared = twins()
    labels = torch.tensor([0, 1, 2])
    for feature, twin_feature in [(("block.relu:2", 1), ("block.relu_b", 1)), (("mix", 2), ("mix", 2))]:
        with ablated(shared, [feature], input_shape=(1, 12, 12)), torch.no_grad():
            a = shared(IMAGES)
        with ablated(unshared, [twin_feature], input_shape=(1, 12, 12)), torch.no_grad():
            b = unshared(IMAGES)
        assert torch.equal(a, b)
        assert not torch.equal(a, shared(IMAGES).detach())
        acc = ablation_accuracy(shared, IMAGES, labels, [[feature], []])
        assert acc.tolist() == ablation_accuracy(unshared, IMAGES, labels, [[twin_feature], []]).tolist()
    # ablating the first call leaves the second call's own zeroing alone
    with ablated(shared, [("block.relu", 0)], input_shape=(1, 12, 12)), torch.no_grad():
        first = shared(IMAGES)
    with ablated(unshared, [("block.relu", 0)], input_shape=(1, 12, 12)), torch.no_grad():
        assert torch.equal(first, unshared(IMAGES))


def test_receptive_fields_of_each_call_match_the_twin():
    shared, unshared = twins()
    a = receptive_fields(shared, (1, 12, 12))
    b = receptive_fields(unshared, (1, 12, 12))
    assert [(f.size, f.jump, f.whole) for f in a.values()] == [(f.size, f.jump, f.whole) for f in b.values()]
    # the second call sees through both convs of the block: 3 + 2 + 2 pixels at jump 2
    assert a[6].size == (11, 11) and a[4].size == (7, 7)


def test_the_model_comes_back_as_it_went_in():
    shared, _ = twins()
    before = copy.deepcopy(shared.state_dict())
    backproject(shared, IMAGES, [("mix", 0), ("block.relu:2", 1)])
    grad_cam(shared, IMAGES, layer="mix")
    descriptors(shared, IMAGES, ["mix"], show_progress=False)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in shared.modules())
    assert all(torch.equal(v, shared.state_dict()[k]) for k, v in before.items())


def test_a_module_is_a_layer_key_when_it_is_called_once():
    shared, _ = twins()
    table = layer_table(shared, (1, 12, 12))
    assert resolve_layer(table, shared.mix).name == "mix"
    assert resolve_layer(table, shared.block).name == "block.relu:2"  # the block is that call's alias
    with pytest.raises(ValueError, match=r"called 2 times.*'block.relu', 'block.relu:2'"):
        resolve_layer(table, shared.block.relu)
    with pytest.raises(ValueError, match="not called in a forward pass"):
        resolve_layer(table, nn.ReLU())
    a = descriptors(shared, IMAGES, [shared.mix], show_progress=False)
    assert a.index.layers[0].name == "mix"
    assert torch.equal(backproject(shared, IMAGES, [(shared.mix, 1)]), backproject(shared, IMAGES, [("mix", 1)]))


def test_token_and_channel_last_layers_are_refused_by_the_descriptor_and_left_out_of_its_default():
    from torchvision import models

    vit = models.vit_b_16(weights=None, image_size=32).eval()
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"sequence of tokens.*describe a layer before the image is cut.*conv_proj"):
        descriptors(vit, x, ["encoder.layers.encoder_layer_0.ln_1"], show_progress=False)
    assert [layer.name for layer in default_layers(vit, (3, 32, 32))] == ["conv_proj"]
    convnext = models.convnext_tiny(weights=None).eval()
    table = layer_table(convnext, (3, 32, 32))
    inside = resolve_layer(table, "features.1.0.block.3")  # the Linear after the permute: (h, w, C)
    with pytest.raises(ValueError, match="channel-last.*to describe it would take the wrong thing"):
        descriptors(convnext, x, [inside], show_progress=False)
    defaults = default_layers(convnext, (3, 32, 32))
    assert inside not in defaults and resolve_layer(table, "features.1.0.block.0") in defaults  # its dwconv
