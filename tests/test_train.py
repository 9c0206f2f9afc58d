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
