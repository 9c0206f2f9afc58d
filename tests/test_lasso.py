"""The mu-Lasso solver: L1-ball projection, Gram accumulation, optimality certified by the duality gap on five
families of problems, warnings when it is not, and agreement with SPAMS, spgl1 and scikit-learn (where they are
right: SPAMS's own failures are detected, not trusted)."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import sklearn.exceptions
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import vefi.lasso
from benchmarks.lasso_problems import FAMILIES, family_problem
from vefi.descriptors import synthetic_descriptors
from vefi.lasso import (ConvergenceWarning, GramAccumulator, mu_lasso_objective, project_l1_ball,
                        solve_mu_lasso)


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


def spams_lasso(spams, gram, L, mu):
    """SPAMS's answer from the same Gram pair (LARS homotopy, one thread), or None when it is not a valid
    point: SPAMS returns NaN, or a point outside the L1 ball, on some degenerate (low-rank) problems."""
    W = spams.lasso(np.asfortranarray(L), Q=np.asfortranarray(gram.Q),
                    q=np.asfortranarray(gram.q), lambda1=mu, mode=0, numThreads=1).toarray()
    if not np.all(np.isfinite(W)) or np.any(np.abs(W).sum(0) > mu * (1 + 1e-9)):
        return None
    return W


def gap_from_data(X, L, W, mu):
    """The duality gap of ||X^T w_j - l_j||^2 per class, recomputed from the data (not from the Gram pair):
    2 (||r||^2 - l^T r + mu ||X^T r||_inf) with r = l - X w."""
    r = L - X @ W
    return 2 * ((r * r).sum(0) - (L * r).sum(0) + mu * np.abs(X.T @ r).max(0))


def test_solver_matches_spams(peer):
    spams = peer("spams")
    for seed, mu in [(0, 10.0), (1, 2.0), (2, 30.0)]:
        X, L, gram = random_problem(n=800, blocks=(60, 50, 40), C=6, seed=seed)
        res = solve_mu_lasso(gram, mu)
        assert res.converged and res.status == "converged"
        W_spams = spams_lasso(spams, gram, L, mu)
        assert W_spams is not None  # descriptor-like data with N >> m: SPAMS is right here
        ref = mu_lasso_objective(W_spams, gram.Q, gram.q, gram.lsq)
        np.testing.assert_allclose(res.objective, ref, rtol=1e-6)
        assert np.all(res.objective <= ref * (1 + 1e-9))


@pytest.mark.parametrize("family", FAMILIES)
def test_solver_certifies_every_family(family, peer):
    # Over- and under-determined problems, radii from 0.01 (one feature) to 1000 (least squares inside the
    # ball, or an exact fit). Each must be certified: converged, and the gap recomputed from the data agrees.
    spams = peer("spams")
    spams_invalid = 0
    for seed in range(6):
        p = family_problem(family, seed)
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)  # a certified solve does not warn
            res = solve_mu_lasso(p.gram, p.mu)
        assert res.converged and res.status == "converged", (p.name, res.message)
        floor = np.maximum(res.objective, 1e-2 * p.gram.lsq.sum())
        assert np.all(res.relative_gap <= 1e-8) and np.all(res.gap <= 1e-8 * floor * (1 + 1e-9)), p.name
        assert np.all(np.abs(res.W).sum(0) <= p.mu * (1 + 1e-12)), p.name
        # the certificate, recomputed from X in another order of operations (its own rounding: 10x slack)
        assert np.all(gap_from_data(p.X, p.L, res.W, p.mu) <= 1e-7 * floor), p.name
        W = spams_lasso(spams, p.gram, p.L, p.mu)
        if W is None:
            spams_invalid += 1
            continue
        ref = mu_lasso_objective(W, p.gram.Q, p.gram.q, p.gram.lsq)
        # never worse than a valid SPAMS answer beyond our certified tolerance
        assert np.all(res.objective <= ref + 1e-8 * floor), p.name
    if family != "lowrank":
        assert spams_invalid == 0  # SPAMS fails on degenerate low-rank problems only


def test_nearly_singular_problems_are_certified_or_say_so():
    # Low rank plus noise 1e-6 to 1e-4: Gram matrices with condition numbers near 1e10-1e12, where rounding
    # can stop the homotopy short (the polish then takes over) and where the verdict may depend on the BLAS
    # kernel. Whatever the verdict, it is never silent, and a certificate it claims holds against the data.
    certified = 0
    for seed in range(12):
        rng = np.random.default_rng(1000 + seed)
        N, m, r = rng.integers(30, 200), rng.integers(5, 40), rng.integers(1, 5)
        X = rng.random((N, r)) @ rng.random((r, m)) + 10 ** rng.uniform(-6, -4) * rng.random((N, m))
        L = np.eye(3)[rng.integers(0, 3, N)]
        gram, mu = GramAccumulator.from_data(X, L), 10 ** rng.uniform(-1, 3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = solve_mu_lasso(gram, mu, max_iter=2000)
        warned = [w for w in caught if issubclass(w.category, ConvergenceWarning)]
        assert res.converged == (res.status == "converged") == (not warned), seed
        assert np.all(np.abs(res.W).sum(0) <= mu * (1 + 1e-12))
        if res.converged:
            certified += 1
            floor = np.maximum(res.objective, 1e-2 * gram.lsq.sum())
            assert np.all(gap_from_data(X, L, res.W, mu) <= 1e-6 * floor), seed
        else:
            assert res.status in ("stalled", "max_iter") and str(warned[0].message) == res.message, seed
    assert certified >= 6  # most are certified (53 of 60 of this family measured on two kernels)


def test_solver_matches_spgl1_class_by_class(peer):
    spgl1 = peer("spgl1")
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
    assert res.converged
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


def test_max_iter_reports_not_converged_and_warns_why():
    X, L, gram = random_problem(seed=12)
    with pytest.warns(ConvergenceWarning, match=r"iteration limit max_iter=2.*raise max_iter") as record:
        res = solve_mu_lasso(gram, 10.0, max_iter=2)
    assert not res.converged and res.status == "max_iter" and res.n_iter <= 2 and np.all(res.gap >= 0)
    assert res.message == str(record[0].message) and np.any(res.relative_gap > res.tol)
    # scikit-learn's filters apply to it too
    assert issubclass(ConvergenceWarning, sklearn.exceptions.ConvergenceWarning)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        assert solve_mu_lasso(gram, 10.0).converged  # a certified solve stays silent


def test_reads_only_the_rows_of_q_it_needs():
    # Deep nets have large m: the solver reads the rows of Q of the features that enter a support (plus the
    # diagonal), never all of Q. Rows it does not read can be anything.
    X, L, gram = random_problem(n=400, blocks=(200, 150, 100), C=3, seed=21)
    res = solve_mu_lasso(gram, 1.0)
    assert res.converged and 0 < res.n_working < 450 / 4

    class Rows(np.ndarray):
        read = set()

        def __getitem__(self, key):
            rows = np.arange(self.shape[0])[key[0] if isinstance(key, tuple) else key]
            Rows.read.update(np.atleast_1d(rows).tolist())
            return np.asarray(self)[key]

    Q = gram.Q.view(Rows)
    again = solve_mu_lasso(Q, 1.0, q=gram.q, lsq=gram.lsq)
    np.testing.assert_array_equal(again.W, res.W)
    assert len(Rows.read) == res.n_working
    assert set(np.flatnonzero(res.W.any(axis=1))) <= Rows.read


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


# --- the fast paths against slow references ------------------------------------------------------------

def minimum_by_faces(Q, q, lsq, mu):
    """Slow, obviously right, for a handful of features: the optimum of 0.5 w^T Q w - q^T w over the L1 ball
    lies in the relative interior of one face {w_S with signs s, s^T w_S = mu} (or inside the ball), where it
    minimises the quadratic on the face's affine hull. Try every face and the interior, keep the best point
    that is feasible. Returns ||X^T w - l||^2 (no factor 1/2) at that point."""
    m = q.size
    best = lsq  # w = 0
    w_ls = np.linalg.lstsq(Q, q, rcond=None)[0]
    if np.abs(w_ls).sum() <= mu:
        best = min(best, w_ls @ Q @ w_ls - 2 * q @ w_ls + lsq)
    for size in range(1, m + 1):
        for S in itertools.combinations(range(m), size):
            S = list(S)
            # every sign pattern of support S at once: K = [[Q_SS, s], [s^T, 0]], solved in least squares
            signs = np.array(list(itertools.product((-1.0, 1.0), repeat=size)))
            K = np.zeros((len(signs), size + 1, size + 1))
            K[:, :size, :size] = Q[np.ix_(S, S)]
            K[:, :size, size] = K[:, size, :size] = signs
            rhs = np.append(q[S], mu)
            sol = (np.linalg.pinv(K) @ rhs)[:, :size]
            for s_S, w_S in zip(signs, sol):
                if np.all(s_S * w_S >= -1e-12) and np.abs(w_S).sum() <= mu * (1 + 1e-9):
                    w = np.zeros(m)
                    w[S] = w_S * min(1.0, mu / max(np.abs(w_S).sum(), 1e-300))
                    best = min(best, w @ Q @ w - 2 * q @ w + lsq)
    return best


def homotopy_only(monkeypatch):
    """Turn the active-set jump off, so that every class follows its per-class homotopy."""
    monkeypatch.setattr(vefi.lasso, "_JUMP_ROUNDS", 0)


def jump_first(monkeypatch):
    """Try the active-set jump before any homotopy event wherever it may be tried (by default only a path
    still going after _JUMP_AFTER events tries it, which no problem of a few features has)."""
    monkeypatch.setattr(vefi.lasso, "_JUMP_AFTER", 0)


def jump_outcomes(monkeypatch) -> list:
    """Record whether each call of the active-set jump landed (True) or gave up (False)."""
    outcomes, real = [], vefi.lasso._class_jump

    def spy(*args, **kwargs):
        w, used = real(*args, **kwargs)
        outcomes.append(w is not None)
        return w, used

    monkeypatch.setattr(vefi.lasso, "_class_jump", spy)
    return outcomes


@pytest.mark.parametrize("family", FAMILIES)
def test_every_path_matches_the_optimum_over_all_faces(family, monkeypatch):
    # Tiny problems (5 to 7 features), where trying every face of the L1 ball is affordable; each of the three
    # paths (the default active-set jump, the per-class homotopy, the lock-step homotopy of all classes)
    # against the same references.
    for seed in range(16):
        p = family_problem(family, seed, max_n=8, max_m=7)
        g = p.gram
        refs = [minimum_by_faces(g.Q, g.q[:, j], g.lsq[j], p.mu) for j in range(g.q.shape[1])]
        floor = 1e-2 * g.lsq.sum()
        with monkeypatch.context() as patch:
            homotopy_only(patch)
            homotopy = solve_mu_lasso(g, p.mu)
        with monkeypatch.context() as patch:
            jump_first(patch)
            jump = solve_mu_lasso(g, p.mu)
        paths = {"default": solve_mu_lasso(g, p.mu), "homotopy": homotopy, "jump": jump,
                 "lockstep": vefi.lasso._solve(g.Q, g.q, g.lsq, p.mu, 1e-8, 10000, None, None, per_class=False)}
        for path, res in paths.items():
            assert res.converged, (p.name, path, res.message)
            for j, ref in enumerate(refs):
                # never worse than the best face beyond the certified gap; never better than the optimum (the
                # faces include the optimal one up to rounding of the small systems)
                assert res.objective[j] <= ref + 1e-8 * max(ref, floor), (p.name, path, j)
                assert res.objective[j] >= ref - 1e-7 * max(ref, floor), (p.name, path, j)


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_paths_agree_with_the_lockstep_homotopy_and_spams(family, monkeypatch, peer):
    # The per-class paths (active-set jump, per-class homotopy) against the lock-step homotopy of all classes
    # and against SPAMS, on the benchmark's problems: the same verdict, and objectives within the certified
    # tolerance of each other and never worse than a valid SPAMS answer.
    spams = peer("spams")
    for seed in range(6):
        p = family_problem(family, seed)
        g = p.gram
        lock = vefi.lasso._solve(g.Q, g.q, g.lsq, p.mu, 1e-8, 10000, None, None, per_class=False)
        fast = solve_mu_lasso(g, p.mu)
        with monkeypatch.context() as patch:
            homotopy_only(patch)
            hom = solve_mu_lasso(g, p.mu)
            # the per-class homotopy takes the lock-step's events, class by class
            assert hom.n_iter == lock.n_iter, p.name
        floor = np.maximum(lock.objective, 1e-2 * g.lsq.sum())
        W_spams = spams_lasso(spams, g, p.L, p.mu)
        ref = None if W_spams is None else mu_lasso_objective(W_spams, g.Q, g.q, g.lsq)
        for res in (lock, fast, hom):
            assert res.converged and np.all(res.relative_gap <= 1e-8), (p.name, res.message)
            assert np.all(np.abs(res.W).sum(0) <= p.mu * (1 + 1e-12)), p.name
            assert np.all(np.abs(res.objective - lock.objective) <= 2e-8 * floor), p.name
            if ref is not None:
                assert np.all(res.objective <= ref + 1e-8 * floor), p.name


def test_a_jump_the_certificate_rejects_is_solved_again_by_the_homotopy(monkeypatch):
    # The jump certifies its point with its own gradient; should the full certificate disagree, the class is
    # solved again by the homotopy, not polished or reported from the jump's point.
    p = family_problem("gaussian", 0)  # a long path (mu near least squares): every class tries the jump
    g = p.gram
    real = vefi.lasso._class_jump
    landed = []

    def off_by_a_bit(*args, **kwargs):
        w, used = real(*args, **kwargs)
        landed.append(w is not None)
        return (None if w is None else w * (1 - 1e-3)), used  # feasible, not optimal

    monkeypatch.setattr(vefi.lasso, "_class_jump", off_by_a_bit)
    res = solve_mu_lasso(g, p.mu)
    lock = vefi.lasso._solve(g.Q, g.q, g.lsq, p.mu, 1e-8, 10000, None, None, per_class=False)
    assert landed and all(landed), landed
    assert res.converged and res.n_iter == lock.n_iter
    np.testing.assert_allclose(res.objective, lock.objective, rtol=1e-9)


def test_the_jump_lands_and_gives_up_on_the_compared_problems(monkeypatch):
    # Both outcomes of the jump occur on the problems test_fast_paths_agree_with_the_lockstep_homotopy_and_spams
    # checks against the lock-step homotopy and SPAMS, so both stay covered by those checks.
    outcomes = jump_outcomes(monkeypatch)
    for seed in range(6):
        p = family_problem("gaussian", seed)
        assert solve_mu_lasso(p.gram, p.mu).converged, p.name
    assert True in outcomes and False in outcomes, outcomes


def test_compiled_homotopy_reads_q_in_any_memory_order():
    # The compiled kernel reads rows of a C-ordered Q; a Fortran-ordered (symmetric) Q is read through its
    # transpose, anything else (a list, a strided view) copied: the same answer every way.
    p = family_problem("skewed", 2)
    g = p.gram
    ref = solve_mu_lasso(g, p.mu)
    for Q in (np.asfortranarray(g.Q), g.Q.tolist()):
        res = solve_mu_lasso(Q, p.mu, q=g.q, lsq=g.lsq)
        assert res.converged and res.n_iter == ref.n_iter, p.name
        np.testing.assert_allclose(res.objective, ref.objective, rtol=1e-8)
    # a strided view (every other feature) is copied, and solves its own smaller problem
    sub = slice(None, None, 2)
    res = solve_mu_lasso(g.Q[sub, sub], p.mu, q=g.q[sub], lsq=g.lsq)
    dense = solve_mu_lasso(np.ascontiguousarray(g.Q[sub, sub]), p.mu, q=g.q[sub], lsq=g.lsq)
    assert not g.Q[sub, sub].flags.c_contiguous and not g.Q[sub, sub].flags.f_contiguous
    assert res.converged and res.n_iter == dense.n_iter
    np.testing.assert_allclose(res.W, dense.W, rtol=0, atol=1e-12 * p.mu)


@pytest.mark.parametrize("m, c", [(0, 2), (3, 0)])
def test_an_empty_problem_is_refused_with_a_clear_error(m, c):
    with pytest.raises(ValueError, match="nothing to select"):
        solve_mu_lasso(np.eye(m), 1.0, q=np.zeros((m, c)), lsq=np.ones(c))
