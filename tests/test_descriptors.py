"""Descriptors of internal responses: values against a slow layer-by-layer reference, in-place ReLUs, the
index, the inputs accepted, and the model left as found."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from vefi.descriptors import FeatureIndex, default_layers, descriptors, synthetic_descriptors
from vefi.layers import layer_table
from vefi.book.models import build_model


@pytest.fixture(scope="module")
def mnist_net():
    torch.manual_seed(0)
    return build_model("mnist").eval()


@pytest.fixture(scope="module")
def images():
    return torch.rand(10, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def reference_descriptors(model, x, names, squared=False, l2_normalize=False):
    """Slow and plain: run a copy of the sequential net without in-place ops layer by layer in float64, keep
    every output, and build each image's descriptor in numpy."""
    net = copy.deepcopy(model).double().eval()
    for m in net.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    outputs = {}
    h = x.double()
    with torch.no_grad():
        for name, layer in net.named_children():
            h = layer(h)
            outputs[name] = h.numpy().copy()
    rows = []
    for i in range(x.shape[0]):
        blocks = []
        for name in names:
            out = outputs[name][i]
            v = (out.reshape(out.shape[0], -1) ** 2).sum(1) if squared else \
                np.sqrt((out.reshape(out.shape[0], -1) ** 2).sum(1))
            blocks.append(v / v.sum() if v.sum() > 0 else v)
        d = np.concatenate(blocks)
        rows.append(d / np.linalg.norm(d) if l2_normalize else d)
    return np.array(rows)


def test_default_layers_exclude_classifier_dropout_and_flatten():
    torch.manual_seed(0)
    names = [layer.name for layer in default_layers(build_model("mnist"))]
    assert names == ["conv1", "relu1", "pool1", "conv2", "relu2", "conv3", "relu3", "fc1", "relu4", "fc2",
                     "relu5"]
    names = [layer.name for layer in default_layers(build_model("an8flower-single"))]
    assert names[0] == "conv1" and names[-1] == "relu6" and "fc3" not in names
    assert not any(n.startswith(("dropout", "flatten")) for n in names) and "norm1" in names
    # a trailing softmax goes with the classifier, as in the authors' demo
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3), nn.Softmax(1))
    assert [layer.kind for layer in default_layers(net, (1, 4, 4))] == ["conv", "relu"]


@pytest.mark.parametrize("squared,l2_normalize", [(False, False), (True, False), (False, True), (True, True)])
def test_descriptors_match_reference(mnist_net, images, squared, l2_normalize):
    X, index, y = descriptors(mnist_net, images, squared=squared, l2_normalize=l2_normalize, batch_size=4,
                              show_progress=False)
    names = [layer.name for layer in index.layers]
    ref = reference_descriptors(mnist_net, images, names, squared, l2_normalize)
    assert X.shape == ref.shape == (10, 1120) and X.dtype == np.float32 and y is None
    np.testing.assert_allclose(X, ref, rtol=2e-5, atol=1e-7)
    if not l2_normalize:
        for layer in index.layers:  # each block is L1-normalised
            np.testing.assert_allclose(X[:, index.block(layer)].sum(1), 1.0, rtol=1e-5)


def test_conv_descriptor_is_of_pre_relu_values(mnist_net, images):
    # The mnist net uses ReLU(inplace=True): the conv's output tensor is overwritten by the ReLU that follows.
    assert mnist_net.relu1.inplace
    X, index, _ = descriptors(mnist_net, images, layers=["conv1", "relu1"], show_progress=False)
    with torch.no_grad():
        pre = mnist_net.conv1(images)  # no ReLU applied to this tensor
    norms = torch.linalg.vector_norm(pre.flatten(2), dim=2)
    expected = (norms / norms.sum(1, keepdim=True)).numpy()
    np.testing.assert_allclose(X[:, index.block("conv1")], expected, rtol=1e-5, atol=1e-7)
    post = torch.linalg.vector_norm(pre.clamp_min(0).flatten(2), dim=2)
    np.testing.assert_allclose(X[:, index.block("relu1")], (post / post.sum(1, keepdim=True)).numpy(),
                               rtol=1e-5, atol=1e-7)
    assert not np.allclose(X[:, index.block("conv1")], X[:, index.block("relu1")], rtol=1e-3)


def test_fc_unit_descriptor_is_absolute_value(mnist_net, images):
    X, index, _ = descriptors(mnist_net, images, layers=["fc2"], show_progress=False)
    with torch.no_grad():
        h = images
        for name, layer in mnist_net.named_children():
            h = layer(h.clone())
            if name == "fc2":
                break
    a = h.abs()
    np.testing.assert_allclose(X, (a / a.sum(1, keepdim=True)).numpy(), rtol=1e-5, atol=1e-7)


def test_index_maps_columns_to_layers(mnist_net):
    table = layer_table(mnist_net)
    X, index, _ = descriptors(mnist_net, torch.rand(2, 1, 28, 28), layers=[9, "conv2", 1], show_progress=False)
    assert [layer.number for layer in index.layers] == [1, 4, 9]  # forward order
    assert len(index) == X.shape[1] == 32 + 64 + 256
    assert index[0] == (1, "conv1", "conv", 0)
    assert index[32 + 5] == (4, "conv2", "conv", 5)
    assert index[-1] == (9, "fc1", "fc", 255) and index[-1].label == "9 fc #255"
    assert index.column("conv2", 5) == 37 and index.block(9) == slice(96, 352)
    assert list(index.layer_numbers[[0, 32, 96]]) == [1, 4, 9] and index.kinds[100] == "fc"
    assert [f.channel for f in index][:3] == [0, 1, 2]
    assert table[8].name == "fc1"
    with pytest.raises(IndexError):
        index[352]
    with pytest.raises(ValueError, match="channel"):
        index.column("conv1", 32)


def test_data_forms_agree(mnist_net, images):
    labels = torch.arange(10) % 3
    X_tensor, _, _ = descriptors(mnist_net, images, batch_size=3, show_progress=False)
    X_array, _, _ = descriptors(mnist_net, images.numpy(), batch_size=10, show_progress=False)
    X_ds, _, y_ds = descriptors(mnist_net, TensorDataset(images, labels), batch_size=4, show_progress=False)
    X_dl, _, y_dl = descriptors(mnist_net, DataLoader(TensorDataset(images, labels), batch_size=6),
                                show_progress=False)
    X_it, _, y_it = descriptors(mnist_net, [images[:5], images[5:]], show_progress=False)
    for other in (X_array, X_ds, X_dl, X_it):
        np.testing.assert_allclose(other, X_tensor, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(y_ds, labels.numpy())
    np.testing.assert_array_equal(y_dl, labels.numpy())
    assert y_it is None


def test_model_left_as_found_also_on_error(monkeypatch):
    torch.manual_seed(0)
    net = build_model("mnist")
    net.train()
    net.fc1.weight.requires_grad_(False)
    before = copy.deepcopy(net.state_dict())
    X1, _, _ = descriptors(net, torch.rand(4, 1, 28, 28), show_progress=False)
    assert net.training and net.dropout1.training  # restored to train mode
    assert not net.fc1.weight.requires_grad and net.fc2.weight.requires_grad
    assert all(not m._forward_hooks for m in net.modules())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    # dropout was off during extraction: two runs agree
    X2, _, _ = descriptors(net, torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0)),
                           show_progress=False)
    X3, _, _ = descriptors(net, torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0)),
                           show_progress=False)
    np.testing.assert_array_equal(X2, X3)
    with pytest.raises(ValueError, match="shape"):
        descriptors(net, torch.rand(2, 3, 28, 28), show_progress=False)  # wrong channels: refused up front
    assert net.training and all(not m._forward_hooks for m in net.modules())

    def broken(x):
        raise RuntimeError("boom")

    monkeypatch.setattr(net.conv2, "forward", broken)  # fails mid-forward, with the hooks on
    with pytest.raises(RuntimeError, match="boom"):
        descriptors(net, torch.rand(2, 1, 28, 28), show_progress=False)
    assert net.training and net.dropout1.training and not net.fc1.weight.requires_grad
    assert all(not m._forward_hooks for m in net.modules())


def test_dead_layer_gives_zeros_not_nan():
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].bias.fill_(-1.0)
    X, index, _ = descriptors(net, torch.rand(2, 1, 6, 6), show_progress=False)
    assert np.all(np.isfinite(X))
    np.testing.assert_array_equal(X[:, index.block(2)], 0.0)
    np.testing.assert_allclose(X[:, index.block(1)], 1 / 3, rtol=1e-6)


def test_bad_input_raises_clear_errors(mnist_net, images):
    with pytest.raises(ValueError, match="unknown layer 'conv9'"):
        descriptors(mnist_net, images, layers=["conv9"], show_progress=False)
    with pytest.raises(ValueError, match="unknown layer 99"):
        descriptors(mnist_net, images, layers=[99], show_progress=False)
    with pytest.raises(ValueError, match="more than once"):
        descriptors(mnist_net, images, layers=[1, "conv1"], show_progress=False)
    with pytest.raises(ValueError, match="empty"):
        descriptors(mnist_net, images, layers=[], show_progress=False)
    with pytest.raises(ValueError, match="no images"):
        descriptors(mnist_net, DataLoader(TensorDataset(images[:0]), batch_size=4), show_progress=False)
    with pytest.raises(ValueError, match="no images"):
        descriptors(mnist_net, [], show_progress=False)
    with pytest.raises(TypeError, match="floating-point"):
        descriptors(mnist_net, (images * 255).to(torch.uint8), show_progress=False)
    with pytest.raises(TypeError, match="nn.Module"):
        descriptors(lambda x: x, images, show_progress=False)
    with pytest.raises(TypeError, match="image tensors"):
        descriptors(mnist_net, [["not", "images"]], show_progress=False)


def test_feature_index_from_layers_and_single_layer_key(mnist_net):
    X, index, _ = descriptors(mnist_net, torch.rand(1, 1, 28, 28), layers="relu3", show_progress=False)
    assert isinstance(index, FeatureIndex) and len(index) == 64 and index[0].kind == "relu"


def test_synthetic_descriptors_look_like_descriptors():
    X, y = synthetic_descriptors(200, [10, 5, 5], n_classes=4, seed=3)
    assert X.shape == (200, 20) and np.all(X >= 0) and set(y) == {0, 1, 2, 3}
    sums = X[:, 10:15].sum(1)
    assert np.all(np.isclose(sums, 1.0) | (sums == 0)) and np.mean(sums == 0) < 0.05  # rare all-zero blocks


def test_unnormalised_and_only_conv_options(mnist_net, images):
    X, index, _ = descriptors(mnist_net, images, normalize=False, show_progress=False)
    names = [layer.name for layer in index.layers]
    with torch.no_grad():
        pre = mnist_net.conv1(images)
    np.testing.assert_allclose(X[:, index.block("conv1")],
                               torch.linalg.vector_norm(pre.flatten(2), dim=2).numpy(), rtol=1e-5)
    assert names == [layer.name for layer in default_layers(mnist_net)]
    conv = [layer.name for layer in default_layers(mnist_net, only_conv=True)]
    assert conv == ["conv1", "relu1", "pool1", "conv2", "relu2", "conv3", "relu3"]
    np.testing.assert_array_equal(index.columns(["relu1", 1]), np.r_[32:64, 0:32])
    counts = index.count_per_layer(np.arange(len(index)) < 40)
    assert counts["1 conv"] == 32 and counts["2 relu"] == 8 and sum(counts.values()) == 40
    with pytest.raises(ValueError, match="shape"):
        index.count_per_layer(np.ones(3, dtype=bool))
