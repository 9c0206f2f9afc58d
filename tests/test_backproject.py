"""Back-projection: the stride fix against autograd through the stride-1 layer, the rules against captum,
the model left as it was, and bad input."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from vefi.backproject import (_LocalResponseNorm, _resample, _subpixel_transposed_conv, backproject,
                              conv_backproject, heatmap, maxpool_backproject, stride1_size,
                              strongest_channels)
from vefi.book.models import build_model

# captum's class for each rule (with the stride fix off, the rules are the peer's)
PEERS = {"guided": "NeuronGuidedBackprop", "deconvnet": "NeuronDeconvolution", "backprop": "NeuronGradient"}


def seeded_model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name).double().eval()


def out_of_place_twin(model: nn.Module) -> nn.Module:
    """captum's hooks cannot handle in-place ReLU: give it a twin with out-of-place ReLUs."""
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    return twin


def captum_maps(captum_attr, model, images, features, rule, source="map"):
    twin = out_of_place_twin(model)
    modules = dict(twin.named_modules())
    maps = []
    for name, channel in features:
        if source == "map":
            def selector(a, c=channel):  # d/da 0.5 * sum(a_c^2) = a_c: the activation map as seed
                return 0.5 * (a[:, c] ** 2).reshape(a.shape[0], -1).sum(1)
        else:
            selector = channel
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            maps.append(getattr(captum_attr, PEERS[rule])(twin, modules[name]).attribute(images, selector))
    return torch.stack(maps, 1)


def nearest(signal, size):
    """Nearest-neighbour resampling, pixel by pixel: output i takes input floor((i + 1/2) * in / out)."""
    rows = [min((2 * i + 1) * signal.shape[-2] // (2 * size[0]), signal.shape[-2] - 1) for i in range(size[0])]
    cols = [min((2 * j + 1) * signal.shape[-1] // (2 * size[1]), signal.shape[-1] - 1) for j in range(size[1])]
    return signal[..., rows, :][..., cols]


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(getattr(m, "_backward_pre_hooks", {})) for m in model.modules())


# ----------------------------------------------------------------------------------------------------
# The layer-level fix against the slow, obviously right reference: autograd through the stride-1 layer.

geometry = st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(2, 4), st.integers(1, 4),
                     st.integers(0, 2), st.integers(0, 2), st.integers(0, 8), st.integers(0, 8))


@settings(max_examples=40, deadline=None)
@given(geometry, st.integers(1, 2), st.integers(0, 10_000))
def test_conv_fix_equals_autograd_through_stride1_conv(g, dilation, seed):
    m_h, m_w, s_h, s_w, o_h, o_w, extra_h, extra_w = g
    a = (dilation * (m_h - 1) + 1 + extra_h, dilation * (m_w - 1) + 1 + extra_w)  # at least one output
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(3, 2, m_h, m_w, generator=gen, dtype=torch.float64)
    out = F.conv2d(torch.zeros(1, 2, *a, dtype=torch.float64), weight, stride=(s_h, s_w), padding=(o_h, o_w),
                   dilation=dilation)
    signal = torch.randn(out.shape, generator=gen, dtype=torch.float64)

    fixed = conv_backproject(signal, weight, a, stride=(s_h, s_w), padding=(o_h, o_w), dilation=dilation)
    x = torch.zeros(1, 2, *a, dtype=torch.float64, requires_grad=True)
    y = F.conv2d(x, weight, padding=(o_h, o_w), dilation=dilation)
    (reference,) = torch.autograd.grad(y, x, nearest(signal, y.shape[-2:]))
    assert fixed.shape == (1, 2, *a)
    assert y.shape[-2:] == stride1_size(a, (m_h, m_w), (o_h, o_w), dilation)
    torch.testing.assert_close(fixed, reference)

    plain = conv_backproject(signal, weight, a, stride=(s_h, s_w), padding=(o_h, o_w), dilation=dilation,
                             stride_fix=False)
    x = torch.zeros(1, 2, *a, dtype=torch.float64, requires_grad=True)
    y = F.conv2d(x, weight, stride=(s_h, s_w), padding=(o_h, o_w), dilation=dilation)
    torch.testing.assert_close(plain, torch.autograd.grad(y, x, signal)[0])


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 4), st.integers(1, 3), st.integers(2, 3), st.integers(1, 3), st.integers(0, 1),
       st.integers(0, 9), st.integers(0, 9), st.integers(0, 10_000))
def test_maxpool_fix_equals_autograd_through_stride1_pool(m_h, m_w, s_h, s_w, pad, extra_h, extra_w, seed):
    pad = (min(pad, m_h // 2), min(pad, m_w // 2))
    a = (m_h + extra_h, m_w + extra_w)
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(2, 3, *a, generator=gen, dtype=torch.float64)
    out = F.max_pool2d(inputs, (m_h, m_w), (s_h, s_w), pad)
    signal = torch.randn(out.shape, generator=gen, dtype=torch.float64)

    fixed = maxpool_backproject(signal, inputs, (m_h, m_w), stride=(s_h, s_w), padding=pad)
    x = inputs.clone().requires_grad_(True)
    y = F.max_pool2d(x, (m_h, m_w), 1, pad)
    (reference,) = torch.autograd.grad(y, x, nearest(signal, y.shape[-2:]))
    assert fixed.shape == inputs.shape
    torch.testing.assert_close(fixed, reference)

    switches = maxpool_backproject(signal, inputs, (m_h, m_w), stride=(s_h, s_w), padding=pad,
                                   pool_fix="switches")
    x = inputs.clone().requires_grad_(True)
    (standard,) = torch.autograd.grad(F.max_pool2d(x, (m_h, m_w), (s_h, s_w), pad), x, signal)
    torch.testing.assert_close(switches, standard)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.integers(1, 5), st.integers(1, 5), st.integers(0, 4),
       st.integers(0, 4), st.integers(0, 12), st.integers(0, 12), st.integers(0, 10_000))
def test_subpixel_transposed_conv_equals_the_gradient(m_h, m_w, s_h, s_w, p_h, p_w, extra_h, extra_w, seed):
    a = (max(m_h - 2 * p_h, 1) + extra_h, max(m_w - 2 * p_w, 1) + extra_w)
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(4, 3, m_h, m_w, generator=gen, dtype=torch.float64)
    x = torch.zeros(2, 3, *a, dtype=torch.float64, requires_grad=True)
    y = F.conv2d(x, weight, stride=(s_h, s_w), padding=(p_h, p_w))
    signal = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    fast = _subpixel_transposed_conv(signal, weight, a, (s_h, s_w), (p_h, p_w))
    torch.testing.assert_close(fast, torch.autograd.grad(y, x, signal)[0])


@pytest.mark.parametrize("size", [1, 2, 4, 5])
def test_local_response_norm_gradient(size):
    gen = torch.Generator().manual_seed(size)
    x = torch.randn(2, 7, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    signal = torch.randn(2, 7, 5, 4, generator=gen, dtype=torch.float64)
    args = (size, 0.3, 0.75, 1.5)
    torch.testing.assert_close(_LocalResponseNorm.apply(x, *args), F.local_response_norm(x, *args))
    (ours,) = torch.autograd.grad(_LocalResponseNorm.apply(x, *args), x, signal)
    (reference,) = torch.autograd.grad(F.local_response_norm(x, *args), x, signal)
    torch.testing.assert_close(ours, reference)


def test_resampling_is_nearest_exact():
    """Equal to F.interpolate's "nearest-exact" except at exact ties, which round up (float rounding in
    PyTorch sends some of them down)."""
    for dtype in (torch.float32, torch.float64):
        sizes = [(2, 3, 61, 7), (27, 27, 106, 106), (13, 5, 27, 11), (6, 6, 6, 9)]
        sizes += [(b, 61 - b, t, 2 * t) for b in range(1, 40, 4) for t in range(b, 130, 17)]
        for b_h, b_w, t_h, t_w in sizes:
            signal = torch.arange(b_h * b_w, dtype=dtype).view(1, 1, b_h, b_w)
            ours = _resample(signal, (t_h, t_w))
            theirs = F.interpolate(signal, size=(t_h, t_w), mode="nearest-exact")
            tie_h = ((2 * torch.arange(t_h) + 1) * b_h) % (2 * t_h) == 0
            tie_w = ((2 * torch.arange(t_w) + 1) * b_w) % (2 * t_w) == 0
            clear = ~tie_h[:, None] & ~tie_w[None, :]
            assert torch.equal(ours[0, 0][clear], theirs[0, 0][clear]), (b_h, b_w, t_h, t_w)
            # at a tie, (i + 1/2) * in / out is a whole number j: the source is j itself
            for i in torch.nonzero(tie_w).flatten().tolist():
                j = min((2 * i + 1) * b_w // (2 * t_w), b_w - 1)
                assert torch.equal(ours[0, 0, :, i], _resample(signal[..., j:j + 1], (t_h, 1))[0, 0, :, 0])


def test_fix_through_a_model_equals_the_layer_reference():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(2, 4, (5, 3), stride=(3, 2), padding=(2, 1)), nn.ReLU(),
                        nn.MaxPool2d(3, stride=2, padding=1), nn.Conv2d(4, 3, 3)).double()
    x = torch.rand(1, 2, 23, 17, dtype=torch.float64)
    maps = backproject(net, x, [(4, 1)], rule="backprop", stride_fix=True, pool_fix="stride1")[0, 0]
    # by hand: seed = map of channel 1, then conv4 (stride 1), pool (fix), relu, conv1 (fix)
    a1 = net[0](x)
    r1 = torch.relu(a1)
    a3 = net[2](r1)
    a4 = net[3](a3)
    seed = torch.zeros_like(a4)
    seed[:, 1] = a4[:, 1]
    g = conv_backproject(seed, net[3].weight, a3.shape[-2:], stride=1)
    g = maxpool_backproject(g, r1, 3, stride=2, padding=1, pool_fix="stride1")
    g = g * (a1 > 0)
    g = conv_backproject(g, net[0].weight, x.shape[-2:], stride=(3, 2), padding=(2, 1))
    torch.testing.assert_close(maps, g[0].detach())


# ----------------------------------------------------------------------------------------------------
# Shapes on random geometries

@settings(max_examples=25, deadline=None)
@given(st.integers(9, 40), st.integers(9, 40), st.integers(1, 7), st.integers(1, 4), st.integers(0, 3),
       st.integers(2, 3), st.integers(1, 3), st.sampled_from(["guided", "deconvnet", "backprop"]),
       st.sampled_from(["stride1", "switches"]), st.booleans())
def test_maps_have_the_input_shape(h, w, kernel, stride, pad, pool, pool_stride, rule, pool_fix, fix):
    kernel = min(kernel, h + 2 * pad, w + 2 * pad)
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, kernel, stride=stride, padding=pad)
    with torch.no_grad():
        side = conv(torch.zeros(1, 3, h, w)).shape[-2:]
    pool = min(pool, *side)
    net = nn.Sequential(conv, nn.ReLU(inplace=True), nn.MaxPool2d(pool, pool_stride), nn.Flatten())
    with torch.no_grad():
        units = net(torch.zeros(1, 3, h, w)).shape[1]
    net.append(nn.Linear(units, 5))
    x = torch.rand(2, 3, h, w)
    maps = backproject(net, x, [(1, 0), (3, 2), (5, 4)], rule=rule, stride_fix=fix, pool_fix=pool_fix)
    assert maps.shape == (2, 3, 3, h, w)
    assert torch.isfinite(maps).all()


# ----------------------------------------------------------------------------------------------------
# With the fix off: the peers

@pytest.mark.parametrize("rule", ["guided", "deconvnet", "backprop"])
def test_map_source_equals_captum_an8flower(peer, rule):
    captum_attr = peer("captum.attr")
    net = seeded_model("an8flower-single")
    x = torch.rand(2, 3, 112, 112, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    features = [("conv1", 3), ("norm1", 7), ("relu2", 5), ("conv4", 11), ("pool3", 2), ("fc1", 10),
                ("relu6", 3)]
    ours = backproject(net, x, features, rule=rule, stride_fix=False)
    theirs = captum_maps(captum_attr, net, x, features, rule)
    assert theirs.abs().amax(dim=(0, 2, 3, 4)).min() > 0  # every feature reaches the input
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("rule", ["guided", "deconvnet", "backprop"])
def test_unit_source_equals_captum_mnist(peer, rule):
    captum_attr = peer("captum.attr")
    net = seeded_model("mnist")
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    features = [("conv2", 5, (3, 4)), ("relu3", 1, (6, 0)), ("fc1", 17), ("fc3", 2)]
    ours = backproject(net, x, features, rule=rule, stride_fix=False, source="unit")
    units = [(f[0], (f[1], *f[2]) if len(f) == 3 else f[1]) for f in features]
    theirs = captum_maps(captum_attr, net, x, units, rule, source="unit")
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)
    # plain gradients also from torch.autograd, the most obvious reference of all
    if rule == "backprop":
        xg = x.clone().requires_grad_(True)
        twin = out_of_place_twin(net)
        (grad,) = torch.autograd.grad(twin(xg)[:, 2].sum(), xg)
        torch.testing.assert_close(ours[:, 3], grad)


def test_unit_source_defaults_to_the_strongest_position():
    net = seeded_model("mnist")
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        act = nn.Sequential(*list(out_of_place_twin(net))[:5])(x)[:, 7]
    ours = backproject(net, x, [("relu2", 7)], source="unit", stride_fix=False)
    for i in range(2):
        y, x_ = divmod(int(act[i].argmax()), act.shape[-1])
        ref = backproject(net, x[i:i + 1], [("relu2", 7, (y, x_))], source="unit", stride_fix=False)
        torch.testing.assert_close(ours[i], ref[0])


def test_other_layer_types_equal_captum(peer):
    captum_attr = peer("captum.attr")
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.LocalResponseNorm(3),
                        nn.AvgPool2d(2), nn.Conv2d(6, 8, 3, stride=2), nn.ReLU(), nn.Dropout(0.5),
                        nn.AdaptiveMaxPool2d(3), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 6),
                        nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).double()
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 2)
    net.eval()
    x = torch.rand(2, 3, 20, 20, dtype=torch.float64)
    features = [("2", 1), ("4", 3), ("8", 5), ("9", 7), ("13", 4), ("14", 1)]
    for rule in PEERS:
        ours = backproject(net, x, features, rule=rule, stride_fix=False)
        theirs = captum_maps(captum_attr, net, x, features, rule)
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------------------------------
# Batching: one call equals one call per image and per feature

def test_batched_equals_one_call_per_image_and_feature():
    net = seeded_model("mnist")
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64)
    per_image = [[(4, 1), (9, 3)], [(6, 2), (4, 1)], [(12, 0), (1, 5)]]
    batched = backproject(net, x, per_image)
    chunked = backproject(net, x, per_image, batch_size=2)
    torch.testing.assert_close(chunked, batched)
    for i, feats in enumerate(per_image):
        for j, feat in enumerate(feats):
            torch.testing.assert_close(batched[i, j], backproject(net, x[i], [feat])[0, 0])


# ----------------------------------------------------------------------------------------------------
# ReLU in any form

class FunctionalNet(nn.Module):
    """The same layers as a small nn.Sequential, with every ReLU written a different functional way."""

    def __init__(self, seq: nn.Sequential):
        super().__init__()
        self.conv1, self.pool, self.conv2, self.fc = seq[0], seq[2], seq[3], seq[6]

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = self.pool(x)
        x = F.relu(self.conv2(x), inplace=True)
        x = x.flatten(1)
        return self.fc(x).relu()


def relu_twins():
    torch.manual_seed(5)
    seq = nn.Sequential(nn.Conv2d(1, 4, 5, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2),
                        nn.Conv2d(4, 6, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 2 * 2, 3),
                        nn.ReLU()).double()
    inplace = copy.deepcopy(seq)
    for m in inplace.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = True
    return seq, inplace, FunctionalNet(copy.deepcopy(seq))


@pytest.mark.parametrize("rule", ["guided", "deconvnet", "backprop"])
@pytest.mark.parametrize("fix", [True, False])
def test_inplace_and_functional_relu_give_the_same_maps(rule, fix):
    seq, inplace, functional = relu_twins()
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    # layer numbers differ (the functional net has no ReLU modules); the modules are the same
    feats = [("0", 2), ("3", 4), ("6", 1)]
    fun_feats = [("conv1", 2), ("conv2", 4), ("fc", 1)]
    ref = backproject(seq, x, feats, rule=rule, stride_fix=fix)
    assert ref.abs().sum() > 0
    torch.testing.assert_close(backproject(inplace, x, feats, rule=rule, stride_fix=fix), ref)
    torch.testing.assert_close(backproject(functional, x, fun_feats, rule=rule, stride_fix=fix), ref)


def test_rules_differ_where_they_should():
    seq, _, _ = relu_twins()
    x = torch.rand(1, 1, 28, 28, dtype=torch.float64)
    maps = {r: backproject(seq, x, [("6", 1)], rule=r) for r in ("guided", "deconvnet", "backprop")}
    assert not torch.allclose(maps["guided"], maps["backprop"])
    assert not torch.allclose(maps["guided"], maps["deconvnet"])


# ----------------------------------------------------------------------------------------------------
# The model is left exactly as it was

def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()],
            [p.requires_grad for p in model.parameters()], hook_count(model))


def assert_unchanged(model, before):
    state, training, grads, hooks = snapshot(model)
    assert state.keys() == before[0].keys()
    for k in state:
        assert torch.equal(state[k], before[0][k]), k
    assert training == before[1]
    assert grads == before[2]
    assert hooks == before[3]
    assert not torch.overrides._get_current_function_mode_stack()


def test_model_left_as_it_was():
    net = seeded_model("an8flower-single")
    net.train()
    net.fc1.weight.requires_grad_(False)
    net.conv2.register_forward_hook(lambda *a: None)  # the user's own hook stays, ours go
    before = snapshot(net)
    x = torch.rand(1, 3, 112, 112, dtype=torch.float64)
    backproject(net, x, [("conv2", 1), ("fc2", 3)])
    assert_unchanged(net, before)


class Tanhy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, stride=2)
        self.fc = nn.Linear(2 * 13 * 13, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def test_model_left_as_it_was_when_raising():
    net = Tanhy().double().train()
    before = snapshot(net)
    with pytest.raises(TypeError, match=r"tanh.*\(Tanhy\)"):
        backproject(net, torch.rand(1, 1, 28, 28, dtype=torch.float64), [("fc", 0)])
    assert_unchanged(net, before)
    # a feature before the tanh is fine: the tanh is never reached
    assert backproject(net, torch.rand(1, 1, 28, 28, dtype=torch.float64), [("conv", 1)]).abs().sum() > 0
    assert_unchanged(net, before)


# ----------------------------------------------------------------------------------------------------
# Bad input gets a clear error

@pytest.fixture(scope="module")
def mnist_net():
    return seeded_model("mnist")


@pytest.mark.parametrize("features, error, match", [
    ([("conv9", 0)], ValueError, "unknown layer 'conv9'"),
    ([(99, 0)], ValueError, "unknown layer 99"),
    ([("conv1", 32)], ValueError, "channel 32 out of range.*32 channels"),
    ([("fc3", -1)], ValueError, "channel -1 out of range.*10 units"),
    ([("conv1", 1.5)], TypeError, "channel must be an int"),
    ([("conv1", 0, (28, 0))], ValueError, "position"),
    ([("fc1", 0, (0, 0))], ValueError, "position"),
    ([], ValueError, "non-empty"),
    (["conv1"], TypeError, "features must be"),
    ([[("conv1", 0)], [("conv1", 0)]], ValueError, "one list per image"),
])
def test_bad_features(mnist_net, features, error, match):
    with pytest.raises(error, match=match):
        backproject(mnist_net, torch.rand(1, 1, 28, 28, dtype=torch.float64), features)


def test_bad_images_and_options(mnist_net):
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"shape \(N, 1, 28, 28\).*\(2, 3, 28, 28\)"):
        backproject(mnist_net, torch.rand(2, 3, 28, 28, dtype=torch.float64), [(1, 0)])
    with pytest.raises(ValueError, match="shape"):
        backproject(mnist_net, torch.rand(28, 28, dtype=torch.float64), [(1, 0)])
    bad = x.clone()
    bad[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        backproject(mnist_net, bad, [(1, 0)])
    with pytest.raises(TypeError, match="torch.Tensor"):
        backproject(mnist_net, x.numpy(), [(1, 0)])
    with pytest.raises(ValueError, match="rule must be one of"):
        backproject(mnist_net, x, [(1, 0)], rule="lrp")
    with pytest.raises(ValueError, match="pool_fix must be one of"):
        backproject(mnist_net, x, [(1, 0)], pool_fix="none")
    with pytest.raises(ValueError, match="source must be one of"):
        backproject(mnist_net, x, [(1, 0)], source="activation")
    with pytest.raises(ValueError, match="one list per image"):
        backproject(mnist_net, x, [[(1, 0)], [(1, 0)], [(1, 0)]])


def test_unknown_nonlinearity_module_is_named():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 26 * 26, 2))
    before = snapshot(net)
    with pytest.raises(TypeError, match=r"layer 2 '1' \(Tanh\)"):
        backproject(net, torch.rand(1, 1, 28, 28), [(4, 0)])
    assert_unchanged(net, before)


# ----------------------------------------------------------------------------------------------------
# Helpers

def test_strongest_channels_by_brute_force():
    net = seeded_model("mnist")
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64)
    feats = strongest_channels(net, x, ["relu1", 6, "fc2"], top=2)
    twin = out_of_place_twin(net)
    with torch.no_grad():
        acts = {}
        h = x
        for number, module in enumerate(twin, start=1):
            h = module(h)
            acts[number] = h
    for i in range(3):
        expected = []
        for number in (2, 6, 12):
            a = acts[number][i]
            norms = a.flatten(1).norm(dim=1) if a.dim() == 3 else a.abs()
            expected += [(number, int(c)) for c in norms.topk(2).indices]
        assert feats[i] == expected
    with pytest.raises(ValueError, match="unknown layer"):
        strongest_channels(net, x, ["nope"])
    with pytest.raises(ValueError, match="top must be"):
        strongest_channels(net, x, ["fc3"], top=11)


def test_heatmap():
    maps = torch.randn(2, 3, 3, 8, 9, dtype=torch.float64)
    maps[1, 2] = 0
    h = heatmap(maps)
    assert h.shape == (2, 3, 8, 9)
    assert torch.allclose(h.amax((-2, -1))[:, :2], torch.ones(2, 2, dtype=torch.float64))
    assert torch.all(h.amin((-2, -1))[:, :2] == 0) and torch.all(h[1, 2] == 0)
    m = maps[0, 1].abs().sum(0)
    torch.testing.assert_close(h[0, 1], (m - m.min()) / (m.max() - m.min()))
