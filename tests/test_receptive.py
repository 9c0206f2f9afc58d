"""Receptive fields against the support of a brute-force gradient on random nets."""

import numpy as np
import pytest
import torch
from torch import nn

from vefi.models import build_model
from vefi.receptive import format_receptive_table, receptive_box, receptive_fields


def random_stack(seed: int, *, gaps: bool = False, dilation: bool = False):
    """A random linear stack of convs and average pools (stride, padding, kernels drawn at random).

    Linear (no ReLU) and average pools, so that every input pixel inside a unit's field has a nonzero
    gradient (with probability 1). Without ``gaps`` every kernel is at least its stride, so the field has no
    holes; with ``dilation`` some convs are dilated (holes too)."""
    rng = np.random.default_rng(seed)
    layers, channels, size = [], 1, int(rng.integers(24, 40))
    side = size
    for _ in range(int(rng.integers(2, 5))):
        if rng.random() < 0.6:
            k = int(rng.integers(1, 6))
            s = int(rng.integers(1, 4 if gaps else min(k, 3) + 1))
            d = int(rng.integers(1, 3)) if dilation else 1
            p = int(rng.integers(0, k // 2 + 1))
            out = int(rng.integers(1, 4))
            layer = nn.Conv2d(channels, out, k, stride=s, padding=p, dilation=d)
            channels = out
            new_side = (side + 2 * p - d * (k - 1) - 1) // s + 1
        else:
            k = int(rng.integers(2, 4))
            s = int(rng.integers(1, 4 if gaps else k + 1))
            p = int(rng.integers(0, k // 2 + 1))
            layer = nn.AvgPool2d(k, stride=s, padding=p)
            new_side = (side + 2 * p - k) // s + 1
        if new_side < 2:
            break
        layers.append(layer)
        side = new_side
    if not layers:
        layers = [nn.Conv2d(1, 1, 3)]
    return nn.Sequential(*layers).double(), size


def gradient_support(net, size, layer_index, channel, y, x):
    torch.manual_seed(1)
    image = torch.rand(1, 1, size, size, dtype=torch.float64, requires_grad=True)
    out = net[: layer_index + 1](image)
    out[0, channel, y, x].backward()
    return image.grad[0, 0].abs() > 0


def bounding_box(mask):
    rows = torch.nonzero(mask.any(1)).flatten()
    cols = torch.nonzero(mask.any(0)).flatten()
    return int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1


@pytest.mark.parametrize("seed", range(12))
def test_box_equals_gradient_support(seed):
    torch.manual_seed(seed)
    net, size = random_stack(seed)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight)
    fields = receptive_fields(net, (1, size, size))
    rng = np.random.default_rng(100 + seed)
    for number, field in fields.items():
        _, c, h, w = net[:number](torch.zeros(1, 1, size, size, dtype=torch.float64)).shape
        for y, x in {(0, 0), (h - 1, w - 1), (int(rng.integers(h)), int(rng.integers(w)))}:
            support = gradient_support(net, size, number - 1, 0, y, x)
            top, left, bottom, right = field.box(y, x)
            expected = torch.zeros_like(support)
            expected[top:bottom, left:right] = True
            assert torch.equal(support, expected), (seed, number, (y, x), field, net)


@pytest.mark.parametrize("seed", range(8))
def test_bounding_box_with_gaps_and_dilation(seed):
    torch.manual_seed(seed)
    net, size = random_stack(seed + 50, gaps=True, dilation=True)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight)
    fields = receptive_fields(net, (1, size, size))
    number = len(net)
    _, _, h, w = net(torch.zeros(1, 1, size, size, dtype=torch.float64)).shape
    for y, x in {(0, 0), (h - 1, w - 1), (h // 2, w // 2)}:
        support = gradient_support(net, size, number - 1, 0, y, x)
        top, left, bottom, right = fields[number].box(y, x)
        # with holes, a clipped box may start on a pixel no tap reaches: the support lies inside the box,
        # and is bounded by it exactly when nothing was clipped
        assert not support[:top].any() and not support[bottom:].any()
        assert not support[:, :left].any() and not support[:, right:].any()
        unclipped = fields[number].box(y, x, clip=False)
        if unclipped == (top, left, bottom, right):
            assert bounding_box(support) == unclipped, (seed, (y, x), net)


@pytest.mark.parametrize("seed", range(6))
def test_max_pool_has_the_field_of_its_average_twin(seed):
    """A max-pool sends its gradient to one input only, so compare its field with the gradient support of the
    same net with each max-pool replaced by an average pool of the same geometry."""
    rng = np.random.default_rng(seed)
    k, s, p = int(rng.integers(2, 4)), int(rng.integers(1, 3)), int(rng.integers(0, 2))
    s = min(s, k)
    max_net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(k, s, p),
                            nn.Conv2d(2, 2, 3, stride=2, padding=1)).double()
    avg_net = nn.Sequential(max_net[0], nn.Identity(), nn.AvgPool2d(k, s, p), max_net[3]).double()
    for m in avg_net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight)
    size = 21
    fields = receptive_fields(max_net, (1, size, size))
    _, _, h, w = max_net(torch.zeros(1, 1, size, size, dtype=torch.float64)).shape
    for y, x in {(0, 0), (h - 1, w - 1), (h // 2, w // 3)}:
        support = gradient_support(avg_net, size, 3, 1, y, x)
        top, left, bottom, right = fields[4].box(y, x)
        expected = torch.zeros_like(support)
        expected[top:bottom, left:right] = True
        assert torch.equal(support, expected)


def test_fully_connected_units_see_the_whole_image():
    net = build_model("mnist")
    fields = receptive_fields(net)
    flatten = next(f for f in fields.values() if f.layer.kind == "flatten").layer.number
    for number, field in fields.items():
        assert field.whole == (number >= flatten)
    assert receptive_box(net, "fc1", 0, 0) == (0, 0, 28, 28)
    # a unit of the last conv map of the MNIST net: 19x19 field, jump 4, clipped at the border
    assert receptive_box(net, "conv3", 0, 0) == (0, 0, 10, 10)
    assert receptive_box(net, "conv3", 6, 6) == (15, 15, 28, 28)


def test_unclipped_boxes_have_the_field_size_and_arrays_work():
    field = receptive_fields(build_model("an8flower-single"))[8]
    top, left, bottom, right = field.box(np.arange(6), np.zeros(6, int), clip=False)
    assert np.all(bottom - top == field.size[0]) and np.all(right - left == field.size[1])
    assert np.all(np.diff(top) == field.jump[0])


def test_bad_input():
    net = build_model("mnist")
    with pytest.raises(ValueError, match="outside the 7x7"):
        receptive_box(net, "conv3", 7, 0)
    with pytest.raises(ValueError, match="unknown layer"):
        receptive_box(net, "conv9", 0, 0)
    with pytest.raises(ValueError, match="vector of units"):
        receptive_box(net, "fc1", 1, 0)
    with pytest.raises(ValueError, match="receptive field is unknown"):
        receptive_fields(nn.Sequential(nn.Conv2d(1, 1, 3), nn.Upsample(scale_factor=2)), (1, 8, 8))


def test_table_and_model_untouched():
    net = build_model("an8flower-single").train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    text = format_receptive_table(receptive_fields(net))
    assert "163x163" in text and "whole image" in text
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not any(m._forward_hooks for m in net.modules())
