"""Back-projection through the activations of modern networks (ReLU6, LeakyReLU, Hardswish, SiLU, GELU,
sigmoid gates), layer/group norm, depthwise and grouped convolutions and strided average pooling.

Every rule is checked against the slowest obvious reference: the network taken apart layer by layer, the
linear layers back-projected by autograd, each activation rule written out elementwise with the derivative
taken by autograd (backprop ``R f'``, deconvnet ``R [R > 0]``, guided ``R [R > 0] max(f', 0)``); the
stride fix against autograd through the stride-1 layer on the resampled signal; torchvision's MobileNets,
EfficientNet and ConvNeXt against ``torch.autograd``'s input gradient; ReLU-only models against captum."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn
from torchvision import models, ops

from vefi.backproject import (avgpool_backproject, backproject, conv_backproject, stride1_size,
                              strongest_channels)

RULES = ("backprop", "deconvnet", "guided")
DTYPE = torch.float64


def nearest(signal, size):
    """Nearest-neighbour resampling, pixel by pixel: output i takes input floor((i + 1/2) * in / out)."""
    rows = [min((2 * i + 1) * signal.shape[-2] // (2 * size[0]), signal.shape[-2] - 1) for i in range(size[0])]
    cols = [min((2 * j + 1) * signal.shape[-1] // (2 * size[1]), signal.shape[-1] - 1) for j in range(size[1])]
    return signal[..., rows, :][..., cols]


def through(layer, x, signal):
    """Back through a linear layer by autograd: the transpose of its Jacobian applied to ``signal``."""
    x = x.detach().requires_grad_(True)
    return torch.autograd.grad(layer(x), x, signal)[0]


def derivative(act, x):
    """f'(x) elementwise, by autograd."""
    x = x.detach().requires_grad_(True)
    return torch.autograd.grad(act(x).sum(), x)[0]


def activation_rule(act, x, signal, rule):
    """The rule of the module docstring, written out."""
    if rule == "backprop":
        return signal * derivative(act, x)
    if rule == "deconvnet":
        return signal.clamp(min=0)
    return signal.clamp(min=0) * derivative(act, x).clamp(min=0)


def map_seed(a, channel):
    seed = torch.zeros_like(a)
    seed[:, channel] = a[:, channel]
    return seed.detach()


def autograd_map(model, x, layer, channel):
    """d/dx 0.5 * sum(a_c^2) for the first call of module ``layer``: the gradient of the map seed."""
    captured = []

    def hook(module, inputs, output):
        if not captured:
            captured.append(output)
            return output.clone()  # later in-place ops of the model must not change the seeded map
        return None

    handle = layer.register_forward_hook(hook)
    try:
        x = x.clone().requires_grad_(True)
        model(x)
    finally:
        handle.remove()
    return torch.autograd.grad(0.5 * (captured[0][:, channel] ** 2).sum(), x)[0]


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(m._backward_pre_hooks) for m in model.modules())


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()],
            [p.requires_grad for p in model.parameters()], hook_count(model))


def assert_unchanged(model, before):
    state, training, grads, hooks = snapshot(model)
    assert state.keys() == before[0].keys()
    for k in state:
        assert torch.equal(state[k], before[0][k]), k
    assert (training, grads, hooks) == before[1:]
    assert not torch.overrides._get_current_function_mode_stack()


def close(ours, reference):
    """Equal up to float rounding, relative to the reference's scale (maps of random nets can be tiny)."""
    scale = float(reference.abs().max())
    assert scale > 0
    torch.testing.assert_close(ours, reference, rtol=1e-7, atol=1e-10 * scale)


# ----------------------------------------------------------------------------------------------------
# Activations: two of them in a row, against the layer-by-layer reference

ACTIVATIONS = {
    "relu6": lambda: nn.ReLU6(),
    "relu6-inplace": lambda: nn.ReLU6(inplace=True),
    "hardtanh": lambda: nn.Hardtanh(-0.3, 0.4),
    "leaky": lambda: nn.LeakyReLU(0.1),
    "leaky-negative": lambda: nn.LeakyReLU(-0.2),
    "hardswish": lambda: nn.Hardswish(inplace=True),
    "silu": lambda: nn.SiLU(),
    "silu-inplace": lambda: nn.SiLU(inplace=True),
    "gelu": lambda: nn.GELU(),
    "gelu-tanh": lambda: nn.GELU(approximate="tanh"),
    "sigmoid": lambda: nn.Sigmoid(),
    "hardsigmoid": lambda: nn.Hardsigmoid(),
    "relu": lambda: nn.ReLU(inplace=True),
}


def two_activation_net(make, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), make(), nn.Conv2d(5, 4, 3), make(),
                         nn.Conv2d(4, 3, 3)).to(DTYPE).eval()


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_rules_equal_the_layer_by_layer_reference(name, rule):
    net = two_activation_net(ACTIVATIONS[name])
    act = copy.deepcopy(net[1])
    act.inplace = False if hasattr(act, "inplace") else None
    # inputs around 0 and beyond the kinks (ReLU6 at 6, hardswish at +-3): every branch of every rule is hit
    x = 4 * torch.randn(2, 2, 9, 8, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    maps = backproject(net, x, [(5, 1), (3, 2)], rule=rule, stride_fix=False)

    a1 = net[0](x)
    a3 = net[2](act(a1))
    a5 = net[4](act(a3))
    r = through(net[4], act(a3), map_seed(a5, 1))
    r = activation_rule(act, a3, r, rule)
    r = through(net[2], act(a1), r)
    r = activation_rule(act, a1, r, rule)
    close(maps[:, 0], through(net[0], x, r))
    r = through(net[2], act(a1), map_seed(a3, 2))
    r = activation_rule(act, a1, r, rule)
    close(maps[:, 1], through(net[0], x, r))
    if rule == "backprop":  # and the most obvious reference of all
        close(maps[:, 0], autograd_map(net, x, net[4], 1))


def test_negative_derivatives_are_hit():
    """The inputs of the test above reach the negative lobes of SiLU, GELU and Hardswish, where guided and
    backprop part ways."""
    x = 4 * torch.randn(2, 2, 9, 8, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    for name in ("silu", "gelu", "hardswish"):
        net = two_activation_net(ACTIVATIONS[name])
        act = copy.deepcopy(net[1])
        act.inplace = False if hasattr(act, "inplace") else None
        assert (derivative(act, net[0](x)) < 0).float().mean() > 0.05, name
        guided = backproject(net, x, [(5, 1)], rule="guided", stride_fix=False)
        clamped_off = backproject(net, x, [(5, 1)], rule="backprop", stride_fix=False)
        assert not torch.allclose(guided, clamped_off)


class Functional(nn.Module):
    """conv - act - conv - act - conv, the activations called as functions in the forward."""

    def __init__(self, seq, first, second):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = seq[0], seq[2], seq[4]
        self.first, self.second = first, second

    def forward(self, x):
        return self.conv3(self.second(self.conv2(self.first(self.conv1(x)))))


FUNCTIONAL = {
    "silu": (lambda t: F.silu(t), lambda t: F.silu(t, inplace=True)),
    "gelu": (lambda t: F.gelu(t), lambda t: F.gelu(t, approximate="none")),
    "gelu-tanh": (lambda t: F.gelu(t, approximate="tanh"), lambda t: F.gelu(t, approximate="tanh")),
    "hardswish": (lambda t: F.hardswish(t), lambda t: F.hardswish(t, inplace=True)),
    "relu6": (lambda t: F.relu6(t), lambda t: F.hardtanh(t, 0.0, 6.0, inplace=True)),
    "leaky": (lambda t: F.leaky_relu(t, 0.1), lambda t: F.leaky_relu_(t, 0.1)),
    "sigmoid": (lambda t: torch.sigmoid(t), lambda t: t.sigmoid()),
    "hardsigmoid": (lambda t: F.hardsigmoid(t), lambda t: F.hardsigmoid(t, inplace=True)),
}


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("name", list(FUNCTIONAL))
def test_functional_activations_equal_the_modules(name, rule):
    seq = two_activation_net(ACTIVATIONS[name])
    fun = Functional(copy.deepcopy(seq), *FUNCTIONAL[name])
    x = 4 * torch.randn(2, 2, 9, 8, dtype=DTYPE, generator=torch.Generator().manual_seed(2))
    ref = backproject(seq, x, [("4", 0)], rule=rule)
    assert ref.abs().sum() > 0
    torch.testing.assert_close(backproject(fun, x, [("conv3", 0)], rule=rule), ref)


# ----------------------------------------------------------------------------------------------------
# Squeeze-and-excitation gates

class Gated(nn.Module):
    """conv - SiLU - x * gate(x) - conv, the gate a sigmoid/hardsigmoid of a small MLP of the pooled map."""

    def __init__(self, how="module"):
        super().__init__()
        self.how = how
        self.conv1, self.act, self.conv2 = nn.Conv2d(2, 6, 3, padding=1), nn.SiLU(inplace=True), nn.Conv2d(6, 3, 3)
        self.squeeze, self.excite = nn.Linear(6, 3), nn.Linear(3, 6)

    def gate(self, h):
        s = self.excite(torch.relu(self.squeeze(h.mean((2, 3)))))
        if self.how == "hardsigmoid":
            return F.hardsigmoid(s).view(-1, 6, 1, 1)
        return torch.sigmoid(s).reshape(s.shape[0], 6, 1, 1)

    def forward(self, x):
        h = self.act(self.conv1(x))
        g = self.gate(h)
        if self.how == "rmul":
            h = g * h
        elif self.how == "torch.mul":
            h = torch.mul(h, g)
        elif self.how == "imul":
            h = h.clone()
            h *= g
        elif self.how == "mul_":
            h = h.clone()
            h.mul_(g)  # in place, its result unused
        else:
            h = h * g
        return self.conv2(h)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("how", ["module", "hardsigmoid", "rmul", "torch.mul", "imul", "mul_"])
def test_gate_is_a_constant_weight_for_deconvnet_and_guided(how, rule):
    torch.manual_seed(3)
    net = Gated(how).to(DTYPE).eval()
    x = 2 * torch.randn(2, 2, 8, 8, dtype=DTYPE, generator=torch.Generator().manual_seed(4))
    maps = backproject(net, x, [("conv2", 2)], rule=rule, stride_fix=False)
    if rule == "backprop":  # the gradient, through the gate's branch too
        close(maps[:, 0], autograd_map(net, x, net.conv2, 2))
        return
    a1 = net.conv1(x)
    h = F.silu(a1)
    g = net.gate(h).detach()
    r = through(net.conv2, h * g, map_seed(net.conv2(h * g), 2)) * g  # R * g to x, nothing to the gate
    r = activation_rule(F.silu, a1, r, rule)
    close(maps[:, 0], through(net.conv1, x, r))


def test_torchvision_squeeze_excitation_is_gated():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(),
                        ops.SqueezeExcitation(8, 4, scale_activation=nn.Hardsigmoid),
                        nn.Conv2d(8, 3, 3)).to(DTYPE).eval()
    x = torch.randn(1, 2, 7, 7, dtype=DTYPE, generator=torch.Generator().manual_seed(6))
    maps = backproject(net, x, [("3", 1)], rule="guided", stride_fix=False)
    a1 = net[0](x)
    h = torch.relu(a1)
    g = net[2]._scale(h).detach()
    r = through(net[3], h * g, map_seed(net[3](h * g), 1)) * g
    r = r.clamp(min=0) * (a1 > 0)
    close(maps[:, 0], through(net[0], x, r))


# ----------------------------------------------------------------------------------------------------
# Layer and group norm: statistics held constant for deconvnet and guided

class LayerNorm2d(nn.LayerNorm):
    """Channel-wise LayerNorm of an (N, C, H, W) map, as ConvNeXt's: permute, normalise, permute back."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


NORMS = {
    "group": lambda: nn.GroupNorm(2, 6),
    "group-noaffine": lambda: nn.GroupNorm(3, 6, affine=False),
    "layer2d": lambda: LayerNorm2d(6),
    "layer-chw": lambda: nn.LayerNorm((6, 5, 5)),
}


def frozen_norm(norm, x, signal):
    """R * w / sigma, sigma the norm's standard deviation (with eps) per sample and group, by hand."""
    n, c = x.shape[:2]
    if isinstance(norm, nn.GroupNorm):
        groups, weight = norm.num_groups, norm.weight
        sigma = (x.reshape(n, groups, -1).var(2, unbiased=False) + norm.eps).sqrt()
        sigma = sigma.repeat_interleave(c // groups, dim=1)[:, :, None, None]
        w = 1 if weight is None else weight[None, :, None, None]
    elif isinstance(norm, LayerNorm2d):
        sigma = (x.var(1, unbiased=False, keepdim=True) + norm.eps).sqrt()
        w = norm.weight[None, :, None, None]
    else:
        sigma = (x.reshape(n, -1).var(1, unbiased=False) + norm.eps).sqrt()[:, None, None, None]
        w = norm.weight[None]
    return signal * w / sigma


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("name", list(NORMS))
def test_norms_pass_the_signal_with_frozen_statistics(name, rule):
    torch.manual_seed(7)
    net = nn.Sequential(nn.Conv2d(2, 6, 3), NORMS[name](), nn.GELU(), nn.Conv2d(6, 3, 3)).to(DTYPE).eval()
    with torch.no_grad():  # weights away from 1, so that w / sigma is not sigma alone
        for p in net[1].parameters():
            p.uniform_(-1.5, 1.5)
    x = torch.randn(2, 2, 7, 7, dtype=DTYPE, generator=torch.Generator().manual_seed(8))
    maps = backproject(net, x, [("3", 0)], rule=rule, stride_fix=False)
    if rule == "backprop":
        close(maps[:, 0], autograd_map(net, x, net[3], 0))
        return
    a0 = net[0](x)
    a1 = net[1](a0)
    r = through(net[3], F.gelu(a1), map_seed(net[3](F.gelu(a1)), 0))
    r = activation_rule(F.gelu, a1, r, rule)
    r = frozen_norm(net[1], a0.detach(), r)
    close(maps[:, 0], through(net[0], x, r))


# ----------------------------------------------------------------------------------------------------
# The stride fix on grouped and depthwise convolutions, and on strided average pools

@settings(max_examples=30, deadline=None)
@given(st.sampled_from([(1, 4, 4), (2, 4, 6), (3, 3, 6), (4, 4, 4)]), st.integers(1, 5), st.integers(1, 4),
       st.integers(1, 3), st.integers(0, 2), st.integers(0, 7), st.integers(0, 10_000))
def test_grouped_conv_fix_equals_autograd_through_stride1_conv(g, m, s_h, s_w, pad, extra, seed):
    groups, c_in, c_out = g
    pad = min(pad, m - 1)
    a = (m + extra, m + (extra * 3) % 5)
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(c_out, c_in // groups, m, m, generator=gen, dtype=DTYPE)
    out = F.conv2d(torch.zeros(1, c_in, *a, dtype=DTYPE), weight, stride=(s_h, s_w), padding=pad, groups=groups)
    signal = torch.randn(out.shape, generator=gen, dtype=DTYPE)
    fixed = conv_backproject(signal, weight, a, stride=(s_h, s_w), padding=pad, groups=groups)
    x = torch.zeros(1, c_in, *a, dtype=DTYPE, requires_grad=True)
    y = F.conv2d(x, weight, padding=pad, groups=groups)
    torch.testing.assert_close(fixed, torch.autograd.grad(y, x, nearest(signal, y.shape[-2:]))[0])
    plain = conv_backproject(signal, weight, a, stride=(s_h, s_w), padding=pad, groups=groups, stride_fix=False)
    x = torch.zeros(1, c_in, *a, dtype=DTYPE, requires_grad=True)
    y = F.conv2d(x, weight, stride=(s_h, s_w), padding=pad, groups=groups)
    torch.testing.assert_close(plain, torch.autograd.grad(y, x, signal)[0])


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(0, 1),
       st.booleans(), st.sampled_from([None, 2, 7]), st.booleans(), st.integers(0, 9), st.integers(0, 9),
       st.integers(0, 10_000))
def test_avgpool_fix_equals_autograd_through_stride1_pool(m_h, m_w, s_h, s_w, pad, include_pad, divisor,
                                                          ceil, extra_h, extra_w, seed):
    pad = (min(pad, m_h // 2), min(pad, m_w // 2))
    a = (m_h + extra_h, m_w + extra_w)
    gen = torch.Generator().manual_seed(seed)
    opts = dict(count_include_pad=include_pad, divisor_override=divisor)
    out = F.avg_pool2d(torch.zeros(2, 3, *a, dtype=DTYPE), (m_h, m_w), (s_h, s_w), pad, ceil, **opts)
    signal = torch.randn(out.shape, generator=gen, dtype=DTYPE)

    fixed = avgpool_backproject(signal, a, (m_h, m_w), stride=(s_h, s_w), padding=pad, ceil_mode=ceil, **opts)
    x = torch.zeros(2, 3, *a, dtype=DTYPE, requires_grad=True)
    y = F.avg_pool2d(x, (m_h, m_w), 1, pad, **opts)
    assert y.shape[-2:] == stride1_size(a, (m_h, m_w), pad)
    target = nearest(signal, y.shape[-2:]) if max(s_h, s_w) > 1 else signal
    torch.testing.assert_close(fixed, torch.autograd.grad(y, x, target)[0])

    plain = avgpool_backproject(signal, a, (m_h, m_w), stride=(s_h, s_w), padding=pad, ceil_mode=ceil,
                                pool_fix="switches", **opts)
    x = torch.zeros(2, 3, *a, dtype=DTYPE, requires_grad=True)
    y = F.avg_pool2d(x, (m_h, m_w), (s_h, s_w), pad, ceil, **opts)
    torch.testing.assert_close(plain, torch.autograd.grad(y, x, signal)[0])


def test_avgpool_fix_has_no_grid():
    """A 3x3 stride-2 average pool covers every other row twice; with the fix, coverage is uniform inside."""
    ones = torch.ones(1, 1, 7, 7, dtype=DTYPE)
    plain = avgpool_backproject(ones, (16, 16), 3, stride=2, pool_fix="switches")[0, 0, 4:12, 4:12]
    fixed = avgpool_backproject(ones, (16, 16), 3, stride=2)[0, 0, 4:12, 4:12]
    assert plain.unique().numel() > 1
    torch.testing.assert_close(fixed, torch.full_like(fixed, float(fixed[0, 0])))


def mobile_block(seed=9):
    """ReLU-only MobileNet-like block: depthwise strided conv, grouped 1x1, strided avg pool."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 5, stride=2, padding=2, groups=8), nn.ReLU(),
                         nn.Conv2d(8, 6, 1, groups=2), nn.ReLU(), nn.AvgPool2d(3, stride=2, padding=1),
                         nn.Conv2d(6, 4, 3)).to(DTYPE).eval()


@pytest.mark.parametrize("pool_fix", ["stride1", "switches"])
def test_fix_through_depthwise_grouped_and_avgpool_equals_the_layer_reference(pool_fix):
    net = mobile_block()
    x = torch.rand(2, 3, 29, 27, dtype=DTYPE)
    maps = backproject(net, x, [(8, 1)], rule="guided", stride_fix=True, pool_fix=pool_fix)[:, 0]
    acts = [x]
    for layer in net:
        acts.append(layer(acts[-1]))
    r = map_seed(acts[8], 1)
    r = through(net[7], acts[7], r)
    r = avgpool_backproject(r, acts[6].shape[-2:], 3, stride=2, padding=1, pool_fix=pool_fix)
    r = r.clamp(min=0) * (acts[5] > 0)
    r = through(net[4], acts[4], r)
    r = r.clamp(min=0) * (acts[3] > 0)
    r = conv_backproject(r, net[2].weight, acts[2].shape[-2:], stride=2, padding=2, groups=8)
    r = r.clamp(min=0) * (acts[1] > 0)
    r = conv_backproject(r, net[0].weight, x.shape[-2:], stride=2, padding=1)
    close(maps, r.detach())


def test_relu_only_depthwise_net_equals_captum_guided(peer):
    captum_attr = peer("captum.attr")
    net = mobile_block()
    x = torch.rand(2, 3, 29, 27, dtype=DTYPE)
    features = [("7", 3), ("5", 2), ("3", 6)]
    ours = backproject(net, x, features, rule="guided", stride_fix=False)
    modules = dict(net.named_modules())
    theirs = []
    for name, c in features:
        def selector(a, c=c):
            return 0.5 * (a[:, c] ** 2).reshape(a.shape[0], -1).sum(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs.append(captum_attr.NeuronGuidedBackprop(net, modules[name]).attribute(x, selector))
    theirs = torch.stack(theirs, 1)
    assert theirs.abs().amax((0, 2, 3, 4)).min() > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------------------------------
# torchvision's modern networks, random weights

TORCHVISION = {
    "mobilenet_v2": "features.18.0",  # the last conv, after ReLU6 blocks
    "mobilenet_v3_small": "features.12.0",  # after Hardswish and hardsigmoid SE gates
    "efficientnet_b0": "features.8.0",  # after SiLU and sigmoid SE gates
    "convnext_tiny": "features.7.2.block.6",  # after GELU, LayerNorm, LayerNorm2d and channel-last blocks
}


@pytest.fixture(scope="module")
def torchvision_nets():
    nets = {}
    for name in TORCHVISION:
        torch.manual_seed(0)
        nets[name] = getattr(models, name)(weights=None).to(DTYPE).eval()
    return nets


@pytest.mark.parametrize("name", list(TORCHVISION))
def test_torchvision_networks(torchvision_nets, name):
    net = torchvision_nets[name]
    layer = dict(net.named_modules())[TORCHVISION[name]]
    x = torch.rand(1, 3, 48, 48, dtype=DTYPE, generator=torch.Generator().manual_seed(10))
    before = snapshot(net)
    for rule in RULES:
        maps = backproject(net, x, [(TORCHVISION[name], 5)], rule=rule)
        assert torch.isfinite(maps).all() and maps.abs().amax() > 0, rule
    plain = backproject(net, x, [(TORCHVISION[name], 5)], rule="backprop", stride_fix=False)[:, 0]
    close(plain, autograd_map(net, x, layer, 5))
    assert_unchanged(net, before)


# ----------------------------------------------------------------------------------------------------
# Layers whose first axis is not a channel are refused, with the layer to pass instead

def test_convnext_channel_last_layers_are_refused(torchvision_nets):
    net = torchvision_nets["convnext_tiny"]
    x = torch.rand(1, 3, 48, 48, dtype=DTYPE)
    for inner in ("1", "2", "3", "4", "5"):
        with pytest.raises(ValueError, match=r"channel-last.*channel-first map \(C, H, W\).*"
                                             r"'features\.1\.0\.block\.6'"):
            backproject(net, x, [(f"features.1.0.block.{inner}", 0)])
    with pytest.raises(ValueError, match="channel-last"):
        strongest_channels(net, x, ["features.1.0.block.3"])
    # the block's own permute back, and LayerNorm2d (which permutes inside), are channel-first
    for name in ("features.1.0.block.6", "classifier.0", "features.2.0"):
        assert backproject(net, x, [(name, 0)]).abs().amax() > 0


class ChannelLast(nn.Module):
    """A custom forward that moves the channels last with Tensor.permute and back with torch.movedim."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc, self.act, self.out = nn.Conv2d(2, 4, 3), nn.Linear(4, 4), nn.SiLU(), nn.Conv2d(4, 3, 1)

    def forward(self, x):
        h = self.act(self.fc(self.conv(x).permute(0, 2, 3, 1)))
        return self.out(torch.movedim(h, 3, 1))


def test_custom_channel_last_is_refused_and_through_it_is_fine():
    net = ChannelLast().to(DTYPE).eval()
    x = torch.rand(1, 2, 8, 8, dtype=DTYPE)
    before = snapshot(net)
    for layer in ("fc", "act"):
        with pytest.raises(ValueError, match=r"channel-last.*axis 2 of \(6, 6, 4\).*'out'"):
            backproject(net, x, [(layer, 0)])
    assert_unchanged(net, before)
    maps = backproject(net, x, [("out", 1)], rule="backprop", stride_fix=False)[:, 0]
    close(maps, autograd_map(net, x, net.out, 1))


def test_vit_token_layers_are_refused():
    torch.manual_seed(0)
    vit = models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16,
                                   mlp_dim=32, num_classes=3).to(DTYPE).eval()
    x = torch.rand(1, 3, 32, 32, dtype=DTYPE)
    with pytest.raises(ValueError, match=r"sequence of tokens.*before the image is cut into tokens.*'conv_proj'"):
        backproject(vit, x, [("encoder.layers.encoder_layer_0.mlp.0", 0)])
    with pytest.raises(ValueError, match="sequence of tokens"):
        backproject(vit, x, [("encoder.ln", 0)])
    assert backproject(vit, x, [("conv_proj", 2)]).abs().amax() > 0


# ----------------------------------------------------------------------------------------------------
# The model is left as it was; what still has no rule is refused

def test_model_left_as_it_was():
    torch.manual_seed(11)
    net = nn.Sequential(nn.Conv2d(2, 6, 3, stride=2), nn.GroupNorm(2, 6), nn.Hardswish(inplace=True),
                        nn.AvgPool2d(2), nn.Conv2d(6, 4, 1)).to(DTYPE)
    gated = Gated().to(DTYPE)
    for model in (net, gated):
        model.train()
        first = next(model.parameters())
        first.requires_grad_(False)
        model.register_forward_hook(lambda *a: None)  # the user's hook stays, ours go
        before = snapshot(model)
        x = torch.rand(2, 2, 9, 9, dtype=DTYPE)
        last = "4" if model is net else "conv2"
        for rule in RULES:
            assert backproject(model, x, [(last, 1)], rule=rule).abs().sum() > 0
        assert_unchanged(model, before)


@pytest.mark.parametrize("make, name", [(nn.ELU, "ELU"), (nn.Tanh, "Tanh"), (nn.Mish, "Mish")])
def test_activations_without_a_rule_are_refused(make, name):
    net = nn.Sequential(nn.Conv2d(1, 2, 3), make(), nn.Conv2d(2, 2, 3)).to(DTYPE)
    before = snapshot(net)
    with pytest.raises(TypeError, match=rf"layer 2 '1' \({name}\).*supported: ReLU, ReLU6"):
        backproject(net, torch.rand(1, 1, 9, 9, dtype=DTYPE), [(3, 0)])
    assert_unchanged(net, before)


def test_functions_without_a_rule_are_refused():
    class Elu(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.out = nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3)

        def forward(self, x):
            return self.out(F.elu(self.conv(x)))

    with pytest.raises(TypeError, match=r"nonlinearity 'elu' \(called in module 'model' \(Elu\)\)"):
        backproject(Elu().to(DTYPE), torch.rand(1, 1, 9, 9, dtype=DTYPE), [("out", 0)])


def test_same_maps_under_inference_mode():
    """A user explaining a prediction is naturally inside torch.inference_mode(): the rules still run."""
    torch.manual_seed(12)
    for net, feature, shape in ((Gated().to(DTYPE), "conv2", (1, 2, 9, 9)),
                                (ChannelLast().to(DTYPE), "out", (1, 2, 9, 9)),
                                (mobile_block(), "7", (1, 3, 29, 27))):
        x = torch.rand(shape, dtype=DTYPE)
        for rule in RULES:
            outside = backproject(net, x, [(feature, 0)], rule=rule)
            with torch.inference_mode():
                inside = backproject(net, x, [(feature, 0)], rule=rule)
            assert outside.abs().amax() > 0
            torch.testing.assert_close(inside, outside)
