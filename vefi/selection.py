"""Relevant features by mu-Lasso (Sec. 3.1), as a scikit-learn feature selector.

``RelevantFeatureSelector(mu=10).fit(X, y)`` builds the one-hot label matrix ``L`` (C x N) of the paper from
integer labels, solves the mu-Lasso of :mod:`vefi.lasso` for all classes at once, and keeps the features with
a nonzero weight for any class. ``coef_`` has scikit-learn's orientation (C x m), the transpose of the paper's
``W`` (m x C).
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import NamedTuple

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.feature_selection import SelectorMixin
from sklearn.utils.validation import check_is_fitted

from vefi.descriptors import Feature, FeatureIndex
from vefi.lasso import ConvergenceWarning, GramAccumulator, MuLassoResult, check_radius, solve_mu_lasso

__all__ = ["RelevantFeatureSelector", "SelectionPath", "one_hot", "selection_path"]


def one_hot(y, n_classes: int | None = None) -> np.ndarray:
    """The paper's label matrix, transposed to (N, C): ``L[i, c] = 1`` when image i has label c.

    Labels are class indices ``0..C-1`` (the model's output units); ``n_classes`` defaults to
    ``max(y) + 1``. A class in that range without any example is an error: its lasso would be empty.

    Examples
    --------
    >>> one_hot([0, 2, 1, 2]).astype(int).tolist()
    [[1, 0, 0], [0, 0, 1], [0, 1, 0], [0, 0, 1]]
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"labels must be a 1-D array of class indices, got shape {y.shape}")
    if y.size == 0:
        raise ValueError("no labels: y is empty")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise TypeError(f"labels must be integer class indices 0..C-1, got dtype {y.dtype}")
    if y.min() < 0:
        raise ValueError(f"labels must be class indices 0..C-1, got {int(y.min())}")
    C = int(y.max()) + 1 if n_classes is None else int(n_classes)
    if y.max() >= C:
        raise ValueError(f"label {int(y.max())} out of range for n_classes={C}")
    counts = np.bincount(y, minlength=C)
    if np.any(counts == 0):
        raise ValueError(f"class(es) {np.flatnonzero(counts == 0).tolist()} have no examples; every class "
                         f"0..{C - 1} needs at least one")
    return np.eye(C)[y]


def _class_support(coef: np.ndarray, threshold: float) -> np.ndarray:
    mag = np.abs(coef)
    return mag > float(threshold) * mag.max(axis=-1, keepdims=True)


class RelevantFeatureSelector(SelectorMixin, BaseEstimator):
    """Select the features relevant to each class by mu-Lasso (Oramas et al. 2019, Sec. 3.1).

    Solves ``min_W ||X^T W - L^T||_F^2 s.t. ||w_j||_1 <= mu`` with :func:`vefi.lasso.solve_mu_lasso` (a lasso
    homotopy with a certified duality gap), and keeps the features whose weight is nonzero for some class. A
    fit the solver could not certify to ``tol`` warns (:class:`vefi.lasso.ConvergenceWarning`, saying why and
    what to do) and says so in ``converged_``, ``status_`` and ``message_``.

    Parameters
    ----------
    mu : float
        L1 budget per class (the paper: 10 for MNIST and ImageNet; the demo used 5 for an8Flower).
    tol : float
        Relative duality gap at which the solver stops (the objective is then within ``tol`` of the optimum,
        relatively).
    max_iter : int
        Most solver iterations (about one per feature entering or leaving a class's support).
    threshold : float
        A weight counts as nonzero when ``|w_ij| > threshold * max_i |w_ij|`` (relative to the largest weight
        of its class). The solver's weights are exact zeros off the support, so this only guards against
        rounding dust.
    n_classes : int, optional
        Number of classes; default ``max(y) + 1``.
    warm_start : bool
        Start from the previous ``coef_`` (useful along a grid of ``mu``).

    Attributes
    ----------
    coef_ : numpy.ndarray of shape (C, m)
        Weights per class (rows), the paper's ``W`` transposed.
    classes_ : numpy.ndarray of shape (C,)
    n_features_in_ : int
    objective_, gap_, relative_gap_ : numpy.ndarray of shape (C,)
        Per class: ``||X^T w_j - l_j||^2``, its duality gap (a bound on the distance to the optimum), and
        their ratio (see :class:`vefi.lasso.MuLassoResult`).
    n_iter_ : int
        Solver iterations.
    converged_ : bool
        Every class certified: ``relative_gap_ <= tol``.
    status_ : str
        ``"converged"``, ``"max_iter"`` or ``"stalled"`` (see :class:`vefi.lasso.MuLassoResult`).
    message_ : str
        Why the solver stopped, and what to do if it did not converge.
    result_ : vefi.lasso.MuLassoResult
    method_, n_passes_, working_set_, class_labels_
        Set by :func:`vefi.statistics.fit_relevant` only: ``"dense"`` or ``"working_set"``, the passes over
        the data, the columns of the final working set, and the label value of each row of ``coef_``.

    Examples
    --------
    >>> from vefi.descriptors import synthetic_descriptors
    >>> X, y = synthetic_descriptors(300, [20, 10], n_classes=3)
    >>> sel = RelevantFeatureSelector(mu=2).fit(X, y)
    >>> sel.coef_.shape, sel.converged_, sel.transform(X).shape[1] == int(sel.get_support().sum())
    ((3, 30), True, True)
    """

    def __init__(self, mu: float = 10.0, *, tol: float = 1e-8, max_iter: int = 10000, threshold: float = 1e-6,
                 n_classes: int | None = None, warm_start: bool = False):
        self.mu = mu
        self.tol = tol
        self.max_iter = max_iter
        self.threshold = threshold
        self.n_classes = n_classes
        self.warm_start = warm_start

    def fit(self, X, y=None):
        """Fit on descriptors ``X`` (N, m) and integer labels ``y`` (N,), or on a :class:`GramAccumulator`.

        Parameters
        ----------
        X : array_like of shape (N, m) or GramAccumulator
            Descriptors (rows are images), or statistics accumulated over batches (then ``y`` is None).
        y : array_like of shape (N,), optional
            Class indices 0..C-1.

        Returns
        -------
        self
        """
        mu = check_radius(self.mu)
        if isinstance(X, GramAccumulator):
            if y is not None:
                raise TypeError("with a GramAccumulator the labels are already in it: pass y=None")
            if X.Q is None:
                raise ValueError("the GramAccumulator is empty: no batch was added")
            gram = X
        else:
            if y is None:
                raise TypeError("fit needs labels y (class indices) next to X, or a GramAccumulator as X")
            X = np.asarray(X)
            if X.ndim != 2:
                raise ValueError(f"X must be a 2-D array (n_samples, n_features), got shape {X.shape}")
            if not np.issubdtype(X.dtype, np.number):
                raise TypeError(f"X must be numeric, got dtype {X.dtype}")
            y = np.asarray(y)
            if y.ndim != 1 or y.shape[0] != X.shape[0]:
                raise ValueError(f"X has {X.shape[0]} samples but y has shape {y.shape}; expected "
                                 f"({X.shape[0]},)")
            if X.shape[0] == 0:
                raise ValueError("no samples: X has 0 rows")
            if not np.all(np.isfinite(X)):
                raise ValueError("X contains NaN or Inf")
            gram = GramAccumulator.from_data(X, one_hot(y, self.n_classes))
        W0 = None
        if self.warm_start and hasattr(self, "coef_") and self.coef_.shape == (gram.n_targets, gram.n_features):
            W0 = self.coef_.T
        with warnings.catch_warnings():  # warned once, below, from the caller's line
            warnings.simplefilter("ignore", ConvergenceWarning)
            res = solve_mu_lasso(gram, mu, tol=self.tol, max_iter=self.max_iter, W0=W0)
        if not res.converged:
            warnings.warn(f"RelevantFeatureSelector(mu={mu:g}): {res.message}", ConvergenceWarning, stacklevel=2)
        return self._set_result(res)

    @classmethod
    def from_result(cls, result: MuLassoResult, *, columns=None, n_features: int | None = None,
                    **params) -> "RelevantFeatureSelector":
        """A fitted selector from a solve done elsewhere, e.g. over a subset of the columns.

        Parameters
        ----------
        result : vefi.lasso.MuLassoResult
            The solve; the selector's ``mu`` and ``tol`` are the result's.
        columns : array_like of int, optional
            The feature (column) of each row of ``result.W``, when the solve was over a subset of the
            ``n_features`` columns; the weights of the other columns are zero. Default: all, in order.
        n_features : int, optional
            Total number of features m (needed with ``columns``).
        **params
            Other parameters of the selector (``threshold``, ``max_iter``, ``n_classes``, ...).

        Returns
        -------
        RelevantFeatureSelector
            Fitted: ``coef_`` has shape (C, m). The certificate attributes (``gap_``, ``relative_gap_``,
            ``converged_``, ``status_``, ``message_``) are the result's: for a solve over a subset of the
            columns they certify that subproblem only, unless the result carries the gap of the full problem
            (as :func:`vefi.statistics.fit_relevant`'s does).

        Examples
        --------
        >>> from vefi.descriptors import synthetic_descriptors
        >>> from vefi.lasso import GramAccumulator, solve_mu_lasso
        >>> X, y = synthetic_descriptors(300, [20, 10], n_classes=3)
        >>> cols = np.arange(10, 30)
        >>> res = solve_mu_lasso(GramAccumulator.from_data(X[:, cols], one_hot(y)), mu=2)
        >>> sel = RelevantFeatureSelector.from_result(res, columns=cols, n_features=30)
        >>> sel.coef_.shape, bool(np.all(sel.coef_[:, :10] == 0))
        ((3, 30), True)
        """
        if not isinstance(result, MuLassoResult):
            raise TypeError(f"expected a vefi.lasso.MuLassoResult, got {type(result).__name__}")
        for name in ("mu", "tol"):
            if name in params:
                raise TypeError(f"{name} comes from the result ({getattr(result, name)!r}); do not pass it")
        W = np.asarray(result.W, dtype=np.float64)
        if W.ndim != 2:
            raise ValueError(f"result.W must have shape (m, C), got {W.shape}")
        if columns is not None:
            columns = np.asarray(columns, dtype=np.intp).reshape(-1)
            if n_features is None:
                raise TypeError("with columns, give n_features (the total number of features m)")
            n_features = int(n_features)
            if columns.shape[0] != W.shape[0]:
                raise ValueError(f"{columns.shape[0]} columns given for the {W.shape[0]} rows of result.W")
            if columns.size and (columns.min() < 0 or columns.max() >= n_features):
                raise ValueError(f"columns must lie in 0..{n_features - 1}")
            if np.unique(columns).size != columns.size:
                raise ValueError("columns contains repeated features")
            full = np.zeros((n_features, W.shape[1]))
            full[columns] = W
            W = full
        elif n_features is not None and int(n_features) != W.shape[0]:
            raise ValueError(f"result.W has {W.shape[0]} rows but n_features={n_features}; pass columns= too")
        sel = cls(mu=result.mu, tol=result.tol, **params)
        return sel._set_result(replace(result, W=W))

    def _set_result(self, res: MuLassoResult) -> "RelevantFeatureSelector":
        """Store a solve as the fitted state."""
        self.result_: MuLassoResult = res
        self.coef_ = res.W.T.copy()
        self.classes_ = np.arange(res.W.shape[1])
        self.n_features_in_ = res.W.shape[0]
        self.objective_ = res.objective
        self.gap_ = res.gap
        self.relative_gap_ = res.relative_gap
        self.n_iter_ = res.n_iter
        self.converged_ = res.converged
        self.status_ = res.status
        self.message_ = res.message
        return self

    def class_support(self) -> np.ndarray:
        """Boolean (C, m): feature i is relevant to class c."""
        check_is_fitted(self, "coef_")
        return _class_support(self.coef_, self.threshold)

    def _get_support_mask(self) -> np.ndarray:
        return self.class_support().any(axis=0)

    def _check_index(self, index: FeatureIndex) -> None:
        if not isinstance(index, FeatureIndex):
            raise TypeError(f"expected a vefi.descriptors.FeatureIndex, got {type(index).__name__}")
        if len(index) != self.n_features_in_:
            raise ValueError(f"the index describes {len(index)} features but the selector was fitted on "
                             f"{self.n_features_in_}")

    def selected_features(self, index: FeatureIndex) -> list[Feature]:
        """The selected features as ``(layer number, layer name, kind, channel)``, in column order."""
        self._check_index(index)
        return [index[j] for j in np.flatnonzero(self.get_support())]

    def features_per_class(self, index: FeatureIndex) -> dict[int, list[Feature]]:
        """For each class, its relevant features, strongest weight first."""
        self._check_index(index)
        support = self.class_support()
        out = {}
        for c in self.classes_:
            cols = np.flatnonzero(support[c])
            cols = cols[np.argsort(-np.abs(self.coef_[c, cols]), kind="stable")]
            out[int(c)] = [index[j] for j in cols]
        return out


class SelectionPath(NamedTuple):
    """What :func:`selection_path` returns.

    Attributes
    ----------
    mus : numpy.ndarray of shape (K,)
        The radii, increasing.
    coef : numpy.ndarray of shape (K, C, m)
        ``coef_`` at each radius.
    support : numpy.ndarray of shape (K, C, m)
        ``class_support()`` at each radius.
    objective : numpy.ndarray of shape (K, C)
    """

    mus: np.ndarray
    coef: np.ndarray
    support: np.ndarray
    objective: np.ndarray

    def counts(self) -> np.ndarray:
        """Number of selected features (relevant to any class) at each radius, shape (K,)."""
        return self.support.any(axis=1).sum(axis=1)


def selection_path(X, y=None, mus=(1, 2, 5, 10, 20), **params) -> SelectionPath:
    """Fit :class:`RelevantFeatureSelector` along increasing radii, each fit warm-started from the previous.

    Parameters
    ----------
    X, y
        As in :meth:`RelevantFeatureSelector.fit` (descriptors and labels, or a ``GramAccumulator``).
    mus : sequence of float
        Radii; sorted increasingly.
    **params
        Other parameters of :class:`RelevantFeatureSelector` (``tol``, ``threshold``, ...).

    Examples
    --------
    >>> from vefi.descriptors import synthetic_descriptors
    >>> X, y = synthetic_descriptors(300, [20, 10], n_classes=3)
    >>> path = selection_path(X, y, mus=[0.5, 2, 8])
    >>> path.coef.shape, bool(np.all(np.diff(path.objective, axis=0) <= 1e-9))
    ((3, 3, 30), True)
    """
    mus = np.sort(np.asarray(mus, dtype=np.float64).reshape(-1))
    if mus.size == 0:
        raise ValueError("mus is empty: give at least one radius")
    gram = X if isinstance(X, GramAccumulator) else None
    if gram is None:
        if y is None:
            raise TypeError("selection_path needs labels y next to X, or a GramAccumulator as X")
        X = np.asarray(X)
        if X.ndim != 2 or not np.all(np.isfinite(X)):
            raise ValueError(f"X must be a finite 2-D array (n_samples, n_features), got shape {X.shape}")
        y = np.asarray(y)
        if y.shape != (X.shape[0],):
            raise ValueError(f"X has {X.shape[0]} samples but y has shape {y.shape}")
        gram = GramAccumulator.from_data(X, one_hot(y, params.get("n_classes")))
    sel = RelevantFeatureSelector(warm_start=True, **params)
    coefs, objectives = [], []
    for mu in mus:
        sel.set_params(mu=float(mu)).fit(gram)
        coefs.append(sel.coef_.copy())
        objectives.append(sel.objective_.copy())
    coef = np.array(coefs)
    return SelectionPath(mus, coef, _class_support(coef, sel.threshold), np.array(objectives))
