import numpy as np
import pytest
import torch

from vefi.localisation import THRESHOLDS, area_under_curve, iou_curve, method_heatmaps
from vefi.book.studies import LocalisationResult


def test_iou_hand_computed():
    # 3x3 heatmap, values 0..8 / 8; mask = top row (values 0, 1, 2)
    h = torch.arange(9.0).view(1, 3, 3) / 8
    g = torch.zeros(1, 3, 3, dtype=torch.bool)
    g[0, 0] = True
    t = [0.0, 0.2, 0.5, 1.0]
    # t=0: all 9 pixels -> 3/9; t=0.2: values >= 1.6/8 -> 2..8 (7 px), inter {2} -> 1 / (7 + 2) = 1/9;
    # t=0.5: 4..8 (5 px), no overlap -> 0 / 8; t=1: {8}, union 4 -> 0
    expected = [3 / 9, 1 / 9, 0.0, 0.0]
    np.testing.assert_allclose(iou_curve(h, g, t)[0], expected)
    # the mask at the bottom row instead
    g2 = torch.zeros(1, 3, 3, dtype=torch.bool)
    g2[0, 2] = True  # values 6, 7, 8
    # t=0.5: 5 px incl. the 3 -> 3/5; t=1: {8} -> 1/3
    np.testing.assert_allclose(iou_curve(h, g2, t)[0], [3 / 9, 3 / 7, 3 / 5, 1 / 3])


def test_normalisation_and_empty_sets():
    h = torch.tensor([[[2.0, 4.0], [6.0, 10.0]]])  # normalised: 0, .25, .5, 1
    g = torch.tensor([[[False, False], [True, True]]])
    np.testing.assert_allclose(iou_curve(h, g, [0.5])[0], [1.0])
    # constant map: normalised to zeros; at t>0 empty region; empty mask too -> IoU 1
    assert iou_curve(torch.ones(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.bool), [0.5])[0, 0] == 1.0
    assert iou_curve(torch.ones(1, 2, 2), g, [0.5])[0, 0] == 0.0
    # scale invariance
    np.testing.assert_allclose(iou_curve(3 * h + 7, g), iou_curve(h, g))


def test_batched_equals_one_by_one():
    rng = np.random.default_rng(0)
    h = torch.from_numpy(rng.random((5, 7, 9)))
    g = torch.from_numpy(rng.random((5, 7, 9)) < 0.3)
    full = iou_curve(h, g)
    for i in range(5):
        np.testing.assert_allclose(full[i], iou_curve(h[i], g[i])[0])
    # a slow reference for one image
    hn = (h[2] - h[2].min()) / (h[2].max() - h[2].min())
    for j, t in enumerate(THRESHOLDS):
        e = hn >= t
        ref = (e & g[2]).sum().item() / (e | g[2]).sum().item()
        assert full[2, j] == pytest.approx(ref)


def test_area_under_curve_hand_computed():
    assert area_under_curve([1, 1, 1], [0, 0.5, 1]) == pytest.approx(1.0)
    assert area_under_curve([0, 1], [0, 1]) == pytest.approx(0.5)
    assert area_under_curve([0.2, 0.4, 0.0], [0, 0.25, 1.0]) == pytest.approx(0.075 + 0.15)
    with pytest.raises(ValueError):
        area_under_curve([1, 2], [0, 0.5, 1])
    with pytest.raises(ValueError):
        area_under_curve([1, 2], [0.5, 0.5])


def test_result_summaries():
    t = np.array([0.0, 0.5, 1.0])
    iou = np.array([[0.2, 0.6, 0.0], [0.4, 0.8, 0.2]])
    r = LocalisationResult("an8flower-single", "x", None, t, iou, 2, 0.0, False)
    np.testing.assert_allclose(r.curve, [0.3, 0.7, 0.1])
    assert r.mean_iou == pytest.approx(iou.mean())
    assert r.auc == pytest.approx((0.3 + 0.7) / 4 + (0.7 + 0.1) / 4)
    assert r.best_iou == pytest.approx(0.7) and r.best_threshold == 0.5


def test_bad_input():
    h = torch.rand(2, 4, 4)
    with pytest.raises(TypeError):
        iou_curve(h, torch.ones(2, 4, 4))
    with pytest.raises(ValueError, match="shape"):
        iou_curve(h, torch.ones(2, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="thresholds"):
        iou_curve(h, torch.ones(2, 4, 4, dtype=torch.bool), [1.5])
    bad = h.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        iou_curve(bad, torch.ones(2, 4, 4, dtype=torch.bool))


def test_method_heatmaps_chunks_random_control_seeded():
    from vefi.book.models import build_model

    torch.manual_seed(0)
    net = build_model("mnist")
    x = torch.rand(5, 1, 28, 28)
    a = method_heatmaps("random", net, x, images_per_call=2, seed=1)
    b = method_heatmaps("random", net, x, images_per_call=2, seed=1)
    c = method_heatmaps("random", net, x, images_per_call=2, seed=2)
    assert a.shape == (5, 28, 28) and torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[2])  # chunks draw differently
    g = method_heatmaps("gradient", net, x, target=torch.arange(5), images_per_call=2)
    from vefi.heatmaps import compute
    torch.testing.assert_close(g, compute("gradient", net, x, torch.arange(5)))


def test_method_heatmaps_checks_the_target_once_with_the_shared_rules():
    from vefi.book.models import build_model
    from vefi.heatmaps import compute

    torch.manual_seed(0)
    net = build_model("mnist")
    x = torch.rand(5, 1, 28, 28)
    # one class for every image is the same as that class repeated, whatever the chunking
    torch.testing.assert_close(method_heatmaps("gradient", net, x, target=3, images_per_call=2),
                               compute("gradient", net, x, torch.full((5,), 3)))
    with pytest.raises(TypeError, match="class indices"):
        method_heatmaps("gradient", net, x, target=2.7)  # never rounded to class 2
    with pytest.raises(ValueError, match="one per image"):
        method_heatmaps("gradient", net, x, target=[1, 2, 3], images_per_call=2)  # refused before any chunk
