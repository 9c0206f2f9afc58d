"""Tests of vefi.criteria: pixel flipping against a slow loop, a perfect heatmap beats a random one,
continuity of known explainers, and refusal of bad input."""

import math

import pytest
import torch
from torch import nn

from vefi.criteria import (Continuity, PerturbationCurve, Selectivity, continuity, gaussian_blur,
                           perturbation_curve, random_heatmaps, translation_path)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)  # small, so that the slow loop is quick; in-place ReLU and dropout as in the book
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Dropout(0.5), nn.Linear(4 * 14 * 14, 10))
    model.train()  # the metric must evaluate in eval mode and give the flag back
    return model


@pytest.fixture(scope="module")
def images():
    return torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def slow_curve(model, image, heatmap, target, *, patch, per_step, steps, baseline_image, score="logit"):
    """One image, one step at a time, patches listed in Python: the obviously right pixel flipping."""
    h, w = heatmap.shape
    patches = []
    for top in range(0, h, patch):
        for left in range(0, w, patch):
            patches.append((top, left, float(heatmap[top:top + patch, left:left + patch].double().sum())))
    order = sorted(range(len(patches)), key=lambda p: -patches[p][2])  # stable: ties in raster order
    out = []
    model.eval()
    for k in range(steps + 1):
        x = image.clone()
        for p in order[:k * per_step]:
            top, left, _ = patches[p]
            x[:, top:top + patch, left:left + patch] = baseline_image[:, top:top + patch, left:left + patch]
        with torch.no_grad():
            logits = model(x[None])[0]
        if score == "probability":
            logits = logits.softmax(0)
        out.append(float(logits[target]))
    return out


@pytest.mark.parametrize("baseline, patch, per_step, score", [
    ("zero", 4, 1, "logit"), ("mean", 5, 2, "probability"), ("blur", 7, 3, "logit"), ("uniform", 4, 5, "logit"),
    (0.5, 3, 4, "logit")])
def test_curve_matches_slow_loop(net, images, baseline, patch, per_step, score):
    heatmaps = random_heatmaps(3, (28, 28), seed=4)
    heatmaps[1] = (heatmaps[1] * 3).floor()  # exact ties (integer sums), resolved in raster order by both
    target = torch.tensor([0, 3, 9])
    was_training = net.training
    before = {k: v.clone() for k, v in net.state_dict().items()}
    curve = perturbation_curve(net, images, heatmaps, target, patch=patch, per_step=per_step, baseline=baseline,
                               score=score, batch_size=7, seed=2)
    assert net.training == was_training
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    if baseline == "zero":
        base = torch.zeros_like(images)
    elif baseline == "mean":
        base = images.mean((2, 3), keepdim=True).expand_as(images)
    elif baseline == "blur":
        base = gaussian_blur(images, 2.0)
    elif baseline == "uniform":
        base = torch.rand(images.shape, generator=torch.Generator().manual_seed(2))
    else:
        base = torch.full_like(images, baseline)
    count = math.ceil(28 / patch) ** 2
    steps = math.ceil(count / per_step)
    assert curve.scores.shape == (3, steps + 1)
    for i in range(3):
        expected = slow_curve(net, images[i], heatmaps[i], int(target[i]), patch=patch, per_step=per_step,
                              steps=steps, baseline_image=base[i], score=score)
        net.train(was_training)
        torch.testing.assert_close(curve.scores[i], torch.tensor(expected), rtol=1e-4, atol=1e-5)
    assert curve.fraction[0] == 0 and curve.fraction[-1] == 1
    assert torch.all(curve.fraction[1:] > curve.fraction[:-1])


def test_fewer_steps_is_a_prefix(net, images):
    heatmaps = random_heatmaps(3, (28, 28), seed=0)
    full = perturbation_curve(net, images, heatmaps, patch=4)
    short = perturbation_curve(net, images, heatmaps, patch=4, steps=10)
    torch.testing.assert_close(short.scores, full.scores[:, :11])
    assert torch.equal(short.target, full.target)
    # target None is the predicted class of the clean image
    assert torch.equal(full.target, net.eval()(images).argmax(1))


def test_aopc_and_auc_definitions():
    curve = PerturbationCurve(torch.tensor([[4.0, 2.0, 1.0]]), torch.tensor([0.0, 0.5, 1.0]), torch.tensor([0]))
    assert curve.aopc.tolist() == [pytest.approx((0 + 2 + 3) / 3)]
    assert curve.auc.tolist() == [pytest.approx(0.5 * (4 + 2) / 2 + 0.5 * (2 + 1) / 2)]
    assert curve.steps == 2


def region_model(region: torch.Tensor) -> nn.Module:
    """Score of class 0 = sum of the pixels inside ``region``; class 1 = minus that."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(region.numel(), 2))
    with torch.no_grad():
        net[1].weight.copy_(torch.stack([region.flatten(), -region.flatten()]).float())
        net[1].bias.zero_()
    return net


def test_perfect_heatmap_beats_random():
    region = torch.zeros(1, 16, 16)
    region[:, 4:10, 2:8] = 1
    net = region_model(region)
    images = torch.rand(20, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    perfect = images[:, 0] * region[0]  # exactly each pixel's contribution to the score
    metric = Selectivity(patch=2)
    assert metric.higher_is_better is True
    good = metric(net, images, perfect, target=0)
    chance = metric.random_curve(net, images, target=0).aopc
    assert torch.all(good > chance)
    # the perfect curve reaches 0 once the region's 9 patches are gone, and stays there
    curve = metric.curve(net, images, perfect, target=0)
    assert torch.allclose(curve.scores[:, 9:], torch.zeros(1), atol=1e-5)
    assert torch.all(curve.scores[:, 8] > 0)
    # a heatmap that points the wrong way is worse than chance
    assert torch.all(metric(net, images, -perfect, target=0) < chance)
    # an explainer callable gives the same as its heatmaps
    explainer = lambda model, x, t: x[:, 0] * region[0]
    torch.testing.assert_close(metric(net, images, explainer, target=0), good)


def test_selectivity_bad_input(net, images):
    heatmaps = torch.rand(3, 28, 28)
    with pytest.raises(ValueError, match="shape"):
        perturbation_curve(net, images, torch.rand(3, 27, 28))
    with pytest.raises(ValueError, match="shape"):
        perturbation_curve(net, images, torch.rand(2, 28, 28))
    bad = heatmaps.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        perturbation_curve(net, images, bad)
    bad_images = images.clone()
    bad_images[1, 0, 3, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        perturbation_curve(net, bad_images, heatmaps)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        perturbation_curve(net, images, heatmaps, steps=0)
    with pytest.raises(ValueError, match="steps must be <= 49"):
        perturbation_curve(net, images, heatmaps, steps=50)
    with pytest.raises(ValueError, match="unknown baseline 'noise'"):
        perturbation_curve(net, images, heatmaps, baseline="noise")
    with pytest.raises(ValueError, match="unknown baseline"):
        Selectivity(baseline="noise")
    with pytest.raises(ValueError, match="unknown score"):
        Selectivity(score="loss")
    with pytest.raises(ValueError, match="patch"):
        perturbation_curve(net, images, heatmaps, patch=29)
    with pytest.raises(ValueError, match="target classes"):
        perturbation_curve(net, images, heatmaps, target=10)
    with pytest.raises(TypeError, match="heatmaps must be a torch.Tensor"):
        perturbation_curve(net, images, heatmaps.numpy())
    with pytest.raises(TypeError, match="int"):
        Selectivity(per_step=1.5)


def test_translation_path():
    x = torch.rand(2, 1, 6, 6)
    path = translation_path(x, (0, 1, -2), axis="y")
    assert path.shape == (2, 3, 1, 6, 6)
    assert torch.equal(path[:, 0], x)
    assert torch.equal(path[:, 1, :, 1:], x[:, :, :-1]) and torch.all(path[:, 1, :, 0] == 0)
    assert torch.equal(path[:, 2, :, :-2], x[:, :, 2:]) and torch.all(path[:, 2, :, -2:] == 0)
    with pytest.raises(ValueError, match="shift"):
        translation_path(x, (0, 6))
    with pytest.raises(ValueError, match="axis"):
        translation_path(x, (0, 1), axis="z")


def test_continuity_of_constant_explainer_is_zero():
    net = region_model(torch.ones(1, 8, 8))
    constant = lambda model, x, t: torch.full((x.shape[0], 8, 8), 0.3)
    metric = Continuity(shifts=(0, 1, 2))
    assert metric.higher_is_better is False
    assert metric(net, torch.rand(4, 1, 8, 8), constant).tolist() == [0.0] * 4


def test_continuity_of_linear_explainer_is_its_constant():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(64, 64, generator=g, dtype=torch.float64)
    x0 = torch.rand(2, 1, 8, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    steps = torch.tensor([0.0, 0.1, 0.25, 0.3], dtype=torch.float64).view(1, 4, 1, 1, 1)
    path = x0[:, None] + steps * v[:, None]  # a straight path: every pair differs by a multiple of v
    heat = (path.reshape(2, 4, 64) @ a.T).reshape(2, 4, 8, 8)
    expected = (v.reshape(2, 64) @ a.T).abs().sum(1) / v.reshape(2, 64).norm(dim=1)
    for pairs in ("all", "consecutive"):
        torch.testing.assert_close(continuity(path, heat, pairs=pairs), expected.float(), rtol=1e-5, atol=0)
    # any explainer is bounded by the largest pairwise ratio, so consecutive pairs never exceed all pairs
    noisy = heat + torch.randn(heat.shape, generator=g, dtype=torch.float64)
    assert torch.all(continuity(path, noisy, pairs="consecutive") <= continuity(path, noisy, pairs="all"))
    # normalising by the path's mean L1 norm divides by that norm
    scale = heat.abs().sum((2, 3)).mean(1)
    torch.testing.assert_close(continuity(path, heat, normalise="path"), (expected / scale).float())


def test_continuity_bad_input():
    path = torch.rand(2, 3, 1, 5, 5)
    with pytest.raises(ValueError, match="shape"):
        continuity(path, torch.rand(2, 3, 5, 4))
    with pytest.raises(ValueError, match="at least 2"):
        continuity(path[:, :1], torch.rand(2, 1, 5, 5))
    bad = torch.rand(2, 3, 5, 5)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        continuity(path, bad)
    with pytest.raises(ValueError, match="pairs"):
        continuity(path, torch.rand(2, 3, 5, 5), pairs="some")
    with pytest.raises(ValueError, match="at least 2"):
        Continuity(shifts=(0,))
