"""The whole method on every torchvision classifier (random weights, 64x64 inputs, CPU).

For each network: the five lines of the README (relevant features by mu-Lasso on block outputs and late
layers, explanations with the stride fix, average images), Grad-CAM at its default layer, CAM where the net
ends in global pooling and one linear layer (and a clear refusal where it does not); the model comes back
exactly as it went in. Where captum computes the same thing (guided backprop from a block's output, the
stride fix off, on the nets whose every ReLU is a module), the maps agree.
"""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import vefi
from vefi.backproject import backproject
from vefi.cam import cam, default_layer, grad_cam
from vefi.layers import layer_table

MODELS = {  # name: constructor keywords
    "alexnet": {},
    "vgg11": {},
    "resnet18": {},
    "resnet50": {},
    "densenet121": {},
    "squeezenet1_0": {},
    "googlenet": {"aux_logits": False, "init_weights": True},
    "shufflenet_v2_x0_5": {},
    "regnet_y_400mf": {},
    "mobilenet_v2": {},
    "mobilenet_v3_small": {},
    "efficientnet_b0": {},
    "convnext_tiny": {},
    "vit_b_16": {"image_size": 64},
}
# the nets whose class scores are one linear layer on a global average pool of maps (CAM's premise)
CAM_NETS = {"resnet18", "resnet50", "densenet121", "googlenet", "shufflenet_v2_x0_5", "regnet_y_400mf",
            "mobilenet_v2", "efficientnet_b0"}
SIDE, N, CLASSES = 64, 6, [0, 1, 2]
# map layers the descriptor may use: channel-first outputs of these kinds (inside a ConvNeXt block the
# activations and linear layers work on a channel-last map; a ViT's token layers are no maps at all)
MAP_KINDS = ("conv", "block", "bn", "relu", "relu6", "hardswish", "silu")


def build(name):
    from torchvision import models  # a runtime dependency: never skipped

    torch.manual_seed(0)
    return getattr(models, name)(weights=None, **MODELS[name]).eval()


def late_layers(net):
    """The last two map layers, and the last block output when the net has blocks."""
    table = layer_table(net, (3, SIDE, SIDE))
    maps = [layer for layer in table if layer.kind in MAP_KINDS and len(layer.output_shape) == 3]
    blocks = [layer for layer in maps if layer.kind == "block" or layer.aliases]
    chosen = {layer.number: layer for layer in maps[-2:] + blocks[-1:]}
    return [chosen[number] for number in sorted(chosen)]


def state(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("name", list(MODELS))
def test_the_method_runs_on_every_torchvision_classifier(name):
    net = build(name)
    before = state(net)
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(N, 3, SIDE, SIDE, generator=generator)
    labels = torch.arange(N) % len(CLASSES)
    loader = DataLoader(TensorDataset(images, labels), batch_size=3)
    layers = late_layers(net)
    assert layers, "no map layer"

    relevant = vefi.select_features(net, loader, mu=1.0, classes=CLASSES, layers=[layer.name for layer in layers],
                                    input_shape=(3, SIDE, SIDE), show_progress=False)
    assert relevant.selector.converged_ and len(relevant.features) > 0
    explanation = relevant.explain(images[:1], target=[0])  # a class of the selection, not the predicted
    maps = explanation.heatmap
    assert maps.shape == (1, SIDE, SIDE)
    assert torch.isfinite(maps).all() and (maps.flatten(1).amax(1) > 0).all()
    features = relevant.features[:2]
    averages = relevant.average_images(TensorDataset(images, labels), features, top=3, show_progress=False)
    assert [a.feature for a in averages] == features
    assert all(torch.isfinite(a.average.float()).all() for a in averages)

    target_layer = default_layer(net, (3, SIDE, SIDE))
    heat = grad_cam(net, images[:2])
    assert heat.shape == (2, SIDE, SIDE) and torch.isfinite(heat).all()
    if name in CAM_NETS:
        assert cam(net, images[:2]).shape == (2, SIDE, SIDE)
    else:
        with pytest.raises(ValueError, match="CAM needs a net that ends in global average pooling"):
            cam(net, images[:2])

    after = state(net)
    assert not net.training and after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               for m in net.modules())
    assert target_layer.name  # the default Grad-CAM layer has a name a reader can pass back


# captum's guided backprop replaces the backward of nn.ReLU modules: the same rule as vefi's on nets whose
# every ReLU is a module (googlenet's are functions, which captum passes by their plain gradient)
CAPTUM_BLOCKS = {"resnet18": ["layer2.0", "layer3"], "resnet50": ["layer2.1"], "vgg11": ["features"],
                 "alexnet": ["features"]}


@pytest.mark.parametrize("name", list(CAPTUM_BLOCKS))
def test_guided_backprop_from_a_block_matches_captum(name, peer):
    captum_attr = peer("captum.attr")
    net = build(name).double()
    for module in net.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False  # captum's hooks refuse in-place ReLUs; the maps are the same
    x = torch.rand(2, 3, SIDE, SIDE, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    modules = dict(net.named_modules())
    for block in CAPTUM_BLOCKS[name]:
        outputs = []
        handle = modules[block].register_forward_hook(lambda m, i, o: outputs.append(o.detach()))
        with torch.no_grad():
            net(x)
        handle.remove()
        channels = outputs[0].abs().sum((0, 2, 3)).argsort(descending=True)[:2].tolist()  # two live channels
        ours = backproject(net, x, [(block, c) for c in channels], rule="guided", stride_fix=False)
        theirs = []
        for c in channels:
            def selector(a, c=c):  # the gradient of this with respect to the block's output is channel c's map
                return 0.5 * (a[:, c] ** 2).reshape(a.shape[0], -1).sum(1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                theirs.append(captum_attr.NeuronGuidedBackprop(net, modules[block]).attribute(
                    copy.deepcopy(x), selector))
        theirs = torch.stack(theirs, 1)
        assert theirs.abs().amax((0, 2, 3, 4)).min() > 0
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)
