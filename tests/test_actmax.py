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


# --- dead units, stalls and the step size (issue #14) ------------------------------------------------------

from vefi.actmax import StalledError, StalledWarning, _RedirectedReLU  # noqa: E402

_PLAIN = dict(l2=0.0, blur_every=0, jitter=0, clip=False, show_progress=False)


def _small(dead_bias: float = -5.0):
    """conv(1->3, 3x3) -> ReLU (in place) -> max-pool 2 -> fc(3*4*4 -> 2). Channel 1 has a bias so negative
    that it is off everywhere on a grey image; channel 2 has zero weights (no input reaches it at all)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(3 * 4 * 4, 2))
    with torch.no_grad():
        net[0].weight.mul_(3.0)
        net[0].bias[1] = dead_bias
        net[0].weight[2].zero_()
        net[0].bias[2] = -1.0
    return net


def test_synthesis_raises_the_response_of_a_small_model():
    net = _small()
    before = _state(net)
    # no jitter: on an 8x8 image a roll of 2 pixels moves a 3x3 field off the centre unit it is climbing
    res = activation_maximisation(net, [0, 1, (1, 0), (3, 0)], steps=30, input_shape=(1, 8, 8),
                                  reduction="centre", jitter=0, show_progress=False)
    # against the value on the start image, computed here without vefi
    with torch.no_grad():
        logits = net(res.start)
        pooled = net[:3](res.start)
        after = net[:3](res.images)
    torch.testing.assert_close(res.initial[:2], logits[torch.arange(2), torch.arange(2)])
    torch.testing.assert_close(res.initial[3], pooled[3, 0, 2, 2])
    assert after[3, 0, 2, 2] > pooled[3, 0, 2, 2] + 0.5
    assert (res.final > res.initial).all() and res.moved.all()
    _assert_same(net, before)


def test_a_unit_off_on_the_start_image_is_revived_by_redirect():
    net = _small()
    start = torch.full((1, 8, 8), 0.5)
    with torch.no_grad():
        assert net[:2](start[None])[0, 1].abs().max() == 0  # dead on the start image: zero gradient
    with pytest.warns(StalledWarning, match=r"2 relu #1 \(0 -> 0\)"):
        plain = activation_maximisation(net, [(2, 1)], steps=40, start=start, input_shape=(1, 8, 8),
                                        redirect=False, **_PLAIN)
    assert not plain.moved.any() and torch.equal(plain.images, plain.start)
    res = activation_maximisation(net, [(2, 1), (3, 1)], steps=40, start=start, input_shape=(1, 8, 8), **_PLAIN)
    assert res.moved.all() and (res.final > 0).all()


def test_a_unit_no_gradient_reaches_warns_or_raises_and_leaves_the_model():
    net = _small()
    before = _state(net)
    with pytest.warns(StalledWarning, match=r"1 of 2 targets.*2 relu #2"):
        res = activation_maximisation(net, [(2, 0), (2, 2)], steps=20, input_shape=(1, 8, 8), show_progress=False)
    assert res.moved.tolist() == [True, False] and res.labels == ["2 relu #0", "2 relu #2"]
    with pytest.raises(StalledError, match="2 relu #2"):
        activation_maximisation(net, [(2, 2)], steps=5, input_shape=(1, 8, 8), on_stall="raise",
                                show_progress=False)
    _assert_same(net, before)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = activation_maximisation(net, [(2, 2)], steps=5, input_shape=(1, 8, 8), on_stall="ignore",
                                        show_progress=False)
    assert not quiet.moved.any()
    with pytest.raises(ValueError, match="on_stall"):
        activation_maximisation(net, [1], input_shape=(1, 8, 8), on_stall="loud", show_progress=False)
    with pytest.raises(ValueError, match="min_rise"):
        activation_maximisation(net, [1], input_shape=(1, 8, 8), min_rise=-1, show_progress=False)


def test_redirected_relu_backward_against_its_definition():
    torch.manual_seed(1)
    x = torch.randn(4, 6, requires_grad=True)
    with torch.no_grad():
        x[2] = -x[2].abs() - 0.1  # row 2: every unit off
    g = torch.randn(4, 6)
    g[1] = 0.0
    g[3] = torch.where(x[3] > 0, torch.zeros(6), g[3])  # row 3: gradient only where units are off
    (got,) = torch.autograd.grad(_RedirectedReLU.apply(x), x, g)
    expected = torch.empty(4, 6)
    for i in range(4):
        true = g[i] * (x[i] > 0)
        # a row the true gradient does not reach at all gets the upward part of the gradient at off units
        expected[i] = true if true.abs().max() > 0 else torch.where(x[i] > 0, g[i], g[i].clamp(min=0))
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(_RedirectedReLU.apply(x), torch.relu(x))


def test_redirect_changes_nothing_where_the_gradient_flows():
    net = _net()
    a = activation_maximisation(net, [3, 7], steps=10, jitter=0, redirect=False, show_progress=False)
    b = activation_maximisation(net, [3, 7], steps=10, jitter=0, redirect=True, show_progress=False)
    torch.testing.assert_close(a.images, b.images)


def test_functional_relu_in_a_custom_forward_is_redirected():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)
            self.fc = nn.Linear(2 * 6 * 6, 2)

        def forward(self, x):
            return self.fc(torch.nn.functional.relu(self.conv(x), inplace=True).flatten(1))

    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.conv.bias.fill_(-1.0)  # both channels off on the start image: the logits get no gradient
    with pytest.warns(StalledWarning):
        plain = activation_maximisation(net, [0], steps=30, input_shape=(1, 6, 6), redirect=False, **_PLAIN)
    with torch.no_grad():
        assert net.conv(plain.start).max() < 0
    res = activation_maximisation(net, [0], steps=30, input_shape=(1, 6, 6), **_PLAIN)
    assert res.moved.all()


def test_step_size_is_in_pixels_over_the_pixels_the_target_sees():
    # a conv unit at the centre of a 16x16 image sees 3x3 pixels: each plain step moves them by lr on
    # average, and nothing else (the old mean over the whole image made the step 256/9 times larger)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 16 * 16, 2))
    res = activation_maximisation(net, [(1, 0)], steps=1, lr=0.01, reduction="centre", input_shape=(1, 16, 16),
                                  **_PLAIN)
    step = (res.images - res.start)[0, 0]
    assert (step[7:10, 7:10] != 0).all() and step.count_nonzero() == 9
    torch.testing.assert_close(step[7:10, 7:10].abs().mean(), torch.tensor(0.01))
