"""The scikit-learn style selector: fitting from data or from a Gram accumulator, the support, the feature
lists, bad input, and the whole pipeline on real network descriptors against SPAMS and spgl1."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from sklearn.base import clone

from tests.conftest import in_ci
from vefi.book.data import DataNotFoundError, load_dataset
from vefi.descriptors import descriptors, synthetic_descriptors
from vefi.lasso import ConvergenceWarning, GramAccumulator, mu_lasso_objective
from vefi.book.models import build_model
from vefi.selection import RelevantFeatureSelector, one_hot


@pytest.fixture(scope="module")
def data():
    return synthetic_descriptors(600, [40, 30, 20], n_classes=4, seed=2)


def test_fit_from_data_equals_fit_from_gram(data):
    X, y = data
    a = RelevantFeatureSelector(mu=3).fit(X, y)
    gram = GramAccumulator().update(X[:250], one_hot(y[:250], 4)) + \
        GramAccumulator().update(X[250:], one_hot(y[250:], 4))
    b = RelevantFeatureSelector(mu=3).fit(gram)
    assert a.coef_.shape == (4, 90) and a.converged_ and a.n_features_in_ == 90
    np.testing.assert_allclose(a.coef_, b.coef_, atol=1e-9)
    np.testing.assert_array_equal(a.classes_, np.arange(4))
    assert np.all(np.abs(a.coef_).sum(1) <= 3 * (1 + 1e-9))
    # coef_ is the paper's W transposed, and the objective is the paper's
    np.testing.assert_allclose(a.objective_, mu_lasso_objective(a.coef_.T, gram.Q, gram.q, gram.lsq), rtol=1e-9)
    assert np.all(a.relative_gap_ <= a.tol) and a.n_iter_ > 0
    # the certificate, per class, for the CLI and the book to show
    assert a.gap_.shape == a.relative_gap_.shape == (4,) and np.all(a.gap_ >= 0)
    assert a.status_ == "converged" and "certified" in a.message_


def test_support_transform_and_feature_lists(data):
    X, y = data
    sel = RelevantFeatureSelector(mu=3).fit(X, y)
    support = sel.get_support()
    np.testing.assert_array_equal(support, np.any(sel.coef_ != 0, axis=0))
    assert 0 < support.sum() < 90
    np.testing.assert_array_equal(sel.transform(X), X[:, support])
    np.testing.assert_array_equal(sel.get_support(indices=True), np.flatnonzero(support))
    # a high threshold keeps only each class's strongest weights
    strict = clone(sel).set_params(threshold=0.5).fit(X, y)
    assert strict.get_support().sum() < support.sum()
    for c in range(4):
        keep = np.abs(strict.coef_[c]) > 0.5 * np.abs(strict.coef_[c]).max()
        np.testing.assert_array_equal(strict.class_support()[c], keep)


def test_selected_features_name_layers_and_channels():
    torch.manual_seed(0)
    net = build_model("mnist").eval()
    images = torch.rand(60, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    X, index, _ = descriptors(net, images, layers=["conv3", "fc2"], show_progress=False)
    y = np.arange(60) % 3
    sel = RelevantFeatureSelector(mu=1.0).fit(X, y)
    feats = sel.selected_features(index)
    assert len(feats) == sel.get_support().sum()
    assert [index.column(f.layer_name, f.channel) for f in feats] == list(sel.get_support(indices=True))
    assert all(f.kind in ("conv", "fc") and f.layer_number in (6, 11) for f in feats)
    per_class = sel.features_per_class(index)
    assert set(per_class) == {0, 1, 2}
    for c, fs in per_class.items():
        weights = [abs(sel.coef_[c, index.column(f.layer_name, f.channel)]) for f in fs]
        assert weights == sorted(weights, reverse=True) and len(fs) == sel.class_support()[c].sum()
    with pytest.raises(ValueError, match="describes"):
        sel.selected_features(type(index).from_layers(index.layers[:1]))


def test_warm_start_and_convergence_warning(data):
    X, y = data
    sel = RelevantFeatureSelector(mu=3, warm_start=True).fit(X, y)
    first = sel.n_iter_
    sel.set_params(mu=3.5).fit(X, y)
    cold = RelevantFeatureSelector(mu=3.5).fit(X, y)
    np.testing.assert_allclose(sel.objective_, cold.objective_, rtol=1e-8)
    assert first > 0
    with pytest.warns(ConvergenceWarning, match=r"mu=3\): .*iteration limit.*raise max_iter") as record:
        stopped = RelevantFeatureSelector(mu=3, max_iter=1).fit(X, y)
    assert len(record) == 1  # warned once, by the selector, not twice
    assert not stopped.converged_ and stopped.status_ == "max_iter" and stopped.n_iter_ == 1
    assert np.any(stopped.relative_gap_ > stopped.tol) and stopped.message_ in str(record[0].message)


def test_one_hot_is_the_paper_label_matrix():
    L = one_hot(np.array([2, 0, 1, 2]))
    np.testing.assert_array_equal(L.T, [[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 1]])
    np.testing.assert_array_equal(one_hot(np.array([0.0, 1.0])), np.eye(2))


def test_bad_input_raises_clear_errors(data):
    X, y = data
    for mu in (0, -2, np.inf, np.nan):
        with pytest.raises(ValueError, match="mu"):
            RelevantFeatureSelector(mu=mu).fit(X, y)
    bad = X.copy()
    bad[3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        RelevantFeatureSelector().fit(bad, y)
    with pytest.raises(ValueError, match="no examples"):
        RelevantFeatureSelector().fit(X, np.where(y == 1, 0, y))  # class 1 never occurs
    with pytest.raises(ValueError, match="no examples"):
        RelevantFeatureSelector(n_classes=6).fit(X, y)
    with pytest.raises(ValueError, match="600 samples"):
        RelevantFeatureSelector().fit(X, y[:-1])
    with pytest.raises(TypeError, match="integer class indices"):
        RelevantFeatureSelector().fit(X, y + 0.5)
    with pytest.raises(ValueError, match="class indices"):
        RelevantFeatureSelector().fit(X, y - 1)
    with pytest.raises(TypeError, match="labels y"):
        RelevantFeatureSelector().fit(X)
    with pytest.raises(TypeError, match="y=None"):
        RelevantFeatureSelector().fit(GramAccumulator.from_data(X, one_hot(y)), y)
    with pytest.raises(ValueError, match="empty"):
        RelevantFeatureSelector().fit(GramAccumulator())
    with pytest.raises(ValueError, match="2-D"):
        RelevantFeatureSelector().fit(X[0], y[:1])
    with pytest.raises(ValueError, match="no samples"):
        RelevantFeatureSelector().fit(X[:0], y[:0])
    sel = RelevantFeatureSelector(mu=2).fit(X, y)
    with pytest.raises(ValueError):
        sel.transform(X[:, :10])  # feature count mismatch


@pytest.fixture(scope="module")
def mnist_descriptors():
    """Descriptors of a seeded, untrained MNIST net on 1500 real MNIST test images: the structure of real
    descriptors (dead units, L1 blocks of very different sizes). MNIST comes with ``make data``; without it
    the tests that need it skip, saying so (and fail under CI=true, where ``make test`` fetched it)."""
    try:
        test_set = load_dataset("mnist", "test", download=False)
    except DataNotFoundError as error:
        if in_ci():
            pytest.fail(f"CI=true but MNIST is missing ({error}); make test runs make data first", pytrace=False)
        pytest.skip(f"MNIST not fetched ({error}); run make data")
    images, y = test_set.batch(slice(0, 1500)), test_set.labels[:1500].numpy()
    torch.manual_seed(0)
    X, index, _ = descriptors(build_model("mnist"), images, batch_size=500, show_progress=False)
    return X, y, index


@pytest.mark.parametrize("mu", [1.0, 10.0, 100.0])
def test_mnist_descriptors_are_certified_at_every_mu(mnist_descriptors, mu):
    X, y, _ = mnist_descriptors
    sel = RelevantFeatureSelector(mu=mu).fit(X, y)
    assert sel.converged_ and np.all(sel.relative_gap_ <= sel.tol), sel.message_
    assert np.all(np.abs(sel.coef_).sum(1) <= mu * (1 + 1e-12))


def test_untrained_net_on_random_images_is_certified():
    # Data that is always present, built here: descriptors of random images (no data set needed).
    torch.manual_seed(1)
    net = build_model("mnist").eval()
    images = torch.rand(300, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    X, _, _ = descriptors(net, images, show_progress=False)
    y = np.arange(300) % 10
    for mu in (1.0, 10.0):
        sel = RelevantFeatureSelector(mu=mu).fit(X, y)
        assert sel.converged_, sel.message_
        gram = GramAccumulator.from_data(X, one_hot(y))
        G = gram.Q @ sel.coef_.T - gram.q
        for c in range(10):  # KKT: |gradient| equal on the support, no larger anywhere
            on = sel.coef_[c] != 0
            lam = np.abs(G[:, c]).max()
            np.testing.assert_allclose(-G[on, c] * np.sign(sel.coef_[c, on]), lam, rtol=1e-6)


def test_network_descriptors_against_spams_and_spgl1(mnist_descriptors, peer):
    spams = peer("spams")
    spgl1 = peer("spgl1")
    X, y, index = mnist_descriptors
    sel = RelevantFeatureSelector(mu=10).fit(X, y)
    assert sel.converged_
    gram = GramAccumulator.from_data(X, one_hot(y))
    W_spams = spams.lasso(np.asfortranarray(one_hot(y)), Q=np.asfortranarray(gram.Q),
                          q=np.asfortranarray(gram.q), lambda1=10.0, mode=0, numThreads=1).toarray()
    ref = mu_lasso_objective(W_spams, gram.Q, gram.q, gram.lsq)
    np.testing.assert_allclose(sel.objective_, ref, rtol=1e-6)
    A = X.astype(np.float64)
    for c in (0, 7):
        _, r, _, _ = spgl1.spg_lasso(A, (y == c).astype(float), 10.0, opt_tol=1e-8, iter_lim=5000)
        assert abs(sel.objective_[c] - r @ r) <= 1e-6 * r @ r
    feats = sel.selected_features(index)
    assert len(feats) == sel.get_support().sum() > 0
    # KKT on real descriptors: equal |gradient| on the support, no larger anywhere
    G = gram.Q @ sel.coef_.T - gram.q
    for c in range(10):
        on = sel.coef_[c] != 0
        lam = np.abs(G[:, c]).max()
        np.testing.assert_allclose(-G[on, c] * np.sign(sel.coef_[c, on]), lam, rtol=1e-6)


def test_selection_path_equals_independent_fits(data):
    from vefi.selection import selection_path

    X, y = data
    path = selection_path(X, y, mus=[4.0, 0.5, 2.0])
    np.testing.assert_array_equal(path.mus, [0.5, 2.0, 4.0])
    for k, mu in enumerate(path.mus):
        sel = RelevantFeatureSelector(mu=mu).fit(X, y)
        np.testing.assert_allclose(path.objective[k], sel.objective_, rtol=1e-8)
        np.testing.assert_array_equal(path.support[k], sel.class_support())
    assert path.counts().shape == (3,) and path.counts()[0] <= path.counts()[-1]
    with pytest.raises(ValueError, match="empty"):
        selection_path(X, y, mus=[])
