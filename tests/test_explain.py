"""Explanations by relevant features: top-k selection, maps, determinism, model state, bad input."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vefi.explain as explain_module
from vefi.backproject import backproject, heatmap
from vefi.descriptors import descriptors
from vefi.explain import background_ratio, background_share, contributions, explain, explanation_figure
from vefi.book.models import build_model
from vefi.relevant import RelevantFeatures
from vefi.selection import RelevantFeatureSelector


def fitted(net, n=60, mu=2.0, seed=0):
    """A selector fitted on random images of a random net: a RelevantFeatures like the book's."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(n, *net.input_shape, generator=gen)
    X, index, _ = descriptors(net, images, show_progress=False)
    y = np.arange(n) % len(net.classes)
    selector = RelevantFeatureSelector(mu=mu, tol=1e-6, max_iter=3000).fit(X, y)
    return RelevantFeatures(net, index, selector, tuple(range(len(net.classes))), net.input_shape, "mnist")


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    net = build_model("mnist").eval()
    rel = fitted(net)
    images = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    return net, rel, images


@pytest.fixture(scope="module")
def explained(setup):
    net, rel, images = setup
    return explain(net, images, rel)


def slow_top_k(net, rel, images, targets, k, score="paper"):
    """Obviously right: loop over images and features (the paper's w * x, or the demo's x * w / sum(w))."""
    X, _, _ = descriptors(net, images, [layer.number for layer in rel.index.layers], show_progress=False)
    support = rel.selector.get_support()
    out = []
    for i in range(len(images)):
        w = rel.selector.coef_[int(targets[i])]
        total = sum(float(v) for v in w)
        scored = []
        for j in range(len(rel.index)):
            s = float(X[i, j]) * float(w[j]) / (total if score == "demo" else 1.0)
            if support[j] and s > 0:
                scored.append((s, j))
        scored.sort(key=lambda t: (-t[0], t[1]))
        out.append([(rel.index[j], s) for s, j in scored[:k]])
    return out


@pytest.mark.parametrize("k, score", [(1, "paper"), (3, "paper"), (3, "demo")])
def test_top_k_matches_a_direct_computation(setup, explained, k, score):
    net, rel, images = setup
    e = explained if (k, score) == (3, "paper") else explain(net, images, rel, k=k, score=score)
    with torch.no_grad():
        predicted = net(images).argmax(1)
    assert torch.equal(e.predicted, predicted) and torch.equal(e.target, predicted)
    expected = slow_top_k(net, rel, images, predicted, k, score)
    for i in range(len(images)):
        assert e.features[i] == [f for f, _ in expected[i]]
        np.testing.assert_allclose(e.scores[i], [s for _, s in expected[i]], rtol=1e-5)
        assert len(e.features[i]) <= k


def test_any_class_on_request(setup):
    net, rel, images = setup
    for target in (0, torch.tensor([3, 1, 4, 5])):
        e = explain(net, images, rel, target=target)
        wanted = torch.full((4,), target) if isinstance(target, int) else target
        assert torch.equal(e.target, wanted)
        expected = slow_top_k(net, rel, images, wanted, 3)
        assert e.features == [[f for f, _ in row] for row in expected]


def test_maps_are_the_normalised_back_projections_and_heatmap_their_max(setup, explained):
    net, rel, images = setup
    e = explained
    for i in range(len(images)):
        feats = [(f.layer_number, f.channel) for f in e.features[i]]
        if not feats:
            continue
        # one image at a time, independently of the batch
        direct = heatmap(backproject(net, images[i], feats, rule="guided", stride_fix=True))[0]
        torch.testing.assert_close(e.maps[i, : len(feats)], direct, rtol=1e-5, atol=1e-6)
        assert torch.all(e.maps[i, len(feats):] == 0)
        assert torch.all(e.maps[i, : len(feats)].amax((-2, -1)) == 1)
    torch.testing.assert_close(e.heatmap, e.maps.amax(1))
    assert e.heatmap.min() >= 0 and e.heatmap.max() <= 1


def test_fewer_positive_features_than_k_gives_fewer(setup):
    net, rel, images = setup
    k = len(rel.index)
    e = explain(net, images, rel, k=k)
    counts = [len(f) for f in e.features]
    positive = (contributions(descriptors(net, images, show_progress=False).X, rel.selector.coef_,
                              e.target.numpy(), rel.selector.get_support()) > 0).sum(1)
    assert counts == positive.tolist() and max(counts) < k
    for i, c in enumerate(counts):
        assert torch.all(e.maps[i, c:] == 0)


def test_batch_equals_one_by_one(setup, explained):
    net, rel, images = setup
    batch = explained
    for i in range(2):
        one = explain(net, images[i], rel)
        assert one.features[0] == batch.features[i]
        torch.testing.assert_close(one.maps[0], batch.maps[i], rtol=1e-4, atol=1e-5)


def test_deterministic(setup, explained):
    net, rel, images = setup
    a, b = explained, explain(net, images, rel)
    assert a.features == b.features and torch.equal(a.maps, b.maps) and torch.equal(a.heatmap, b.heatmap)


def test_baselines(setup, explained):
    net, rel, images = setup
    fixed = explained
    plain = explain(net, images, rel, stride_fix=False)
    up = explain(net, images, rel, maps="upsampled")
    assert fixed.features == plain.features == up.features
    assert not torch.allclose(fixed.maps, plain.maps)
    # upsampled activations, checked directly for conv features
    for i, feats in enumerate(up.features):
        for j, f in enumerate(feats):
            if f.layer_number >= up.first_fc:
                assert torch.all(up.maps[i, j] == 0)
                continue
            torch.testing.assert_close(up.maps[i, j], upsampled(net, images[i], f.layer_number, f.channel))
    # the random net's features may all be fc: check conv maps on chosen features too
    from vefi.layers import layer_table
    chosen = [[(4, 3), (7, 10), (1, 0)], [(6, 63), (2, 5), (10, 1)]]
    maps = explain_module.upsampled_maps(net, images[:2], chosen, layer_table(net))
    for i, row in enumerate(chosen):
        for j, (number, channel) in enumerate(row):
            expected = upsampled(net, images[i], number, channel) if number < 8 else torch.zeros(28, 28)
            torch.testing.assert_close(maps[i, j], expected, rtol=1e-5, atol=1e-6)


def upsampled(net, image, number, channel):
    """The layer's output (before any in-place ReLU after it) for one image, upsampled and min-max scaled."""
    with torch.no_grad():
        act = torch.nn.Sequential(*list(net.children())[:number])(image[None].clone())[0, channel]
    m = F.interpolate(act[None, None], size=(28, 28), mode="bilinear", align_corners=False)[0, 0]
    return (m - m.min()) / (m.max() - m.min())


def state(net):
    return ({k: v.clone() for k, v in net.state_dict().items()}, [m.training for m in net.modules()],
            [p.requires_grad for p in net.parameters()])


def assert_unchanged(net, before):
    params, training, grads = before
    assert all(torch.equal(params[k], v) for k, v in net.state_dict().items())
    assert [m.training for m in net.modules()] == training
    assert [p.requires_grad for p in net.parameters()] == grads
    for m in net.modules():
        assert not m._forward_hooks and not m._backward_hooks and not m._forward_pre_hooks


def test_model_left_unchanged(setup, monkeypatch):
    net, rel, images = setup
    net = copy.deepcopy(net)
    rel = RelevantFeatures(net, rel.index, rel.selector, rel.classes, rel.input_shape, rel.name)
    net.train()
    net.conv1.weight.requires_grad_(False)
    before = state(net)
    explain(net, images, rel)
    explain(net, images, rel, maps="upsampled")
    assert_unchanged(net, before)

    def broken(*args, **kwargs):
        backproject(*args, **kwargs)
        raise RuntimeError("boom")

    monkeypatch.setattr(explain_module, "backproject", broken)
    with pytest.raises(RuntimeError, match="boom"):
        explain(net, images, rel)
    assert_unchanged(net, before)
    with pytest.raises(ValueError):
        explain(net, images, rel, target=10)
    assert_unchanged(net, before)


def test_bad_input(setup):
    net, rel, images = setup
    with pytest.raises(ValueError, match=r"shape \(N, 1, 28, 28\)"):
        explain(net, torch.rand(2, 1, 32, 32), rel)
    with pytest.raises(ValueError, match=r"shape \(N, 1, 28, 28\)"):
        explain(net, torch.rand(2, 3, 28, 28), rel)
    with pytest.raises(ValueError, match="k must be at least 1"):
        explain(net, images, rel, k=0)
    with pytest.raises(TypeError, match="k must be an int"):
        explain(net, images, rel, k=2.5)
    with pytest.raises(ValueError, match="class index 10 out of range.*10 classes"):
        explain(net, images, rel, target=10)
    with pytest.raises(ValueError, match="class index -1 out of range"):
        explain(net, images, rel, target=torch.tensor([0, 1, -1, 2]))
    with pytest.raises(ValueError, match="one class per image"):
        explain(net, images, rel, target=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="NaN"):
        bad = images.clone()
        bad[0, 0, 3, 3] = float("nan")
        explain(net, bad, rel)
    with pytest.raises(ValueError, match="maps must be one of"):
        explain(net, images, rel, maps="gradcam")
    with pytest.raises(TypeError, match="RelevantFeatures"):
        explain(net, images, object())


def test_selector_fitted_on_another_model(setup):
    net, rel, images = setup
    torch.manual_seed(1)
    flower = build_model("an8flower-single")
    with pytest.raises(ValueError, match="fitted on another model"):
        explain(flower, torch.rand(1, 3, 112, 112), rel)
    same_architecture = build_model("mnist")  # other weights
    with pytest.raises(ValueError, match="fitted on another model.*different weights"):
        explain(same_architecture, images, rel)
    # the same weights in another object are fine
    twin = copy.deepcopy(net)
    assert explain(twin, images, rel).features == explain_module.explain(net, images, rel).features
    # weights wider than the index
    wide = copy.deepcopy(rel.selector)
    wide.coef_ = np.hstack([wide.coef_, np.zeros((10, 3))])
    with pytest.raises(ValueError, match="weights have shape"):
        RelevantFeatures(net, rel.index, wide, rel.classes, rel.input_shape)


def test_background_share_and_figures(explained):
    e = explained
    share = background_share(e, threshold=0.5)
    assert share.shape == e.maps.shape[:2] and share.min() >= 0 and share.max() <= 1
    # obviously right, one map at a time
    i, j = 0, 0
    background = e.images[i].mean(0) <= 0.5
    m = e.maps[i, j]
    assert abs(float(share[i, j]) - float(m[background].sum() / m.sum())) < 1e-5
    ratio = background_ratio(e, threshold=0.5, margin=0)
    assert abs(float(ratio[i, j]) - float(m[background].mean() / m[~background].mean())) < 1e-4
    with pytest.raises(ValueError, match="margin"):
        background_ratio(e, margin=-1)
    fig = e.plot(0)
    assert len(fig.axes) >= 3
    fig = explanation_figure([(e, 0), (e, 2)], k=3)
    assert len(fig.axes) == 2 * 5
    import matplotlib.pyplot as plt
    plt.close("all")


def test_demo_score_flips_the_ranking_of_a_class_whose_weights_sum_below_zero(setup):
    """The demo's division by sum(w_c) keeps the features that speak against a class with sum(w_c) < 0;
    the paper's w_c * x keeps those that speak for it (descriptors are >= 0, so: w > 0)."""
    net, rel, images = setup
    selector = copy.deepcopy(rel.selector)
    selector.coef_ = selector.coef_ * np.where(selector.coef_.sum(1, keepdims=True) > 0, -1.0, 1.0)
    flipped = RelevantFeatures(net, rel.index, selector, rel.classes, rel.input_shape)
    for c in range(len(rel.classes)):
        w = selector.coef_[c]
        assert w.sum() < 0
        paper = explain(net, images, flipped, target=c, k=3)
        demo = explain(net, images, flipped, target=c, k=3, score="demo")
        weight = lambda f: w[rel.index.column(f.layer_number, f.channel)]  # noqa: E731
        assert all(weight(f) > 0 for row in paper.features for f in row)
        assert all(weight(f) < 0 for row in demo.features for f in row)
        assert (any(paper.features) or not (w > 0).any()) and (any(demo.features) or not (w < 0).any())
