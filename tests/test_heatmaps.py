"""The heatmap registry: names, one calling convention, shapes, the seeded control, delegation to the
method modules and to vefi.explain, and bad input."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from vefi.heatmaps import METHODS, compute, normalise
from vefi.lrp import lrp
from vefi.book.models import build_model
from vefi.saliency import sensitivity
from vefi.targets import resolve_target

EXPLAIN = ("ours", "deconv-gb", "upsampled-activations")
FAST_OPTIONS = {"occlusion": {"window": 14, "stride": 14}, "meaningful-perturbation": {"steps": 2}}


def seeded_model(name="mnist", seed=0):
    torch.manual_seed(seed)
    return build_model(name).eval()


def test_names():
    assert METHODS == ("ours", "deconv-gb", "upsampled-activations", "gradient", "gradient-x-input",
                       "lrp-epsilon", "lrp-zplus", "lrp-alpha1beta0", "lrp-alpha2beta1", "lrp-composite",
                       "occlusion", "grad-cam", "meaningful-perturbation", "random")


@pytest.mark.parametrize("method", [m for m in METHODS if m not in EXPLAIN])
def test_every_method_one_convention(method):
    model = seeded_model()
    images = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    h = compute(method, model, images, target=torch.tensor([1, 2, 3]), **FAST_OPTIONS.get(method, {}))
    assert h.shape == (3, 28, 28) and h.dtype == torch.float32
    assert torch.isfinite(h).all()
    if method != "meaningful-perturbation":  # two optimisation steps may leave the mask untouched
        assert h.abs().max() > 0
    one = compute(method, model, images[0], target=1, **FAST_OPTIONS.get(method, {}))  # a single (C, H, W)
    assert one.shape == (1, 28, 28)


def test_delegates_to_the_modules():
    model = seeded_model()
    images = torch.rand(2, 1, 28, 28)
    assert torch.allclose(compute("gradient", model, images, 4), sensitivity(model, images, 4))
    assert torch.allclose(compute("lrp-alpha2beta1", model, images, 4),
                          lrp(model, images, 4, rule="alpha2beta1").sum(1))
    assert torch.allclose(compute("lrp-epsilon", model, images, 4, epsilon=0.0),
                          compute("gradient-x-input", model, images, 4), atol=1e-5)
    assert not torch.allclose(compute("lrp-zplus", model, images, 4), compute("lrp-alpha1beta0", model, images, 4))


def test_random_is_seeded():
    model = seeded_model()
    images = torch.rand(2, 1, 28, 28)
    a, b = compute("random", model, images), compute("random", model, images, seed=0)
    assert torch.equal(a, b)
    assert not torch.equal(a, compute("random", model, images, seed=1))
    with pytest.raises(TypeError, match="seed"):
        compute("random", model, images, window=3)


def test_explain_methods_call_vefi_explain(monkeypatch):
    calls = []

    def explain(model, images, relevant, *, target=None, stride_fix=True, maps="backproject", **options):
        calls.append((relevant, target, stride_fix, maps, options))
        return types.SimpleNamespace(heatmap=torch.zeros(images.shape[0], *images.shape[2:]))

    monkeypatch.setitem(sys.modules, "vefi.explain", types.SimpleNamespace(explain=explain))
    model, images = seeded_model(), torch.rand(2, 1, 28, 28)
    for method in EXPLAIN:
        assert compute(method, model, images, 3, relevant="R", k=2).shape == (2, 28, 28)
    assert [c[2:4] for c in calls] == [(True, "backproject"), (False, "backproject"), (True, "upsampled")]
    assert all(c[0] == "R" and c[1] == 3 and c[4] == {"k": 2} for c in calls)


def test_normalise():
    h = torch.stack([torch.arange(4.0).reshape(2, 2), torch.full((2, 2), 3.0)])
    out = normalise(h)
    assert torch.equal(out[0], torch.tensor([[0.0, 1 / 3], [2 / 3, 1.0]]))
    assert torch.equal(out[1], torch.zeros(2, 2))  # a constant map
    assert normalise(h[0]).shape == (2, 2)
    with pytest.raises(ValueError, match="shape"):
        normalise(torch.zeros(2))


def test_bad_input():
    model = seeded_model()
    images = torch.rand(1, 1, 28, 28)
    with pytest.raises(ValueError, match="lrp-composite"):
        compute("lrp-gamma", model, images)
    with pytest.raises(ValueError, match="NaN"):
        compute("gradient", model, images * float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        compute("random", model, images * float("nan"))
    with pytest.raises(ValueError, match="relevant"):
        compute("ours", model, images)
    with pytest.raises(ValueError, match="larger than the image"):
        compute("occlusion", model, images, window=40)
    with pytest.raises(TypeError, match="Module"):
        compute("gradient", lambda x: x, images)
    assert resolve_target(None, torch.tensor([[0.0, 2.0]])).tolist() == [1]
