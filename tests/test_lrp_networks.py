"""LRP on real networks: batch norm canonized into the layer before it, residual sums split in proportion to
their summands, zero denominators (``epsilon=0``) giving zero, not NaN.

Checked against zennit (its canonizers ``ResNetCanonizer``/``VGGCanonizer`` and composites equivalent to
vefi's rules) on torchvision's resnet18 and vgg16_bn with random weights, against a slow dense-matrix LRP on a
tiny conv-bn-relu-residual net, and by conservation on resnet18, densenet121 and shufflenet_v2 (their biases
zeroed, ``epsilon=0``: then relevance is conserved exactly, through merged batch norms, sums, concatenations and
global pools alike).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from vefi.lrp import RULES, lrp, relevance_sums

# float64 throughout: the comparisons are then limited by the methods, not by rounding on some BLAS kernel
DTYPE = torch.float64


def torchvision_net(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return getattr(models, name)(weights=None).to(DTYPE).eval()


def images(n: int = 2, size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))


def randomise_batch_norms(model: nn.Module, seed: int = 5) -> nn.Module:
    """Batch-norm statistics and affine parameters far from the identity that random init leaves them at
    (negative scales too, which flip the signs of contributions): the merge must matter."""
    generator = torch.Generator().manual_seed(seed)

    def draw(m, low, high):
        return low + (high - low) * torch.rand(m.num_features, generator=generator, dtype=DTYPE)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(draw(m, -0.3, 0.3))
                m.running_var.copy_(draw(m, 0.3, 2.0))
                m.weight.copy_(draw(m, -1.5, 1.5))
                m.bias.copy_(draw(m, -0.3, 0.3))
    return model


def without_norm_epsilon(model: nn.Module) -> nn.Module:
    """The batch norms' ``eps`` set to 0, for the comparison with zennit: its canonizer merges a norm into the
    layer before and then leaves the norm with the identity's statistics but its ``eps``, so that it computes
    ``y / sqrt(1 + eps)``, not ``y``: a factor ``1 - eps/2`` per norm, 1e-4 of the map after 13 of them (seen
    on vgg16_bn). With ``eps = 0`` (the variances are >= 0.3 here) both compute the same function."""
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.eps = 0.0
    return model


@pytest.fixture(scope="module")
def resnet18():
    return without_norm_epsilon(randomise_batch_norms(torchvision_net("resnet18")))


@pytest.fixture(scope="module")
def vgg16_bn():
    return without_norm_epsilon(randomise_batch_norms(torchvision_net("vgg16_bn")))


def model_state(model: nn.Module):
    """Everything an explainer could leave behind: parameters and buffers, flags, hooks."""
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [m.training for m in model.modules()],
            [p.requires_grad for p in model.parameters()],
            [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()],
            [p.grad is None for p in model.parameters()])


def assert_same_state(before, after):
    assert before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1:] == after[1:]


# --- zennit -----------------------------------------------------------------------------------------------

def zennit_twin(model: nn.Module) -> nn.Module:
    """An out-of-place copy for zennit: its hooks cannot take in-place ReLUs, and its canonizers change the
    module they are applied to (until removed)."""
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    return twin


def zennit_relevance(peer, twin, x, target, rule, canonizer, epsilon=0.25):
    """zennit's attribution with its canonizer for the net.

    ``rule="epsilon"``: Epsilon at every conv and linear layer and (zennit's ``Norm``, the epsilon rule
    without parameters) at residual sums, as vefi does; average pools ``Norm`` with a negligible stabiliser
    (vefi's split there is exact). ``rule="composite"`` is zennit's own ``EpsilonPlus`` (its ZPlus keeps the
    positive bias: vefi's alpha1beta0), whose sums and pools get ``Norm`` with the stabiliser, as vefi's."""
    zennit_rules = peer("zennit.rules")
    composites = peer("zennit.composites")
    Gradient = peer("zennit.attribution").Gradient
    Sum = peer("zennit.layer").Sum
    if rule == "epsilon":
        composite = composites.LayerMapComposite(
            layer_map=[(nn.ReLU, zennit_rules.Pass()), (Sum, zennit_rules.Norm(stabilizer=epsilon)),
                       ((nn.AdaptiveAvgPool2d, nn.AvgPool2d), zennit_rules.Norm(stabilizer=1e-30)),
                       (nn.BatchNorm2d, zennit_rules.Pass()),
                       (nn.Conv2d, zennit_rules.Epsilon(epsilon=epsilon)),
                       (nn.Linear, zennit_rules.Epsilon(epsilon=epsilon))],
            canonizers=[canonizer])
    else:
        composite = composites.EpsilonPlus(epsilon=epsilon, stabilizer=1e-6, canonizers=[canonizer])
    with Gradient(model=twin, composite=composite) as attributor:
        _, relevance = attributor(x, lambda out: F.one_hot(target, out.shape[1]).to(out) * out)
    return relevance


VEFI_RULES = {"epsilon": dict(rule="epsilon", epsilon=0.25),
              "composite": dict(rule="composite", epsilon=0.25, stabilizer=1e-6, first_rule="alpha1beta0",
                                conv_rule="alpha1beta0", dense_rule="epsilon")}


@pytest.fixture(scope="module")
def twins(resnet18, vgg16_bn):
    made = {}

    def twin(name):
        if name not in made:
            made[name] = zennit_twin(resnet18 if name == "resnet18" else vgg16_bn)
        return made[name]
    return twin


@pytest.mark.parametrize("net,canonizer", [("resnet18", "ResNetCanonizer"), ("vgg16_bn", "VGGCanonizer")])
@pytest.mark.parametrize("rule", ["epsilon", "composite"])
def test_matches_zennit_with_its_canonizers(peer, request, twins, net, canonizer, rule):
    model = request.getfixturevalue(net)
    canonizer = getattr(peer("zennit.torchvision"), canonizer)()
    x, target = images(1), torch.tensor([781])
    ours = lrp(model, x, target, **VEFI_RULES[rule])
    theirs = zennit_relevance(peer, twins(net), x, target, rule, canonizer)
    scale = float(theirs.abs().amax())
    assert scale > 0 and torch.isfinite(ours).all()
    # measured: 2e-14 of the map's largest value in float64; 1e-4 leaves room for any BLAS kernel
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-4 * scale), float((ours - theirs).abs().max()) / scale


def test_merge_equals_folding_by_hand(resnet18):
    """The on-the-fly merge gives the map of the same net with every batch norm folded into its conv by hand."""
    model = copy.deepcopy(resnet18)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 0.1  # large, so that a merge that forgot it would show
    folded = fold_batch_norms(model)
    x, target = images(1, 32), torch.tensor([7])
    for rule in RULES:
        merged = lrp(model, x, target, rule=rule)
        by_hand = lrp(folded, x, target, rule=rule)
        scale = float(by_hand.abs().amax())
        assert scale > 0
        assert torch.allclose(merged, by_hand, rtol=0, atol=1e-8 * scale), rule


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """A copy of a torchvision ResNet with every batch norm folded into the conv before it, the norm replaced
    by the identity: the reference for the on-the-fly merge."""
    folded = copy.deepcopy(model)
    pairs = [("conv1", "bn1")]
    for name, m in folded.named_modules():
        if isinstance(m, models.resnet.BasicBlock):
            pairs += [(f"{name}.conv1", f"{name}.bn1"), (f"{name}.conv2", f"{name}.bn2")]
            if m.downsample is not None:
                pairs.append((f"{name}.downsample.0", f"{name}.downsample.1"))
    modules = dict(folded.named_modules())
    with torch.no_grad():
        for conv_name, bn_name in pairs:
            conv, bn = modules[conv_name], modules[bn_name]
            scale = bn.weight / (bn.running_var + bn.eps).sqrt()
            conv.weight.mul_(scale[:, None, None, None])
            conv.bias = nn.Parameter(bn.bias - bn.running_mean * scale)
            parent_name, _, attribute = bn_name.rpartition(".")
            setattr(modules[parent_name] if parent_name else folded, attribute, nn.Identity())
    return folded


# --- a slow reference: every layer of a tiny residual net as a dense matrix --------------------------------

class TinyResidual(nn.Module):
    """conv-bn-relu, then a basic block (conv-bn-relu-conv-bn, plus the skip), relu, average pool, linear."""

    def __init__(self, add: str = "iadd"):
        super().__init__()
        self.add = add
        self.conv0, self.bn0 = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.conv1, self.bn1 = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
        self.conv2, self.bn2 = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(3 * 3 * 3, 4)

    def forward(self, x):
        a = self.relu(self.bn0(self.conv0(x)))
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(a)))))
        if self.add == "iadd":
            out += a
        elif self.add == "add_":
            out.add_(a)
        elif self.add == "torch.add":
            out = torch.add(a, out)
        else:
            out = a + out
        return self.fc(torch.flatten(self.pool(self.relu(out)), 1))


def tiny_residual(add="iadd", seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return randomise_batch_norms(TinyResidual(add).to(DTYPE).eval(), seed)


def stab(z, eps):
    return z + eps * (torch.sign(z) + (z == 0).to(z))


def share(contrib, denominator, r_out):
    """sum_j contrib_ij / denominator_j * R_j, zero where the denominator is zero."""
    safe = torch.where(denominator == 0, torch.ones_like(denominator), denominator)
    ratio = torch.where(denominator == 0, torch.zeros_like(r_out), r_out / safe)
    return (contrib * ratio[:, None]).sum(0)


def linear_rule(rule, x, M, b, r_out, eps=0.25, stabilizer=1e-6, low=0.0, high=1.0):
    contrib = M * x[None, :]  # z_ij = x_i w_ij, outputs in rows
    if rule == "epsilon":
        return share(contrib, stab(contrib.sum(1) + b, eps), r_out)
    if rule == "zplus":
        pos = (M.clamp(min=0) * x.clamp(min=0)[None, :]) + (M.clamp(max=0) * x.clamp(max=0)[None, :])
        return share(pos, stab(pos.sum(1), stabilizer), r_out)
    if rule in ("alpha1beta0", "alpha2beta1"):
        alpha, beta = (1.0, 0.0) if rule == "alpha1beta0" else (2.0, 1.0)
        pos, neg = contrib.clamp(min=0), contrib.clamp(max=0)
        r = alpha * share(pos, stab(pos.sum(1) + b.clamp(min=0), stabilizer), r_out)
        return r - beta * share(neg, stab(neg.sum(1) + b.clamp(max=0), stabilizer), r_out)
    if rule == "zbox":
        box = contrib - low * M.clamp(min=0) - high * M.clamp(max=0)
        return share(box, stab(box.sum(1), stabilizer), r_out)
    raise AssertionError(rule)


def as_matrix(fn, in_shape):
    """A linear map (no bias) as a dense matrix (outputs x inputs), column by column."""
    n_in = int(torch.tensor(in_shape).prod())
    basis = torch.eye(n_in, dtype=DTYPE).reshape((n_in,) + tuple(in_shape))
    with torch.no_grad():
        return fn(basis).reshape(n_in, -1).T


def merged(conv, bn, in_shape):
    """conv followed by bn as one dense layer: (matrix, bias) with the batch norm's scale and shift folded in."""
    M = as_matrix(lambda t: F.conv2d(t, conv.weight, None, conv.stride, conv.padding), in_shape)
    scale = (bn.weight / (bn.running_var + bn.eps).sqrt()).detach()
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(scale)
    pixels = M.shape[0] // scale.numel()
    scale_rows = scale.repeat_interleave(pixels)
    return M * scale_rows[:, None], ((bias - bn.running_mean) * scale + bn.bias.detach()).repeat_interleave(pixels)


def dense_lrp(net, image, target, rules, eps=0.25, stabilizer=1e-6, sum_eps=0.25):
    """rules: (first layer, other convs, dense). Relevance at the sum: each summand's share of the sum."""
    with torch.no_grad():
        x = image[None]
        a = F.relu(net.bn0(net.conv0(x)))
        h = F.relu(net.bn1(net.conv1(a)))
        branch = net.bn2(net.conv2(h))
        s = F.relu(branch + a)
        p = F.avg_pool2d(s, 2)
        logits = net.fc(p.flatten(1))[0]
    r = torch.zeros_like(logits)
    r[target] = logits[target]
    r = linear_rule(rules[2], p.flatten(), net.fc.weight.detach(), net.fc.bias.detach(), r, eps, stabilizer)
    # average pool: a linear layer without bias, its relevance split exactly in proportion (no stabiliser)
    P = as_matrix(lambda t: F.avg_pool2d(t, 2), s.shape[1:])
    r = share(P * s.flatten()[None, :], P @ s.flatten(), r)
    total = (branch + a).flatten()  # the ReLU passes relevance on; the sum shares it out
    r_branch = share(torch.diag(branch.flatten()), stab(total, sum_eps), r)
    r_skip = share(torch.diag(a.flatten()), stab(total, sum_eps), r)
    M2, b2 = merged(net.conv2, net.bn2, h.shape[1:])
    r_h = linear_rule(rules[1], h.flatten(), M2, b2, r_branch, eps, stabilizer)
    M1, b1 = merged(net.conv1, net.bn1, a.shape[1:])
    r_a = linear_rule(rules[1], a.flatten(), M1, b1, r_h, eps, stabilizer) + r_skip
    M0, b0 = merged(net.conv0, net.bn0, x.shape[1:])
    return linear_rule(rules[0], x.flatten(), M0, b0, r_a, eps, stabilizer).reshape(image.shape)


@pytest.mark.parametrize("rule", RULES)
def test_matches_dense_reference_on_a_residual_net(rule):
    net = tiny_residual()
    before = model_state(net)
    x = torch.rand(2, 2, 6, 6, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
    target = torch.tensor([1, 2])
    ours = lrp(net, x, target, rule=rule, epsilon=0.25, stabilizer=1e-6)
    assert_same_state(before, model_state(net))
    rules = ("zbox", "alpha1beta0", "epsilon") if rule == "composite" else (rule,) * 3
    sum_eps = 0.25 if rule == "epsilon" else 1e-6  # the sums take the epsilon of the convolutions' rule
    for i in range(2):
        slow = dense_lrp(net, x[i], int(target[i]), rules, sum_eps=sum_eps)
        assert slow.abs().max() > 0
        assert torch.allclose(ours[i], slow, rtol=0, atol=1e-9 * float(slow.abs().max())), \
            float((ours[i] - slow).abs().max())


@pytest.mark.parametrize("add", ["add_", "torch.add", "plus"])
def test_every_spelling_of_the_sum_is_caught(add):
    x = torch.rand(2, 2, 6, 6, dtype=DTYPE, generator=torch.Generator().manual_seed(4))
    expected = lrp(tiny_residual("iadd"), x, 1)
    assert torch.allclose(lrp(tiny_residual(add), x, 1), expected, rtol=1e-12, atol=0)


def test_a_sum_with_a_constant_is_a_bias():
    """Only sums of two relevance-carrying tensors are split: ``x + constant`` keeps the gradient, so the
    constant takes its share, as a bias does."""
    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 4, bias=False), nn.Linear(4, 2, bias=False)
            self.register_buffer("shift", torch.full((1, 4), 0.5, dtype=DTYPE))

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x.flatten(1)) + self.shift))

    torch.manual_seed(0)
    net = Shifted().to(DTYPE)
    x = torch.rand(1, 1, 2, 2, dtype=DTYPE)
    with torch.no_grad():
        h = net.fc1(x.flatten(1)) + net.shift
    as_bias = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2, bias=False)).to(DTYPE)
    with torch.no_grad():
        as_bias[1].weight.copy_(net.fc1.weight)
        as_bias[1].bias.copy_(net.shift[0])
        as_bias[3].weight.copy_(net.fc2.weight)
    assert h.abs().min() > 0
    assert torch.allclose(lrp(net, x, 0, epsilon=0.0), lrp(as_bias, x, 0, epsilon=0.0), rtol=1e-12)


# --- zero denominators, and the nets that need no special layers --------------------------------------------

def test_zero_denominator_gives_zero_not_nan():
    """A batch norm right after a ReLU, with the identity's statistics: its output is exactly 0 wherever the
    ReLU's is, and with epsilon=0 the denominator there is 0 (it was NaN all over the map)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(), nn.BatchNorm2d(4),
                        nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 8 * 8, 3, bias=False)).to(DTYPE).eval()
    x = torch.rand(2, 3, 8, 8, dtype=DTYPE)
    with torch.no_grad():
        assert (net[:3](x) == 0).any()
    for rule in RULES:
        sums = relevance_sums(net, x, 1, rule=rule, epsilon=0.0, stabilizer=1e-12)
        assert all(torch.isfinite(total).all() for _, total in sums), rule
    sums = relevance_sums(net, x, 1, epsilon=0.0)
    for name, total in sums:  # bias-free, identity batch norm: conserved
        assert torch.allclose(total, sums[-1][1], rtol=1e-9), name


def zero_biases(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.zero_()
    return model


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "shufflenet_v2_x0_5"])
def test_conservation_on_torchvision_nets(name):
    """Random-init batch norms have zero shift, so with the biases zeroed and epsilon=0 every rule step is
    conservative (merged convs, densenet's element-wise norms, sums, concatenations, global pools): the input
    relevance sums to the logit. densenet121's map was all NaN; shufflenet_v2 was refused (empty branch1)."""
    model = zero_biases(torchvision_net(name))
    x, target = images(1, 64), torch.tensor([5])
    before = model_state(model)
    relevance = lrp(model, x, target, epsilon=0.0)
    assert_same_state(before, model_state(model))
    assert torch.isfinite(relevance).all() and relevance.abs().max() > 0
    with torch.no_grad():
        logit = model(x)[0, 5]
    assert torch.allclose(relevance.sum(), logit, rtol=1e-6), (float(relevance.sum()), float(logit))
    composite = lrp(model, x, target, rule="composite")
    assert torch.isfinite(composite).all() and composite.abs().max() > 0


def test_model_left_as_it_came_in_training_mode(resnet18):
    model = copy.deepcopy(resnet18).train()
    model.layer1[0].conv1.weight.requires_grad_(False)
    before = model_state(model)
    lrp(model, images(1), 0, rule="composite")
    assert_same_state(before, model_state(model))
    with pytest.raises(ValueError, match="class"):
        lrp(model, images(1), target=1000)
    assert_same_state(before, model_state(model))


def test_a_merged_layer_whose_output_also_goes_elsewhere():
    """A conv whose output feeds its batch norm and also a skip: the norm's path gets the merged rule, the skip
    the conv's own rule. The reference: the same net with the conv duplicated, one copy for each use."""
    class Shared(nn.Module):
        def __init__(self, duplicate: bool):
            super().__init__()
            self.duplicate = duplicate
            self.conv, self.twin, self.bn = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(2, 3, 3, padding=1), \
                nn.BatchNorm2d(3)
            self.fc = nn.Linear(3 * 6 * 6, 4)

        def forward(self, x):
            z = self.conv(x)
            skip = self.twin(x) if self.duplicate else z
            return self.fc(torch.relu(self.bn(z) + skip).flatten(1))

    torch.manual_seed(0)
    shared = randomise_batch_norms(Shared(False).to(DTYPE).eval())
    duplicated = copy.deepcopy(shared)
    duplicated.duplicate = True
    duplicated.twin.load_state_dict(duplicated.conv.state_dict())
    x = torch.rand(2, 2, 6, 6, dtype=DTYPE, generator=torch.Generator().manual_seed(6))
    for rule in ("epsilon", "alpha2beta1"):
        expected = lrp(duplicated, x, 1, rule=rule)
        assert expected.abs().max() > 0
        assert torch.allclose(lrp(shared, x, 1, rule=rule), expected, rtol=0, atol=1e-10 * float(expected.abs().max()))


def test_linear_then_batchnorm1d_is_merged_too():
    torch.manual_seed(0)
    net = randomise_batch_norms(nn.Sequential(nn.Flatten(), nn.Linear(8, 5), nn.BatchNorm1d(5), nn.ReLU(),
                                              nn.Linear(5, 3)).to(DTYPE).eval())
    linear, bn = net[1], net[2]
    folded = nn.Sequential(nn.Flatten(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3)).to(DTYPE)
    with torch.no_grad():
        scale = bn.weight / (bn.running_var + bn.eps).sqrt()
        folded[1].weight.copy_(linear.weight * scale[:, None])
        folded[1].bias.copy_((linear.bias - bn.running_mean) * scale + bn.bias)
        folded[3].load_state_dict(net[4].state_dict())
    x = torch.rand(3, 2, 2, 2, dtype=DTYPE, generator=torch.Generator().manual_seed(7))
    for rule in RULES[:4]:
        expected = lrp(folded, x, 2, rule=rule)
        assert expected.abs().max() > 0
        assert torch.allclose(lrp(net, x, 2, rule=rule), expected, rtol=0, atol=1e-10 * float(expected.abs().max()))
