"""The grid-artifact measures on synthetic maps, and the coverage picture of an 11x11 stride-4 convolution."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from vefi.backproject import backproject, strongest_channels
from vefi.gridness import coverage_cv, coverage_map, grid_chance, grid_energy, layer_grid_energy
from vefi.book.models import build_model


def brute_force_coverage(size, kernel, stride, padding):
    """Count, for each input pixel, the (output unit, kernel tap) pairs that land on it."""
    counts = torch.zeros(size, dtype=torch.float64)
    out = [(size[i] + 2 * padding[i] - kernel[i]) // stride[i] + 1 for i in range(2)]
    for oy in range(out[0]):
        for ox in range(out[1]):
            for ky in range(kernel[0]):
                for kx in range(kernel[1]):
                    y, x = oy * stride[0] - padding[0] + ky, ox * stride[1] - padding[1] + kx
                    if 0 <= y < size[0] and 0 <= x < size[1]:
                        counts[y, x] += 1
    return counts


def test_uniform_map_scores_zero_and_comb_scores_one():
    assert float(grid_energy(torch.full((64, 64), 3.0), 4)) == 0.0
    comb = torch.zeros(64, 64)
    comb[1::4, 2::4] = 1.0  # a comb at any phase
    assert float(grid_energy(comb, 4)) == pytest.approx(1.0, abs=1e-6)
    # a separable period-4 pattern that is not a comb is still all grid
    profile = torch.tensor([3.0, 3.0, 3.0, 2.0]).repeat(16)
    assert float(grid_energy(profile[:, None] * profile[None, :], 4)) == pytest.approx(1.0, abs=1e-6)


def test_noise_scores_near_chance_and_smooth_maps_low():
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(200, 96, 96, generator=gen, dtype=torch.float64)
    chance = grid_chance(96, 4)
    assert float(grid_energy(noise, 4).mean()) == pytest.approx(chance, rel=0.2)
    yy, xx = torch.meshgrid(torch.arange(96.0), torch.arange(96.0), indexing="ij")
    blob = torch.exp(-((yy - 40) ** 2 + (xx - 55) ** 2) / (2 * 12.0 ** 2))
    assert float(grid_energy(blob, 4)) < 1e-3
    # a comb added to the blob is seen at once
    combed = blob.clone()
    combed[::4, ::4] += 0.5
    assert float(grid_energy(combed, 4)) > 0.2


def test_batches_and_crop():
    maps = torch.stack([torch.ones(30, 30), torch.zeros(30, 30)])
    maps[1, ::3, ::3] = 1
    scores = grid_energy(maps, 3, margin=1)
    assert scores.shape == (2,)
    assert scores[0] == 0 and scores[1] == pytest.approx(1.0, abs=1e-6)


def test_coverage_of_11x11_stride4_exactly():
    plain = coverage_map(112, 11, stride=4)
    fixed = coverage_map(112, 11, stride=4, stride_fix=True)
    inside = slice(12, 100)
    # each axis: 3, 3, 3, 2 with period 4, so a pixel is reached 4, 6 or 9 times (product of the axes)
    row = plain[56, inside] / 3
    axis = torch.tensor([3.0, 3.0, 3.0, 2.0])
    phase = [i for i in range(4) if torch.equal(row[:4], axis.roll(i))][0]
    assert torch.equal(row, axis.roll(phase).repeat(22))
    assert set(plain[inside, inside].flatten().tolist()) == {4.0, 6.0, 9.0}
    # with the fix: 121 (= 11 x 11) everywhere inside, and ramps at the border on both sides alike
    assert fixed.shape == plain.shape == (112, 112)
    assert torch.all(fixed[10:102, 10:102] == 121)
    assert torch.equal(fixed, fixed.flip(0)) and torch.equal(fixed, fixed.flip(1))
    assert torch.equal(fixed[56, :11], torch.arange(1.0, 12.0, dtype=torch.float64) * 11)
    # the measures agree
    assert float(grid_energy(plain, 4, margin=12)) > 0.99
    assert float(grid_energy(fixed, 4, margin=12)) < 1e-12
    assert float(coverage_cv(plain, margin=12)) > 0.2
    assert float(coverage_cv(fixed, margin=10)) == 0.0


@settings(max_examples=30, deadline=None)
@given(st.integers(6, 30), st.integers(6, 30), st.integers(1, 6), st.integers(1, 6), st.integers(1, 4),
       st.integers(1, 4), st.integers(0, 2), st.integers(0, 2))
def test_coverage_map_equals_brute_force(h, w, kh, kw, sh, sw, ph, pw):
    kh, kw = min(kh, h + 2 * ph), min(kw, w + 2 * pw)
    fast = coverage_map((h, w), (kh, kw), (sh, sw), (ph, pw))
    torch.testing.assert_close(fast, brute_force_coverage((h, w), (kh, kw), (sh, sw), (ph, pw)))


def test_fix_removes_the_grid_of_a_strided_conv_in_a_model():
    """Constant seed through a strided conv of all-ones weights, via backproject: same coverage pictures."""
    conv = nn.Conv2d(1, 1, 11, stride=4, bias=False).double()
    nn.init.ones_(conv.weight)
    net = nn.Sequential(conv)
    x = torch.ones(1, 1, 112, 112, dtype=torch.float64)  # the map of a constant input is constant (121)
    plain = backproject(net, x, [(1, 0)], stride_fix=False)[0, 0, 0] / 121
    fixed = backproject(net, x, [(1, 0)], stride_fix=True)[0, 0, 0] / 121
    torch.testing.assert_close(plain, coverage_map(112, 11, 4))
    torch.testing.assert_close(fixed, coverage_map(112, 11, 4, stride_fix=True))
    assert float(grid_energy(plain, 4, margin=12)) > 0.99 > 1e-12 > float(grid_energy(fixed, 4, margin=12))


def test_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        grid_energy(torch.tensor([[1.0, float("nan")], [0.0, 0.0]]), 2)
    with pytest.raises(ValueError, match="period"):
        grid_energy(torch.ones(8, 8), 0)
    with pytest.raises(ValueError, match="margin"):
        grid_energy(torch.ones(8, 8), 2, margin=4)
    with pytest.raises(ValueError, match=r"\(\.\.\., H, W\)"):
        grid_energy(torch.ones(8), 2)
    with pytest.raises(ValueError, match="no output"):
        coverage_map(5, 11, 4)


def test_layer_grid_energy_is_the_composition():
    torch.manual_seed(0)
    net = build_model("an8flower-single").double().eval()
    x = torch.rand(2, 3, 112, 112, dtype=torch.float64)
    layers = ["conv1", "conv3", "fc1"]
    for fix in (False, True):
        scores = layer_grid_energy(net, x, layers, 4, margin=8, stride_fix=fix, batch_size=4)
        feats = strongest_channels(net, x, layers)
        for i in range(2):
            for j, feat in enumerate(feats[i]):
                single = backproject(net, x[i], [feat], stride_fix=fix)[0, 0]
                expected = grid_energy(single.abs().sum(0), 4, margin=8)
                torch.testing.assert_close(scores[i, j], expected)
