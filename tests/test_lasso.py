"""The mu-Lasso solver: L1-ball projection, Gram accumulation, optimality, and agreement with SPAMS, spgl1
and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from vefi.descriptors import synthetic_descriptors
from vefi.lasso import GramAccumulator, mu_lasso_objective, project_l1_ball, solve_mu_lasso


# --- projection onto the L1 ball -------------------------------------------------------------------------

def projection_by_bisection(v: np.ndarray, radius: float) -> np.ndarray:
    """Slow, obviously right: find the soft threshold theta with sum(max(|v| - theta, 0)) = radius."""
    if np.abs(v).sum() <= radius:
        return v.copy()
    lo, hi = 0.0, np.abs(v).max()
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.maximum(np.abs(v) - mid, 0).sum() > radius:
            lo = mid
        else:
            hi = mid
    return np.sign(v) * np.maximum(np.abs(v) - 0.5 * (lo + hi), 0)


finite = st.floats(-100, 100, allow_nan=False, allow_infinity=False)
vectors = arrays(np.float64, st.integers(1, 40), elements=finite)
radii = st.floats(1e-3, 50)


@settings(max_examples=150, deadline=None)
@given(vectors, radii)
def test_projection_lands_in_ball_and_is_idempotent(v, radius):
    p = project_l1_ball(v, radius)
    assert np.abs(p).sum() <= radius * (1 + 1e-12) + 1e-12
    np.testing.assert_allclose(project_l1_ball(p, radius), p, rtol=1e-12, atol=1e-12)
    if np.abs(v).sum() <= radius:
        np.testing.assert_array_equal(p, v)


@settings(max_examples=150, deadline=None)
@given(vectors, radii)
def test_projection_equals_bisection(v, radius):
    np.testing.assert_allclose(project_l1_ball(v, radius), projection_by_bisection(v, radius),
                               atol=1e-9 * max(1.0, np.abs(v).max()))


@settings(max_examples=100, deadline=None)
@given(vectors, radii)
def test_projection_is_the_nearest_point(v, radius):
    # p is the projection iff (v - p)^T (z - p) <= 0 for every z in the ball; the ball is the convex hull of
    # its vertices +-radius e_i, so checking those suffices.
    p = project_l1_ball(v, radius)
    r = v - p
    scale = max(1.0, np.abs(v).max()) ** 2
    assert radius * np.abs(r).max() <= r @ p + 1e-9 * scale


@settings(max_examples=50, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 30), st.integers(1, 6)), elements=finite), radii)
def test_projection_of_a_matrix_is_column_by_column(V, radius):
    P = project_l1_ball(V, radius)
    for j in range(V.shape[1]):
        np.testing.assert_array_equal(P[:, j], project_l1_ball(V[:, j], radius))


def test_projection_rejects_bad_input():
    with pytest.raises(ValueError, match="positive"):
        project_l1_ball([1.0, 2.0], 0.0)
    with pytest.raises(ValueError, match="NaN"):
        project_l1_ball([1.0, np.nan], 1.0)
    with pytest.raises(ValueError, match="shape"):
        project_l1_ball(np.ones((2, 2, 2)), 1.0)


# --- Gram accumulation -------------------------------------------------------------------------------------

def test_gram_accumulator_sums_batches_and_workers():
    X, y = synthetic_descriptors(500, [30, 20], n_classes=4, seed=1)
    L = np.eye(4)[y]
    whole = GramAccumulator.from_data(X, L, batch_size=64)
    np.testing.assert_allclose(whole.Q, X.T @ X, rtol=1e-12)
    np.testing.assert_allclose(whole.q, X.T @ L, rtol=1e-12)
    np.testing.assert_allclose(whole.lsq, np.bincount(y, minlength=4))
    a = GramAccumulator().update(X[:200].astype(np.float32), L[:200])
    b = GramAccumulator().update(X[200:].astype(np.float32), L[200:])
    both = a + b
    assert both.Q.dtype == np.float64 and both.n_samples == 500
    np.testing.assert_allclose(both.Q, X.astype(np.float32).astype(np.float64).T
                               @ X.astype(np.float32).astype(np.float64), rtol=1e-12)
    assert (GramAccumulator() + a).n_samples == 200


def test_gram_accumulator_rejects_bad_batches():
    acc = GramAccumulator().update(np.ones((3, 5)), np.eye(3))
    with pytest.raises(ValueError, match="5 features"):
        acc.update(np.ones((3, 4)), np.eye(3))
    with pytest.raises(ValueError, match="samples"):
        acc.update(np.ones((3, 5)), np.eye(4))
    with pytest.raises(ValueError, match="NaN or Inf"):
        GramAccumulator().update(np.array([[1.0, np.inf]]), np.ones((1, 1)))
    with pytest.raises(ValueError, match="no samples"):
        GramAccumulator.from_data(np.zeros((0, 3)), np.zeros((0, 2)))


# --- the solver --------------------------------------------------------------------------------------------

def random_problem(n=600, blocks=(40, 30, 20), C=5, seed=0):
    X, y = synthetic_descriptors(n, list(blocks), n_classes=C, seed=seed)
    L = np.eye(C)[y]
    return X, L, GramAccumulator.from_data(X, L)


def check_kkt(W, gram, mu, rtol=1e-6):
    """Optimality of each column: on the ball's boundary unless the gradient vanishes; for nonzero w_i,
    -g_i sign(w_i) equals lambda = max|g|; |g_i| <= lambda elsewhere."""
    G = gram.Q @ W - gram.q  # gradient of 0.5 ||A w - b||^2
    for j in range(W.shape[1]):
        w, g = W[:, j], G[:, j]
        lam = np.abs(g).max()
        scale = np.abs(gram.q[:, j]).max()
        if lam <= 1e-9 * scale:
            continue  # unconstrained optimum inside the ball
        assert abs(np.abs(w).sum() - mu) <= 1e-9 * mu
        on = w != 0
        np.testing.assert_allclose(-g[on] * np.sign(w[on]), lam, rtol=rtol)
        assert np.all(np.abs(g[~on]) <= lam * (1 + rtol))


@pytest.mark.parametrize("mu", [0.5, 3.0, 10.0])
def test_solver_meets_kkt_and_reports_a_small_gap(mu):
    X, L, gram = random_problem(seed=int(mu * 10))
    res = solve_mu_lasso(gram, mu, tol=1e-10)
    assert res.converged and np.all(res.relative_gap <= 1e-10)
    assert res.W.shape == (90, 5) and res.n_iter > 0
    check_kkt(res.W, gram, mu)
    # the reported objective and gap are those of ||X^T w - l||^2, recomputed here from the data
    r = L - X @ res.W
    np.testing.assert_allclose(res.objective, (r * r).sum(0), rtol=1e-9)
    g = X.T @ r
    gap = 2 * ((r * r).sum(0) - (L * r).sum(0) + mu * np.abs(g).max(0))
    np.testing.assert_allclose(res.gap, np.maximum(gap, 0), atol=1e-9 * res.objective.max())


def test_solver_matches_spams():
    spams = pytest.importorskip("spams")
    for seed, mu in [(0, 10.0), (1, 2.0), (2, 30.0)]:
        X, L, gram = random_problem(n=800, blocks=(60, 50, 40), C=6, seed=seed)
        res = solve_mu_lasso(gram, mu)
        W_spams = spams.lasso(np.asfortranarray(L), Q=np.asfortranarray(gram.Q), q=np.asfortranarray(gram.q),
                              lambda1=mu, mode=0, numThreads=1).toarray()
        assert np.all(np.abs(W_spams).sum(0) <= mu * (1 + 1e-9))
        ref = mu_lasso_objective(W_spams, gram.Q, gram.q, gram.lsq)
        np.testing.assert_allclose(res.objective, ref, rtol=1e-6)
        assert np.all(res.objective <= ref * (1 + 1e-9))


def test_solver_matches_spams_on_assorted_problems():
    # Gaussian, skewed positive and descriptor-like data; more or fewer images than features; radii from
    # tiny (one feature) to large (least squares inside the ball, or an exact fit).
    spams = pytest.importorskip("spams")
    rng = np.random.default_rng(0)
    for trial in range(24):
        n, m, C = int(rng.integers(5, 300)), int(rng.integers(2, 200)), int(rng.integers(1, 5))
        kind = trial % 3
        if kind == 0:
            X = rng.normal(size=(n, m))
        elif kind == 1:
            X = rng.random((n, m)) ** 3
        else:
            X, _ = synthetic_descriptors(n, [max(2, m // 3)] * 3, seed=trial)  # (1-feature blocks: constant)
        L = np.eye(C)[np.arange(n) % C]
        mu = float(10 ** rng.uniform(-2, 2.5))
        gram = GramAccumulator.from_data(X, L)
        res = solve_mu_lasso(gram, mu)
        W = spams.lasso(np.asfortranarray(L), Q=np.asfortranarray(gram.Q), q=np.asfortranarray(gram.q),
                        lambda1=mu, mode=0, numThreads=1).toarray()
        ref = mu_lasso_objective(W, gram.Q, gram.q, gram.lsq)
        assert np.all(np.abs(res.W).sum(0) <= mu * (1 + 1e-12)), trial
        # relative to the objective, or to 1e-4 of ||l||^2 when a class is fitted (almost) exactly
        assert np.all(np.abs(res.objective - ref) <= 1e-6 * np.maximum(ref, 1e-4 * gram.lsq)), trial
        assert np.all(res.objective <= ref + 1e-9 * gram.lsq), trial


def test_solver_matches_spgl1_class_by_class():
    spgl1 = pytest.importorskip("spgl1")
    X, L, gram = random_problem(n=400, blocks=(30, 20), C=3, seed=5)
    mu = 5.0
    res = solve_mu_lasso(gram, mu)
    for j in range(3):
        x, r, _, _ = spgl1.spg_lasso(X, L[:, j], mu, opt_tol=1e-9, bp_tol=1e-9, iter_lim=20000)
        assert abs(res.objective[j] - r @ r) <= 1e-6 * r @ r
        assert res.objective[j] <= r @ r * (1 + 1e-9)


def test_solver_matches_sklearn_penalised_lasso():
    from sklearn.linear_model import Lasso

    X, L, gram = random_problem(n=500, blocks=(25, 25), C=3, seed=7)
    mu = 4.0
    res = solve_mu_lasso(gram, mu, tol=1e-12)
    for j in range(3):
        # The constrained optimum solves the penalised problem at lambda = ||A^T r||_inf; scikit-learn scales
        # the squared loss by 1/(2N), so its alpha is lambda / N. One target at a time: lasso_path with a 2-D
        # target would solve the multi-task (L2,1) problem instead.
        r = L[:, j] - X @ res.W[:, j]
        alpha = np.abs(X.T @ r).max() / X.shape[0]
        sk = Lasso(alpha=alpha, fit_intercept=False, tol=1e-14, max_iter=200000).fit(X, L[:, j])
        obj_sk = ((L[:, j] - X @ sk.coef_) ** 2).sum()
        np.testing.assert_allclose(np.abs(sk.coef_).sum(), mu, rtol=1e-4)
        np.testing.assert_allclose(res.objective[j], obj_sk, rtol=1e-6)
        np.testing.assert_allclose(sk.coef_, res.W[:, j], atol=1e-3 * np.abs(res.W[:, j]).max())


def test_solver_interior_solution_is_least_squares():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(200, 6))
    L = np.eye(2)[rng.integers(0, 2, 200)]
    gram = GramAccumulator.from_data(X, L)
    ls = np.linalg.lstsq(X, L, rcond=None)[0]
    res = solve_mu_lasso(gram, mu=10 * np.abs(ls).sum(0).max(), tol=1e-12)
    assert res.converged
    np.testing.assert_allclose(res.W, ls, atol=1e-8)


def test_warm_start_and_accepts_arrays():
    X, L, gram = random_problem(seed=11)
    cold = solve_mu_lasso(gram, 5.0)
    warm = solve_mu_lasso(gram.Q, 5.0, q=gram.q, lsq=gram.lsq, W0=cold.W)
    np.testing.assert_allclose(warm.objective, cold.objective, rtol=1e-9)
    assert warm.n_iter <= cold.n_iter
    # A W0 outside the ball is projected first, not trusted.
    far = solve_mu_lasso(gram, 5.0, W0=100 * np.ones_like(cold.W))
    np.testing.assert_allclose(far.objective, cold.objective, rtol=1e-6)


def test_max_iter_reports_not_converged():
    X, L, gram = random_problem(seed=12)
    res = solve_mu_lasso(gram, 10.0, max_iter=2)
    assert not res.converged and res.n_iter <= 2 and np.all(res.gap >= 0)


@pytest.mark.parametrize("mu", [0, -1.0, np.inf, np.nan])
def test_solver_rejects_bad_mu(mu):
    _, _, gram = random_problem(n=100)
    with pytest.raises(ValueError, match="mu"):
        solve_mu_lasso(gram, mu)


def test_solver_rejects_bad_input():
    _, _, gram = random_problem(n=100)
    with pytest.raises(TypeError, match="mu"):
        solve_mu_lasso(gram, "ten")
    bad = gram.copy()
    bad.lsq[1] = 0.0
    bad.q[:, 1] = 0.0
    with pytest.raises(ValueError, match="without examples"):
        solve_mu_lasso(bad, 1.0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        solve_mu_lasso(np.full((3, 3), np.nan), 1.0, q=np.ones((3, 1)), lsq=[1.0])
    with pytest.raises(ValueError, match="shapes do not match"):
        solve_mu_lasso(np.eye(3), 1.0, q=np.ones((4, 1)), lsq=[1.0])
    with pytest.raises(TypeError, match="q and lsq"):
        solve_mu_lasso(np.eye(3), 1.0)
    with pytest.raises(ValueError, match="empty"):
        solve_mu_lasso(GramAccumulator(), 1.0)
    with pytest.raises(ValueError, match="W0"):
        solve_mu_lasso(gram, 1.0, W0=np.zeros((2, 2)))


def test_callback_sees_every_iteration_with_the_full_gap():
    _, _, gram = random_problem(seed=13)
    seen = []
    res = solve_mu_lasso(gram, 4.0, callback=lambda it, W, rel: seen.append((it, W.copy(), rel.copy())))
    assert [s[0] for s in seen] == list(range(1, res.n_iter + 1))
    it, W, rel = seen[-1]
    np.testing.assert_allclose(W, res.W)
    np.testing.assert_allclose(rel, res.relative_gap, atol=1e-12)
    assert all(np.all(np.abs(s[1]).sum(0) <= 4.0 * (1 + 1e-12)) for s in seen)


def test_degenerate_data():
    # descriptors that are all zero: nothing correlates with any class, w = 0 is optimal
    gram = GramAccumulator.from_data(np.zeros((10, 4)), np.eye(2)[np.arange(10) % 2])
    res = solve_mu_lasso(gram, 1.0)
    assert res.converged and not res.W.any()
    np.testing.assert_allclose(res.objective, [5.0, 5.0])
    # one constant feature: the least-squares weight 0.5 fits inside the ball
    res = solve_mu_lasso(GramAccumulator.from_data(np.ones((10, 1)), np.eye(2)[np.arange(10) % 2]), 1.0)
    assert res.converged
    np.testing.assert_allclose(res.W, [[0.5, 0.5]])
