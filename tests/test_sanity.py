"""Tests of vefi.sanity: which layers get randomised, seeding, the user's model untouched, Spearman against
scipy, SSIM against a direct transcription of skimage's algorithm on scipy.ndimage."""

import numpy as np
import pytest
import torch
from scipy import ndimage, stats

from vefi.book.models import build_model
from vefi.sanity import (model_randomisation, parameter_layers, randomise_layers, similarities, spearman,
                         ssim)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = build_model("mnist")
    model.train()
    return model


@pytest.fixture(scope="module")
def images():
    return torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def gradient(model, x, target):
    model.eval()
    x = x.clone().requires_grad_(True)
    model(x).gather(1, target[:, None]).sum().backward()
    return x.grad[:, 0]


class Recorder:
    """An explainer that keeps a copy of every model it is given."""

    def __init__(self):
        self.states = []

    def __call__(self, model, x, target):
        self.states.append({k: v.clone() for k, v in model.state_dict().items()})
        return gradient(model, x, target)


def layer_changed(state, original, layer_name):
    return any(not torch.equal(state[k], original[k]) for k in original if k.startswith(layer_name + "."))


def test_cascading_randomises_exactly_the_intended_layers(net, images):
    original = {k: v.clone() for k, v in net.state_dict().items()}
    flags = [(m, m.training) for m in net.modules()]
    grads = [p.requires_grad for p in net.parameters()]
    recorder = Recorder()
    result = model_randomisation(net, images, recorder, seed=5)
    names = [layer.name for layer in parameter_layers(net)]
    assert names == ["conv1", "conv2", "conv3", "fc1", "fc2", "fc3"]
    assert result.steps == ["original"] + names[::-1]
    assert len(recorder.states) == len(names) + 1
    for step, state in enumerate(recorder.states):
        randomised = set(names[::-1][:step])
        assert set(result.randomised[step]) == randomised
        for name in names:
            assert layer_changed(state, original, name) == (name in randomised), (step, name)
    # the user's model is untouched: weights, training flags, requires_grad
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in original.items())
    assert all(m.training == flag for m, flag in flags)
    assert [p.requires_grad for p in net.parameters()] == grads
    assert all(p.grad is None for p in net.parameters())
    # step 0 is the trained model's heatmap: perfect similarity
    assert float(result.mean("spearman")[-1]) < 0.99  # a fully random net has other gradients
    assert result.similarity["spearman"][0].tolist() == pytest.approx([1.0] * 4)
    assert result.similarity["ssim"][0].tolist() == pytest.approx([1.0] * 4)
    assert result.heatmaps.shape == (len(names) + 1, 4, 28, 28)
    assert torch.equal(result.target, net.eval()(images).argmax(1))
    net.train()


def test_independent_randomises_one_layer_at_a_time(net, images):
    original = {k: v.clone() for k, v in net.state_dict().items()}
    recorder = Recorder()
    result = model_randomisation(net, images, recorder, mode="independent", layers=["fc2", "conv1"])
    assert result.steps == ["original", "fc2", "conv1"]
    assert result.randomised == [(), ("fc2",), ("conv1",)]
    assert layer_changed(recorder.states[1], original, "fc2")
    assert not layer_changed(recorder.states[1], original, "conv1")
    assert layer_changed(recorder.states[2], original, "conv1")
    assert not layer_changed(recorder.states[2], original, "fc2")


def test_randomisation_is_seeded(net, images):
    images = images[:2]
    a = model_randomisation(net, images, gradient, seed=1, layers=["fc3", "fc2"])
    b = model_randomisation(net, images, gradient, seed=1, layers=["fc3", "fc2"])
    c = model_randomisation(net, images, gradient, seed=2, layers=["fc3", "fc2"])
    assert torch.equal(a.heatmaps, b.heatmaps)
    assert not torch.equal(a.heatmaps[1:], c.heatmaps[1:])
    # a layer gets the same new weights whatever else is randomised
    one = randomise_layers(net, ["fc2"], seed=1)
    two = randomise_layers(net, ["fc3", "fc2"], seed=1)
    assert torch.equal(one.fc2.weight, two.fc2.weight)
    assert torch.equal(one.fc3.weight, net.fc3.weight)
    assert not torch.equal(two.fc3.weight, net.fc3.weight)
    bound = 1 / np.sqrt(net.fc2.weight.shape[1])
    assert float(one.fc2.weight.detach().abs().max()) <= bound


def test_randomisation_bad_input(net, images):
    with pytest.raises(ValueError, match="unknown mode"):
        model_randomisation(net, images, gradient, mode="sideways")
    with pytest.raises(ValueError, match="no parameters"):
        randomise_layers(net, ["relu1"])
    with pytest.raises(ValueError):
        model_randomisation(net, images, gradient, layers=["conv9"])
    bad = images.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model_randomisation(net, bad, gradient)
    with pytest.raises(TypeError, match="callable"):
        model_randomisation(net, images, "gradient")
    with pytest.raises(ValueError, match="explainer must return"):
        model_randomisation(net, images, lambda m, x, t: torch.zeros(4, 27, 28), layers=["fc3"])


def test_spearman_matches_scipy():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 9, 9, generator=g)
    b = a + torch.randn(5, 9, 9, generator=g)
    a[2] = a[2].round()  # many ties
    b[3] = b[3].clamp_min(0)  # ties at zero, as in rectified heatmaps
    for absolute in (False, True):
        ours = spearman(a, b, absolute=absolute)
        for i in range(5):
            x, y = (a[i].abs(), b[i].abs()) if absolute else (a[i], b[i])
            ref = stats.spearmanr(x.flatten().numpy(), y.flatten().numpy()).statistic
            assert float(ours[i]) == pytest.approx(ref, abs=1e-6)
    assert float(spearman(a[0], -a[0])) == pytest.approx(-1.0)
    assert np.isnan(float(spearman(torch.ones(4, 4), a[0, :4, :4])))  # no rank order, as scipy


def skimage_ssim(x, y, data_range, sigma=1.5):
    """skimage.metrics.structural_similarity(gaussian_weights=True, use_sample_covariance=False), written out."""
    filt = lambda z: ndimage.gaussian_filter(z, sigma=sigma, truncate=3.5)
    ux, uy = filt(x), filt(y)
    vx, vy, vxy = filt(x * x) - ux * ux, filt(y * y) - uy * uy, filt(x * y) - ux * uy
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    pad = (11 - 1) // 2
    return s[pad:-pad, pad:-pad].mean()


def test_ssim_matches_reference_and_is_symmetric():
    rng = np.random.default_rng(0)
    x = rng.random((3, 20, 24))
    y = np.clip(x + 0.2 * rng.standard_normal(x.shape), 0, 1)
    ours = ssim(torch.from_numpy(x), torch.from_numpy(y), data_range=1.0)
    for i in range(3):
        assert float(ours[i]) == pytest.approx(skimage_ssim(x[i], y[i], 1.0), abs=1e-6)
    back = ssim(torch.from_numpy(y), torch.from_numpy(x), data_range=1.0)
    torch.testing.assert_close(ours, back)
    assert ssim(torch.from_numpy(x), torch.from_numpy(x)).tolist() == pytest.approx([1.0] * 3)


def test_ssim_of_constant_images_by_hand():
    # no variance anywhere: SSIM = (2ab + C1) / (a^2 + b^2 + C1) with C1 = (0.01 L)^2
    a, b = 0.2, 0.7
    c1 = 0.01 ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    value = ssim(torch.full((16, 16), a), torch.full((16, 16), b), data_range=1.0)
    assert float(value) == pytest.approx(expected, rel=1e-6)


def test_similarity_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        spearman(torch.rand(3, 4, 4), torch.rand(3, 4, 5))
    with pytest.raises(ValueError, match="NaN"):
        ssim(torch.full((12, 12), float("nan")), torch.rand(12, 12))
    with pytest.raises(ValueError, match="larger than"):
        ssim(torch.rand(8, 8), torch.rand(8, 8))
    with pytest.raises(TypeError):
        similarities(np.zeros((2, 12, 12)), torch.zeros(2, 12, 12))
