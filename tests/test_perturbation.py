"""Meaningful perturbation: the deletion mask finds the only region the score depends on; the model is untouched."""

import pytest
import torch
from torch import nn

from vefi.perturbation import GAMES, blur, meaningful_perturbation, perturbation_masks

SIZE = 16
REGION = (slice(4, 9), slice(6, 11))  # the only pixels the toy score reads


class RegionScore(nn.Module):
    """Logit 0 = 5 * (mean brightness of REGION - 0.5), logit 1 = 0: only REGION matters."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(5.0))
        self.input_shape = (1, SIZE, SIZE)

    def forward(self, x):
        mean = x[:, 0, REGION[0], REGION[1]].flatten(1).mean(1)
        first = self.scale * (mean - 0.5)
        return torch.stack([first, torch.zeros_like(first)], 1)


def _images(n=2):
    x = torch.zeros(n, 1, SIZE, SIZE)
    x[:, :, REGION[0], REGION[1]] = 1.0
    x += 0.05 * torch.rand(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    return x.clamp(0, 1)


def _region_mask():
    m = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    m[REGION] = True
    return m


def _small_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    net.input_shape = (1, SIZE, SIZE)
    return net


def test_deletion_mask_concentrates_on_the_region():
    model = RegionScore()
    res = perturbation_masks(model, _images(), target=0, steps=80, lr=0.1, l1=0.1, tv=0.05,
                             mask_size=SIZE, sigma=2.0, show_progress=False)
    region = _region_mask()
    assert (res.score_after < res.score_before - 0.3).all()
    for heat in res.heatmap:
        found = heat > 0.5
        iou = (found & region).sum() / (found | region).sum()
        assert iou > 0.6, float(iou)
        # and nothing far from the region is deleted
        far = torch.ones(SIZE, SIZE, dtype=torch.bool)
        far[2:11, 4:13] = False
        assert heat[far].max() < 0.2


def test_preservation_keeps_the_region():
    model = RegionScore()
    res = perturbation_masks(model, _images(1), target=0, game="preservation", steps=80, l1=0.5, tv=0.05,
                             mask_size=8, sigma=2.0, show_progress=False)
    heat = res.heatmap[0]
    region = _region_mask()
    assert heat[region].mean() > heat[~region].mean() + 0.3


@pytest.mark.parametrize("game", GAMES)
def test_mask_in_unit_range_deterministic_and_heatmap_matches(game):
    net = _small_net()
    x = torch.rand(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    a = perturbation_masks(net, x, game=game, steps=15, jitter=2, seed=3, show_progress=False)
    b = perturbation_masks(net, x, game=game, steps=15, jitter=2, seed=3, show_progress=False)
    assert a.mask.shape == (3, SIZE, SIZE)
    assert a.mask.min() >= 0 and a.mask.max() <= 1
    assert torch.equal(a.mask, b.mask)
    expected = 1 - a.mask if game == "deletion" else a.mask
    assert torch.equal(a.heatmap, expected)
    h = meaningful_perturbation(net, x, game=game, steps=15, jitter=2, seed=3, show_progress=False)
    assert torch.equal(h, a.heatmap) and h.dtype == torch.float32


def test_batch_equals_one_image_at_a_time():
    net = _small_net()
    x = torch.rand(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    both = perturbation_masks(net, x, steps=10, show_progress=False).mask
    one = perturbation_masks(net, x[1:], steps=10, show_progress=False).mask
    torch.testing.assert_close(both[1:], one, atol=1e-5, rtol=0)


def _state(net):
    return ([p.detach().clone() for p in net.parameters()], [p.requires_grad for p in net.parameters()],
            [m.training for m in net.modules()],
            sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks) for m in net.modules()))


def _assert_same(net, before):
    params, grads, training, hooks = _state(net)
    assert all(torch.equal(a, b) for a, b in zip(params, before[0]))
    assert grads == before[1] and training == before[2] and hooks == before[3]
    assert all(p.grad is None for p in net.parameters())


def test_model_unchanged():
    net = _small_net().train()
    next(net.parameters()).requires_grad_(False)
    before = _state(net)
    perturbation_masks(net, torch.rand(2, 1, SIZE, SIZE), steps=5, show_progress=False)
    _assert_same(net, before)


def test_model_unchanged_on_error():
    net = _small_net().train()
    before = _state(net)
    with pytest.raises(ValueError, match="target"):
        perturbation_masks(net, torch.rand(2, 1, SIZE, SIZE), target=7, steps=5, show_progress=False)
    _assert_same(net, before)

    class Boom(nn.Module):
        calls = 0

        def forward(self, x):
            Boom.calls += 1
            if Boom.calls > 3:
                raise RuntimeError("boom")
            return x

    net.insert(0, Boom())
    before = _state(net)
    with pytest.raises(RuntimeError, match="boom"):
        perturbation_masks(net, torch.rand(2, 1, SIZE, SIZE), steps=5, show_progress=False)
    _assert_same(net, before)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"images": torch.full((1, 1, SIZE, SIZE), float("nan"))}, ValueError, "NaN"),
    ({"images": torch.rand(1, 3, SIZE, SIZE)}, ValueError, "shape"),
    ({"images": torch.rand(SIZE, SIZE)}, ValueError, "shape"),
    ({"images": torch.zeros(1, 1, SIZE, SIZE, dtype=torch.uint8)}, TypeError, "floating"),
    ({"images": [[0.0]]}, TypeError, "Tensor"),
    ({"game": "insertion"}, ValueError, "deletion"),
    ({"target": 3}, ValueError, "0..2"),
    ({"target": 1.5}, TypeError, "target"),
    ({"steps": 0}, ValueError, "steps"),
    ({"mask_size": 40}, ValueError, "mask_size"),
    ({"score": "entropy"}, ValueError, "score"),
])
def test_bad_input(kwargs, error, match):
    args = {"images": torch.rand(1, 1, SIZE, SIZE), "steps": 2, "show_progress": False}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        meaningful_perturbation(_small_net(), **args)


def test_blur_keeps_mass_and_rejects_bad_sigma():
    x = torch.rand(1, 3, 12, 12)
    assert blur(x, 1.0).shape == x.shape
    torch.testing.assert_close(blur(torch.ones(1, 1, 5, 5), 3.0), torch.ones(1, 1, 5, 5))
    with pytest.raises(ValueError, match="sigma"):
        blur(x, 0.0)
