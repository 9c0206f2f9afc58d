"""Streamed statistics of the mu-Lasso: the Gram pair batch by batch from a model and any kind of data, the
working-set fit that never forms the m x m matrix (against the dense fit and SPAMS), memory checks and the
errors of bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import vefi
from vefi.descriptors import DescriptorStream, descriptors, synthetic_descriptors
from vefi.lasso import ConvergenceWarning, GramAccumulator, MuLassoResult, mu_lasso_objective, solve_mu_lasso
from vefi.selection import RelevantFeatureSelector, one_hot
from vefi.statistics import (ArrayStream, StatisticsMemoryError, available_memory, estimate_memory,
                             fit_relevant, gram_statistics)


def small_net(n_classes: int = 3, seed: int = 0) -> nn.Module:
    """A small conv net on 1x16x16 images: 296 default descriptor features."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 24, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(24, 48, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(48 * 5 * 5, 64), nn.ReLU(), nn.Linear(64, n_classes))


def class_images(n: int, n_classes: int = 3, seed: int = 0):
    """Random images whose class brightens one quadrant-like patch, so that some features are relevant."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % n_classes
    x = torch.rand(n, 1, 16, 16, generator=g)
    for c in range(n_classes):
        r = 4 * (c % 3)
        x[y == c, :, r:r + 5, r:r + 5] += 0.8
    return x, y


def state_of(model):
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
            [p.detach().clone() for p in model.parameters()])


def assert_same_state(a, b):
    assert a[:3] == b[:3]
    for p, r in zip(a[3], b[3]):
        assert torch.equal(p, r)


#: Tolerance, relative to the largest entry, of Gram pairs whose descriptors a network computed in float32 with
#: other batch sizes: torch's convolutions may round differently per batch size on some processors (seen on
#: AVX-512: 6e-8), so such pairs agree to float32 rounding, not bit for bit. A dropped, repeated or mislabelled
#: image changes entries by far more.
FLOAT32_BATCHING = 1e-6


def assert_same_gram(a: GramAccumulator, b: GramAccumulator, tol: float = 1e-12):
    scale = np.abs(b.Q).max()
    np.testing.assert_allclose(a.Q, b.Q, rtol=0, atol=tol * scale)
    np.testing.assert_allclose(a.q, b.q, rtol=0, atol=tol * np.abs(b.q).max())
    np.testing.assert_array_equal(a.lsq, b.lsq)
    assert a.n_samples == b.n_samples
    np.testing.assert_array_equal(a.Q, a.Q.T)  # exactly symmetric


def assert_same_fit(a, b, rtol=1e-6):
    """Two certified fits of the same problem: same support per class, weights and objectives within tol."""
    assert a.converged_ and b.converged_, (a.message_, b.message_)
    np.testing.assert_array_equal(a.class_support(), b.class_support())
    np.testing.assert_allclose(a.objective_, b.objective_, rtol=rtol)
    scale = np.abs(a.coef_).max(axis=1, keepdims=True)
    assert np.all(np.abs(a.coef_ - b.coef_) <= rtol * 10 * scale)


@pytest.fixture(scope="module")
def synthetic():
    X, y = synthetic_descriptors(1500, [50, 100, 150, 200] * 4, n_classes=6, seed=4)
    return X, y


# --- the Gram pair ---------------------------------------------------------------------------------------------

def test_gram_statistics_of_a_stream_equals_the_full_matrix(synthetic):
    X, y = synthetic
    gram, index = gram_statistics(ArrayStream(X, y, batch_size=333))
    assert_same_gram(gram, GramAccumulator.from_data(X, one_hot(y)))
    assert len(index) == X.shape[1]
    # a stream of float32 descriptors, as DescriptorStream yields them: accumulated in float64
    X32 = X.astype(np.float32)
    gram32, _ = gram_statistics(ArrayStream(X32, y, batch_size=100))
    assert gram32.Q.dtype == np.float64
    assert_same_gram(gram32, GramAccumulator.from_data(X32, one_hot(y)))


def test_gram_statistics_of_a_model_on_every_kind_of_data():
    net = small_net()
    images, y = class_images(90)
    before = state_of(net)
    X, index, _ = descriptors(net, images, input_shape=(1, 16, 16), show_progress=False)
    ref = GramAccumulator.from_data(X, one_hot(y.numpy()))
    kinds = {
        "tensor with labels=": dict(data=images, labels=y),
        "numpy images": dict(data=images.numpy(), labels=y.numpy()),
        "Dataset": dict(data=TensorDataset(images, y)),
        "DataLoader": dict(data=DataLoader(TensorDataset(images, y), batch_size=25)),
        "list of batches": dict(data=[(images[i:i + 40], y[i:i + 40]) for i in range(0, 90, 40)]),
        "generator": dict(data=((images[i:i + 30], y[i:i + 30]) for i in range(0, 90, 30))),
    }
    for name, kw in kinds.items():
        gram, idx = gram_statistics(net, batch_size=32, show_progress=False, **kw)
        assert idx == index, name
        assert_same_gram(gram, ref, FLOAT32_BATCHING)
    assert_same_state(state_of(net), before)
    # chosen layers, and a DescriptorStream given as data
    gram, idx = gram_statistics(net, images, [4, 8], labels=y,
                                input_shape=(1, 16, 16), show_progress=False)
    assert len(idx) == 48 + 64
    stream = DescriptorStream(net, TensorDataset(images, y), [4, 8], batch_size=50, input_shape=(1, 16, 16),
                              show_progress=False)
    gram2, _ = gram_statistics(None, stream)
    assert_same_gram(gram2, gram, FLOAT32_BATCHING)
    # the descriptor options reach the stream
    Xs, _, _ = descriptors(net, images, squared=True, input_shape=(1, 16, 16), show_progress=False)
    gram3, _ = gram_statistics(net, images, labels=y, squared=True, show_progress=False)
    assert_same_gram(gram3, GramAccumulator.from_data(Xs, one_hot(y.numpy())), FLOAT32_BATCHING)


def test_classes_of_interest_of_a_larger_network():
    net = small_net(n_classes=20)
    images, y = class_images(60, n_classes=3)
    labels = np.array([12, 3, 7])[y.numpy()]  # 3 of the 20 output units
    X, _, _ = descriptors(net, images, input_shape=(1, 16, 16), show_progress=False)
    gram, _ = gram_statistics(net, images, labels=labels, classes=[7, 12, 3], show_progress=False)
    L = (labels[:, None] == np.array([7, 12, 3])[None]).astype(float)  # target columns in the given order
    assert_same_gram(gram, GramAccumulator.from_data(X, L), FLOAT32_BATCHING)
    sel, _ = fit_relevant(net, images, 2.0, labels=labels, classes=[7, 12, 3], show_progress=False)
    assert sel.coef_.shape == (3, X.shape[1]) and sel.converged_
    np.testing.assert_array_equal(sel.class_labels_, [7, 12, 3])
    # without classes=, the labels are the 20 output units: 17 of them have no example
    with pytest.raises(ValueError, match=r"have no example.*classes="):
        gram_statistics(net, images, labels=labels, show_progress=False)


# --- the working-set fit ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("mu", [1.0, 10.0, 50.0])
def test_working_set_fit_equals_dense_fit_on_synthetic_descriptors(synthetic, mu):
    X, y = synthetic
    dense, _ = fit_relevant(ArrayStream(X, y, batch_size=400), mu=mu, working_set=False)
    ws, _ = fit_relevant(ArrayStream(X, y, batch_size=400), mu=mu, working_set=True)
    assert dense.method_ == "dense" and ws.method_ == "working_set"
    assert_same_fit(ws, dense)
    # the reference: the selector fitted on the matrix in memory
    ref = RelevantFeatureSelector(mu=mu).fit(X, y)
    assert_same_fit(ws, ref)
    assert np.all(ws.relative_gap_ <= ws.tol) and np.all(np.abs(ws.coef_).sum(1) <= mu * (1 + 1e-12))
    # the working set is a small part of the features, and contains the support
    assert ws.working_set_.size < X.shape[1]
    assert np.all(np.isin(np.flatnonzero(ws.get_support()), ws.working_set_))
    assert ws.n_passes_ >= 3 and ws.n_passes_ % 2 == 1
    assert "certified over all" in ws.message_ and ws.status_ == "converged"


def test_working_set_certificate_is_the_full_problem(synthetic):
    X, y = synthetic
    ws, _ = fit_relevant(ArrayStream(X, y, batch_size=500), mu=10.0, working_set=True)
    gram = GramAccumulator.from_data(X, one_hot(y))
    W = ws.coef_.T
    G = gram.Q @ W - gram.q
    gap = 2 * (np.einsum("ij,ij->j", W, G) + 10.0 * np.abs(G).max(axis=0))  # the paper's scaling
    obj = mu_lasso_objective(W, gram.Q, gram.q, gram.lsq)
    np.testing.assert_allclose(ws.objective_, obj, rtol=1e-10)
    np.testing.assert_allclose(ws.gap_, gap, rtol=1e-6, atol=1e-9 * obj.max())
    # KKT over all m features: |gradient| equal on the support and no larger anywhere
    for c in range(W.shape[1]):
        on = W[:, c] != 0
        lam = np.abs(G[:, c]).max()
        np.testing.assert_allclose(-G[on, c] * np.sign(W[on, c]), lam, rtol=1e-6)


def test_working_set_fit_against_spams(synthetic, peer):
    spams = peer("spams")
    X, y = synthetic
    ws, _ = fit_relevant(ArrayStream(X, y, batch_size=500), mu=10.0, working_set=True)
    gram = GramAccumulator.from_data(X, one_hot(y))
    W = spams.lasso(np.asfortranarray(one_hot(y)), Q=np.asfortranarray(gram.Q), q=np.asfortranarray(gram.q),
                    lambda1=10.0, mode=0, numThreads=1).toarray()
    ref = mu_lasso_objective(W, gram.Q, gram.q, gram.lsq)
    assert np.all(ws.objective_ <= ref * (1 + 1e-6))
    np.testing.assert_allclose(ws.objective_, ref, rtol=1e-6)


def test_working_set_fit_equals_dense_fit_on_a_real_model():
    net = small_net()
    images, y = class_images(240)
    before = state_of(net)
    for mu in (0.5, 5.0):
        dense, index = fit_relevant(net, images, mu, labels=y, working_set=False, show_progress=False)
        ws, index2 = fit_relevant(net, images, mu, labels=y, working_set=True, batch_size=64,
                                  show_progress=False)
        assert index == index2 and ws.coef_.shape == (3, len(index))
        assert_same_fit(ws, dense)
        X, _, _ = descriptors(net, images, show_progress=False, input_shape=(1, 16, 16))
        assert_same_fit(ws, RelevantFeatureSelector(mu=mu).fit(X, y.numpy()))
        assert ws.selected_features(index) == dense.selected_features(index)
    assert_same_state(state_of(net), before)


def test_auto_picks_dense_or_working_set_by_memory(synthetic):
    X, y = synthetic
    m = X.shape[1]
    stream = ArrayStream(X, y, batch_size=500)
    big, _ = fit_relevant(stream, mu=5.0)
    assert big.method_ == "dense" and big.n_passes_ == 1 and big.working_set_.size == m
    small_budget = estimate_memory(m, 6, batch_size=128) // 2
    small, _ = fit_relevant(stream, mu=5.0, max_memory=small_budget)
    assert small.method_ == "working_set"
    assert_same_fit(small, big)
    with pytest.raises(StatisticsMemoryError, match=rf"m={m} features.*bytes.*working_set=True") as info:
        fit_relevant(stream, mu=5.0, working_set=False, max_memory=small_budget)
    assert isinstance(info.value, MemoryError) and isinstance(info.value, ValueError)
    with pytest.raises(MemoryError, match="fewer layers"):
        gram_statistics(stream, max_memory=small_budget)
    with pytest.raises(StatisticsMemoryError, match="working-set fit"):
        fit_relevant(stream, mu=5.0, working_set=True, max_memory=1000)


def test_memory_estimate():
    assert available_memory() > 0
    m, C, n = 94_000, 10, 128
    assert estimate_memory(m, C, batch_size=n) > 8 * m * m  # the Gram matrix dominates
    ws = estimate_memory(m, C, batch_size=n, method="working_set", working_set=3000)
    assert ws < 4 * 2**30 and ws < estimate_memory(m, C) / 100
    with pytest.raises(ValueError, match="method"):
        estimate_memory(10, 2, method="sparse")


def test_round_limit_warns_and_says_what_to_do(synthetic):
    X, y = synthetic
    full, _ = fit_relevant(ArrayStream(X, y, batch_size=500), mu=50.0, working_set=True)
    assert full.n_passes_ > 3, "this problem needs more than one round"
    with pytest.warns(ConvergenceWarning, match="max_rounds") as record:
        cut, _ = fit_relevant(ArrayStream(X, y, batch_size=500), mu=50.0, working_set=True, max_rounds=1)
    assert len(record) == 1
    assert not cut.converged_ and cut.status_ == "max_iter" and np.any(cut.relative_gap_ > cut.tol)
    assert cut.message_ in str(record[0].message)


def test_selector_from_result_of_a_subset():
    X, y = synthetic_descriptors(300, [20, 10], n_classes=3)
    cols = np.array([0, 3, 5, 12, 20, 29])
    res = solve_mu_lasso(GramAccumulator.from_data(X[:, cols], one_hot(y)), mu=0.5)
    sel = RelevantFeatureSelector.from_result(res, columns=cols, n_features=30, threshold=1e-6)
    assert sel.coef_.shape == (3, 30) and sel.mu == 0.5 and sel.tol == res.tol
    np.testing.assert_array_equal(sel.coef_[:, cols], res.W.T)
    assert np.all(np.delete(sel.coef_, cols, axis=1) == 0)
    assert sel.converged_ == res.converged and sel.status_ == res.status
    np.testing.assert_array_equal(sel.transform(X), X[:, sel.get_support()])
    whole = RelevantFeatureSelector.from_result(res)
    assert whole.coef_.shape == (3, 6)
    with pytest.raises(TypeError, match="n_features"):
        RelevantFeatureSelector.from_result(res, columns=cols)
    with pytest.raises(ValueError, match="repeated"):
        RelevantFeatureSelector.from_result(res, columns=[0, 0, 1, 2, 3, 4], n_features=30)
    with pytest.raises(ValueError, match="columns must lie"):
        RelevantFeatureSelector.from_result(res, columns=cols + 10, n_features=30)
    with pytest.raises(TypeError, match="comes from the result"):
        RelevantFeatureSelector.from_result(res, mu=2.0)
    with pytest.raises(TypeError, match="MuLassoResult"):
        RelevantFeatureSelector.from_result(res.W)
    assert isinstance(sel.result_, MuLassoResult) and sel.result_.W.shape == (30, 3)


# --- bad input -------------------------------------------------------------------------------------------------

def test_bad_input_raises_clear_errors():
    net = small_net()
    images, y = class_images(60)
    quiet = dict(show_progress=False)
    # a loader whose images change shape mid-way
    batches = [(images[:20], y[:20]), (torch.rand(20, 1, 18, 18), y[20:40])]
    with pytest.raises(ValueError, match=r"batch 1 .*shape"):
        gram_statistics(net, batches, **quiet)
    # a stream whose descriptors change width mid-way
    X, yy = synthetic_descriptors(60, [10, 10], n_classes=3)

    class Ragged:
        index = ArrayStream(X).index

        def __iter__(self):
            yield X[:30], yy[:30]
            yield X[30:, :15], yy[30:]

    with pytest.raises(ValueError, match=r"batch 1 .*\(30, 15\), expected \(n, 20\)"):
        gram_statistics(Ragged())
    # labels outside the classes of interest, and outside the model's outputs
    with pytest.raises(ValueError, match=r"label\(s\) \[2\] are not among the classes of interest \[0, 1\]"):
        gram_statistics(net, images, labels=y, classes=[0, 1], **quiet)
    with pytest.raises(ValueError, match="outside the model's 3 output units"):
        gram_statistics(net, images, labels=y + 1, **quiet)
    with pytest.raises(ValueError, match="negative"):
        gram_statistics(net, images, labels=y - 1, **quiet)
    with pytest.raises(TypeError, match="integer class labels"):
        gram_statistics(net, images, labels=y + 0.5, **quiet)
    # an empty loader, and a class with no example
    empty = DataLoader(TensorDataset(images[:0], y[:0]), batch_size=8)
    with pytest.raises(ValueError, match="no images"):
        gram_statistics(net, empty, **quiet)
    with pytest.raises(ValueError, match="no images"):
        gram_statistics(net, empty, input_shape=(1, 16, 16), **quiet)
    with pytest.raises(ValueError, match=r"class\(es\) \[1\] have no example"):
        gram_statistics(net, images, labels=torch.where(y == 1, 0, y), **quiet)
    # a model without parameters
    with pytest.raises(ValueError, match="no parameters"):
        gram_statistics(nn.Sequential(nn.ReLU(), nn.Flatten()), images, labels=y, **quiet)
    # a model whose forward returns a tuple or a dict: which output is the logits?

    class Pair(nn.Module):
        def __init__(self, dict_output=False):
            super().__init__()
            self.net, self.dict_output = small_net(), dict_output

        def forward(self, x):
            out = self.net(x)
            return {"logits": out, "aux": out} if self.dict_output else (out, out)

    with pytest.raises(TypeError, match=r"returned a tuple of 2.*model\(x\)\[0\].*classes="):
        gram_statistics(Pair(), images, labels=y, **quiet)
    with pytest.raises(TypeError, match=r"returned a dict with keys \['logits', 'aux'\]"):
        fit_relevant(Pair(dict_output=True), images, labels=y, **quiet)
    # data without labels
    with pytest.raises(ValueError, match="without labels.*labels="):
        gram_statistics(net, images, **quiet)
    with pytest.raises(ValueError, match="without labels"):
        fit_relevant(ArrayStream(X), mu=1.0, working_set=True)
    with pytest.raises(TypeError, match="labels= goes with a tensor"):
        gram_statistics(net, TensorDataset(images, y), labels=y, **quiet)
    with pytest.raises(ValueError, match="60 images but 59 labels"):
        gram_statistics(net, images, labels=y[:-1], **quiet)
    # a one-shot iterator cannot be streamed twice
    with pytest.raises(TypeError, match="one-shot"):
        fit_relevant(net, iter([(images, y)]), working_set=True, **quiet)
    # a stream that yields other images on a later pass (a one-shot stream, a changing sampler)

    class Shrinking:
        index = ArrayStream(X).index
        passes = 0

        def __iter__(self):
            self.passes += 1
            stop = 60 if self.passes == 1 else 30
            yield X[:stop], yy[:stop]

    with pytest.raises(ValueError, match="yielded 60 images on the first pass but 30"):
        fit_relevant(Shrinking(), mu=1.0, working_set=True)
    # NaN descriptors, bad parameters, misplaced arguments
    bad = X.copy()
    bad[5, 3] = np.nan
    with pytest.raises(ValueError, match="batch 0: descriptors contain NaN"):
        gram_statistics(ArrayStream(bad, yy))
    with pytest.raises(ValueError, match="mu"):
        fit_relevant(ArrayStream(X, yy), mu=0)
    with pytest.raises(ValueError, match="working_set"):
        fit_relevant(ArrayStream(X, yy), mu=1, working_set="yes")
    with pytest.raises(ValueError, match="max_memory"):
        gram_statistics(ArrayStream(X, yy), max_memory=-1)
    with pytest.raises(TypeError, match="data must be None"):
        gram_statistics(ArrayStream(X, yy), images)
    with pytest.raises(TypeError, match="belong to the stream"):
        gram_statistics(ArrayStream(X, yy), layers=[1])
    with pytest.raises(TypeError, match="torch.nn.Module"):
        gram_statistics("net", images, labels=y)
    with pytest.raises(ValueError, match="repeated"):
        gram_statistics(net, images, labels=y, classes=[0, 0], **quiet)
    with pytest.raises(ValueError, match="input_shape"):
        gram_statistics(net, [(torch.rand(4, 16), y[:4])], **quiet)


def test_errors_leave_the_model_as_it_came():
    net = small_net().train()
    net[0].weight.requires_grad_(False)
    before = state_of(net)
    images, y = class_images(30)
    with pytest.raises(ValueError):
        gram_statistics(net, images, labels=y + 5, show_progress=False)
    with pytest.raises(ValueError):
        fit_relevant(net, [(images[:10], y[:10]), (images[10:20, :, :8], y[10:20])], working_set=True,
                     show_progress=False)
    assert_same_state(state_of(net), before)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a certified fit warns nothing
        sel, _ = fit_relevant(net, images, 1.0, labels=y, working_set=True, show_progress=False)
    assert sel.converged_
    assert_same_state(state_of(net), before)


def test_select_features_reads_the_image_shape_from_any_kind_of_data():
    # one way to read the shape (vefi.statistics.peek_image_shape) for select_features and the fit alike: a
    # one-shot generator is peeked without losing its first batch, an empty dataset says so
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    x, y = torch.rand(60, 1, 12, 12), torch.arange(60) % 3
    picked = []
    for data in (DataLoader(TensorDataset(x, y), batch_size=16), TensorDataset(x, y),
                 ((x[i:i + 20], y[i:i + 20]) for i in range(0, 60, 20))):
        relevant = vefi.select_features(model, data, mu=1.0, show_progress=False)
        assert relevant.input_shape == (1, 12, 12)
        picked.append(relevant.features)
    assert picked[0] == picked[1] == picked[2]  # the generator's first batch was not lost
    with pytest.raises(ValueError, match="the dataset is empty"):
        vefi.select_features(model, TensorDataset(x[:0], y[:0]), show_progress=False)


_LARGE_GRAM_UPDATE = """
import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits
from vefi.statistics import SYRK_THREADED_MAX, _add_outer
m = 26_000
assert m > SYRK_THREADED_MAX
rng = np.random.default_rng(0)
X, Q = rng.random((64, m)), np.zeros((m, m))
with threadpool_limits(2, user_api="blas"):
    _add_outer(Q, X)
    threads = [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
rows = [0, 12_345, m - 1]
expected = X[:, rows].T @ X
for k, r in enumerate(rows):
    assert np.allclose(Q[r, : r + 1], expected[k, : r + 1]), r
print("ok", threads)
"""


def test_dense_gram_update_survives_the_size_where_threaded_syrk_crashed():
    # m = 26,000 crashed scipy's threaded OpenBLAS dsyrk (a segmentation fault); run in a subprocess so that a
    # crash is a failure with its exit code, not the end of the test session. Needs 5.4 GB.
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _LARGE_GRAM_UPDATE], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"exit code {done.returncode}: {done.stderr[-2000:]}"
    assert done.stdout.startswith("ok"), done.stdout
