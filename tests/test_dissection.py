"""Network dissection: IoU against a hand-computed case and against a slow, obviously right loop."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vefi.book.data import ImageSet, dataset_info
from vefi.dissection import DISCRIMINATIVE, detectors, dissect, iou_from_masks, unit_thresholds


def test_iou_by_hand():
    # unit 0 fires on the top row of both images, unit 1 nowhere; the concept is the left column
    units = torch.zeros(2, 2, 2, 2, dtype=torch.bool)
    units[:, 0, 0, :] = True
    concept = torch.zeros(2, 1, 2, 2, dtype=torch.bool)
    concept[0, 0, :, 0] = True
    # image 0: intersection 1, union 3; image 1: intersection 0, union 2 -> dataset IoU 1 / 5
    iou = iou_from_masks(units, concept)
    assert iou.shape == (2, 1)
    assert iou[0, 0] == pytest.approx(1 / 5)
    # unit 1: intersection 0, union 2 (concept only) -> 0
    assert iou[1, 0] == 0.0
    # an empty union is 0, not NaN
    assert iou_from_masks(torch.zeros(1, 1, 2, 2, dtype=torch.bool), torch.zeros(1, 1, 2, 2, dtype=torch.bool))[0, 0] == 0


def test_thresholds_are_quantiles_over_images_and_positions():
    a = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    t = unit_thresholds(a, 0.9)
    for k in range(3):
        assert t[k] == pytest.approx(np.quantile(a[:, k].numpy().ravel(), 0.9))


class _Net(nn.Sequential):
    def __init__(self):
        torch.manual_seed(0)
        super().__init__(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(4, 5, 3, stride=2, padding=1), nn.ReLU(inplace=True),
                         nn.Flatten(), nn.Linear(5 * 4 * 4, 6))
        self.input_shape = (3, 16, 16)


def _data(n=9):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 3, 16, 16), dtype=np.uint8)
    parts = rng.random((n, 4, 16, 16)) < 0.3
    masks = parts[:, 1]
    return ImageSet(dataset_info("an8flower-single"), "test", images, np.zeros(n, dtype=np.int64), masks, parts,
                    ("petals", "centre", "stem", "leaves"))


def _slow(net, data, layer_number, quantile):
    maps = []
    for i in range(len(data)):
        with torch.no_grad():
            maps.append(nn.Sequential(*list(net.eval())[:layer_number])(data.batch([i]))[0])
    maps = torch.stack(maps)
    K = maps.shape[1]
    concepts = torch.cat([data.parts, data.masks[:, None]], 1).numpy()
    iou = np.zeros((K, concepts.shape[1]))
    for k in range(K):
        t = np.quantile(maps[:, k].numpy().ravel(), quantile)
        for c in range(concepts.shape[1]):
            inter = union = 0
            for i in range(len(data)):
                up = F.interpolate(maps[i:i + 1, k:k + 1], size=(16, 16), mode="bilinear", align_corners=False)
                m = up[0, 0].numpy() > t
                inter += np.logical_and(m, concepts[i, c]).sum()
                union += np.logical_or(m, concepts[i, c]).sum()
            iou[k, c] = inter / union if union else 0.0
    return iou


def test_dissect_matches_slow_loop_and_leaves_model():
    net = _Net().train()
    data = _data()
    params = [p.detach().clone() for p in net.parameters()]
    # layer 1 is a conv followed by an in-place ReLU: its own (pre-ReLU) output must be dissected
    d1, d3 = dissect(net, data, [1, 3], quantile=0.8, batch_size=4, show_progress=False)
    assert d1.concepts == ("petals", "centre", "stem", "leaves", DISCRIMINATIVE)
    assert d1.iou.shape == (4, 5) and d3.iou.shape == (5, 5) and d1.n_images == 9
    assert net.training and all(torch.equal(a, b) for a, b in zip(params, net.parameters()))
    assert all(not m._forward_hooks for m in net.modules())
    np.testing.assert_allclose(d1.iou, _slow(net, data, 1, 0.8), atol=1e-12)
    np.testing.assert_allclose(d3.iou, _slow(net, data, 3, 0.8), atol=1e-12)
    np.testing.assert_array_equal(d1.column(DISCRIMINATIVE), d1.column("centre"))  # masks = centre here
    # a subset of images gives the IoU of that subset
    sub = dissect(net, data, 3, quantile=0.8, index=[0, 2, 4], show_progress=False)[0]
    small = ImageSet(data.info, "test", data.images[[0, 2, 4]].numpy(), np.zeros(3, dtype=np.int64),
                     data.masks[[0, 2, 4]].numpy(), data.parts[[0, 2, 4]].numpy(), data.part_names)
    np.testing.assert_allclose(sub.iou, _slow(net, small, 3, 0.8), atol=1e-12)


def test_detectors():
    net = _Net()
    d = dissect(net, _data(), 3, quantile=0.8, show_progress=False)[0]
    found = detectors(d, threshold=0.0)
    assert sorted(k for units in found.values() for k in units) == list(range(5))
    assert all(d.iou[k].argmax() == d.concepts.index(c) for c, units in found.items() for k in units)
    assert detectors(d, threshold=1.0) == {c: [] for c in d.concepts}


@pytest.mark.parametrize("layers, kwargs, error, match", [
    ("conv9", {}, ValueError, "unknown layer"),
    (6, {}, ValueError, "spatial"),
    (1, {"quantile": 1.0}, ValueError, "quantile"),
    (1, {"index": []}, ValueError, "empty"),
])
def test_bad_input(layers, kwargs, error, match):
    with pytest.raises(error, match=match):
        dissect(_Net(), _data(), layers, show_progress=False, **kwargs)


def test_bad_data():
    data = _data()
    data.images = data.images.float()
    data.images[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        dissect(_Net(), data, 1, show_progress=False)
    wrong = _data()
    wrong.images = wrong.images[:, :, :8, :8]
    with pytest.raises(ValueError, match="shape|agree"):
        dissect(_Net(), wrong, 1, show_progress=False)
    no_parts = _data()
    no_parts.parts = None
    with pytest.raises(ValueError, match="part masks"):
        dissect(_Net(), no_parts, 1, show_progress=False)
