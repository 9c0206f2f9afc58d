"""LRP: every rule against zennit on the book's nets, against a slow dense-matrix re-implementation on a tiny
net, conservation, LRP-0 = gradient x input, the model left as it was, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vefi.lrp import RULES, lrp, relevance_sums
from vefi.book.models import build_model
from vefi.saliency import gradient_x_input


def seeded_model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name).double().eval()


def zennit_relevance(peer, model, images, target, rule, epsilon=0.25):
    """zennit with the same configuration: LRN passes relevance through (it has no LRN rule), ReLUs out of
    place (its backward hooks cannot take in-place ones), pools left to the gradient (its default).

    zennit is imported here, through conftest.py's ``peer``: without it only the comparisons skip."""
    zennit_rules = peer("zennit.rules")
    Gradient = peer("zennit.attribution").Gradient
    composites = peer("zennit.composites")
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    single = {"epsilon": zennit_rules.Epsilon(epsilon=epsilon),
              "zplus": zennit_rules.ZPlus(zero_params="bias"),
              "alpha1beta0": zennit_rules.AlphaBeta(alpha=1.0, beta=0.0),
              "alpha2beta1": zennit_rules.AlphaBeta(alpha=2.0, beta=1.0)}
    base = [(nn.ReLU, zennit_rules.Pass()), (nn.LocalResponseNorm, zennit_rules.Pass())]
    if rule == "composite":
        composite = composites.SpecialFirstLayerMapComposite(
            layer_map=base + [(nn.Conv2d, zennit_rules.AlphaBeta(alpha=1.0, beta=0.0)),
                              (nn.Linear, zennit_rules.Epsilon(epsilon=epsilon))],
            first_map=[(nn.Conv2d, zennit_rules.ZBox(low=0.0, high=1.0))])
    else:
        composite = composites.LayerMapComposite(
            layer_map=base + [(nn.Conv2d, single[rule]), (nn.Linear, single[rule])])
    with Gradient(model=twin, composite=composite) as attributor:
        _, relevance = attributor(images, lambda out: F.one_hot(target, out.shape[1]).to(out) * out)
    return relevance


# every rule on the MNIST net; the an8Flower net (LRN, overlapping pools, 11x11 stride 4) with two of them,
# to keep the file fast
CASES = [("mnist", rule) for rule in RULES] + [("an8flower-single", "alpha2beta1"),
                                                ("an8flower-single", "composite")]


@pytest.mark.parametrize("name,rule", CASES)
def test_matches_zennit(peer, name, rule):
    model = seeded_model(name)
    images = torch.rand((2,) + model.input_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([2, 5])
    ours = lrp(model, images, target, rule=rule, epsilon=0.25)
    theirs = zennit_relevance(peer, model, images, target, rule)
    scale = theirs.abs().amax()
    assert scale > 0
    assert torch.allclose(ours, theirs, atol=1e-8 * float(scale), rtol=1e-6), float((ours - theirs).abs().max())


# --- a slow, obviously right re-implementation: every layer as a dense matrix ------------------------------

def dense_matrix(layer: nn.Module, in_shape) -> torch.Tensor:
    """The weighted layer without its bias as a matrix (outputs x inputs), column by column."""
    n_in = int(torch.tensor(in_shape).prod())
    with torch.no_grad():
        return _dense(layer, in_shape, n_in)


def _dense(layer, in_shape, n_in):
    basis = torch.eye(n_in, dtype=torch.float64).reshape((n_in,) + tuple(in_shape))
    if isinstance(layer, nn.Conv2d):
        cols = F.conv2d(basis, layer.weight, None, layer.stride, layer.padding)
    else:
        cols = F.linear(basis, layer.weight)
    return cols.reshape(n_in, -1).T


def stab(z, eps):
    return z + eps * (torch.sign(z) + (z == 0).double())


def dense_rule(rule, x, M, b, r_out, eps=0.25, low=0.0, high=1.0):
    contrib = M * x[None, :]  # z_ij = x_i w_ij, outputs in rows
    if rule == "epsilon":
        return ((contrib / stab(contrib.sum(1) + b, eps)[:, None]) * r_out[:, None]).sum(0)
    if rule == "zplus":
        pos = contrib.clamp(min=0)
        return ((pos / stab(pos.sum(1), 1e-6)[:, None]) * r_out[:, None]).sum(0)
    if rule in ("alpha1beta0", "alpha2beta1"):
        alpha, beta = (1.0, 0.0) if rule == "alpha1beta0" else (2.0, 1.0)
        pos, neg = contrib.clamp(min=0), contrib.clamp(max=0)
        zp, zn = pos.sum(1) + b.clamp(min=0), neg.sum(1) + b.clamp(max=0)
        share = alpha * pos / stab(zp, 1e-6)[:, None] - beta * neg / stab(zn, 1e-6)[:, None]
        return (share * r_out[:, None]).sum(0)
    if rule == "zbox":
        box = contrib - low * M.clamp(min=0) - high * M.clamp(max=0)
        return ((box / stab(box.sum(1), 1e-6)[:, None]) * r_out[:, None]).sum(0)
    raise AssertionError(rule)


def dense_maxpool(x, r_out, kernel):
    """Winner takes all, window by window."""
    c, h, w = x.shape
    r_in = torch.zeros_like(x)
    r_out = r_out.reshape(c, h // kernel, w // kernel)
    for k in range(c):
        for i in range(h // kernel):
            for j in range(w // kernel):
                window = x[k, i * kernel:(i + 1) * kernel, j * kernel:(j + 1) * kernel]
                a = int(window.argmax())
                r_in[k, i * kernel + a // kernel, j * kernel + a % kernel] += r_out[k, i, j]
    return r_in


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                         nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(16, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)).double().eval()


def dense_lrp(net, image, target, rules):
    conv1, _, _, conv2, _, _, fc1, _, fc2 = net
    with torch.no_grad():
        a0 = image
        z1 = conv1(a0[None])[0]
        a1 = z1.clamp(min=0)
        p1 = F.max_pool2d(a1[None], 2)[0]
        z2 = conv2(p1[None])[0]
        a2 = z2.clamp(min=0).flatten()
        z3 = fc1(a2[None])[0]
        a3 = z3.clamp(min=0)
        z4 = fc2(a3[None])[0]
    r = torch.zeros(3, dtype=torch.float64)
    r[target] = z4[target]
    r = dense_rule(rules[3], a3, dense_matrix(fc2, (6,)), fc2.bias.detach(), r)
    r = dense_rule(rules[2], a2, dense_matrix(fc1, (16,)), fc1.bias.detach(), r)
    r = dense_rule(rules[1], p1.flatten(), dense_matrix(conv2, p1.shape), conv2.bias.detach().repeat_interleave(4), r)
    r = dense_maxpool(a1, r, 2).flatten()
    r = dense_rule(rules[0], a0.flatten(), dense_matrix(conv1, a0.shape), conv1.bias.detach().repeat_interleave(64), r)
    return r.reshape(image.shape)


@pytest.mark.parametrize("rule", RULES)
def test_matches_dense_reimplementation(rule):
    net = tiny_net()
    images = torch.rand(2, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    rules = ["zbox", "alpha1beta0", "epsilon", "epsilon"] if rule == "composite" else [rule] * 4
    ours = lrp(net, images, target=torch.tensor([1, 2]), rule=rule, epsilon=0.25)
    for i, t in enumerate([1, 2]):
        slow = dense_lrp(net, images[i], t, rules)
        assert slow.abs().max() > 0
        assert torch.allclose(ours[i], slow, atol=1e-10), float((ours[i] - slow).abs().max())


@pytest.mark.parametrize("name,rule", CASES)
def test_conservation_without_biases(name, rule):
    model = seeded_model(name)
    for m in model.modules():
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)
    images = torch.rand((2,) + model.input_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    # the stabiliser of the other rules, too, goes to (nearly) 0: a random net's scores are small
    sums = relevance_sums(model, images, target=1, rule=rule, epsilon=0.0, stabilizer=1e-15)
    score = sums[-1][1]
    assert len(sums) == 1 + sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    for layer, total in sums:
        assert torch.allclose(total, score, rtol=1e-8, atol=0), (layer, total, score)


def test_biases_break_conservation_and_epsilon_absorbs():
    model = seeded_model("mnist")
    images = torch.rand(2, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    exact = relevance_sums(model, images, target=1, epsilon=0.0)
    absorbed = relevance_sums(model, images, target=1, epsilon=1.0)
    assert not torch.allclose(exact[0][1], exact[-1][1], rtol=1e-3)
    # the first sum is the input relevance, as lrp returns it
    assert torch.allclose(exact[0][1], lrp(model, images, 1, epsilon=0.0).sum((1, 2, 3)))
    assert absorbed[0][1].abs().sum() < exact[0][1].abs().sum()


def test_lrp0_is_gradient_x_input():
    # on a net without LRN: LRP passes relevance through LRN unchanged, the gradient does not
    model = seeded_model("mnist")
    images = torch.rand(2, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ours = lrp(model, images, target=torch.tensor([3, 4]), epsilon=0.0).sum(1)
    assert torch.allclose(ours, gradient_x_input(model, images, target=torch.tensor([3, 4])), atol=1e-10)


def test_positive_rules_give_positive_relevance():
    model = seeded_model("mnist")
    images = torch.rand(2, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    logits = model(images)
    target = logits.argmax(1)
    assert (logits.max(1).values > 0).all()  # a positive seed
    for rule in ("zplus", "alpha1beta0"):
        assert (lrp(model, images, target, rule=rule) >= 0).all()
    assert (lrp(model, images, target, rule="alpha2beta1") < 0).any()


def test_inplace_relu_same_as_out_of_place():
    model = seeded_model("mnist")
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    images = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    for rule in RULES:
        assert torch.equal(lrp(model, images, 0, rule=rule), lrp(twin, images, 0, rule=rule))


def state(model):
    return ([p.detach().clone() for p in model.parameters()], [m.training for m in model.modules()],
            [p.requires_grad for p in model.parameters()],
            sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks)
                for m in model.modules()))


def assert_same_state(before, after):
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    assert before[1:] == after[1:]


def test_model_unchanged_also_on_error():
    model = build_model("mnist").double()
    model.train()
    model.fc1.weight.requires_grad_(False)
    before = state(model)
    images = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    lrp(model, images, rule="composite")
    assert_same_state(before, state(model))
    with pytest.raises(ValueError, match="class"):
        lrp(model, images, target=10)  # fails inside the pass, after the hooks went on
    assert_same_state(before, state(model))
    assert all(p.grad is None for p in model.parameters())


def test_bad_input():
    model = seeded_model("mnist")
    images = torch.rand(1, 1, 28, 28, dtype=torch.float64)
    with pytest.raises(ValueError, match="NaN"):
        lrp(model, images * float("nan"))
    with pytest.raises(ValueError, match="unknown LRP rule"):
        lrp(model, images, rule="gamma")
    with pytest.raises(ValueError, match="first layer"):
        lrp(model, images, rule="composite", conv_rule="zbox")
    with pytest.raises(ValueError, match="shape"):
        lrp(model, torch.rand(1, 3, 28, 28, dtype=torch.float64))
    odd = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sigmoid(), nn.Flatten(), nn.Linear(2 * 26 * 26, 3))
    with pytest.raises(TypeError, match="Sigmoid"):
        lrp(odd, torch.rand(1, 1, 28, 28))
    assert sum(len(m._forward_hooks) for m in odd.modules()) == 0
    # z^B on a layer that does not see the image
    late = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 12 * 12, 3))
    with pytest.raises(ValueError, match="z\\^B"):
        lrp(late, torch.rand(1, 1, 28, 28), rule="composite")
    assert sum(len(m._forward_hooks) for m in late.modules()) == 0


def test_other_supported_layers_run_and_conserve():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.AvgPool2d(2), nn.Dropout(0.5), nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3, bias=False)).double().eval()
    net[1].running_mean.zero_()  # batch norm without shift: a bias-free net, so relevance is conserved
    images = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    sums = relevance_sums(net, images, target=0, epsilon=0.0)
    for _, total in sums:
        assert torch.allclose(total, sums[-1][1], rtol=1e-6)
    assert lrp(net, images, 0, rule="composite").shape == (2, 3, 8, 8)
