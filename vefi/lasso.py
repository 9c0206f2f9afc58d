"""The mu-Lasso of Sec. 3.1: one L1-constrained least-squares problem per class, solved all at once.

For descriptors ``X`` (m x N, one image per column) and one-hot labels ``L`` (C x N) the paper solves

.. math:: W^* = \\arg\\min_W \\|X^T W - L^T\\|_F^2 \\quad \\text{s.t.} \\quad \\|w_j\\|_1 \\le \\mu
          \\text{ for every class } j.

The problem separates into one constrained lasso per column ``w_j``; every quantity the solver needs comes
from the Gram pair ``Q = X X^T`` (m x m), ``q = X L^T`` (m x C) and the squared label norms ``||l_j||^2``,
which :class:`GramAccumulator` sums over streamed batches in float64.

The solver is the lasso homotopy (Osborne, Presnell & Turlach 2000; Efron et al. 2004, LARS with the lasso
modification), which SPAMS also uses: the solution ``w(lambda)`` of the penalised problem
``min 0.5 ||X^T w - l||^2 + lambda ||w||_1`` is piecewise linear in ``lambda``, and ``||w(lambda)||_1`` grows
as ``lambda`` falls, so following it from ``lambda = max|q|`` (w = 0) until the L1 norm reaches ``mu`` (or
``lambda`` reaches 0: least squares inside the ball) gives the constrained solution exactly, in about one
iteration per feature that enters or leaves the support. Each iteration reads the rows of Q of the active
features only (one product of those columns with two vectors), and solves with a Cholesky factor of the
active Gram block, bordered by one row when a feature enters (see below for how it is run). Why this and
not the SPGL1 iteration the paper cites (spectral projected gradient with BB steps): measured on 60
problems of five families (``benchmarks/lasso_problems.py``), the projected gradient, even with face steps
and a working set, stopped at its iteration limit on a quarter of them (columns scaled over six orders of
magnitude, exact fits with more features than images, mu up to 1000), with answers that depended on the
BLAS kernel; the homotopy's work does not depend on the conditioning, only its rounding
does. Degenerate data is handled where SPAMS returns NaN or leaves the ball: a feature whose column is
(numerically) in the span of the active ones (blocks that sum to one, low rank, more features than images)
is kept out until the next drop, since adding it would make the active block singular, and a feature that
just left may not re-enter at once with its old sign (rounding at a tie). The span test needs no new row of Q
(``Q[A, i]`` is row i of the stored columns of the active features); when the next feature to enter fails
it, all candidates of that class are tested at once and the next event is picked from the same product, so
that low-rank data costs one iteration per feature that enters, not one per feature tested.

How the time is spent, and why part of it is compiled. The homotopy's work is small (one event per feature
that enters or leaves a support, each one pass over the stored columns of the active features), and on the
benchmark's problems (milliseconds each) the cost was Python's overhead per event: some thirty array
operations of a few microseconds each, which left the numpy homotopy 5-40 times slower than SPAMS's C++ on
the families above (median 9x), and 5 times slower at m = 1000 (SPAMS on one thread). So each class's homotopy runs in a
function compiled with numba (``_path_kernel``, the same events and rules as the lock-step homotopy): per
event one pass over the stored rows of Q of the active features gives both correlation directions, two
triangular solves with the Cholesky factor give the path's directions, the factor is bordered by one row
when a feature enters and updated by a rank-one (Givens) update when one leaves, instead of refactored
(O(k^2), not O(k^3), per drop). Measured (``benchmarks/bench_lasso.py``): the families' time is then a median
of about 2x SPAMS's and at most about 6x (the largest ratios are problems SPAMS solves in 20 microseconds,
where the certificate's own products cost more), and at m = 1000-4000 it is faster than SPAMS. The kernel
calls no BLAS, so its rounding depends neither on the OpenBLAS kernel nor on the thread count; it is
compiled on the first call on a machine (a few seconds) and cached beside the module.

Each class follows its own path (one call of the kernel): the classes of a lock-step homotopy share one
product per step, but pay for it with bookkeeping over all classes on every step, the whole cost of a small
problem. The lock-step homotopy (numpy) is kept for a warm start ``W0``, which it resumes, and for
``callback``, which sees its iterates. A class whose path is long may take a shortcut, an active-set jump (a
primal-dual active-set, or semismooth Newton, iteration: guess the optimal support and signs from the
prox-gradient fixed point, solve the optimality conditions on it, repeat; it lands in one to five rounds
when it lands), checked by the same certificate and redone by the homotopy when the certificate rejects it.
It is tried only where it pays: for a class whose path is still going after ``_JUMP_AFTER`` (32) events and
whose first guess is every feature (the path then runs down to a small lambda, with at least one event per
independent feature, as where mu approaches the least-squares fit); elsewhere one round of the jump costs
more than the compiled path. ``tests/test_lasso.py`` checks the paths (default, homotopy only, jump first,
lock-step) against the optimum found by trying every face of the L1 ball on tiny problems, and against each
other and SPAMS on the benchmark's families.

The answer is certified, not assumed: after the homotopy, the duality gap of every class is computed from
the full problem (one product with the rows of Q on the support) and ``converged`` means
``gap <= tol * max(objective, 0.01 ||L||_F^2)``; otherwise :class:`ConvergenceWarning` says why (the
iteration limit, or a gap that rounding keeps above ``tol``) and what to do.

Duality gap (SPGL1's form). For ``min_w 0.5 ||A w - b||^2 s.t. ||w||_1 <= tau`` with residual
``r = b - A w``, the dual objective at ``r`` is ``b^T r - 0.5 ||r||^2 - tau ||A^T r||_inf``, so

    gap = ||r||^2 - b^T r + tau ||A^T r||_inf.

With ``A = X^T``, ``b = l_j`` and ``g = Q w - q_j = -A^T r``, ``||r||^2 - b^T r = w^T Q w - q_j^T w = w^T g``,
hence ``gap = w^T g + tau ||g||_inf`` -- non-negative for every feasible ``w`` (Hoelder) and zero exactly at
the optimum. It bounds the distance of the objective to the optimum.

Conventions in the results: ``objective`` is the paper's ``||X^T w_j - l_j||^2`` (no factor 1/2) and ``gap``
is the duality gap of that objective (twice the gap of the 1/2-scaled problem); ``relative_gap`` is their
ratio (with the floor above), the same in either convention.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np
from scipy.linalg.blas import dtrsm, dtrsv
from scipy.linalg.lapack import dpotrf, dpotrs
from sklearn.exceptions import ConvergenceWarning as _SklearnConvergenceWarning
from numba import njit
from threadpoolctl import ThreadpoolController

# The homotopy's per-event work, compiled (numpy semantics for division by zero: the masked quotients are
# infinities, not errors), cached beside the module so that only the first import on a machine compiles.
_jit = njit(cache=True, nogil=True, error_model="numpy")

# A feature enters the active set only if its Gram column is not (numerically) in the span of the active
# ones: the squared distance to that span must exceed this fraction of its squared norm. Scale-free, and far
# above the 1e-16 that exact dependencies (blocks summing to one, low rank, more features than images) leave.
_DEPENDENT = 1e-11
# A class is certified when gap <= tol * max(objective, FIT_FLOOR * ||L||_F^2): relative to the objective,
# and absolute (1e-10 ||L||_F^2 at tol=1e-8) when the features fit the class (almost) exactly and the
# objective is rounding (the gap is then mu ||Q w - q||_inf, rounding times mu).
FIT_FLOOR = 1e-2

# The projected-gradient polish (:func:`_polish`): a face step after a column kept its support for
# _FACE_AFTER iterations, on supports of at most _FACE_MAX features (its cost is cubic in the support); the
# working set starts with, and grows by, _N_ADD features per class.
_FACE_AFTER = 2
_FACE_MAX = 2048
_N_ADD = 32

__all__ = ["ConvergenceWarning", "FIT_FLOOR", "GramAccumulator", "MuLassoResult", "check_radius", "project_l1_ball",
           "solve_mu_lasso", "mu_lasso_objective"]


class ConvergenceWarning(_SklearnConvergenceWarning):
    """:func:`solve_mu_lasso` could not certify its answer to ``tol``; the message says why and what to do.

    A subclass of scikit-learn's ``ConvergenceWarning``, so filters written for scikit-learn apply too.
    """


def check_radius(radius) -> float:
    """``radius`` as a float; a clear error unless it is a positive finite number (mu, the L1 radius)."""
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
    radius = check_radius(radius)
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
        ``gap / max(objective, 0.01 ||L||_F^2)``: relative to the objective, and absolute (in units of
        ``||L||_F^2 = sum_j ||l_j||^2``) for a class the features fit (almost) exactly, whose objective is
        only rounding.
    n_iter : int
        Homotopy iterations (in each, one feature enters or leaves the support of every unfinished class),
        plus the projected-gradient iterations of the polish, where one ran.
    converged : bool
        True when every class reached ``relative_gap <= tol``.
    mu, tol : float
        The radius and the tolerance used.
    n_working : int
        Number of features whose row of ``Q`` the homotopy read (the union of the supports it tried); a
        polish also reads the rows of its working set.
    status : str
        ``"converged"``; ``"max_iter"`` (the iteration limit was reached first); or ``"stalled"`` (the
        homotopy ended, or cycled among ties, with a gap above ``tol``: rounding dominates).
    message : str
        Why it stopped, and what to do when it did not converge (the text of the warning).
    """

    W: np.ndarray
    objective: np.ndarray
    gap: np.ndarray
    relative_gap: np.ndarray
    n_iter: int
    converged: bool
    mu: float
    tol: float
    n_working: int = 0
    status: str = "converged"
    message: str = ""


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
    # asanyarray: an array subclass that serves rows of Q (a later streamed Q) stays what it is
    Q = np.asanyarray(gram, dtype=np.float64)
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
    if Q.shape[0] == 0 or q.shape[1] == 0:
        raise ValueError(f"nothing to select: {Q.shape[0]} features and {q.shape[1]} classes (Q {Q.shape}, "
                         f"q {q.shape}); the descriptor needs at least one feature and the labels one class")
    return Q, q, lsq


class _Homotopy:
    """The lasso homotopies of all classes, in lock-step: for class j from ``lambda = max|q_j|`` (w = 0) down
    to the ``lambda`` where ``||w_j(lambda)||_1 = mu``.

    Per class: the active features ``idx`` with their signs ``s``, the lower Cholesky factor ``R`` of
    ``Q[idx, idx]`` and the current ``lam``. On an active set, ``w(lambda) = u - lambda dw`` with
    ``Q_AA u = q_A`` and ``Q_AA dw = s``, and the correlations ``c = q - Q w`` are ``b + lambda a`` with
    ``b = q - Q_A u`` and ``a = Q_A dw``. Each event (a feature whose ``|c_i|`` reaches ``lambda`` enters, a
    weight that reaches zero leaves, the L1 norm reaches ``mu``, or ``lambda`` reaches 0) is the root of a
    linear function, computed afresh on every step from ``u`` and ``dw`` (nothing accumulates).

    The columns of Q of every feature that entered some support are kept in ``QU`` (the only part of Q ever
    read), so that one matrix product gives ``b`` and ``a`` of every class.
    """

    def __init__(self, Q, q, mu, W0=None):
        m, C = q.shape
        self.Q, self.q, self.mu, self.C = Q, q, mu, C
        self.diag = np.array(np.diagonal(Q))  # a plain copy, whatever array type serves Q
        self.eligible = self.diag > 0  # a feature that is zero on every image can never enter
        self.pos = np.full(m, -1)  # column of feature i in QU
        self.feature = np.full(m, -1)  # feature of column p of QU
        self.QU = np.zeros((m, min(m, 16)))
        self.nU = 0
        self.active = np.zeros((m, C), dtype=bool)
        self.blocked = np.zeros((m, C), dtype=bool)  # numerically dependent on the active set, until a drop
        self.candidate = np.repeat(self.eligible[:, None], C, axis=1)  # eligible, not active, not blocked
        self.idx = [np.zeros(0, dtype=np.intp) for _ in range(C)]
        self.s = [np.zeros(0) for _ in range(C)]
        self.R = [np.zeros((0, 0)) for _ in range(C)]
        self.lam = np.zeros(C)
        self.done = np.zeros(C, dtype=bool)
        self.cycling = np.zeros(C, dtype=bool)
        self.steps_at_lam = np.zeros(C, dtype=int)
        self.last_added = np.full(C, -1)
        self.last_dropped = np.full(C, -1)
        self.dropped_sign = np.zeros(C)
        self.W = np.zeros((m, C))
        for j in range(C):
            if W0 is None or not np.any(W0[:, j]) or not self._resume(j, W0[:, j]):
                self._start(j, np.inf)

    # --- the stored columns of Q ---------------------------------------------------------------------------
    def _columns(self, features) -> np.ndarray:
        """Positions in QU of ``features``, reading the rows of Q (= its columns) not stored yet."""
        features = np.asarray(features, dtype=np.intp)
        new = features[self.pos[features] < 0]
        if new.size:
            new = np.unique(new) if new.size > 1 else new
            if self.nU + new.size > self.QU.shape[1]:  # amortised growth
                grown = np.zeros((self.QU.shape[0], max(2 * self.QU.shape[1], self.nU + new.size)))
                grown[:, :self.nU] = self.QU[:, :self.nU]
                self.QU = grown
            self.QU[:, self.nU:self.nU + new.size] = self.Q[new].T
            self.pos[new] = np.arange(self.nU, self.nU + new.size)
            self.feature[self.nU:self.nU + new.size] = new
            self.nU += new.size
        return self.pos[features]

    def _gram(self, j) -> np.ndarray:
        idx = self.idx[j]
        return self.QU[np.ix_(idx, self.pos[idx])]

    # --- changes of an active set --------------------------------------------------------------------------
    def _start(self, j, lam_cap):
        q = self.q[:, j]
        corr = np.where(self.eligible, np.abs(q), 0.0)
        i = int(np.argmax(corr)) if corr.size else 0
        self.W[:, j] = 0.0
        if corr.size == 0 or corr[i] <= 0:
            self.done[j] = True  # no feature correlates with the class: w = 0 is optimal
            return
        self.lam[j] = min(lam_cap, float(corr[i]))
        self._insert(j, i, float(np.sign(q[i])), np.zeros(0))

    def _resume(self, j, w0) -> bool:
        """Continue the path from ``w0`` when it is a point of it (a solution for a smaller radius, as along
        :func:`vefi.selection.selection_path`): the penalised optimality conditions hold at some lambda."""
        S = np.flatnonzero(w0)
        if not self.eligible[S].all():
            return False
        cols = self._columns(S)
        c = self.q[:, j] - self.QU[:, cols] @ w0[S]
        lam = float(np.abs(c).max())
        s = np.sign(w0[S])
        if not lam > 0 or np.abs(c[S] - lam * s).max() > 1e-6 * lam:
            return False
        R, info = dpotrf(self.QU[S][:, cols], lower=1, clean=1)
        if info != 0:
            return False
        self.idx[j], self.s[j], self.R[j] = S, s, R
        self.active[S, j] = True
        self.candidate[S, j] = False
        self.lam[j] = lam
        self.W[:, j] = w0
        return True

    def _dependent(self, j, features) -> tuple:
        """Which of ``features`` have a Gram column (numerically) in the span of the active ones of class j,
        and the rows ``ell = R^-1 Q[idx, i]`` of the factor they would add. Reads no row of Q: ``Q[idx, i]``
        is the row i of the stored columns of the active features (Q is symmetric)."""
        idx = self.idx[j]
        if not idx.size:
            return self.diag[features] <= 0, np.zeros((0, len(features)))
        if len(features) == 1:  # the next feature to enter (the common case: fewer calls)
            i = features[0]
            ell = dtrsv(self.R[j], self.QU[i, self.pos[idx]], lower=1)
            return [not self.diag[i] - ell @ ell > _DEPENDENT * self.diag[i]], ell[:, None]
        E = dtrsm(1.0, self.R[j], self.QU[np.ix_(features, self.pos[idx])].T, lower=1)
        d2 = self.diag[features] - np.einsum("ij,ij->j", E, E)
        return ~(d2 > _DEPENDENT * self.diag[features]), E

    def _insert(self, j, i, sign, ell) -> None:
        """Add feature i (not dependent on the active ones; ``ell`` from :meth:`_dependent`) to class j."""
        if self.pos[i] < 0:
            self._columns([i])
        idx, R, k = self.idx[j], self.R[j], self.idx[j].size
        new = np.zeros((k + 1, k + 1), order="F")
        new[:k, :k] = R
        new[k, :k] = ell
        new[k, k] = np.sqrt(self.diag[i] - ell @ ell)
        self.R[j] = new
        self.idx[j] = np.append(idx, i)
        self.s[j] = np.append(self.s[j], sign)
        self.active[i, j] = True
        self.candidate[i, j] = False
        self.last_added[j] = i

    def _block(self, j, features) -> None:
        self.blocked[features, j] = True
        self.candidate[features, j] = False

    def _drop(self, j, i) -> None:
        p = int(np.flatnonzero(self.idx[j] == i)[0])
        self.dropped_sign[j] = self.s[j][p]
        self.idx[j] = np.delete(self.idx[j], p)
        self.s[j] = np.delete(self.s[j], p)
        self.active[i, j] = False
        self.W[i, j] = 0.0
        self.last_dropped[j] = i
        self.blocked[:, j] = False  # a feature dependent on the old set may not be on the smaller one
        self.candidate[:, j] = self.eligible & ~self.active[:, j]
        # A principal submatrix of a positive definite matrix: refactor (simpler than a downdate; drops are
        # rarer than additions).
        if self.idx[j].size:
            R, info = dpotrf(self._gram(j), lower=1, clean=1)
            if info != 0:  # lost definiteness to rounding: stop this class, the certificate will tell
                self.done[j] = self.cycling[j] = True
            self.R[j] = R
        else:
            self.R[j] = np.zeros((0, 0))

    def _directions(self, j, refine=False):
        """``u`` and ``dw`` of class j, as the two columns of a (k, 2) array."""
        idx = self.idx[j]
        rhs = np.empty((idx.size, 2), order="F")
        rhs[:, 0] = self.q[idx, j]
        rhs[:, 1] = self.s[j]
        U, _ = dpotrs(self.R[j], rhs, lower=1)
        if refine:  # one step of iterative refinement against Q itself, for the final answer
            U += dpotrs(self.R[j], rhs - self._gram(j) @ U, lower=1)[0]
        return U

    def _finish(self, j, lam) -> None:
        U = self._directions(j, refine=True)
        w = U[:, 0] - lam * U[:, 1]
        norm = np.abs(w).sum()
        if norm > self.mu:  # rounding: the solution is on the sphere, a few ulps out
            w *= self.mu / norm
        self.W[:, j] = 0.0
        self.W[self.idx[j], j] = w
        self.lam[j] = lam
        self.done[j] = True

    # --- one event for every unfinished class --------------------------------------------------------------
    def step(self) -> None:
        for j in np.flatnonzero(~self.done):
            if not self.idx[j].size:  # every feature left (only through rounding): start again from w = 0
                self._start(j, self.lam[j])
        J = np.array([j for j in range(self.C) if not self.done[j] and self.idx[j].size], dtype=np.intp)
        if not J.size:
            return
        nU, nJ = self.nU, J.size
        # The directions of every class, scattered by stored column: M[:, 2c:2c+2] = (u, dw) of class J[c],
        # S[:, c] its signs (zero off its support), so that one product and column reductions serve all.
        M = np.zeros((nU, 2 * nJ))
        S = np.zeros((nU, nJ))
        dirs = []
        for c, j in enumerate(J):
            rows = self.pos[self.idx[j]]
            dirs.append(self._directions(j))
            M[rows, 2 * c:2 * c + 2] = dirs[-1]
            S[rows, c] = self.s[j]
        B = self.QU[:, :nU] @ M
        b, a = (self.q if nJ == self.C else self.q[:, J]) - B[:, 0::2], B[:, 1::2]
        lam = self.lam[J]
        cols = np.arange(nJ)
        u, dw = M[:, 0::2], M[:, 1::2]
        sdw = S * dw
        nd = sdw.sum(axis=0)
        leaving = sdw < 0
        with np.errstate(divide="ignore", invalid="ignore"):  # the masked quotients only
            # Entering: |c_i(lambda')| = lambda' with sign +1 at b_i / (1 - a_i), with sign -1 at
            # -b_i / (1 + a_i) (when the denominator is positive; otherwise |c_i| falls at least as fast as
            # lambda); a feature already above lambda (rounding at a tie) enters now.
            c_now = b + lam * a
            t_pos = np.where(c_now > lam, lam, np.where(a < 1.0, np.minimum(b / (1.0 - a), lam), -np.inf))
            t_neg = np.where(-c_now > lam, lam, np.where(a > -1.0, np.minimum(b / (-1.0 - a), lam), -np.inf))
            # The L1 norm s^T (u - lambda dw) reaches mu at lam_mu (s^T dw = s^T Q_AA^-1 s > 0).
            lam_mu = np.where(nd > 0, ((S * u).sum(axis=0) - self.mu) / nd, -np.inf)
            # Leaving: w_i moves towards zero (s_i dw_i < 0) and reaches it at u_i / dw_i.
            added = self.last_added[J]
            new = np.flatnonzero(added >= 0)
            leaving[self.pos[added[new]], new] = False  # it just entered at zero
            t_drop = np.where(leaving, u / dw, -np.inf)
        p_drop = np.argmax(t_drop, axis=0)
        lam_drop = np.minimum(t_drop[p_drop, cols], lam)
        # A feature that just left does not enter again at once with the sign it left with (that would undo
        # the step: rounding at a tie); with the other sign it may (a drop that rounding got wrong).
        dropped = self.last_dropped[J]
        back = np.flatnonzero(dropped >= 0)
        if back.size:
            rows, sign = dropped[back], self.dropped_sign[J][back]
            t_same = np.where(sign > 0, t_pos[rows, back], t_neg[rows, back])
            t_same = np.where(t_same < lam[back] * (1 - 1e-9), t_same, -np.inf)
            t_pos[rows[sign > 0], back[sign > 0]] = t_same[sign > 0]
            t_neg[rows[sign < 0], back[sign < 0]] = t_same[sign < 0]
        t_in = np.maximum(t_pos, t_neg)
        t_in[~(self.candidate if nJ == self.C else self.candidate[:, J])] = -np.inf
        i_in = np.argmax(t_in, axis=0)
        for c, j in enumerate(J):
            lj, mu_c, drop_c = float(lam[c]), float(lam_mu[c]), float(lam_drop[c])
            tested = False
            while True:
                i = int(i_in[c])
                lam_in = float(t_in[i, c])
                event = max(drop_c, lam_in, 0.0)
                if mu_c >= event or event <= 0.0:
                    self._finish(j, min(max(mu_c, 0.0), lj))
                    break
                entering = drop_c < lam_in
                if entering:
                    dep, ell = self._dependent(j, [i])
                    if dep[0]:
                        # x_i is (numerically) in the span of the active features: its correlation moves with
                        # theirs, and adding it would make Q_AA singular (where SPAMS returns NaN); it stays
                        # out until a drop. So may others (low rank, blocks that sum to one): test all the
                        # candidates at once (the test reads no row of Q), block the dependent, pick again.
                        cand = np.array([i]) if tested else np.flatnonzero(t_in[:, c] > -np.inf)
                        blocked = cand[self._dependent(j, cand)[0]]
                        self._block(j, blocked)
                        t_in[blocked, c] = -np.inf
                        i_in[c] = np.argmax(t_in[:, c])
                        tested = True
                        continue
                self.steps_at_lam[j] = self.steps_at_lam[j] + 1 if event >= lj else 0
                if self.steps_at_lam[j] > 2 * self.q.shape[0] + 10:  # cycling among ties: the certificate decides
                    self.done[j] = self.cycling[j] = True
                    break
                self.W[self.idx[j], j] = dirs[c][:, 0] - event * dirs[c][:, 1]
                self.lam[j] = event
                self.last_added[j] = self.last_dropped[j] = -1
                if entering:
                    self._insert(j, i, 1.0 if t_pos[i, c] >= t_neg[i, c] else -1.0, ell[:, 0])
                else:
                    self._drop(j, int(self.feature[p_drop[c]]))
                break




class _ClassPaths:
    """The result of :func:`_class_path` for every class, in the shape :func:`_solve` reads from
    :class:`_Homotopy` (``W``, ``done``, ``cycling``, ``idx`` and ``nU``)."""

    def __init__(self, Q, q, lsq, mu, tol, max_iter, jump=True):
        m, C = q.shape
        diag = np.array(np.diagonal(Q))
        eligible = diag > 0
        read = np.zeros(m, dtype=bool)
        f_floor = FIT_FLOOR * 0.5 * lsq.sum()
        self.Q, self.q, self.mu, self.max_iter = Q, q, mu, max_iter
        self.diag, self.eligible, self.read = diag, eligible, read
        self.W = np.zeros((m, C))
        self.done = np.zeros(C, dtype=bool)
        self.cycling = np.zeros(C, dtype=bool)
        self.jumped = np.zeros(C, dtype=bool)
        self.idx = [np.zeros(0, dtype=np.intp)] * C
        self.n_iter = 0
        rounds = min(_JUMP_ROUNDS, max_iter) if jump else 0
        # The jump pays only where the homotopy is long, so each class first follows its (compiled) homotopy
        # for _JUMP_AFTER events, and only a class whose path goes on tries the jump: where the jump's first
        # guess is every feature (the prox-gradient point from w = 0, q_i / Q_ii, is inside the ball) the path
        # runs down to a small lambda, with at least one event per independent feature; elsewhere even one
        # round of the jump costs more than the whole path.
        long_path = (np.abs(q[eligible]) / diag[eligible, None]).sum(axis=0) <= mu
        for j in range(C):
            qj = np.ascontiguousarray(q[:, j])
            budget = min(_JUMP_AFTER, max_iter) if rounds and long_path[j] else max_iter
            path = _class_path(Q, diag, eligible, qj, mu, budget, read)
            if path[3] or budget == max_iter:
                self._take(j, path)
                continue
            # Half the tolerance: the certificate of _solve computes the gradient in another order of
            # operations, and at an exact fit the gap is rounding.
            w, used = _class_jump(Q, diag, eligible, qj, lsq[j], mu, 0.5 * tol, f_floor, rounds, read)
            if w is None:
                self.homotopy([j])
            else:
                self.W[:, j] = w
                self.idx[j] = np.flatnonzero(w)
                self.done[j] = self.jumped[j] = True
                self.n_iter = max(self.n_iter, path[2] + used)

    def _take(self, j, path) -> None:
        w, idx, it, done, cycling = path
        self.W[:, j] = w
        self.idx[j] = idx
        self.done[j], self.cycling[j], self.jumped[j] = done, cycling, False
        self.n_iter = max(self.n_iter, it)

    @property
    def nU(self) -> int:
        return int(self.read.sum())

    def homotopy(self, classes) -> None:
        """Solve ``classes`` by the homotopy (a jump the certificate rejects is redone this way)."""
        for j in classes:
            self._take(j, _class_path(self.Q, self.diag, self.eligible, np.ascontiguousarray(self.q[:, j]),
                                      self.mu, self.max_iter, self.read))


# Rounds of the active-set jump (:func:`_class_jump`) tried before the homotopy: it lands in one to five
# rounds when it lands at all (measured on the problems of benchmarks/lasso_problems.py); beyond that it
# cycles, and the homotopy, whose work is bounded, takes over.
_JUMP_ROUNDS = 5
# Homotopy events of a class before it may try the jump (see _ClassPaths).
_JUMP_AFTER = 32


def _class_jump(Q, diag, eligible, q, lsq, mu, tol, f_floor, rounds, read):
    """Guess the optimal support and signs of one class and solve its optimality conditions there, a
    primal-dual active-set (semismooth Newton) iteration: returns ``(w, rounds used)``, ``w`` None unless
    the duality gap certifies it.

    At the optimum, with ``g = q - Q w`` and ``lambda = ||g||_inf``, the features of the support are those
    with ``|z_i| > lambda`` for ``z = diag(Q) w + g``, and ``sign(z_i)`` is the sign of ``w_i`` (the
    prox-gradient fixed point in the metric ``diag(Q)``, which makes the guess independent of the scale of
    the features). Each round takes that support A and signs s from the current point, solves
    ``Q_AA w_A + lambda s = q_A, s^T w_A = mu`` (lambda = 0 and least squares on A when that lambda is
    negative), and stops when the gap certifies the point. The first guess is the point ``w = 0`` projected
    in that metric. Cheap where it works, since one round replaces as many homotopy events as features
    enter; it gives up (returns None) on a singular ``Q_AA`` (more guessed features than independent ones)
    and after ``rounds`` rounds, and the homotopy then solves the class.
    """
    m = q.size
    z = np.where(eligible, q, 0.0)
    # The threshold theta of the projection: sum_i max(|z_i| - theta, 0) / d_i = mu.
    a = np.abs(z)
    order = np.argsort(-a)
    a_s = a[order]
    inv = 1.0 / np.where(eligible, diag, 1.0)[order]
    theta = (np.cumsum(a_s * inv) - mu) / np.cumsum(inv)
    valid = np.flatnonzero(theta < a_s)
    if not valid.size:
        return None, 0
    lam = max(float(theta[valid[-1]]), 0.0)
    w = np.zeros(m)
    kept = 0
    for r in range(1, rounds + 1):
        az = np.abs(z)
        A = np.flatnonzero(az > lam)
        if not A.size:
            return None, r
        A = A[np.argsort(-az[A], kind="stable")]  # most violated first: they are kept if A is too large
        if r > 1 and A.size > 2 * kept + 8:  # a poor guess: grow by steps, not by a Cholesky of m features
            A = A[:2 * kept + 8]
        QA = Q[A]  # rows A of Q: its columns A
        read[A] = True
        R, info = dpotrf(QA[:, A], lower=1)
        # More guessed features than independent ones (fewer images than features, low rank, blocks that
        # sum to one): keep those before the first that is (numerically) in the span of the earlier ones.
        piv = np.diagonal(R) ** 2 > _DEPENDENT * diag[A]
        if info != 0:
            piv[info - 1:] = False
        if not piv.all():
            keep = int(np.argmin(piv))
            if keep == 0:
                return None, r
            A, QA, R = A[:keep], QA[:keep], np.asfortranarray(R[:keep, :keep])
        kept = A.size
        s = np.sign(z[A])
        U = dpotrs(R, np.column_stack((q[A], s)), lower=1)[0]
        su = s @ U
        lam = (su[0] - mu) / su[1] if su[1] > 0 else 0.0
        if lam < 0:
            lam = 0.0
        wA = U[:, 0] - lam * U[:, 1]
        norm = np.abs(wA).sum()
        if norm > mu:
            if norm > mu * (1 + 1e-9):  # signs that disagree: not feasible yet
                w[:] = 0.0
                w[A] = wA
                z = diag * w + (q - QA.T @ wA)
                continue
            wA *= mu / norm  # rounding: on the sphere, a few ulps out
        g = q - QA.T @ wA
        # The gap of the feasible point (SPGL1's form, 1/2 convention) and the objective, from g.
        gap = max(mu * float(np.abs(g).max()) - float(wA @ g[A]), 0.0)
        f = 0.5 * lsq - 0.5 * float(wA @ (q[A] + g[A]))
        w[:] = 0.0
        w[A] = wA
        if gap <= tol * max(f, f_floor):
            return w, r
        z = diag * w + g
    return None, rounds


def _class_path(Q, diag, eligible, q, mu, max_iter, read):
    """The lasso homotopy of one class (the same events and rules as :meth:`_Homotopy.step`), compiled:
    see :func:`_path_kernel`. Returns ``(w, idx, iterations, done, cycling)``; ``read`` (bool, per feature)
    is set for every row of Q read. The iterations count as in the lock-step homotopy: one per event, plus
    the one that ends the path."""
    w, idx, it, done, cycling = _path_kernel(_rows_of(Q), diag, eligible, q, float(mu), int(max_iter), read,
                                             _DEPENDENT)
    return w, idx, int(it), bool(done), bool(cycling)


def _rows_of(Q) -> np.ndarray:
    """``Q`` as a C-contiguous float64 ndarray whose rows the kernel reads (Q is symmetric, so the transpose
    of a Fortran-ordered Q serves without a copy)."""
    if type(Q) is np.ndarray and Q.dtype == np.float64:
        if Q.flags.c_contiguous:
            return Q
        if Q.flags.f_contiguous:
            return Q.T
    return np.ascontiguousarray(Q, dtype=np.float64)


@_jit
def _solve_factor(R, k, b0, b1):
    """Overwrite ``b0``, ``b1`` (their first k entries) with ``(R R^T)^-1 b``: R lower triangular, row-major."""
    for r in range(k):  # R y = b
        s0, s1 = b0[r], b1[r]
        for c in range(r):
            s0 -= R[r, c] * b0[c]
            s1 -= R[r, c] * b1[c]
        b0[r], b1[r] = s0 / R[r, r], s1 / R[r, r]
    for r in range(k - 1, -1, -1):  # R^T x = y, by columns of R^T (rows of R: contiguous)
        b0[r] /= R[r, r]
        b1[r] /= R[r, r]
        for c in range(r):
            b0[c] -= R[r, c] * b0[r]
            b1[c] -= R[r, c] * b1[r]


@_jit
def _forward(R, k, QA, i, out):
    """``out[:k] = R^-1 Q[idx, i]`` (the row the factor gains when feature i enters) and ``||out||^2``;
    ``Q[idx, i]`` is column i of the stored rows QA (Q symmetric)."""
    norm = 0.0
    for r in range(k):
        s = QA[r, i]
        for c in range(r):
            s -= R[r, c] * out[c]
        out[r] = s / R[r, r]
        norm += out[r] * out[r]
    return norm


@_jit
def _path_kernel(Q, diag, eligible, q, mu, max_iter, read, dependent):
    """The homotopy of :func:`_class_path`, as loops: per event, one pass over the stored rows of Q of the
    active features (``QA``, in entry order) gives both correlation directions, two triangular solves with
    the Cholesky factor ``R`` of ``Q_AA`` give the directions, and the factor is bordered by one row when a
    feature enters and updated by a rank-one (Givens) update when one leaves (removing row and column p of
    ``Q_AA`` leaves the trailing block of the factor short of the outer product of its column p)."""
    m = q.size
    ninf = -np.inf
    shut = np.logical_not(eligible)  # not a candidate: ineligible, active, or blocked (dependent on the active set)
    cap = min(m, 16)
    QA = np.empty((cap, m))
    R = np.zeros((cap, cap))
    idx = np.zeros(m, dtype=np.int64)  # active features in entry order, their q and signs
    qa = np.zeros(m)
    sg = np.zeros(m)
    u = np.zeros(m)
    dw = np.zeros(m)
    ku = -1  # rows of the directions (u, dw) of the last event; -1: none yet
    c0 = np.empty(m)
    c1 = np.empty(m)
    t0 = np.empty(m)
    t1 = np.empty(m)
    t_in = np.empty(m)
    ell = np.empty(m)
    e = np.empty(m)
    x = np.empty(m)
    absq = np.where(eligible, np.abs(q), 0.0)
    k = 0
    lam = np.inf
    at = 0.0
    it = 0
    last_added = -1
    last_dropped = -1
    dropped_sign = 0.0
    steps_at_lam = 0
    while True:
        if k == 0:  # the start, or every feature left (only through rounding): from w = 0
            i = int(np.argmax(absq))
            if absq[i] <= 0:  # no feature correlates with the class: w = 0 is optimal
                return np.zeros(m), idx[:0].copy(), it, True, False
            lam = min(lam, absq[i])
            QA[0] = Q[i]
            read[i] = True
            R[0, 0] = np.sqrt(diag[i])
            idx[0], qa[0], sg[0] = i, q[i], np.sign(q[i])
            shut[i] = True
            k = 1
            last_added = i
            ku = -1
        if it >= max_iter:
            return _answer(m, idx, u, dw, ku, at), idx[:k].copy(), it, False, False
        it += 1
        for r in range(k):
            u[r], dw[r] = qa[r], sg[r]
        _solve_factor(R, k, u, dw)
        ku = k
        # B = Q_A^T (u, dw): c(lambda') = (q - B0) + lambda' B1
        c0[:] = 0.0
        c1[:] = 0.0
        for p in range(k):
            up, dp = u[p], dw[p]
            row = QA[p]
            for r in range(m):
                c0[r] += row[r] * up
                c1[r] += row[r] * dp
        # Entering (t0: sign +1, t1: sign -1): sigma c_i(lambda') = lambda' at sigma b_i / (1 - sigma a_i)
        # when the denominator is positive (otherwise |c_i| falls at least as fast as lambda); a feature
        # already above lambda (rounding at a tie) enters now.
        for r in range(m):
            b = q[r] - c0[r]
            a = c1[r]
            den = 1.0 - a
            t = b / den
            if den <= 0.0:
                t = ninf
            if b > lam * den:
                t = lam
            t0[r] = t
            den = 1.0 + a
            t = -b / den
            if den <= 0.0:
                t = ninf
            if -b > lam * den:
                t = lam
            t1[r] = t
        if last_dropped >= 0:  # no re-entry at once with the sign it left with (rounding at a tie)
            if dropped_sign > 0:
                if not t0[last_dropped] < lam * (1 - 1e-9):
                    t0[last_dropped] = ninf
            elif not t1[last_dropped] < lam * (1 - 1e-9):
                t1[last_dropped] = ninf
        for r in range(m):
            t_in[r] = ninf if shut[r] else max(t0[r], t1[r])
        # The L1 norm s^T (u - lambda dw) reaches mu at lam_mu; w_i with s_i dw_i < 0 reaches zero at
        # u_i / dw_i (not the feature that just entered at zero, always the last).
        su = 0.0
        nd = 0.0
        for r in range(k):
            su += sg[r] * u[r]
            nd += sg[r] * dw[r]
        lam_mu = (su - mu) / nd if nd > 0 else ninf
        p_drop = 0
        drop = ninf
        for r in range(k):
            if sg[r] * dw[r] < 0 and not (last_added >= 0 and r == k - 1):
                t = u[r] / dw[r]
                if t > drop:
                    drop, p_drop = t, r
        drop = min(drop, lam)
        tested = False
        entering = False
        i = 0
        event = 0.0
        d2 = 0.0
        while True:
            i = int(np.argmax(t_in))
            lam_in = t_in[i]
            event = max(drop, lam_in, 0.0)
            if lam_mu >= event or event <= 0.0:
                at = min(max(lam_mu, 0.0), lam)
                # one step of iterative refinement against Q itself, for the final answer
                for r in range(k):
                    s0, s1 = qa[r], sg[r]
                    for c in range(k):
                        v = QA[r, idx[c]]
                        s0 -= v * u[c]
                        s1 -= v * dw[c]
                    e[r], x[r] = s0, s1
                _solve_factor(R, k, e, x)
                for r in range(k):
                    u[r] += e[r]
                    dw[r] += x[r]
                w = _answer(m, idx, u, dw, ku, at)
                norm = np.abs(w).sum()
                if norm > mu:  # rounding: the solution is on the sphere, a few ulps out
                    w *= mu / norm
                return w, idx[:k].copy(), it, True, False
            entering = drop < lam_in
            if entering:
                d2 = _forward(R, k, QA, i, ell)
                if not diag[i] - d2 > dependent * diag[i]:
                    # In the span of the active features (see _Homotopy.step): test every candidate at
                    # once, block the dependent until the next drop, pick again.
                    for c in range(m):
                        if (c == i) if tested else t_in[c] > ninf:
                            if not diag[c] - _forward(R, k, QA, c, e) > dependent * diag[c]:
                                shut[c] = True
                                t_in[c] = ninf
                    tested = True
                    continue
            break
        steps_at_lam = steps_at_lam + 1 if event >= lam else 0
        if steps_at_lam > 2 * m + 10:  # cycling among ties: the certificate decides
            at = lam  # the point of the previous event, on these directions
            return _answer(m, idx, u, dw, ku, at), idx[:k].copy(), it, True, True
        at = lam = event
        last_added = last_dropped = -1
        if entering:
            if k == cap:  # amortised growth
                cap = min(m, 2 * cap)
                grown = np.empty((cap, m))
                grown[:k] = QA[:k]
                QA = grown
                grownR = np.zeros((cap, cap))
                grownR[:k, :k] = R[:k, :k]
                R = grownR
            QA[k] = Q[i]  # Q symmetric: its row i is its column i
            read[i] = True
            for c in range(k):
                R[k, c] = ell[c]
            R[k, k] = np.sqrt(diag[i] - d2)
            idx[k], qa[k], sg[k] = i, q[i], (1.0 if t0[i] >= t1[i] else -1.0)
            shut[i] = True
            k += 1
            last_added = i
        else:
            i = idx[p_drop]
            dropped_sign = sg[p_drop]
            last_dropped = i
            # the point of this event, before the support shrinks (the dropped weight is zero there)
            for r in range(k):
                u[r] -= event * dw[r]
            n = k - 1 - p_drop
            for r in range(n):
                x[r] = R[p_drop + 1 + r, p_drop]
            for r in range(p_drop, k - 1):
                idx[r], qa[r], sg[r], u[r] = idx[r + 1], qa[r + 1], sg[r + 1], u[r + 1]
                QA[r] = QA[r + 1]
                for c in range(p_drop):
                    R[r, c] = R[r + 1, c]
                for c in range(p_drop, r + 1):
                    R[r, c] = R[r + 1, c + 1]
            for c in range(k):
                R[k - 1, c] = 0.0
                R[c, k - 1] = 0.0
            k -= 1
            # the trailing block L33 of the factor becomes the factor of L33 L33^T + x x^T
            for j in range(n):
                jj = p_drop + j
                d = R[jj, jj]
                rr = np.sqrt(d * d + x[j] * x[j])
                cs, sn = rr / d, x[j] / d
                R[jj, jj] = rr
                for r in range(j + 1, n):
                    R[p_drop + r, jj] = (R[p_drop + r, jj] + sn * x[r]) / cs
                    x[r] = cs * x[r] - sn * R[p_drop + r, jj]
            for r in range(k):
                dw[r] = 0.0
            ku = k
            at = 0.0
            shut[:] = np.logical_not(eligible)  # a feature dependent on the old set may not be on the smaller one
            for r in range(k):
                shut[idx[r]] = True


@_jit
def _answer(m, idx, u, dw, ku, at):
    """The weights ``u - at dw`` on the support of the directions of the last event."""
    w = np.zeros(m)
    for r in range(max(ku, 0)):
        w[idx[r]] = u[r] - at * dw[r]
    return w


@functools.cache
def _blas_controller() -> ThreadpoolController:
    """The BLAS libraries loaded, found once (finding them costs more than solving a small problem)."""
    return ThreadpoolController()


@functools.cache
def _blas_libraries() -> tuple:
    return tuple(_blas_controller().select(user_api="blas").lib_controllers)


class _OneBlasThread:
    """One BLAS thread inside the ``with`` block, the old counts restored after: what threadpoolctl's
    ``limit(limits=1, user_api="blas")`` does, without listing the libraries again on every call (which costs
    more than solving a small problem)."""

    def __enter__(self):
        self.old = [(lib, lib.num_threads) for lib in _blas_libraries()]
        for lib, n in self.old:
            if n != 1:
                lib.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        for lib, n in self.old:
            if n != 1:
                lib.set_num_threads(n)
        return False


def _full_gap(Q, q, lsq, mu, W):
    """Objective (1/2 convention), gap and relative gap of the full problem, reading the rows of Q where W
    is nonzero only."""
    U = np.flatnonzero(W.any(axis=1))
    WU = W[U]
    G = Q[U].T @ WU - q  # Q symmetric: the rows U of Q are its columns U
    GU = G[U]
    f = 0.5 * np.einsum("ij,ij->j", WU, GU - q[U]) + 0.5 * lsq
    gap = np.maximum(np.einsum("ij,ij->j", WU, GU) + mu * np.abs(G).max(axis=0), 0.0)
    return f, gap, gap / np.maximum(f, FIT_FLOOR * 0.5 * lsq.sum())


def solve_mu_lasso(gram, mu: float = 10.0, *, q=None, lsq=None, tol: float = 1e-8, max_iter: int = 10000,
                   W0=None, callback=None) -> MuLassoResult:
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
        Certify every class to ``gap <= tol * max(objective, 0.01 ||L||_F^2)``: ``objective - optimum`` is
        then at most ``tol`` times the objective (or ``0.01 tol ||L||_F^2`` for a class fitted almost exactly).
    max_iter : int
        Most iterations (homotopy events: about one per feature entering or leaving a support).
    W0 : array_like of shape (m, C), optional
        Warm start, projected onto the constraint first: a class whose ``w0`` is a point of its homotopy path
        (the solution for a smaller radius) continues from there, any other starts from zero.
    callback : callable, optional
        Called as ``callback(iteration, W, relative_gap)`` after every iteration with the full (m, C) iterate
        and the relative duality gap of the full problem per class (costs one product with Q per call: for
        teaching and plots, not for speed).

    Returns
    -------
    MuLassoResult

    Warns
    -----
    ConvergenceWarning
        When some class is not certified to ``tol``; the message says why and what to do.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X, y = rng.random((200, 20)), rng.integers(0, 3, 200)
    >>> res = solve_mu_lasso(GramAccumulator.from_data(X, np.eye(3)[y]), mu=1.0)
    >>> res.converged, res.status, res.W.shape, bool(np.all(np.abs(res.W).sum(0) <= 1 + 1e-9))
    (True, 'converged', (20, 3), True)
    """
    mu = check_radius(mu)
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
        W0 = _project(W0, mu)
    # The iterations are small products and triangular solves; a second BLAS thread only adds
    # synchronisation, and one thread makes the result independent of the thread count.
    with _OneBlasThread():
        res = _solve(Q, q, lsq, mu, float(tol), int(max_iter), W0, callback)
    if not res.converged:
        warnings.warn(res.message, ConvergenceWarning, stacklevel=2)
    return res


def _solve(Q, q, lsq, mu, tol, max_iter, W0, callback, per_class=None) -> MuLassoResult:
    """The homotopies of all classes in lock-step and the certificate; inputs checked."""
    m, C = q.shape
    if per_class is None:
        per_class = W0 is None and callback is None
    if per_class:
        path = _ClassPaths(Q, q, lsq, mu, tol, max_iter)
        it = path.n_iter
    else:
        path = _Homotopy(Q, q, mu, W0)
        it = 0
        while it < max_iter and not path.done.all():
            it += 1
            path.step()
            if callback is not None:
                callback(it, path.W.copy(), _full_gap(Q, q, lsq, mu, path.W)[2])
    W = path.W
    f, gap, rel = _full_gap(Q, q, lsq, mu, W)
    if per_class and path.jumped.any():
        redo = np.flatnonzero((rel > tol) & path.jumped)
        if redo.size:
            path.homotopy(redo)
            it = path.n_iter
            f, gap, rel = _full_gap(Q, q, lsq, mu, W)
    unfinished = ~path.done
    # A homotopy that ended but is not certified was let down by rounding (a nearly singular active block,
    # a feature held out as dependent that still improves the objective by a hair): polish those classes by
    # projected gradient from the homotopy's answer, then certify again.
    n_polish = 0
    stuck = np.flatnonzero((rel > tol) & ~unfinished)
    if stuck.size and it < max_iter:
        floor = FIT_FLOOR * 0.5 * lsq.sum()
        W[:, stuck], n_polish = _polish(Q, q[:, stuck], lsq[stuck], mu, tol, max_iter - it, W[:, stuck], floor)
        it += n_polish
        f, gap, rel = _full_gap(Q, q, lsq, mu, W)
    status, message = "converged", f"certified: relative duality gap {rel.max(initial=0):.1e} <= tol={tol:g}"
    if np.any(rel > tol):
        bad = np.flatnonzero(rel > tol)
        if unfinished[bad].any():
            status = "max_iter"
            n_act = max(path.idx[j].size for j in bad)
            message = (f"mu-Lasso reached the iteration limit max_iter={max_iter} before the homotopy of "
                       f"class(es) {bad.tolist()} ended (relative duality gap {rel[bad].max():.2e} > tol={tol:g}; "
                       f"{n_act} features active): raise max_iter (each iteration adds or removes one feature, "
                       f"so about twice the expected support size suffices)")
        else:
            status = "stalled"
            how = ("cycled among tied features at one lambda: the gap stopped decreasing"
                   if path.cycling[bad].any() else "ended")
            message = (f"mu-Lasso stalled: the homotopy of class(es) {bad.tolist()} {how}, and {n_polish} "
                       f"projected-gradient iterations from there left a relative duality "
                       f"gap of {rel[bad].max():.2e} > tol={tol:g}; rounding dominates (a Gram matrix with a condition "
                       f"number near 1/eps): rescale the features (e.g. standardise the columns of X), or "
                       f"accept a larger tol, or report the problem")
    return MuLassoResult(W=W, objective=2.0 * f, gap=2.0 * gap, relative_gap=rel, n_iter=it,
                         converged=status == "converged", mu=mu, tol=tol,
                         n_working=path.nU, status=status, message=message)


def _qmul(Q: np.ndarray, M: np.ndarray, dense_fraction: float = 0.5) -> np.ndarray:
    """``Q @ M`` for symmetric ``Q``, reading only the rows of ``Q`` where ``M`` has a nonzero row."""
    rows = np.flatnonzero(np.any(M != 0, axis=1))
    if rows.size >= dense_fraction * Q.shape[0]:
        return Q @ M
    if rows.size == 0:
        return np.zeros((Q.shape[0], M.shape[1]))
    return Q[rows].T @ M[rows]



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



def _working_gap(Q, q, lsq, mu, W, U, f_floor):
    """Relative gap of the full problem and the gradient, for ``W`` supported on rows U."""
    QW = Q[U].T @ W[U]  # Q symmetric: the rows U of Q are its columns U
    G = QW - q
    f = _half_objective(W, QW, q, lsq)
    gap = np.maximum(np.einsum("ij,ij->j", W, G) + mu * np.abs(G).max(axis=0), 0.0)
    return gap / np.maximum(f, f_floor), G


def _polish(Q, q, lsq, mu, tol, max_iter, W, f_floor):
    """Projected-gradient polish of columns the homotopy left uncertified; returns ``(W, iterations)``.

    The working-set loop around :func:`_spg`, warm-started at the homotopy's answer, which is already within
    rounding of the optimum: the SPG runs on the Gram block of the support plus the violators of the
    optimality conditions, and one product with the rows of Q of that block per round checks every feature.
    """
    m, C = q.shape
    W = W.copy()
    work = np.zeros(m, dtype=bool)
    work[np.any(W != 0, axis=1)] = True
    G = _qmul(Q, W) - q
    n_add = _N_ADD
    it, rounds = 0, 0
    while it < max_iter:
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
        if U.size == 0:
            break
        WU, n_it = _spg(Q[np.ix_(U, U)], q[U], lsq, mu, W[U], tol, max_iter - it, 10, 1e-4, f_floor)
        it += n_it
        W[:] = 0.0
        W[U] = WU
        rel, G = _working_gap(Q, q, lsq, mu, W, U, f_floor)
        if np.all(rel <= tol) or work.all():
            break
        n_add = max(n_add, int(np.count_nonzero(W, axis=0).max()))
    return W, it


def _spg(Q, q, lsq, mu, W, tol, max_iter, n_prev, gamma, f_floor):
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
    return W, it
