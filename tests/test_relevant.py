"""The book's relevant features: the cached Gram pair gives what descriptors + selector give directly, and an
uncertified selection warns."""

import warnings

import numpy as np
import pytest
import torch

from vefi.descriptors import FeatureIndex, default_layers, descriptors
from vefi.lasso import ConvergenceWarning
from vefi.book.models import build_model
from vefi.relevant import model_fingerprint
from vefi.book.relevant import relevant_features, training_gram
from vefi.selection import RelevantFeatureSelector

from tests.test_data import fake_idx_folder


@pytest.fixture
def fake_fashion(tmp_path, monkeypatch):
    monkeypatch.setenv("VEFI_DATA", str(tmp_path))
    monkeypatch.setenv("VEFI_QUICK", "1")
    monkeypatch.delenv("VEFI_FASHION_MNIST", raising=False)
    fake_idx_folder(tmp_path / "fashion-mnist", n_train=80, n_test=16)
    torch.manual_seed(0)
    return build_model("fashion-mnist")


def test_fingerprint_follows_the_weights():
    torch.manual_seed(0)
    a = build_model("mnist")
    torch.manual_seed(0)
    b = build_model("mnist")
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.fc1.weight[0, 0] += 1e-6
    assert model_fingerprint(a) != model_fingerprint(b)


def test_relevant_features_match_a_direct_fit(fake_fashion):
    from vefi.book.data import load_dataset

    model = fake_fashion
    X, index, y = descriptors(model, load_dataset("fashion-mnist", "train"), show_progress=False)
    direct = RelevantFeatureSelector(mu=2).fit(X, y)
    rel = relevant_features("fashion-mnist", mu=2, model=model)
    assert [layer.number for layer in rel.index.layers] == [layer.number for layer in index.layers]
    np.testing.assert_allclose(rel.selector.coef_, direct.coef_, atol=1e-6)
    assert rel.features == direct.selected_features(index)


def test_only_conv_is_the_conv_block_of_the_same_statistics(fake_fashion):
    from vefi.book.data import load_dataset

    model = fake_fashion
    conv = default_layers(model, only_conv=True)
    X, index, y = descriptors(model, load_dataset("fashion-mnist", "train"), conv, show_progress=False)
    direct = RelevantFeatureSelector(mu=2).fit(X, y)
    rel = relevant_features("fashion-mnist", mu=2, only_conv=True, model=model)
    assert rel.index == FeatureIndex.from_layers(conv) and "OnlyConv" in rel.name
    np.testing.assert_allclose(rel.selector.coef_, direct.coef_, atol=1e-6)
    assert all(f.kind != "fc" for f in rel.features)


def test_gram_is_cached_and_a_damaged_cache_is_rebuilt(fake_fashion, tmp_path):
    model = fake_fashion
    first, _ = training_gram("fashion-mnist", model)
    (cached,) = (tmp_path / "descriptors").glob("fashion-mnist-gram-*.npz")
    stamp = cached.stat().st_mtime_ns
    again, _ = training_gram("fashion-mnist", model)
    assert cached.stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(first.Q, again.Q)
    cached.write_bytes(cached.read_bytes()[:-10])
    with pytest.warns(RuntimeWarning, match="damaged"):
        rebuilt, _ = training_gram("fashion-mnist", model)
    np.testing.assert_allclose(rebuilt.Q, first.Q)


def test_an_uncertified_selection_warns_with_the_network_name(fake_fashion, monkeypatch):
    # The book keeps warnings visible: a selection the solver did not certify must say so, once.
    import vefi.selection

    real = vefi.selection.solve_mu_lasso
    monkeypatch.setattr(vefi.selection, "solve_mu_lasso", lambda *a, **k: real(*a, **{**k, "max_iter": 1}))
    with pytest.warns(ConvergenceWarning, match=r"fashion-mnist, All at mu=2 are not certified.*max_iter") \
            as record:
        rel = relevant_features("fashion-mnist", mu=2, model=fake_fashion)
    assert len(record) == 1 and not rel.selector.converged_ and rel.selector.status_ == "max_iter"
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        assert relevant_features("fashion-mnist", mu=2, model=fake_fashion).selector.converged_
