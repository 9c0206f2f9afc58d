import numpy as np
import pytest
import torch
from scipy import stats

from vefi.boxocclusion import box_masks, confidence_drop, default_box, occlude, sample_centres


def test_centres_follow_the_heatmap_chi_square():
    h = torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 0.0], [6.0, 0.0, 8.0]])  # min-max: value / 8
    n = 20000
    draws = sample_centres(h, n, seed=123)[0]
    flat = (draws[:, 0] * 3 + draws[:, 1]).numpy()
    counts = np.bincount(flat, minlength=9)
    p = (h / 8).flatten().double().numpy()
    p = p / p.sum()
    assert counts[p == 0].sum() == 0  # zero-weight pixels are never drawn
    keep = p > 0
    stat, pvalue = stats.chisquare(counts[keep], n * p[keep] / p[keep].sum())
    assert pvalue > 1e-3, (counts, n * p)
    # and a wrong distribution (uniform over the support) is rejected
    _, p_wrong = stats.chisquare(counts[keep], np.full(keep.sum(), n / keep.sum()))
    assert p_wrong < 1e-6


def test_signed_heatmap_and_constant_and_seed():
    h = torch.tensor([[[-1.0, 1.0]]])  # min-max: 0, 1
    assert torch.all(sample_centres(h, 50, seed=0)[0, :, 1] == 1)
    counts = torch.bincount(sample_centres(torch.ones(1, 1, 4), 4000, seed=0)[0, :, 1], minlength=4)
    assert counts.min() > 850  # uniform
    r = torch.rand(2, 5, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_centres(r, 10, seed=3), sample_centres(r, 10, seed=3))
    assert not torch.equal(sample_centres(r, 10, seed=3), sample_centres(r, 10, seed=4))


def test_first_box_centre_follows_heatmap():
    # coverage of one pixel with 1x1 boxes: the mask is exactly one draw from the heatmap
    h = torch.tensor([[1.0, 3.0], [0.0, 4.0]]).expand(6000, 2, 2)  # min-max: 1/4, 3/4, 0, 1
    m = box_masks(h, coverage=0.25, box=1, seed=7)
    assert torch.all(m.flatten(1).sum(1) == 1)
    counts = m.flatten(1).sum(0).numpy()
    p = np.array([0.25, 0.75, 0.0, 1.0]) / 2.0
    assert counts[2] == 0
    _, pvalue = stats.chisquare(counts[[0, 1, 3]], 6000 * p[[0, 1, 3]])
    assert pvalue > 1e-3


def test_masks_reach_coverage_and_prefer_the_heatmap():
    h = torch.zeros(4, 28, 28)
    h[:, :14, :14] = 1.0  # a quarter of the image
    m = box_masks(h, coverage=0.2, box=4, seed=0)
    frac = m.float().mean((1, 2))
    assert torch.all(frac >= 0.2) and torch.all(frac < 0.2 + 16 / 784 + 1e-9)
    # centres only in the hot quarter while it has uncovered pixels: boxes reach at most 2 pixels beyond it
    assert not m[:, 16:, :].any() and not m[:, :, 16:].any()
    # beyond what the hot region can give, the rest is drawn uniformly
    m2 = box_masks(h, coverage=0.5, box=4, seed=0)
    assert torch.all(m2.float().mean((1, 2)) >= 0.5) and torch.all(m2[:, :14, :14])
    assert torch.equal(m, box_masks(h, coverage=0.2, box=4, seed=0))
    assert default_box(28, 28) == 4 and default_box(112, 112) == 16


def test_box_masks_bad_input():
    with pytest.raises(ValueError):
        box_masks(torch.rand(1, 5, 5), coverage=0)
    with pytest.raises(ValueError):
        box_masks(torch.rand(1, 5, 5), box=6)
    with pytest.raises(ValueError, match="NaN"):
        box_masks(torch.full((1, 5, 5), float("nan")))


def test_occlude_baselines():
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    m = torch.zeros(2, 4, 4, dtype=torch.bool)
    m[:, 1:3, 1:3] = True
    out = occlude(x, m, "mean")
    torch.testing.assert_close(out[:, :, 1, 1], x.mean((2, 3)))
    assert torch.equal(out[:, :, 0], x[:, :, 0])
    assert torch.all(occlude(x, m, "zero")[:, :, 1:3, 1:3] == 0)
    assert torch.all(occlude(x, m, 0.5)[:, :, 1:3, 1:3] == 0.5)
    with pytest.raises(ValueError):
        occlude(x, m, "blur")
    with pytest.raises(ValueError):
        occlude(x, m[:, :3], "mean")


def test_confidence_drop_against_direct_computation():
    from vefi.book.models import build_model

    torch.manual_seed(0)
    net = build_model("mnist")
    net.train()
    x = torch.rand(3, 1, 28, 28)
    occluded = torch.cat([x * 0.5, torch.zeros_like(x)])
    before, drop = confidence_drop(net, x, occluded)
    assert net.training
    net.eval()
    with torch.no_grad():
        p0 = torch.softmax(net(x), 1)
        c = p0.argmax(1)
        for r, version in enumerate((x * 0.5, torch.zeros_like(x))):
            p1 = torch.softmax(net(version), 1)
            np.testing.assert_allclose(drop[r], (p0[range(3), c] - p1[range(3), c]).numpy(), atol=1e-6)
    np.testing.assert_allclose(before, p0.max(1).values.numpy(), atol=1e-6)
