"""Activation maximisation raises its target; filters and top patches; the model is left untouched."""

import numpy as np
import pytest
import torch
from torch import nn

from vefi.actmax import activation_maximisation, filters, top_patches, unit_responses
from vefi.book.data import ImageSet, dataset_info
from vefi.descriptors import Feature
from vefi.layers import layer_table
from vefi.book.models import build_model
from vefi.receptive import receptive_box


def _net():
    torch.manual_seed(0)
    return build_model("mnist")


def _state(net):
    return ([p.detach().clone() for p in net.parameters()], [p.requires_grad for p in net.parameters()],
            [m.training for m in net.modules()],
            sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks) for m in net.modules()))


def _assert_same(net, before):
    params, grads, training, hooks = _state(net)
    assert all(torch.equal(a, b) for a, b in zip(params, before[0]))
    assert grads == before[1] and training == before[2] and hooks == before[3]
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("reduction", ["mean", "centre"])
def test_class_and_units_increase(reduction):
    net = _net().train()
    before = _state(net)
    targets = [3, ("conv2", 5), (Feature(6, "conv3", "conv", 1)), ("fc2", 7)]
    res = activation_maximisation(net, targets, steps=40, lr=0.05, reduction=reduction, show_progress=False)
    assert res.images.shape == (4, 1, 28, 28) and res.trace.shape == (40, 4)
    assert res.images.min() >= 0 and res.images.max() <= 1
    assert (res.final > res.initial).all()
    assert (res.trace[-1] > res.trace[0]).all()
    # the start image's objective, computed directly
    with torch.no_grad():
        logits = net.eval()(res.start)
    net.train()
    torch.testing.assert_close(res.initial[0], logits[0, 3])
    _assert_same(net, before)


def test_without_regularisers_and_deterministic():
    net = _net()
    kwargs = dict(steps=20, l2=0.0, blur_every=0, jitter=0, clip=False, show_progress=False)
    a = activation_maximisation(net, [1, 2], seed=5, **kwargs)
    b = activation_maximisation(net, [1, 2], seed=5, **kwargs)
    assert torch.equal(a.images, b.images)
    assert (a.final > a.initial).all()
    # with jitter 0 the trace is the objective of the image each step started from
    torch.testing.assert_close(a.trace[0], a.initial)
    c = activation_maximisation(net, [1, 2], seed=6, **kwargs)
    assert not torch.equal(a.start, c.start)


def test_each_row_ascends_its_own_target():
    net = _net()
    both = activation_maximisation(net, [4, 8], steps=10, jitter=0, show_progress=False)
    one = activation_maximisation(net, [8], steps=10, jitter=0, start=both.start[1:], show_progress=False)
    torch.testing.assert_close(both.images[1:], one.images, atol=1e-5, rtol=0)


def test_inplace_relu_does_not_change_the_unit_objective():
    # conv1 is followed by an in-place ReLU: the objective must be the conv output, which can be negative
    net = _net()
    res = activation_maximisation(net, [("conv1", 0)], steps=1, reduction="centre", show_progress=False)
    with torch.no_grad():
        direct = net.conv1(res.start)[0, 0, 14, 14]
    torch.testing.assert_close(res.initial[0], direct)


@pytest.mark.parametrize("targets, kwargs, error, match", [
    ([("conv9", 0)], {}, ValueError, "unknown layer"),
    ([("conv2", 64)], {}, ValueError, "out of range"),
    ([10], {}, ValueError, "out of range"),
    ([], {}, ValueError, "empty"),
    (["conv2"], {}, TypeError, "class index"),
    ([1], {"steps": 0}, ValueError, "steps"),
    ([1], {"reduction": "max"}, ValueError, "reduction"),
    ([1], {"start": torch.full((1, 28, 28), float("nan"))}, ValueError, "NaN"),
    ([1], {"start": torch.rand(1, 1, 14, 14)}, ValueError, "shape"),
])
def test_bad_input(targets, kwargs, error, match):
    net = _net()
    before = _state(net)
    with pytest.raises(error, match=match):
        activation_maximisation(net, targets, show_progress=False, **kwargs)
    _assert_same(net, before)


def test_filters():
    net = _net()
    w = filters(net)
    assert w.shape == (32, 1, 5, 5)
    assert torch.allclose(w.amin((1, 2, 3)), torch.zeros(32)) and torch.allclose(w.amax((1, 2, 3)), torch.ones(32))
    raw = net.conv1.weight.detach()
    i = 7
    expected = (raw[i] - raw[i].min()) / (raw[i].max() - raw[i].min())
    torch.testing.assert_close(w[i], expected)
    with pytest.raises(ValueError, match="input channels"):
        filters(net, "conv2")
    with pytest.raises(ValueError, match="not a Conv2d"):
        filters(net, "relu1")


def test_top_patches_match_a_direct_loop():
    net = _net()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(30, 1, 28, 28), dtype=np.uint8)
    data = ImageSet(dataset_info("mnist"), "test", images, np.zeros(30, dtype=np.int64))
    response, position = unit_responses(net, data, "conv2", 3, batch_size=7, show_progress=False)
    layer = [lay for lay in layer_table(net) if lay.name == "conv2"][0]
    for i in range(30):
        with torch.no_grad():
            out = nn.Sequential(*list(net.eval())[: layer.number])(data.batch([i]))[0, 3]
        assert torch.isclose(response[i], out.max())
        # the position is a maximum of the map up to rounding (batching changes the last digits)
        torch.testing.assert_close(out[tuple(position[i])], out.max())
    found = top_patches(net, data, "conv2", 3, k=5, batch_size=7, show_progress=False)
    assert found.index.tolist() == response.topk(5).indices.tolist()
    for i, box, crop, pos in zip(found.index.tolist(), found.boxes, found.patches, found.position.tolist()):
        assert box == receptive_box(net, layer.number, *pos)
        top, left, bottom, right = box
        assert torch.equal(crop, data.batch([i])[0, :, top:bottom, left:right])
    with pytest.raises(ValueError, match="k must be"):
        top_patches(net, data, "conv2", 3, k=0, show_progress=False)
