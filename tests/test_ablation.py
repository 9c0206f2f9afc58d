import numpy as np
import pytest
import torch
from torch import nn

from vefi.ablation import (ablated, ablation_accuracy, feature_strength, mean_class_accuracy, random_like,
                           subsample)
from vefi.descriptors import Feature, FeatureIndex, default_layers
from vefi.book.models import build_model


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_model("mnist").eval()


@pytest.fixture(scope="module")
def images():
    return torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def manual_forward(model, x, zero):
    """Slow reference: run the layers one by one, zeroing ``zero[name]`` channels of that layer's output."""
    for name, module in model.named_children():
        x = module(x.clone())
        if name in zero:
            x = x.clone()
            x[:, zero[name]] = 0
    return x


def test_zeroes_exactly_the_channel_downstream(net, images):
    seen = {}
    handle = net.pool1.register_forward_hook(lambda m, i, o: seen.__setitem__("pool_in", i[0].clone()))
    try:
        plain = net(images)
        plain_in = seen["pool_in"]
        with ablated(net, [("relu1", 3)]):
            out = net(images)
        ablated_in = seen["pool_in"]
    finally:
        handle.remove()
    assert torch.all(ablated_in[:, 3] == 0) and plain_in[:, 3].abs().sum() > 0
    others = [c for c in range(32) if c != 3]
    assert torch.equal(ablated_in[:, others], plain_in[:, others])
    torch.testing.assert_close(out, manual_forward(net, images, {"relu1": [3]}))
    assert not torch.allclose(out, plain)


def test_conv_and_fc_features_match_manual(net, images):
    with ablated(net, [Feature(4, "conv2", "conv", 7), ("conv2", 9), ("fc1", 5), (12, 100)]):
        out = net(images)
    torch.testing.assert_close(out, manual_forward(net, images, {"conv2": [7, 9], "fc1": [5], "fc2": [100]}))


def test_inplace_relu_sees_zeroed_conv_output(net, images):
    seen = {}
    handle = net.relu2.register_forward_hook(lambda m, i, o: seen.__setitem__("relu_out", o.clone()))
    try:
        with ablated(net, [("conv2", 2)]):
            net(images)
    finally:
        handle.remove()
    assert torch.all(seen["relu_out"][:, 2] == 0)


def test_restores_model_also_on_error(net, images):
    state = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    with pytest.raises(RuntimeError, match="boom"):
        with ablated(net, [("relu1", 0), ("fc1", 2)]):
            raise RuntimeError("boom")
    assert net.training
    net.eval()
    assert all(len(m._forward_hooks) == 0 for m in net.modules())
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k])
    plain = net(images)
    torch.testing.assert_close(plain, manual_forward(net, images, {}))


def test_bad_features(net):
    with pytest.raises(ValueError, match="out of range"):
        with ablated(net, [("relu1", 32)]):
            pass
    with pytest.raises(ValueError, match="unknown layer"):
        with ablated(net, [("nope", 0)]):
            pass
    with pytest.raises(TypeError):
        with ablated(net, ["relu1"]):
            pass
    with pytest.raises(ValueError, match="does not belong"):
        with ablated(net, [Feature(2, "pool1", "pool", 0)]):
            pass
    assert all(len(m._forward_hooks) == 0 for m in net.modules())


def test_batched_configurations_equal_one_by_one(net):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(40, 1, 28, 28, generator=g)
    labels = torch.randint(0, 10, (40,), generator=g)
    configs = [[], [("relu1", c) for c in range(0, 32, 2)], [("conv3", 1), ("fc2", 4)],
               [("relu3", c) for c in range(60)]]
    logits = []
    for features in configs:
        with ablated(net, features), torch.no_grad():
            logits.append(net(x))
    logits = torch.stack(logits)
    # batching changes the last digits of a logit: compare only decisions that rounding cannot flip (a random
    # net has a few images whose two best classes are within 1e-4 of the logits' scale)
    best = logits.topk(2, dim=2).values
    clear = ((best[..., 0] - best[..., 1]) > 1e-4 * logits.abs().amax()).all(0)
    assert clear.sum() >= 30
    x, labels, logits = x[clear], labels[clear], logits[:, clear]
    batched = ablation_accuracy(net, x, labels, configs, max_rows=50)  # forces several passes and chunks
    one_by_one = [mean_class_accuracy(out.argmax(1).numpy(), labels.numpy(), 10) for out in logits]
    np.testing.assert_allclose(batched, one_by_one)
    assert len(set(one_by_one)) > 1  # the configurations differ: the comparison can tell them apart
    assert all(len(m._forward_hooks) == 0 for m in net.modules())


def test_mean_class_accuracy_against_direct_computation():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 300)
    predicted = np.where(rng.random(300) < 0.6, labels, rng.integers(0, 5, 300))
    direct = np.mean([np.mean(predicted[labels == c] == c) for c in range(5)])
    assert mean_class_accuracy(predicted, labels, 5) == pytest.approx(direct)
    # unbalanced: differs from plain accuracy
    labels = np.array([0] * 9 + [1])
    predicted = np.zeros(10, dtype=int)
    assert mean_class_accuracy(predicted, labels) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        mean_class_accuracy([0, 1], [0])
    with pytest.raises(TypeError):
        mean_class_accuracy([0.5], [0])


def test_random_control_is_seeded():
    index = FeatureIndex.from_layers(default_layers(build_model("mnist")))
    picked = [index[j] for j in (0, 5, 40, 41, 300, 900)]
    a, b, c = random_like(picked, index, 0), random_like(picked, index, 0), random_like(picked, index, 1)
    assert a == b and a != c
    for draw in (a, c):
        assert sorted(f.layer_number for f in draw) == sorted(f.layer_number for f in picked)
        assert len(set(draw)) == len(draw)
    with pytest.raises(ValueError):
        random_like([index[0]] * 33, index, 0)


def test_feature_strength_and_subsample():
    assert feature_strength(np.array([[1.0, -3.0], [2.0, 0.0]])).tolist() == [2.0, 3.0]
    s = subsample(100, 10, seed=4)
    assert len(s) == 10 and len(set(s.tolist())) == 10 and np.all(np.diff(s) > 0)
    assert np.array_equal(s, subsample(100, 10, seed=4)) and not np.array_equal(s, subsample(100, 10, seed=5))


def test_custom_model_with_functional_relu():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 3)
            self.fc = nn.Linear(3 * 6 * 6, 2)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).flatten(1))

    torch.manual_seed(0)
    model = Net()
    x = torch.rand(4, 1, 8, 8)
    with ablated(model, [("conv", 1)], input_shape=(1, 8, 8)):
        out = model(x)
    h = torch.relu(model.conv(x))
    h[:, 1] = 0
    torch.testing.assert_close(out, model.fc(h.flatten(1)))
