"""Receptive fields against the support of a brute-force gradient: random chains, random branched nets
(residual additions, concatenations, gates), and the torchvision classifiers with positive random weights."""

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vefi.book.models import build_model
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
        # with holes the support is not the whole box, but the clipped box is its bounding box: the taps
        # that fall into padding are left out at every map, so each side is a pixel some path reaches
        assert bounding_box(support) == (top, left, bottom, right), (seed, (y, x), net)
        unclipped = fields[number].box(y, x, clip=False)
        assert unclipped[0] <= top and unclipped[1] <= left and unclipped[2] >= bottom and unclipped[3] >= right


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


# ---------------------------------------------------------------------------------------------------------
# Branched networks: the box of a position (over all its channels) against the gradient support


def position_support(net, image, picks):
    """Support of d(sum over channels of the output at (y, x)) / d image, one row per pick.

    ``picks``: list of ((module, call), y, x) with y = x = None for the sum of all outputs of the module's
    call-th call (a unit of a whole-image layer sees what all of them see). One forward pass on a batch with
    one pick per row, one backward pass."""
    image = image.expand(len(picks), *image.shape[1:]).clone().requires_grad_(True)
    captured, counts = {}, {}

    def hook(module, inputs, output):
        counts[module] = call = counts.get(module, 0) + 1
        captured[(module, call)] = output.clone()  # clone: a later in-place op must not rewrite it

    handles = [m.register_forward_hook(hook) for m in {m for (m, _), _, _ in picks}]
    try:
        net(image)
    finally:
        for h in handles:
            h.remove()
    seeds = [captured[m][row].sum() if y is None else captured[m][row, :, y, x].sum()
             for row, (m, y, x) in enumerate(picks)]
    (grad,) = torch.autograd.grad(torch.stack(seeds).sum(), image)
    return grad.abs().sum(1) > 0


def random_window(rng, channels, out, *, holes):
    if rng.random() < 0.65:
        k = int(rng.integers(1, 6))
        s = int(rng.integers(1, 4 if holes else min(k, 3) + 1))
        d = int(rng.integers(1, 3)) if holes else 1
        return nn.Conv2d(channels, out, k, stride=s, padding=int(rng.integers(0, k // 2 + 1)), dilation=d), out
    k = int(rng.integers(2, 4))
    s = int(rng.integers(1, 4 if holes else k + 1))
    return nn.AvgPool2d(k, stride=s, padding=int(rng.integers(0, k // 2 + 1))), channels


class Merge(nn.Module):
    """Two random branches on one input, added (or concatenated along channels), optionally gated by a global
    vector of their input (squeeze-and-excitation)."""

    def __init__(self, rng, channels, side, *, holes):
        super().__init__()
        self.cat, self.gate = bool(rng.random() < 0.5), bool(rng.random() < 0.15)
        for _ in range(500):  # draw branch pairs until their maps have the same size
            a, ca = random_window(rng, channels, 3, holes=holes)
            b, cb = random_window(rng, channels, 3 if not self.cat else 2, holes=holes)
            if ca != cb and not self.cat:
                continue
            try:
                sa, sb = (tuple(m(torch.zeros(1, channels, side, side)).shape) for m in (a, b))
            except RuntimeError:  # a kernel larger than the padded map
                continue
            if sa[-1] == sb[-1] and sa[-1] >= 2:
                break
        else:
            a, b, ca, cb = nn.Identity(), nn.Identity(), channels, channels
        self.a, self.b = a, b
        self.channels = ca + cb if self.cat else ca
        self.fc = nn.Linear(channels, self.channels)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        out = torch.cat([a, b], dim=1) if self.cat else a + b
        if self.gate:
            out = out * self.fc(x.mean((2, 3)))[:, :, None, None]
        return out


def random_graph(seed, *, holes=False):
    """A random linear net (no ReLU: every path is nonzero with probability one) of merge blocks, each
    followed by an identity so that the merged map is a layer; float64 with normal weights. Returns the net
    and its input size."""
    rng = np.random.default_rng(seed)
    side = int(rng.integers(20, 36))
    layers, channels, s = [], 1, side
    for _ in range(int(rng.integers(2, 4))):
        block = Merge(rng, channels, s, holes=holes)
        try:
            new = block(torch.zeros(1, channels, s, s)).shape[-1]
        except RuntimeError:
            break
        if new < 2:
            break
        layers += [block, nn.Identity()]
        channels, s = block.channels, new
    net = nn.Sequential(*layers, nn.Conv2d(channels, 2, 3, padding=1)).double()
    torch.manual_seed(seed)
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight)
    return net, side


def check_boxes(net, size, fields, *, channels=1, exact_fill=False, image=None):
    """For each field, at three positions (one for a whole-image field): the gradient support of the
    position lies in the box and touches its four sides; with ``exact_fill`` it fills the box."""
    dtype = next(net.parameters()).dtype
    picks, boxes = [], []
    for field in fields:
        module = (field.layer.module, field.layer.call)
        if field.whole:
            picks.append((module, None, None))
            boxes.append(field.box(0, 0))
            continue
        h, w = field.map_size
        for y, x in sorted({(0, 0), (h - 1, w - 1), (h // 2, w // 3)}):
            picks.append((module, y, x))
            boxes.append(field.box(y, x))
    if image is None:
        image = torch.rand(1, channels, size, size, dtype=dtype, generator=torch.Generator().manual_seed(3)) + 0.5
    support = position_support(net, image, picks)
    for row, ((module, y, x), box) in enumerate(zip(picks, boxes)):
        mask = support[row]
        if box == (0, 0, 0, 0):  # a unit that sees only padding
            assert not mask.any(), (module, y, x)
            continue
        assert bounding_box(mask) == box, (module, (y, x), box)
        if exact_fill:
            top, left, bottom, right = box
            assert mask[top:bottom, left:right].all(), (module, (y, x), box)


@pytest.mark.parametrize("seed", range(16))
def test_branched_nets_box_equals_gradient_support(seed):
    """After every addition, concatenation and gate the box is the bounding box of the support (the support
    itself is a union of boxes, not always a box: branches of different field sizes)."""
    net, size = random_graph(seed)
    fields = [f for f in receptive_fields(net, (1, size, size)).values() if f.layer.kind != "fc"]
    assert any(isinstance(m, Merge) and m.gate for m in net) == any(f.whole for f in fields)
    check_boxes(net, size, fields)


@pytest.mark.parametrize("seed", range(8))
def test_branched_nets_with_holes_bound_the_gradient_support(seed):
    net, size = random_graph(100 + seed, holes=True)
    fields = [f for f in receptive_fields(net, (1, size, size)).values() if f.layer.kind != "fc"]
    check_boxes(net, size, fields)


# ---------------------------------------------------------------------------------------------------------
# The torchvision classifiers, random weights.

MODELS = {  # name: (constructor keywords, input side)
    "alexnet": ({}, 64),
    "vgg11": ({}, 64),
    "resnet18": ({}, 64),
    "resnet50": ({}, 64),
    "densenet121": ({}, 64),
    "squeezenet1_0": ({}, 64),
    "googlenet": ({"aux_logits": False, "init_weights": True}, 64),
    "shufflenet_v2_x0_5": ({}, 64),
    "regnet_y_400mf": ({}, 64),
    "mobilenet_v2": ({}, 64),
    "mobilenet_v3_small": ({}, 64),
    "efficientnet_b0": ({}, 64),
    "convnext_tiny": ({}, 64),
    "vit_b_16": ({"image_size": 64}, 64),
}
ZOO = list(MODELS)  # the slow part of this file (about 20 s of CPU): shorten this list to skip models


def zoo_model(name):
    from torchvision import models  # a runtime dependency: never skipped

    keywords, side = MODELS[name]
    # built without initialising its weights (torchvision's initialisation of vgg takes seconds): the
    # geometry does not depend on them, and positive_twin draws its own (random, positive)
    try:
        with torch.device("meta"):
            net = getattr(models, name)(weights=None, **keywords)
    except NotImplementedError:  # regnet computes its widths with tensors, which need data
        net = getattr(models, name)(weights=None, **keywords)
    net = net.to_empty(device="cpu").eval()
    with torch.no_grad():
        for tensor in [*net.parameters(), *net.buffers()]:
            tensor.zero_()  # not left as whatever memory held
    return net, side


def positive_twin(net):
    """``net`` changed in place (the tests build their own) into the same geometry with every path nonzero:
    all weights positive (scaled by fan-in so that the values stay near one), for positive inputs; max pools
    (one winner) become average pools of the same windows; activations that saturate on large inputs become
    ones that do not (ReLU6: ReLU; the sigmoid of a gate: softsign, whose slope stays nonzero where float32's
    sigmoid is exactly flat). Then the gradient support of a position touches every side of its box."""
    for name, module in list(net.named_modules()):
        if isinstance(module, nn.MaxPool2d):
            new = nn.AvgPool2d(module.kernel_size, module.stride, module.padding, ceil_mode=module.ceil_mode)
        elif isinstance(module, nn.Hardtanh):  # ReLU6 included
            new = nn.ReLU()
        elif isinstance(module, (nn.Hardsigmoid, nn.Sigmoid)):  # gates: bounded, but never flat
            new = nn.Softsign()
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, child, new)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            scale = 1 / p[0].numel() if p.dim() >= 2 else 1.0
            p.uniform_(0.5 * scale, 1.5 * scale, generator=generator)
        for module in net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.zero_()
                module.running_var.fill_(1)
    return net.requires_grad_(False)


def spread(fields, count):
    """``count`` fields spread over the depth (first, last, and in between)."""
    if len(fields) <= count:
        return fields
    return [fields[i] for i in np.linspace(0, len(fields) - 1, count).round().astype(int)]


@pytest.mark.parametrize("name", ZOO)
def test_torchvision_boxes_against_gradient_support(name):
    net, side = zoo_model(name)
    fields = list(receptive_fields(net, (3, side, side)).values())
    # maps with channels first (the layers whose positions are (y, x) of dims 1, 2 of the output)
    maps = [f for f in fields if not f.whole and f.map_size is not None and len(f.layer.output_shape) == 3
            and tuple(f.layer.output_shape[1:]) == f.map_size]
    assert maps, "no spatial layer"
    whole = [f for f in fields if f.whole and (f.map_size is not None or len(f.layer.output_shape) == 1)]
    chosen = spread(maps, 4) + spread(whole, 2)
    twin = positive_twin(net)
    modules = dict(twin.named_modules())
    twinned = [replace(f, layer=replace(f.layer, module=modules[f.layer.module_name])) for f in chosen]
    check_boxes(twin, side, twinned, channels=3)
    # nothing made up for global layers: no jump, no start
    assert all(f.jump is None and f.start is None for f in fields if f.whole)


def test_residual_jumps_and_gates_are_whole():
    net, side = zoo_model("resnet18")
    fields = {f.layer.name: f for f in receptive_fields(net, (3, side, side)).values()}
    assert fields["layer2.1.conv2"].jump == (8, 8)  # composing the layers in series said 16
    assert fields["layer4.1.conv2"].jump == (32, 32) and fields["fc"].whole
    net, side = zoo_model("efficientnet_b0")
    fields = list(receptive_fields(net, (3, side, side)).values())
    gate = next(f for f in fields if "block.1" in f.layer.name and f.layer.kind == "pool")  # SE squeeze
    assert gate.whole and all(f.whole for f in fields[fields.index(gate):])  # the gated map sees all


def test_vit_tokens_have_no_box():
    net, side = zoo_model("vit_b_16")
    fields = {f.layer.name: f for f in receptive_fields(net, (3, side, side)).values()}
    patches = fields["conv_proj"]
    assert patches.size == (16, 16) and patches.jump == (16, 16) and patches.box(1, 2) == (16, 32, 32, 48)
    tokens = fields["encoder.layers.encoder_layer_0.ln_1"]
    assert tokens.whole and tokens.map_size is None
    with pytest.raises(ValueError, match="not a map of positions"):
        tokens.box(0, 0)
    with pytest.raises(ValueError, match="not a map of positions"):
        receptive_box(net, "encoder.ln", 0, 0, input_shape=(3, side, side))
    assert receptive_box(net, "heads.head", 0, 0, input_shape=(3, side, side)) == (0, 0, side, side)


# ---------------------------------------------------------------------------------------------------------
# Operations that are not leaf modules, irregular fields, errors, the model left as it came


class Functional(nn.Module):
    """Zero padding, a split and a concatenation, a channel shuffle, a channels-last linear layer, a
    broadcast addition, a ceil-mode pool and a dilated "same" conv, all in the forward."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(2, 2, 5, padding=2)
        self.lin = nn.Linear(4, 4)
        self.conv3 = nn.Conv2d(4, 3, 3, dilation=2, padding="same")
        self.out = nn.Identity()

    def forward(self, x):
        x = self.conv1(F.pad(x, (1, 0, 2, 1)))
        a, b = x.chunk(2, dim=1)
        x = torch.cat([a, self.conv2(b)], 1)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        x = self.lin(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = F.avg_pool2d(x + x[:, :1], 2, ceil_mode=True)
        return self.out(self.conv3(x))


def test_functional_operations_follow_the_graph():
    net = Functional().double()
    size = 23
    fields = receptive_fields(net, (1, size, size))
    by_name = {f.layer.name: f for f in fields.values()}
    assert by_name["lin"].map_size == by_name["conv2"].map_size == (13, 12)  # channels last: dims 1, 2
    assert by_name["lin"].size == by_name["conv2"].size == (11, 11)
    assert by_name["conv1"].box(0, 0) == (0, 0, 0, 0)  # its taps fall into the two rows of zero padding
    check_boxes(net, size, [by_name[n] for n in ("conv1", "conv2", "conv3", "out")])


class Mixed(nn.Module):
    """Two branches that reach the same map size with different jumps (2 and 1)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Conv2d(1, 1, 2, stride=2), nn.Conv2d(1, 1, 9), nn.Identity()

    def forward(self, x):
        return self.out(self.a(x) + self.b(x))


def test_irregular_fields_have_exact_clipped_boxes_only():
    net = Mixed().double()
    field = list(receptive_fields(net, (1, 16, 16)).values())[-1]
    assert not field.regular and field.size is None and field.jump is None
    assert field.box(0, 0) == (0, 0, 9, 9) and field.box(7, 7) == (7, 7, 16, 16)
    check_boxes(net, 16, [field])
    with pytest.raises(ValueError, match="irregular"):
        field.box(0, 0, clip=False)
    assert "irregular" in format_receptive_table(receptive_fields(net, (1, 16, 16)))


@pytest.mark.parametrize("size, regular", [(16, True), (14, False)])
def test_adaptive_pool_windows(size, regular):
    net = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.AdaptiveAvgPool2d(4), nn.Conv2d(1, 1, 3)).double()
    fields = receptive_fields(net, (1, size, size))
    assert fields[2].regular == regular
    if regular:  # windows of 4, 4 apart
        assert (fields[2].size, fields[2].jump, fields[3].size, fields[3].jump) == ((6, 6), (4, 4), (14, 14), (4, 4))
    check_boxes(net, size, list(fields.values()))
    pooled = receptive_fields(nn.Sequential(nn.Conv2d(1, 1, 3), nn.AdaptiveMaxPool2d(1)), (1, size, size))
    assert pooled[2].whole and pooled[2].box(0, 0) == (0, 0, size, size)


class Flip(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3)

    def forward(self, x):
        return torch.flip(self.conv(x), [3])


class Crop(Flip):
    def forward(self, x):
        return self.conv(x)[:, :, 1:]


def test_unknown_operations_are_named():
    with pytest.raises(ValueError, match="'flip'.*receptive field is unknown"):
        receptive_fields(Flip(), (1, 8, 8))
    with pytest.raises(ValueError, match="slices the rows or columns.*receptive field is unknown"):
        receptive_fields(Crop(), (1, 8, 8))
    with pytest.raises(ValueError, match="'interpolate'.*in module '1' \\(Upsample\\)"):
        receptive_fields(nn.Sequential(nn.Conv2d(1, 1, 3), nn.Upsample(scale_factor=2)), (1, 8, 8))


def test_torchvision_model_left_as_it_came():
    net, side = zoo_model("resnet18")
    net.train()
    net.layer1.requires_grad_(False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flags = [(m.training, p.requires_grad) for m in net.modules() for p in m.parameters(recurse=False)]
    receptive_fields(net, (3, side, side))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert flags == [(m.training, p.requires_grad) for m in net.modules() for p in m.parameters(recurse=False)]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())
