"""Reliability of the public API on the model side (issue 13, part 6): functional nonlinearities in LRP, grad
modes of the caller, layers without parameters in the sanity check, dtype and device mismatches, image checks
in descriptors, non-integer targets, LRP's hyper-parameters, explain's k, models that return a tuple or a dict,
and back-projection through a model that carries the user's hooks. Every case also checks that the model comes
back as it went in."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from vefi.ablation import ablation_accuracy
from vefi.actmax import activation_maximisation
from vefi.backproject import backproject
from vefi.cam import cam, grad_cam, upsampled_activations
from vefi.criteria import Selectivity, perturbation_curve
from vefi.descriptors import descriptors
from vefi.explain import explain
from vefi.heatmaps import METHODS, compute
from vefi.targets import class_indices
from vefi.layers import check_images, check_scores
from vefi.lrp import lrp, relevance_sums
from vefi.book.models import build_model
from vefi.occlusion import occlusion
from vefi.perturbation import perturbation_masks
from vefi.relevant import RelevantFeatures
from vefi.saliency import gradient, gradient_x_input, sensitivity
from vefi.sanity import model_randomisation, randomise_layers
from vefi.selection import RelevantFeatureSelector

EXPLAIN = ("ours", "deconv-gb", "upsampled-activations")
FAST = {"occlusion": {"window": 14, "stride": 14}, "meaningful-perturbation": {"steps": 2, "show_progress": False}}


def seeded(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("mnist").eval()


def some_images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def fitted(net: nn.Module, n: int = 60, mu: float = 2.0) -> RelevantFeatures:
    """A selector fitted on random images of ``net``, like the book's RelevantFeatures."""
    X, index, _ = descriptors(net, some_images(n, seed=0), show_progress=False)
    selector = RelevantFeatureSelector(mu=mu, tol=1e-6, max_iter=3000).fit(X, np.arange(n) % 10)
    return RelevantFeatures(net, index, selector, tuple(range(10)), net.input_shape, "mnist")


def state(model: nn.Module):
    """Everything a tool could leave changed: weights, training flags, requires_grad, hooks of every kind."""
    return ([p.detach().clone() for p in model.parameters()], [m.training for m in model.modules()],
            [p.requires_grad for p in model.parameters()],
            [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
              len(m._backward_pre_hooks)) for m in model.modules()])


def assert_same_state(before, after) -> None:
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    assert before[1:] == after[1:]


def explainer(model, x, target):
    """A plain gradient explainer for the sanity check."""
    return gradient(model, x, target)[:, 0]


@pytest.fixture(scope="module")
def net():
    return seeded()


@pytest.fixture(scope="module")
def relevant(net):
    return fitted(net)


# --------------------------------------------------------------------------------------------------------
# 1. LRP refuses functional nonlinearities, as back-projection does.

class Functional(nn.Module):
    """A conv net whose nonlinearity is a function called in forward: no module for a hook to see."""

    def __init__(self, activation):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 26 * 26, 3)
        self.activation = activation

    def forward(self, x):
        return self.fc(self.activation(self.conv(x)).flatten(1))


@pytest.mark.parametrize("name, activation", [("gelu", F.gelu), ("sigmoid", torch.sigmoid),
                                              ("tanh", torch.Tensor.tanh), ("silu", F.silu)])
def test_lrp_refuses_a_functional_nonlinearity(name, activation):
    torch.manual_seed(0)
    model = Functional(activation).train()
    before = state(model)
    x = torch.rand(2, 1, 28, 28)
    with pytest.raises(TypeError, match=rf"cannot propagate LRP relevance through the nonlinearity '{name}' "
                                        r"\(called in module 'model' \(Functional\)\)"):
        lrp(model, x, 0)
    assert_same_state(before, state(model))


@pytest.mark.parametrize("name, activation", [("tanh", torch.Tensor.tanh), ("softplus", F.softplus),
                                              ("elu", F.elu)])
def test_backproject_refuses_a_functional_nonlinearity_it_has_no_rule_for(name, activation):
    torch.manual_seed(0)
    model = Functional(activation).train()
    before = state(model)
    x = torch.rand(2, 1, 28, 28)
    with pytest.raises(TypeError, match=rf"cannot back-project through the nonlinearity '{name}' \(called in"):
        backproject(model, x, [("fc", 0)])
    assert_same_state(before, state(model))


@pytest.mark.parametrize("activation", [F.gelu, torch.sigmoid, F.silu])
def test_backproject_follows_a_functional_nonlinearity_it_has_a_rule_for(activation):
    torch.manual_seed(0)
    model = Functional(activation).train()
    before = state(model)
    x = torch.rand(2, 1, 28, 28)
    maps = backproject(model, x, [("fc", 0)])
    assert torch.isfinite(torch.as_tensor(maps)).all() and torch.as_tensor(maps).abs().sum() > 0
    assert_same_state(before, state(model))


def test_lrp_still_takes_a_functional_relu():
    torch.manual_seed(0)
    functional = Functional(F.relu).eval()
    modules = nn.Sequential(functional.conv, nn.ReLU(), nn.Flatten(), functional.fc).eval()
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(lrp(functional, x, 1), lrp(modules, x, 1))


# --------------------------------------------------------------------------------------------------------
# 2. Every method of the registry under the caller's torch.no_grad() and torch.inference_mode().

@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_every_heatmap_method_under_the_callers_grad_mode(mode, net, relevant):
    images, target = some_images(), torch.tensor([3, 7])
    before = state(net)
    for method in METHODS:
        options = dict(FAST.get(method, {}), **({"relevant": relevant} if method in EXPLAIN else {}))
        expected = compute(method, net, images, target, **options)
        with mode():
            inside = images.clone()  # under inference mode: an inference tensor, as a user's would be
            got = compute(method, net, inside, target, **options)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=f"{method} under {mode.__name__}")
        assert_same_state(before, state(net))


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_gradient_tools_outside_the_registry_under_the_callers_grad_mode(mode, net):
    images = some_images()
    expected = (lrp(net, images, 2, rule="composite"), gradient(net, images, 2),
                backproject(net, images, [("conv2", 3), ("fc1", 5)]),
                activation_maximisation(net, [1, ("conv2", 0)], steps=3, show_progress=False).images)
    with mode():
        inside = images.clone()
        got = (lrp(net, inside, 2, rule="composite"), gradient(net, inside, 2),
               backproject(net, inside, [("conv2", 3), ("fc1", 5)]),
               activation_maximisation(net, [1, ("conv2", 0)], steps=3, show_progress=False).images)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert float(expected[2].abs().max()) > 0


def test_a_model_made_under_inference_mode_is_refused_clearly():
    with torch.inference_mode():
        model = seeded()
    with pytest.raises(RuntimeError, match=r"created under torch.inference_mode\(\).*outside inference mode"):
        gradient(model, some_images(), 0)


# --------------------------------------------------------------------------------------------------------
# 3. The sanity check refuses a layer without parameters.

def test_randomisation_refuses_a_layer_without_parameters(net):
    train = copy.deepcopy(net).train()
    before = state(train)
    for layers in (["relu1"], ["fc3", 2], ["pool1"]):
        with pytest.raises(ValueError, match=r"has no parameters to randomise; the layers with parameters are "
                                             r"1='conv1' \(conv\), 4='conv2' \(conv\)"):
            model_randomisation(train, some_images(), explainer, layers=layers)
        assert_same_state(before, state(train))
    with pytest.raises(ValueError, match="'relu1'.*layers with parameters are 1='conv1'"):
        randomise_layers(train, ["relu1"])
    result = model_randomisation(train, some_images(), explainer, layers=["fc3"])
    assert result.steps == ["original", "fc3"] and float(result.mean("spearman")[1]) < 1


# --------------------------------------------------------------------------------------------------------
# 4. dtype and device of the images against the model's: one check, one message.

def cam_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 10)).eval()


REFUSING = {
    "lrp": lambda m, x: lrp(m, x, 0),
    "relevance_sums": lambda m, x: relevance_sums(m, x, 0),
    "gradient": lambda m, x: gradient(m, x, 0),
    "sensitivity": lambda m, x: sensitivity(m, x, 0),
    "gradient_x_input": lambda m, x: gradient_x_input(m, x, 0),
    "grad_cam": lambda m, x: grad_cam(m, x, 0),
    "upsampled_activations": lambda m, x: upsampled_activations(m, x, "relu2", channel=0),
    "occlusion": lambda m, x: occlusion(m, x, 0, window=14, stride=14),
    "backproject": lambda m, x: backproject(m, x, [("conv2", 0)]),
    "model_randomisation": lambda m, x: model_randomisation(m, x, explainer, layers=["fc3"]),
    "compute": lambda m, x: compute("lrp-zplus", m, x, 0),
}


@pytest.mark.parametrize("tool", sorted(REFUSING))
def test_another_dtype_than_the_models_is_refused_with_what_to_do(tool, net):
    before = state(net)
    with pytest.raises(TypeError, match=r"images are torch.float64 but the model's parameters are torch.float32: "
                                        r"pass images.to\(torch.float32\)"):
        REFUSING[tool](net, some_images().double())
    assert_same_state(before, state(net))


@pytest.mark.parametrize("tool", sorted(REFUSING))
def test_another_device_than_the_models_is_refused_with_what_to_do(tool, net):
    elsewhere = copy.deepcopy(net).to("meta")  # a second device that every machine has
    with pytest.raises(ValueError, match=r"images are on device cpu but the model is on meta: pass "
                                         r"images.to\('meta'\)"):
        REFUSING[tool](elsewhere, some_images())


def test_cam_checks_dtype_and_device_too():
    model = cam_net()
    with pytest.raises(TypeError, match="images are torch.float64"):
        cam(model, some_images().double())
    with pytest.raises(ValueError, match="on device cpu but the model is on meta"):
        cam(copy.deepcopy(model).to("meta"), some_images())


def test_tools_that_stream_data_move_it_to_the_models_dtype(net, relevant):
    """descriptors, explain and the metrics take data as a loader gives it (e.g. float64 from numpy) and move
    each batch to the model's dtype and device: float64 images give the float32 images' result."""
    images = some_images()
    wide = images.double()
    np.testing.assert_allclose(descriptors(net, wide, show_progress=False).X,
                               descriptors(net, images, show_progress=False).X)
    np.testing.assert_allclose(descriptors(net, wide.numpy(), show_progress=False).X,
                               descriptors(net, images, show_progress=False).X)
    torch.testing.assert_close(explain(net, wide, relevant).heatmap, explain(net, images, relevant).heatmap)
    torch.testing.assert_close(perturbation_masks(net, wide, 3, steps=2, show_progress=False).heatmap,
                               perturbation_masks(net, images, 3, steps=2, show_progress=False).heatmap)
    heat = torch.rand(2, 28, 28, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(perturbation_curve(net, wide, heat, 3, patch=7).scores,
                               perturbation_curve(net, images, heat, 3, patch=7).scores)
    np.testing.assert_allclose(ablation_accuracy(net, wide, [3, 7], [[], [("fc2", 1)]], n_classes=10),
                               ablation_accuracy(net, images, [3, 7], [[], [("fc2", 1)]], n_classes=10))
    double = copy.deepcopy(net).double()
    start = torch.full((1, 1, 28, 28), 0.5)
    result = activation_maximisation(double, 4, steps=2, start=start, show_progress=False)
    assert result.images.dtype == torch.float64 and torch.isfinite(result.final).all()


# --------------------------------------------------------------------------------------------------------
# 5. descriptors checks every batch like every other tool.

def test_descriptors_refuse_nan_and_wrong_shapes(net):
    before = state(net)
    bad = some_images()
    bad[1, 0, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        descriptors(net, bad, show_progress=False)
    with pytest.raises(ValueError, match="NaN or Inf"):
        descriptors(net, DataLoader(TensorDataset(bad, torch.tensor([0, 1])), batch_size=1), show_progress=False)
    with pytest.raises(ValueError, match=r"images must have shape \(N, 1, 28, 28\) for this model, got "
                                         r"\(2, 3, 28, 28\)"):
        descriptors(net, torch.rand(2, 3, 28, 28), show_progress=False)
    with pytest.raises(ValueError, match=r"images must have shape \(N, 1, 28, 28\) for this model, got "
                                         r"\(2, 1, 32, 32\)"):
        descriptors(net, [torch.rand(2, 1, 32, 32)], show_progress=False)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\) or \(C, H, W\)"):
        descriptors(net, [torch.rand(2, 28, 28, 1, 1)], show_progress=False)
    assert_same_state(before, state(net))


# --------------------------------------------------------------------------------------------------------
# 6. Targets are class indices: never a rounded float.

def test_class_indices_takes_integers_and_refuses_the_rest():
    for good, expected in ((3, [3]), (np.int64(3), [3]), ([1, 2], [1, 2]), ((1, 2), [1, 2]), (range(2), [0, 1]),
                           (torch.tensor(4), [4]), (torch.tensor([1, 2], dtype=torch.int32), [1, 2]),
                           (np.array([5, 6]), [5, 6]), ([torch.tensor(1), np.int32(2)], [1, 2])):
        got = class_indices(good)
        assert got.dtype == torch.long and got.tolist() == expected
    for bad in (2.7, 2.0, [2.7], [1, 2.0], np.array([2.7]), np.float64(2.0), torch.tensor([2.0]), True, [True],
                torch.tensor([True]), "3", None, {1: 2}):
        with pytest.raises(TypeError, match="target must be class indices"):
            class_indices(bad)


FLOAT_TARGETS = {
    "lrp": lambda m, x, t: lrp(m, x, t),
    "gradient": lambda m, x, t: gradient(m, x, t),
    "grad_cam": lambda m, x, t: grad_cam(m, x, t),
    "occlusion": lambda m, x, t: occlusion(m, x, t, window=14, stride=14),
    "perturbation": lambda m, x, t: perturbation_masks(m, x, t, steps=1, show_progress=False),
    "perturbation_curve": lambda m, x, t: perturbation_curve(m, x, torch.rand(2, 28, 28), t, patch=7),
    "selectivity": lambda m, x, t: Selectivity(patch=7)(m, x, torch.rand(2, 28, 28), t),
    "model_randomisation": lambda m, x, t: model_randomisation(m, x, explainer, t, layers=["fc3"]),
    "compute": lambda m, x, t: compute("gradient-x-input", m, x, t),
}


@pytest.mark.parametrize("tool", sorted(FLOAT_TARGETS))
@pytest.mark.parametrize("target", [2.7, [2.7, 1.2], np.array([2.0, 1.0]), torch.tensor([2.7, 1.0])],
                         ids=["float", "list", "array", "tensor"])
def test_a_float_target_is_refused_everywhere(tool, target, net):
    with pytest.raises(TypeError, match="target must be class indices"):
        FLOAT_TARGETS[tool](net, some_images(), target)


def test_explain_refuses_a_float_target_and_takes_integer_ones(net, relevant):
    images = some_images()
    for target in (2.7, [2.7, 1.0], np.array([2.5, 1.0])):
        with pytest.raises(TypeError, match="target must be class indices"):
            explain(net, images, relevant, target=target)
    same = [explain(net, images, relevant, target=t).target.tolist()
            for t in (3, np.int64(3), [3, 3], torch.tensor([3, 3], dtype=torch.int32), np.array([3, 3]))]
    assert same == [[3, 3]] * 5
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        explain(net, images, relevant, target=torch.tensor([[3], [3]]))


# --------------------------------------------------------------------------------------------------------
# 7. LRP's hyper-parameters.

@pytest.mark.parametrize("options, error, match", [
    ({"epsilon": float("nan")}, ValueError, "epsilon must be a finite number >= 0, got nan"),
    ({"epsilon": float("inf")}, ValueError, "epsilon must be a finite number >= 0, got inf"),
    ({"epsilon": -0.1}, ValueError, "epsilon must be a finite number >= 0"),
    ({"epsilon": True}, TypeError, "epsilon must be a real number"),
    ({"epsilon": "0.1"}, TypeError, "epsilon must be a real number"),
    ({"stabilizer": 0.0}, ValueError, "stabilizer must be a finite number > 0"),
    ({"stabilizer": float("nan")}, ValueError, "stabilizer must be a finite number > 0"),
    ({"stabilizer": -1e-6}, ValueError, "stabilizer must be a finite number > 0"),
    ({"rule": "composite", "low": float("nan")}, ValueError, "low .* must be finite"),
    ({"rule": "composite", "high": float("inf")}, ValueError, "high .* must be finite"),
    ({"rule": "composite", "low": torch.tensor([0.0, float("nan")]).view(1, 2, 1)}, ValueError,
     "broadcastable to one image"),
    ({"rule": "composite", "high": torch.full((1, 28, 28), float("nan"))}, ValueError, "high .* must be finite"),
    ({"rule": "composite", "low": 1.0, "high": 0.0}, ValueError, "low must not exceed high"),
    ({"rule": "composite", "low": "0"}, TypeError, "low must be a number or a tensor"),
])
def test_lrp_hyper_parameters_are_checked(options, error, match, net):
    with pytest.raises(error, match=match):
        lrp(net, some_images(), 0, **options)
    with pytest.raises(error, match=match):
        relevance_sums(net, some_images(), 0, **options)


def test_lrp_takes_valid_boxes_and_epsilon_zero(net):
    images = some_images()
    low, high = torch.zeros(1, 28, 28), torch.ones(1, 28, 28)
    torch.testing.assert_close(lrp(net, images, 0, rule="composite", low=low, high=high),
                               lrp(net, images, 0, rule="composite"))
    assert torch.isfinite(lrp(net, images, 0, epsilon=0.0)).all()


# --------------------------------------------------------------------------------------------------------
# 8. explain's k.

def test_explain_lowers_a_huge_k_to_the_features_there_are(net, relevant):
    images = some_images()
    kept = int(np.count_nonzero(relevant.selector.get_support()))
    huge = explain(net, images, relevant, k=10 ** 5)
    assert huge.maps.shape == (2, kept, 28, 28)
    exact = explain(net, images, relevant, k=kept)
    torch.testing.assert_close(huge.maps, exact.maps)
    assert huge.features == exact.features
    assert explain(net, images, relevant, k=3).maps.shape == (2, min(3, kept), 28, 28)


# --------------------------------------------------------------------------------------------------------
# 9. Models that return a tuple or a dict instead of the logits tensor.

class Returns(nn.Module):
    """The book's net, returning its logits inside a dict (Hugging Face style) or a tuple (GoogLeNet in
    training mode, with an auxiliary output)."""

    def __init__(self, net, kind):
        super().__init__()
        self.net, self.kind = copy.deepcopy(net), kind
        self.input_shape = net.input_shape

    def forward(self, x):
        logits = self.net(x)
        return {"logits": logits} if self.kind == "dict" else (logits, logits[:, :2])


OUTPUT_USERS = {
    "lrp": lambda m, x: lrp(m, x, 0),
    "gradient": lambda m, x: gradient(m, x),
    "grad_cam": lambda m, x: grad_cam(m, x, 0),
    "occlusion": lambda m, x: occlusion(m, x, window=14, stride=14),
    "perturbation": lambda m, x: perturbation_masks(m, x, steps=1, show_progress=False),
    "perturbation_curve": lambda m, x: perturbation_curve(m, x, torch.rand(2, 28, 28), patch=7),
    "model_randomisation": lambda m, x: model_randomisation(m, x, explainer, layers=["net.fc3"]),
    "ablation_accuracy": lambda m, x: ablation_accuracy(m, x, [0, 1], [[]], n_classes=10),
    "activation_maximisation": lambda m, x: activation_maximisation(m, 3, steps=1, show_progress=False),
    "compute": lambda m, x: compute("lrp-epsilon", m, x),
}


@pytest.mark.parametrize("tool", sorted(OUTPUT_USERS))
@pytest.mark.parametrize("kind, what", [("dict", r"a dict with keys \['logits'\]"),
                                        ("tuple", r"a tuple of 2 \(Tensor \(\d+, 10\), Tensor \(\d+, 2\)\)")])
def test_a_model_that_does_not_return_a_tensor_is_told_to_wrap_it(tool, kind, what, net):
    model = Returns(net, kind).train()
    before = state(model)
    with pytest.raises(TypeError, match=rf"the model returned {what} instead of a tensor of class scores "
                                        r"\(n, classes\): wrap it in a module whose forward returns the logits"):
        OUTPUT_USERS[tool](model, some_images())
    assert_same_state(before, state(model))


def test_explain_tells_a_dict_model_to_wrap_it(net):
    model = Returns(net, "dict")
    with pytest.raises(TypeError, match=r"returned a dict .* e.g. model\(x\)\['logits'\]"):
        explain(model, some_images(), fitted(model, n=30))


def test_check_scores_says_what_came():
    with pytest.raises(ValueError, match=r"shape \(3, classes\), got \(3, 2, 5\)"):
        check_scores(torch.zeros(3, 2, 5), 3)
    with pytest.raises(ValueError, match=r"shape \(3, classes\), got \(2, 10\)"):
        check_scores(torch.zeros(2, 10), 3)
    with pytest.raises(TypeError, match="returned a str"):
        check_scores("logits")
    assert check_images(torch.zeros(1, 2, 2, dtype=torch.float64), model=nn.Linear(2, 2).double()).dtype == \
        torch.float64


# --------------------------------------------------------------------------------------------------------
# 10. Back-projection through a model that carries the user's hooks.

FEATURES = [("conv2", 3), ("relu3", 7), ("fc1", 5)]


def hooked(net, how):
    model = copy.deepcopy(net)
    calls = []
    if how == "full backward hook":
        model.conv2.register_full_backward_hook(lambda m, grad_in, grad_out: calls.append(1))
    elif how == "full backward pre-hook":
        model.conv3.register_full_backward_pre_hook(lambda m, grad_out: calls.append(1))
    else:  # a forward hook that puts a tensor hook on the output, which logs the gradient's size
        def forward_hook(m, inputs, output):
            if output.requires_grad:
                output.register_hook(lambda g: calls.append(float(g.abs().sum())))
        model.conv2.register_forward_hook(forward_hook)
    return model, calls


@pytest.mark.parametrize("how", ["full backward hook", "full backward pre-hook", "tensor hook"])
def test_backproject_through_the_users_hooks(how, net):
    model, calls = hooked(net, how)
    before = state(model)
    images = some_images()
    for rule in ("guided", "deconvnet", "backprop"):
        expected = backproject(net, images, FEATURES, rule=rule)
        torch.testing.assert_close(backproject(model, images, FEATURES, rule=rule), expected)
    assert calls, "the user's hook was not called"
    assert_same_state(before, state(model))  # the user's hook is still there, and nothing else
    per_image = [[("conv2", 1), ("fc1", 2)], [("conv2", 4), ("fc1", 0)]]
    torch.testing.assert_close(backproject(model, images, per_image, batch_size=2),
                               backproject(net, images, per_image))


def test_backproject_under_a_global_full_backward_hook(net):
    calls = []
    handle = torch.nn.modules.module.register_module_full_backward_hook(lambda m, gi, go: calls.append(1))
    try:
        got = backproject(net, some_images(), FEATURES)
    finally:
        handle.remove()
    torch.testing.assert_close(got, backproject(net, some_images(), FEATURES))
    assert calls
