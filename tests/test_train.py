"""Training is deterministic and cached by what determines its result."""

import numpy as np
import pytest
import torch

from vefi.book import train as training
from vefi.layers import layer_table
from vefi.book.models import build_model

from tests.test_data import fake_idx_folder


@pytest.fixture
def fake_fashion(tmp_path, monkeypatch):
    monkeypatch.setenv("VEFI_DATA", str(tmp_path))
    monkeypatch.setenv("VEFI_QUICK", "1")
    monkeypatch.delenv("VEFI_FASHION_MNIST", raising=False)
    fake_idx_folder(tmp_path / "fashion-mnist", n_train=64, n_test=16)
    return tmp_path


def test_training_is_deterministic(fake_fashion):
    from vefi.book.data import load_dataset

    data = load_dataset("fashion-mnist", "train")
    hp = training.HyperParams(epochs=2, batch_size=16)
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model("fashion-mnist")
        history = training.train(model, data, hp)
        weights.append(model.state_dict())
        assert len(history) == 2 and not model.training
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def test_pretrained_is_cached_and_a_damaged_cache_retrains(fake_fashion, monkeypatch):
    first = training.pretrained("fashion-mnist")
    saved = list((fake_fashion / "models").glob("fashion-mnist-*.pt"))
    assert len(saved) == 1
    real_train = training.train
    monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("trained although cached"))
    again = training.pretrained("fashion-mnist")
    for key, value in first.state_dict().items():
        assert torch.equal(value, again.state_dict()[key])
    assert again.test_accuracy == first.test_accuracy and not again.training

    saved[0].write_bytes(saved[0].read_bytes()[:1000])
    monkeypatch.setattr(training, "train", real_train)
    with pytest.warns(RuntimeWarning, match="damaged"):
        rebuilt = training.pretrained("fashion-mnist")
    for key, value in first.state_dict().items():
        assert torch.equal(value, rebuilt.state_dict()[key])


def test_shipped_weights_are_used_and_stale_or_damaged_ones_say_so(fake_fashion, monkeypatch, tmp_path):
    monkeypatch.setenv("VEFI_QUICK", "0")  # weights are shipped for full mode only
    shipped = tmp_path / "shipped"
    monkeypatch.setattr(training, "SHIPPED", shipped)
    monkeypatch.setattr(training, "BOOK_NETWORKS", (("fashion-mnist", 0, None), ("fashion-mnist", 1, None)))
    (shipped / "gone").mkdir(parents=True)
    (shipped / "fashion-mnist-seed7-0123456789abcdef.pt").write_bytes(b"a network no longer trained")
    files = training.ship_networks()
    assert sorted(shipped.glob("*.pt")) == sorted(files) and len(files) == 2  # the stale file is gone
    assert [f.name.split("-")[2] for f in files] == ["seed0", "seed1"]

    for cached in (fake_fashion / "models").glob("*.pt"):  # a reader's first build: an empty cache
        cached.unlink()
    real_train = training.train
    monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("trained although shipped"))
    model = training.pretrained("fashion-mnist", 1)
    assert model.weights_file.read_bytes() == (shipped / model.weights_file.name).read_bytes()
    assert model.weights_origin == "shipped"
    again = training.pretrained("fashion-mnist", 1)
    assert again.weights_origin == "cache" and again.test_accuracy == model.test_accuracy

    monkeypatch.setattr(training, "train", real_train)
    monkeypatch.setattr(training, "_training_code", lambda: "other training code")
    with pytest.warns(RuntimeWarning, match="make networks"):
        assert training.pretrained("fashion-mnist", 1).weights_origin == "trained"  # shipped for other code

    monkeypatch.undo()
    monkeypatch.setenv("VEFI_DATA", str(fake_fashion))
    monkeypatch.setenv("VEFI_QUICK", "0")
    monkeypatch.setattr(training, "SHIPPED", shipped)
    for cached in (fake_fashion / "models").glob("*.pt"):
        cached.unlink()
    damaged = files[0]
    damaged.write_bytes(damaged.read_bytes()[:1000])
    with pytest.warns(RuntimeWarning, match="damaged.*not using it"):
        training.pretrained("fashion-mnist", 0)
    assert damaged.is_file()  # a file of the repository is never removed


def test_every_network_of_the_book_is_shipped_and_loads():
    """book/networks holds one weights file per network of BOOK_NETWORKS (none left over), each a verified
    file whose weights fit the architecture. Whether they are current (trained with this code and data) is
    told at build time, where pretrained warns and trains anew."""
    shipped = sorted(training.SHIPPED.glob("*.pt"))
    for name, seed, architecture in training.BOOK_NETWORKS:
        stem = training._stem(name, seed, architecture)
        mine = [p for p in shipped if p.name.rsplit("-", 1)[0] == stem]
        assert len(mine) == 1, f"{stem}: {len(mine)} shipped files; run 'make networks'"
        model = build_model(name, architecture)
        state, history, accuracy = training.read_verified(mine[0], lambda b: training._parse_stored(b, model),
                                                          remove_bad=False)
        assert history and accuracy > 0.5, stem
        shipped.remove(mine[0])
    assert not shipped, f"shipped weights of no network of the book: {shipped}"


def test_cache_key_follows_hyperparameters_and_data(fake_fashion):
    from vefi.book.data import load_dataset

    data = load_dataset("fashion-mnist", "train")
    model = build_model("fashion-mnist")
    key = training._cache_key("fashion-mnist", model, data, training.HyperParams(epochs=1))
    assert key == training._cache_key("fashion-mnist", model, data, training.HyperParams(epochs=1))
    assert key != training._cache_key("fashion-mnist", model, data, training.HyperParams(epochs=2))
    data.labels[0] = (data.labels[0] + 1) % 10
    assert key != training._cache_key("fashion-mnist", model, data, training.HyperParams(epochs=1))


def test_evaluate_confusion_matrix(fake_fashion):
    from vefi.book.data import load_dataset

    data = load_dataset("fashion-mnist", "test")
    torch.manual_seed(0)
    model = build_model("fashion-mnist")  # in training mode: dropout on
    accuracy, confusion = training.evaluate(model, data)
    assert model.training  # evaluated without dropout, and given back as it came
    # the direct computation, in eval mode (with dropout on, predictions would be random); one batch of 16
    # images, like evaluate's: the same arithmetic, so argmax decisions agree
    with torch.no_grad():
        pred = model.eval()(data.batch(slice(None))).argmax(1).numpy()
    true = data.labels.numpy()
    expected = np.zeros((10, 10), dtype=np.int64)
    np.add.at(expected, (true, pred), 1)
    np.testing.assert_array_equal(confusion, expected)  # rows: true class, columns: predicted
    assert accuracy == pytest.approx((pred == true).mean())


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "an8flower-single", "an8flower-double"])
def test_architectures_have_what_later_chapters_need(name):
    layers = layer_table(build_model(name))
    kinds = [layer.kind for layer in layers]
    strided = lambda kind: any(layer.kind == kind and layer.module.stride not in (1, (1, 1))  # noqa: E731
                               for layer in layers)
    assert strided("conv") and strided("pool")
    assert kinds.count("fc") >= 3  # two hidden fully connected layers and the classifier
    assert [layer.number for layer in layers] == list(range(1, len(layers) + 1))
    assert layers[-1].output_shape == (len(build_model(name).classes),)


def test_recalibrate_batchnorm_sets_the_statistics_of_the_data(fake_fashion):
    from vefi.book.data import load_dataset

    data = load_dataset("fashion-mnist", "train")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4, momentum=0.01), torch.nn.ReLU(),
                                torch.nn.Dropout(0.5), torch.nn.Flatten(), torch.nn.Linear(4 * 26 * 26, 3))
    bn = model[1]
    with torch.no_grad():  # statistics far from the data's, as after a short schedule
        bn.running_mean.fill_(5.0)
        bn.running_var.fill_(9.0)
    assert training.recalibrate_batchnorm(model, data, batch_size=len(data)) == 1
    with torch.no_grad():
        z = model[0](data.batch(slice(None)))
    # slow reference: the statistics BatchNorm normalises with in training mode, over all the images at once
    expected_mean = z.mean(dim=(0, 2, 3))
    expected_var = z.var(dim=(0, 2, 3), unbiased=True)
    assert torch.allclose(bn.running_mean, expected_mean, rtol=1e-5, atol=1e-6)
    assert torch.allclose(bn.running_var, expected_var, rtol=1e-4, atol=1e-6)
    assert bn.momentum == 0.01 and not model.training and not any(m.training for m in model.modules())
    # eval mode now normalises as training mode did
    with torch.no_grad():
        out_eval = model[1](z)
        model[1].train()
        out_train = model[1](z)
        model[1].eval()
    assert torch.allclose(out_eval, out_train, atol=1e-4)


def test_recalibrate_batchnorm_leaves_a_model_without_batchnorm_alone(fake_fashion):
    from vefi.book.data import load_dataset

    torch.manual_seed(0)
    model = build_model("fashion-mnist")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert training.recalibrate_batchnorm(model, load_dataset("fashion-mnist", "train")) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_training_set_takes_the_first_images_of_each_class(fake_fashion, monkeypatch):
    from dataclasses import replace

    from vefi.book.data import load_dataset

    full = load_dataset("fashion-mnist", "train")
    monkeypatch.setitem(training.HYPERPARAMS, "fashion-mnist",
                        replace(training.HYPERPARAMS["fashion-mnist"], per_class=2))
    subset = training.training_set("fashion-mnist")
    labels = full.labels.numpy()
    rows = np.sort(np.concatenate([np.flatnonzero(labels == c)[:2] for c in range(10)]))
    assert torch.equal(subset.labels, full.labels[rows]) and torch.equal(subset.images, full.images[rows])
    assert np.bincount(subset.labels.numpy(), minlength=10).tolist() == [
        min(2, int((labels == c).sum())) for c in range(10)]


def test_torchvision_architectures_build_with_the_datasets_classes():
    model = build_model("an8flower-double", "mobilenet_v3_small")
    assert model.classifier[-1].out_features == 12 and model.input_shape == (3, 112, 112)
    assert model(torch.rand(2, 3, 112, 112)).shape == (2, 12)
    with pytest.raises(ValueError, match="unknown architecture 'resnet9'.*mobilenet_v3_small"):
        build_model("an8flower-single", "resnet9")
    with pytest.raises(ValueError, match="3 channels.*fashion-mnist has 1"):
        build_model("fashion-mnist", "mobilenet_v3_small")
    with pytest.raises(ValueError, match="unknown architecture"):
        training.training_set("an8flower-single", "resnet9")


def test_the_authors_mnist_network_is_matconvnets_example():
    from vefi.book.relevant import conv_part
    from vefi.descriptors import default_layers

    model = build_model("fashion-mnist", "matconvnet-mnist")
    table = layer_table(model)
    assert [(layer.name, layer.output_shape) for layer in table] == [
        ("conv1", (20, 24, 24)), ("pool1", (20, 12, 12)), ("conv2", (50, 8, 8)), ("pool2", (50, 4, 4)),
        ("conv3", (500, 1, 1)), ("relu1", (500, 1, 1)), ("conv4", (10, 1, 1)), ("flatten", (10,))]
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10) and model.classes == build_model("fashion-mnist").classes
    # the demo's layers 2-7 of MatConvNet (the outputs of layers 1-6): every output but the classifier's
    assert [layer.name for layer in default_layers(model)] == ["conv1", "pool1", "conv2", "pool2", "conv3", "relu1"]
    # OnlyConv stops where the maps end; on the book's own nets it is what default_layers says
    assert [layer.name for layer in conv_part(model)] == ["conv1", "pool1", "conv2", "pool2"]
    for name in ("mnist", "an8flower-single"):
        book_net = build_model(name)
        assert conv_part(book_net) == default_layers(book_net, only_conv=True)
    with pytest.raises(ValueError, match="28x28 grayscale.*an8flower-single"):
        build_model("an8flower-single", "matconvnet-mnist")
    assert training.training_set("fashion-mnist", "matconvnet-mnist") is not None
