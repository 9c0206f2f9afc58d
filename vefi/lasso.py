"""The mu-Lasso of Sec. 3.1: one L1-constrained least-squares problem per class, solved all at once.

For descriptors ``X`` (m x N, one image per column) and one-hot labels ``L`` (C x N) the paper solves

.. math:: W^* = \\arg\\min_W \\|X^T W - L^T\\|_F^2 \\quad \\text{s.t.} \\quad \\|w_j\\|_1 \\le \\mu
          \\text{ for every class } j.

The problem separates into one constrained lasso per column ``w_j``; every quantity the solver needs comes
from the Gram pair ``Q = X X^T`` (m x m), ``q = X L^T`` (m x C) and the squared label norms ``||l_j||^2``,
which :class:`GramAccumulator` sums over streamed batches in float64.

The solver is the spectral projected gradient method of SPGL1 (van den Berg & Friedlander 2008) for a fixed
``tau = mu``: Barzilai-Borwein steps (Barzilai & Borwein 1988), a non-monotone line search, and the Euclidean
projection onto the L1 ball (Duchi et al. 2008), all vectorised over the C columns. Because the objective is
quadratic, a trial point along the projected direction ``d`` costs nothing beyond ``Q d``: the objective,
the gradient and the next BB step follow from ``g^T d`` and ``d^T Q d``. It stops when the relative duality
gap of every class is below ``tol``. Two additions make it fast on descriptors, whose Gram matrix is
ill-conditioned (even singular: every L1-normalised block sums to one) and whose solutions are sparse:

* a face step (SPGL1's subspace minimisation): when a class keeps its support and signs, the exact minimiser
  on that face solves a small linear system, so the iterations end once the support is right;
* a working set: the SPG runs on the Gram block of a few features per class; one product with the full ``Q``
  per round checks every feature against the optimality conditions and adds the violators.

Duality gap (SPGL1's form). For ``min_w 0.5 ||A w - b||^2 s.t. ||w||_1 <= tau`` with residual
``r = b - A w``, the dual objective at ``r`` is ``b^T r - 0.5 ||r||^2 - tau ||A^T r||_inf``, so

    gap = ||r||^2 - b^T r + tau ||A^T r||_inf.

With ``A = X^T``, ``b = l_j`` and ``g = Q w - q_j = -A^T r``, ``||r||^2 - b^T r = w^T Q w - q_j^T w = w^T g``,
hence ``gap = w^T g + tau ||g||_inf`` -- non-negative for every feasible ``w`` (Hoelder) and zero exactly at
the optimum. It bounds the distance of the objective to the optimum.

Conventions in the results: ``objective`` is the paper's ``||X^T w_j - l_j||^2`` (no factor 1/2) and ``gap``
is the duality gap of that objective (twice the gap of the 1/2-scaled problem); ``relative_gap`` is their
ratio, the same in either convention.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

# Tuning of the solver (measured on descriptor-like problems, see benchmarks/bench_lasso.py): a face step
# after a column kept its support for _FACE_AFTER iterations, on supports of at most _FACE_MAX features
# (its cost is cubic in the support); the working set starts with, and grows by, _N_ADD features per class.
_FACE_AFTER = 2
_FACE_MAX = 2048
_N_ADD = 32

__all__ = ["GramAccumulator", "MuLassoResult", "project_l1_ball", "solve_mu_lasso", "mu_lasso_objective"]


def _check_radius(radius) -> float:
    try:
        value = float(radius)
    except (TypeError, ValueError):
        raise TypeError(f"mu (the L1 radius) must be a positive number, got {radius!r}") from None
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"mu (the L1 radius) must be positive and finite, got {radius!r}")
    return value


def project_l1_ball(v, radius: float = 1.0) -> np.ndarray:
    """Euclidean projection onto the L1 ball ``{w : ||w||_1 <= radius}``, column by column.

    The sort-based algorithm of Duchi et al. (2008), vectorised over columns. The threshold ``theta`` of a
    column satisfies ``theta >= max|v| - radius``, so only the entries above that bound are sorted
    (found with a partial sort), which keeps the cost near ``O(m)`` per column when the result is sparse.

    Parameters
    ----------
    v : array_like, shape (m,) or (m, C)
        Vector, or matrix whose columns are projected independently.
    radius : float
        Radius of the ball, positive.

    Returns
    -------
    numpy.ndarray
        Float64 array of the shape of ``v``; columns already inside the ball are returned unchanged.

    Examples
    --------
    >>> project_l1_ball([3.0, -1.0, 0.5], radius=2.0)
    array([2., 0., 0.])
    """
    radius = _check_radius(radius)
    v = np.asarray(v, dtype=np.float64)
    if v.ndim not in (1, 2):
        raise ValueError(f"expected a vector or a matrix (columns projected), got an array of shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError("cannot project a vector with NaN or Inf entries")
    mat = v[:, None] if v.ndim == 1 else v
    return _project(mat, radius).reshape(v.shape)


def _project(mat: np.ndarray, radius: float) -> np.ndarray:
    """:func:`project_l1_ball` of the columns of a float64 matrix, without input checks (the solver's hot
    path)."""
    out = mat.copy()
    if mat.size == 0:
        return out
    mag = np.abs(mat)
    outside = np.flatnonzero(mag.sum(axis=0) > radius)
    if outside.size:
        a = mag[:, outside]
        lower = a.max(axis=0) - radius
        k = int((a > lower).sum(axis=0).max())
        m = a.shape[0]
        # The k largest entries of every column contain all entries above its threshold, and a sorted prefix
        # of any length >= rho + 1 gives Duchi's rho, so one common k serves every column.
        top = -np.partition(-a, k - 1, axis=0)[:k] if k < m else a
        u = -np.sort(-top, axis=0)
        css = np.cumsum(u, axis=0) - radius
        ok = u * np.arange(1, k + 1)[:, None] > css
        rho = k - 1 - np.argmax(ok[::-1], axis=0)
        theta = css[rho, np.arange(outside.size)] / (rho + 1)
        proj = np.sign(mat[:, outside]) * np.maximum(a - theta, 0.0) + 0.0  # + 0.0: no -0.0
        # theta comes from a difference of large numbers; a column can end a few ulps outside the ball.
        norms = np.abs(proj).sum(axis=0)
        proj *= np.where(norms > radius, radius / np.maximum(norms, radius), 1.0)
        out[:, outside] = proj
    return out


class GramAccumulator:
    """The sufficient statistics of the mu-Lasso, summed over batches in float64.

    ``Q = X X^T`` (m x m), ``q = X L^T`` (m x C), ``lsq[j] = ||l_j||^2`` and the number of samples, for
    descriptors given in scikit-learn orientation (rows are images). Accumulators of disjoint batches (from
    several loaders or workers) add up with ``+``.

    Attributes
    ----------
    Q : numpy.ndarray of shape (m, m) or None
    q : numpy.ndarray of shape (m, C) or None
    lsq : numpy.ndarray of shape (C,) or None
    n_samples : int

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X, L = rng.random((100, 5)), np.eye(3)[rng.integers(0, 3, 100)]
    >>> a, b = GramAccumulator(), GramAccumulator()
    >>> _ = a.update(X[:60], L[:60]), b.update(X[60:], L[60:])
    >>> bool(np.allclose((a + b).Q, X.T @ X))
    True
    """

    def __init__(self):
        self.Q: np.ndarray | None = None
        self.q: np.ndarray | None = None
        self.lsq: np.ndarray | None = None
        self.n_samples = 0

    @property
    def n_features(self) -> int | None:
        """Number of features m (None before the first update)."""
        return None if self.Q is None else self.Q.shape[0]

    @property
    def n_targets(self) -> int | None:
        """Number of target columns C, one per class (None before the first update)."""
        return None if self.q is None else self.q.shape[1]

    def update(self, X_batch, L_batch) -> "GramAccumulator":
        """Add a batch: ``X_batch`` (n, m) descriptors, ``L_batch`` (n, C) targets (one-hot labels).

        Returns the accumulator itself, so that calls chain.
        """
        X = np.asarray(X_batch)
        L = np.asarray(L_batch)
        if X.ndim != 2:
            raise ValueError(f"X_batch must be a 2-D array (n_samples, n_features), got shape {X.shape}")
        if L.ndim != 2:
            raise ValueError(f"L_batch must be a 2-D array (n_samples, n_classes), got shape {L.shape}; "
                             "for integer labels use RelevantFeatureSelector or np.eye(C)[y]")
        if X.shape[0] != L.shape[0]:
            raise ValueError(f"X_batch has {X.shape[0]} samples but L_batch has {L.shape[0]}")
        if self.Q is not None and (X.shape[1] != self.n_features or L.shape[1] != self.n_targets):
            raise ValueError(f"batch has {X.shape[1]} features and {L.shape[1]} targets; the accumulator "
                             f"holds {self.n_features} features and {self.n_targets} targets")
        X = X.astype(np.float64, copy=False)
        L = L.astype(np.float64, copy=False)
        if not (np.all(np.isfinite(X)) and np.all(np.isfinite(L))):
            raise ValueError("X_batch and L_batch must be finite; found NaN or Inf")
        if self.Q is None:
            self.Q = np.zeros((X.shape[1], X.shape[1]))
            self.q = np.zeros((X.shape[1], L.shape[1]))
            self.lsq = np.zeros(L.shape[1])
        self.Q += X.T @ X  # numpy recognises a.T @ a and calls syrk
        self.q += X.T @ L
        self.lsq += np.einsum("ij,ij->j", L, L)
        self.n_samples += X.shape[0]
        return self

    @classmethod
    def from_data(cls, X, L, batch_size: int = 8192) -> "GramAccumulator":
        """Accumulate a whole data set ``X`` (N, m), ``L`` (N, C) in batches of ``batch_size`` rows."""
        X = np.asarray(X)
        L = np.asarray(L)
        if X.ndim != 2 or L.ndim != 2 or X.shape[0] != L.shape[0]:
            raise ValueError(f"expected X (N, m) and L (N, C) with the same N, got shapes {X.shape} and "
                             f"{L.shape}")
        if X.shape[0] == 0:
            raise ValueError("no samples: X has 0 rows")
        acc = cls()
        for start in range(0, X.shape[0], batch_size):
            acc.update(X[start:start + batch_size], L[start:start + batch_size])
        return acc

    def __add__(self, other: "GramAccumulator") -> "GramAccumulator":
        if not isinstance(other, GramAccumulator):
            return NotImplemented
        if self.Q is None:
            return other.copy()
        if other.Q is None:
            return self.copy()
        if self.Q.shape != other.Q.shape or self.q.shape != other.q.shape:
            raise ValueError(f"cannot add accumulators of {self.n_features} features/{self.n_targets} targets "
                             f"and {other.n_features} features/{other.n_targets} targets")
        out = GramAccumulator()
        out.Q, out.q, out.lsq = self.Q + other.Q, self.q + other.q, self.lsq + other.lsq
        out.n_samples = self.n_samples + other.n_samples
        return out

    def copy(self) -> "GramAccumulator":
        """An independent copy."""
        out = GramAccumulator()
        if self.Q is not None:
            out.Q, out.q, out.lsq = self.Q.copy(), self.q.copy(), self.lsq.copy()
        out.n_samples = self.n_samples
        return out

    def __repr__(self) -> str:
        return (f"GramAccumulator(n_features={self.n_features}, n_targets={self.n_targets}, "
                f"n_samples={self.n_samples})")


@dataclass
class MuLassoResult:
    """What :func:`solve_mu_lasso` returns.

    Attributes
    ----------
    W : numpy.ndarray of shape (m, C)
        One weight vector per class (columns), ``||w_j||_1 <= mu``.
    objective : numpy.ndarray of shape (C,)
        ``||X^T w_j - l_j||^2`` per class.
    gap : numpy.ndarray of shape (C,)
        Duality gap of that objective per class (an upper bound of ``objective - optimum``).
    relative_gap : numpy.ndarray of shape (C,)
        ``gap / objective`` (the objective taken as at least 1e-4 of ``||l_j||^2``, so that a class fitted
        almost exactly can converge).
    n_iter : int
        Iterations done (one product with ``Q`` each).
    converged : bool
        True when every class reached ``relative_gap <= tol``.
    mu, tol : float
        The radius and the tolerance used.
    n_rounds : int
        Working-set rounds (each ends with one check of every feature against the full Q).
    n_working : int
        Size of the final working set.
    """

    W: np.ndarray
    objective: np.ndarray
    gap: np.ndarray
    relative_gap: np.ndarray
    n_iter: int
    converged: bool
    mu: float
    tol: float
    n_rounds: int = 1
    n_working: int = 0


def _qmul(Q: np.ndarray, M: np.ndarray, dense_fraction: float = 0.5) -> np.ndarray:
    """``Q @ M`` for symmetric ``Q``, reading only the rows of ``Q`` where ``M`` has a nonzero row."""
    rows = np.flatnonzero(np.any(M != 0, axis=1))
    if rows.size >= dense_fraction * Q.shape[0]:
        return Q @ M
    if rows.size == 0:
        return np.zeros((Q.shape[0], M.shape[1]))
    return Q[rows].T @ M[rows]


def _half_objective(W, QW, q, lsq):
    """``0.5 ||A w - b||^2`` per column from the Gram pair."""
    return 0.5 * np.einsum("ij,ij->j", W, QW) - np.einsum("ij,ij->j", q, W) + 0.5 * lsq


def mu_lasso_objective(W, Q, q, lsq) -> np.ndarray:
    """``||X^T w_j - l_j||^2`` per class from the Gram pair (the paper's objective, no factor 1/2)."""
    W = np.asarray(W, dtype=np.float64)
    W2 = W[:, None] if W.ndim == 1 else W
    q2 = np.asarray(q, dtype=np.float64).reshape(W2.shape)
    return 2.0 * _half_objective(W2, np.asarray(Q) @ W2, q2, np.asarray(lsq, dtype=np.float64).reshape(-1))


def _gram_arrays(gram, q, lsq):
    if isinstance(gram, GramAccumulator):
        if q is not None or lsq is not None:
            raise TypeError("pass either a GramAccumulator or the arrays Q, q, lsq, not both")
        if gram.Q is None:
            raise ValueError("the GramAccumulator is empty: no batch was added")
        return gram.Q, gram.q, gram.lsq
    if q is None or lsq is None:
        raise TypeError("solve_mu_lasso needs a GramAccumulator, or Q together with q and lsq")
    Q = np.asarray(gram, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    lsq = np.asarray(lsq, dtype=np.float64)
    if q.ndim == 1:
        q = q[:, None]
    lsq = lsq.reshape(-1)
    if Q.ndim != 2 or Q.shape[0] != Q.shape[1]:
        raise ValueError(f"Q must be a square (m, m) matrix, got shape {Q.shape}")
    if q.shape[0] != Q.shape[0] or lsq.shape[0] != q.shape[1]:
        raise ValueError(f"shapes do not match: Q {Q.shape}, q {q.shape} (expected ({Q.shape[0]}, C)), "
                         f"lsq {lsq.shape} (expected ({q.shape[1]},))")
    return Q, q, lsq


def _solve_or_lstsq(A, b):
    """``A x = b``; the least-norm least-squares solution when ``A`` is singular (features in a null space of
    the Gram matrix, or fewer images than features)."""
    try:
        return np.linalg.solve(A, b)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(A, b, rcond=None)[0]


def _face_steps(Q, q, W, mu, cols, max_drops: int = 8):
    """Active-set steps on the current faces of columns ``cols`` of ``W`` (SPGL1's subspace minimisation).

    On the face where the support S and the signs s of ``w`` stay fixed, the minimiser solves the KKT system
    ``Q_SS w_S + lambda s = q_S, s^T w_S = mu`` (or ``Q_SS w_S = q_S`` when that gives ``lambda < 0``, i.e. the
    minimiser lies inside the ball). Move towards it as far as no sign changes; the coordinate that reaches
    zero first leaves the support. Projected-gradient steps alone crawl once the support is found, because
    the descriptors' Gram matrix is ill-conditioned (it is even singular: every L1-normalised block sums to
    one); this step lands on the exact optimum once the support is right.

    Returns the new columns, shape (m, len(cols)).
    """
    out = W[:, cols].copy()
    for k, j in enumerate(cols):
        w = out[:, k]
        # A few primal active-set steps: solve on the face; if a sign would flip, stop where the first
        # coordinate reaches zero, drop it, and solve again on the smaller face.
        for _ in range(max_drops):
            S = np.flatnonzero(w)
            if S.size == 0:
                break
            s = np.sign(w[S])
            QSS = Q[np.ix_(S, S)]
            n = S.size
            K = np.zeros((n + 1, n + 1))
            K[:n, :n] = QSS
            K[:n, n] = s
            K[n, :n] = s
            sol = _solve_or_lstsq(K, np.append(q[S, j], mu))
            target, lam = sol[:n], sol[n]
            if lam < 0:
                target = _solve_or_lstsq(QSS, q[S, j])
                if np.all(np.isfinite(target)) and np.abs(target).sum() <= mu:
                    w[S] = target  # least squares on S fits inside the ball: signs are free there
                    break
            if not np.all(np.isfinite(target)):
                break
            wS = w[S]
            flips = s * target <= 0
            if not flips.any():
                w[S] = target
                break
            ratios = wS[flips] / (wS[flips] - target[flips])
            new = wS + ratios.min() * (target - wS)
            new[s * new <= 0] = 0.0
            new[np.flatnonzero(flips)[np.argmin(ratios)]] = 0.0  # the first to reach zero leaves exactly
            w[S] = new
    # Rounding can leave a column a hair outside the ball.
    return _project(out, mu)


def solve_mu_lasso(gram, mu: float = 10.0, *, q=None, lsq=None, tol: float = 1e-8, max_iter: int = 10000,
                   W0=None, n_prev: int = 10, gamma: float = 1e-4, callback=None) -> MuLassoResult:
    """Solve ``min ||X^T w_j - l_j||^2 s.t. ||w_j||_1 <= mu`` for every class j, from the Gram pair.

    Parameters
    ----------
    gram : GramAccumulator or array_like of shape (m, m)
        The accumulated statistics, or ``Q = X X^T`` itself (then give ``q`` and ``lsq`` too).
    mu : float
        The L1 radius, positive (the paper: 10 for MNIST and ImageNet).
    q : array_like of shape (m, C), optional
        ``X L^T``, when ``gram`` is the matrix ``Q``.
    lsq : array_like of shape (C,), optional
        ``||l_j||^2`` per class, when ``gram`` is the matrix ``Q``.
    tol : float
        Stop when ``gap / objective <= tol`` for every class; ``objective - optimum`` is then at most
        ``tol * objective``.
    max_iter : int
        Most projected-gradient iterations (each one product ``Q @ D`` restricted to the nonzero rows of
        ``D``).
    W0 : array_like of shape (m, C), optional
        Warm start; projected onto the constraint first. Default: zero.
    n_prev : int
        Length of the objective memory of the non-monotone line search (SPG2 uses 10, SPGL1 3).
    gamma : float
        Sufficient-decrease parameter of the line search.
    callback : callable, optional
        Called as ``callback(iteration, W, relative_gap)`` after every iteration with the full (m, C) iterate
        and the relative duality gap of the full problem per class (costs one product with Q per call: for
        teaching and plots, not for speed).

    Returns
    -------
    MuLassoResult

    Notes
    -----
    One iteration, for all unconverged columns at once: ``D = P(W - alpha G) - W`` with the BB step
    ``alpha``; accept ``W + D`` if its objective is below the largest of the last ``n_prev`` objectives plus
    ``gamma g^T d``, else take the exact minimiser along ``D`` (the objective is quadratic, so neither costs
    a product with ``Q``); the next ``alpha`` is ``s^T s / s^T y = d^T d / d^T Q d``. When a column keeps the
    same support and signs for two iterations, an active-set step on that face follows (see SPGL1's
    subspace minimisation), which ends the iterations once the support is right.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X, y = rng.random((200, 20)), rng.integers(0, 3, 200)
    >>> res = solve_mu_lasso(GramAccumulator.from_data(X, np.eye(3)[y]), mu=1.0)
    >>> res.converged, res.W.shape, bool(np.all(np.abs(res.W).sum(0) <= 1 + 1e-9))
    (True, (20, 3), True)
    """
    mu = _check_radius(mu)
    Q, q, lsq = _gram_arrays(gram, q, lsq)
    # An accumulator checked every batch it took; arrays from elsewhere are checked here.
    if not isinstance(gram, GramAccumulator) and not (np.all(np.isfinite(Q)) and np.all(np.isfinite(q))
                                                      and np.all(np.isfinite(lsq))):
        raise ValueError("the Gram pair contains NaN or Inf")
    if not (np.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be positive, got {tol!r}")
    if int(max_iter) < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter!r}")
    empty = np.flatnonzero(lsq <= 0)
    if empty.size:
        raise ValueError(f"target column(s) {empty.tolist()} are all zero: a class without examples?")
    m, C = q.shape


    if W0 is not None:
        W0 = np.asarray(W0, dtype=np.float64)
        if W0.shape != (m, C):
            raise ValueError(f"W0 must have shape {(m, C)}, got {W0.shape}")
        if not np.all(np.isfinite(W0)):
            raise ValueError("W0 contains NaN or Inf")
    # The iterations are many small products and solves; a second BLAS thread only adds synchronisation
    # (10x slower small solves on a busy 2-core machine) and the products with Q are memory-bound anyway.
    with threadpool_limits(limits=1, user_api="blas"):
        return _solve(Q, q, lsq, mu, tol, int(max_iter), W0, n_prev, gamma, callback)


def _full_gap(Q, q, lsq, mu, W, U, f_floor):
    """Objective (1/2 convention), gap and relative gap of the full problem for ``W`` supported on rows U."""
    QW = Q[U].T @ W[U]  # Q symmetric: the rows U of Q are its columns U
    G = QW - q
    f = _half_objective(W, QW, q, lsq)
    gap = np.maximum(np.einsum("ij,ij->j", W, G) + mu * np.abs(G).max(axis=0), 0.0)
    return f, gap, gap / np.maximum(f, f_floor), G


def _solve(Q, q, lsq, mu, tol, max_iter, W0, n_prev, gamma, callback=None) -> MuLassoResult:
    """The working-set loop around :func:`_spg`; inputs already checked."""
    m, C = q.shape
    W = np.zeros((m, C)) if W0 is None else _project(W0, mu)
    # The gap is relative to the objective, but not to less than 1e-4 of the objective at w = 0: when a class
    # can be fitted (almost) exactly the gap shrinks like the residual, the objective like its square.
    f_floor = 1e-4 * 0.5 * lsq

    # Working set: the support so far plus, per class, the features with the largest gradient. The SPG runs on
    # the working set's small Gram block; one product with the full Q checks every feature and adds the
    # violators of the optimality conditions, until the full problem's duality gap is below tol.
    work = np.zeros(m, dtype=bool)
    work[np.any(W != 0, axis=1)] = True
    G = _qmul(Q, W) - q
    n_add = _N_ADD
    it, rounds = 0, 0
    while True:
        rounds += 1
        outside = np.flatnonzero(~work)
        if outside.size:
            score = np.abs(G[outside])
            lam = np.abs(G[work]).max(axis=0) if work.any() else np.zeros(C)
            score[score <= lam] = 0.0  # only violators of |g_i| <= lambda enter
            k = min(n_add, outside.size)
            top = np.argpartition(-score, k - 1, axis=0)[:k]
            picked = np.unique(top[score[top, np.arange(C)] > 0])
            work[outside[picked]] = True
            if rounds > 1 and picked.size == 0:
                break  # no feature outside violates optimality: the gap left is the working set's own
        elif rounds > 1:
            break
        U = np.flatnonzero(work)
        if U.size == 0:  # no feature correlates with any class: w = 0 is optimal
            f, gap, rel, G = _full_gap(Q, q, lsq, mu, W, U, f_floor)
            break
        QU = Q[np.ix_(U, U)]
        report = None
        if callback is not None:
            def report(i, WU, U=U, start=it):
                full = np.zeros((m, C))
                full[U] = WU
                callback(start + i, full, _full_gap(Q, q, lsq, mu, full, U, f_floor)[2])
        WU, n_it = _spg(QU, q[U], lsq, mu, W[U], tol, max_iter - it, n_prev, gamma, f_floor, report)
        it += n_it
        W[:] = 0.0
        W[U] = WU
        f, gap, rel, G = _full_gap(Q, q, lsq, mu, W, U, f_floor)
        if np.all(rel <= tol) or it >= max_iter or work.all():
            break
        # Grow geometrically, so a dense solution needs few rounds.
        n_add = max(n_add, int(np.count_nonzero(W, axis=0).max()))
    return MuLassoResult(W=W, objective=2.0 * f, gap=2.0 * gap, relative_gap=rel, n_iter=it,
                         converged=bool(np.all(rel <= tol)), mu=mu, tol=float(tol), n_rounds=rounds,
                         n_working=int(work.sum()))


def _spg(Q, q, lsq, mu, W, tol, max_iter, n_prev, gamma, f_floor, report=None):
    """The spectral projected gradient iterations on one (working-set) problem; returns ``(W, iterations)``."""
    m, C = q.shape
    W = W.copy()
    QW = _qmul(Q, W)
    G = QW - q
    f = _half_objective(W, QW, q, lsq)
    # Scale-aware safeguards for the BB step (1/trace(Q) <= 1/lambda_max is always a safe step).
    scale = float(np.trace(Q)) or 1.0
    step_min, step_max = 1e-10 / scale, 1e10 / scale
    D0 = _project(W - G, mu) - W
    dmax = np.abs(D0).max(axis=0)
    step = np.where(dmax > 0, np.clip(1.0 / np.maximum(dmax, 1e-300), step_min, step_max), step_max)
    fhist = np.full((max(int(n_prev), 1), C), -np.inf)
    fhist[0] = f
    frozen = np.zeros(C, dtype=bool)  # stalled at a fixed point where the face step did not help
    signs = np.sign(W).astype(np.int8)
    stable = np.zeros(C, dtype=int)  # iterations since the support and signs last changed
    face_tried = np.zeros(C, dtype=bool)  # a face step was taken on the current support

    def refresh(cols):
        QW[:, cols] = _qmul(Q, W[:, cols])
        G[:, cols] = QW[:, cols] - q[:, cols]
        f[cols] = _half_objective(W[:, cols], QW[:, cols], q[:, cols], lsq[cols])

    it, refreshed_at = 0, 0
    while True:
        gap = np.einsum("ij,ij->j", W, G) + mu * np.abs(G).max(axis=0)
        rel = gap / np.maximum(f, f_floor)
        active = np.flatnonzero((rel > tol) & ~frozen)
        if active.size == 0 or it >= max_iter:
            if refreshed_at == it:
                break
            refresh(slice(None))  # recompute Q W exactly before trusting the updated gap
            refreshed_at = it
            continue
        if it - refreshed_at >= 200:
            refresh(active)
            refreshed_at = it
        it += 1
        a = slice(None) if active.size == C else active
        Wa, Ga = W[:, a], G[:, a]
        D = _project(Wa - step[a] * Ga, mu) - Wa
        QD = _qmul(Q, D)
        gtd = np.einsum("ij,ij->j", Ga, D)
        dqd = np.einsum("ij,ij->j", D, QD)
        dd = np.einsum("ij,ij->j", D, D)
        stalled = (dd == 0) | (gtd >= 0)
        # Non-monotone test of the full step, else the exact minimiser along D (f is quadratic in the step).
        fmax = fhist[:, a].max(axis=0)
        full = f[a] + gtd + 0.5 * dqd <= fmax + gamma * gtd
        with np.errstate(divide="ignore", invalid="ignore"):
            exact = np.clip(-gtd / dqd, 0.0, 1.0)
            bb = np.where(dqd > 0, dd / dqd, step_max)  # s^T s / s^T y with s = lam d, y = lam Q d
        lam = np.where(full | (dqd <= 0), 1.0, exact)
        lam[stalled] = 0.0
        W[:, a] = Wa + lam * D
        QW[:, a] += lam * QD
        G[:, a] = QW[:, a] - q[:, a]
        f[a] = _half_objective(W[:, a], QW[:, a], q[:, a], lsq[a])
        fhist[it % fhist.shape[0], a] = f[a]
        step[a] = np.clip(bb, step_min, step_max)

        new_signs = np.sign(W[:, a]).astype(np.int8)
        same = np.all(new_signs == signs[:, a], axis=0)
        signs[:, a] = new_signs
        stable[active] = np.where(same, stable[active] + 1, 0)
        face_tried[active[~same]] = False
        small = np.count_nonzero(W[:, active], axis=0) <= _FACE_MAX
        frozen[active[stalled & (face_tried[active] | ~small)]] = True
        cols = active[((stable[active] >= _FACE_AFTER) | stalled) & ~face_tried[active] & small]
        if cols.size:
            new = _face_steps(Q, q, W, mu, cols)
            dW = new - W[:, cols]
            dQW = _qmul(Q, dW)
            f_new = _half_objective(new, QW[:, cols] + dQW, q[:, cols], lsq[cols])
            better = f_new <= f[cols]
            keep = cols[better]
            W[:, keep] = new[:, better]
            QW[:, keep] += dQW[:, better]
            G[:, keep] = QW[:, keep] - q[:, keep]
            f[keep] = f_new[better]
            fhist[it % fhist.shape[0], keep] = f[keep]
            face_tried[cols] = True
            signs[:, keep] = np.sign(W[:, keep]).astype(np.int8)
        if report is not None:
            report(it, W)
    return W, it
