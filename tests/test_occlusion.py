"""Occlusion against captum's ``Occlusion``, chunking does not change the result, the model left as it was,
and bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vefi.book.models import build_model
from vefi.occlusion import occlusion, window_positions


def seeded_model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name).double().eval()


@pytest.mark.parametrize("name,window,stride,baseline", [("mnist", 7, 3, 0.5), ("mnist", 5, 5, 0.0),
                                                         ("an8flower-single", 40, 24, 0.5)])
def test_matches_captum(peer, name, window, stride, baseline):
    captum_attr = peer("captum.attr")
    model = seeded_model(name)
    channels, height, width = model.input_shape
    images = torch.rand((2,) + model.input_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([1, 4])
    ours = occlusion(model, images, target, window=window, stride=stride, baseline=baseline, batch_size=50)
    theirs = captum_attr.Occlusion(model).attribute(
        images, sliding_window_shapes=(channels, window, window), strides=(channels, stride, stride),
        baselines=baseline, target=target, perturbations_per_eval=8)
    # captum spreads the window over channels: every channel carries the same map
    assert torch.allclose(theirs, theirs[:, :1].expand_as(theirs))
    assert ours.abs().max() > 0
    assert torch.allclose(ours, theirs[:, 0].to(ours), atol=1e-5 * float(ours.abs().max())), \
        float((ours - theirs[:, 0]).abs().max())


def test_linear_model_is_exact_and_chunking_irrelevant():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 4)).double()
    images = torch.rand(3, 3, 6, 6, dtype=torch.float64)
    h1 = occlusion(net, images, target=2, window=1, stride=1, baseline=0.0, batch_size=7)
    w = net[1].weight[2].reshape(3, 6, 6)
    assert torch.allclose(h1, (w * images).sum(1))
    h2 = occlusion(net, images, target=2, window=1, stride=1, baseline=0.0, batch_size=1000)
    assert torch.allclose(h1, h2, atol=1e-12)


def test_window_positions_reach_the_edge():
    assert window_positions(10, 4, 3) == [0, 3, 6]
    assert window_positions(11, 4, 3) == [0, 3, 6, 9]  # the last window is cut at the edge
    assert window_positions(4, 4, 2) == [0]


def test_model_unchanged():
    model = build_model("mnist")
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    flags = [m.training for m in model.modules()]
    occlusion(model, torch.rand(1, 1, 28, 28), window=14, stride=14)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert flags == [m.training for m in model.modules()]
    with pytest.raises(ValueError):
        occlusion(model, torch.rand(1, 1, 28, 28), target=11, window=14, stride=14)
    assert flags == [m.training for m in model.modules()]


def test_bad_input():
    model = seeded_model("mnist")
    x = torch.rand(1, 1, 28, 28, dtype=torch.float64)
    with pytest.raises(ValueError, match="larger than the image"):
        occlusion(model, x, window=29)
    with pytest.raises(ValueError, match="at least 1"):
        occlusion(model, x, window=4, stride=0)
    with pytest.raises(ValueError, match="NaN"):
        occlusion(model, x.clone().fill_(float("nan")))
    with pytest.raises(TypeError, match="window"):
        occlusion(model, x, window=2.5)
