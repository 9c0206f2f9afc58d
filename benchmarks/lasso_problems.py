"""Seeded mu-Lasso test problems of five families, shared by ``benchmarks/bench_lasso.py`` and the tests.

Each family stresses the solver differently: ``gaussian`` (well conditioned when N >> m), ``skewed``
(positive, heavy-tailed, strongly correlated columns), ``descriptor`` (non-negative, L1-normalised blocks that
make the Gram matrix singular, dead units), ``lowrank`` (rank far below m and N: many exact ties) and
``scaled`` (columns scaled over six orders of magnitude: a Gram matrix with a condition number near 1e12 even
when N >> m). Sizes are over- and under-determined, radii log-uniform from 0.01 to 1000.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from vefi.lasso import GramAccumulator  # (no torch: the kernel tests start one interpreter per kernel)

FAMILIES = ("gaussian", "skewed", "descriptor", "lowrank", "scaled")


class Problem(NamedTuple):
    """One problem: descriptors ``X`` (N, m), targets ``L`` (N, C), the radius and its Gram pair."""

    name: str
    family: str
    X: np.ndarray
    L: np.ndarray
    mu: float
    gram: GramAccumulator


def descriptor_like(rng, y: np.ndarray, m: int) -> np.ndarray:
    """Non-negative, sparse (ReLU-like), class-dependent responses in three layers, each block L1-normalised
    per image (so every block sums to one: the Gram matrix is singular), with a fifth of the units dead."""
    n = y.size
    profile = rng.gamma(2.0, 1.0, size=(int(y.max()) + 1, m)) ** 2
    X = profile[y] * rng.gamma(2.0, 0.5, size=(n, m))
    X[rng.random((n, m)) < 0.4] = 0.0
    X[:, rng.random(m) < 0.2] = 0.0  # units that never fire
    for block in np.array_split(np.arange(m), 3):
        if block.size:
            X[:, block] /= np.maximum(X[:, block].sum(axis=1, keepdims=True), 1e-30)
    return X


def family_problem(family: str, seed: int, max_n: int = 300, max_m: int = 200) -> Problem:
    """The problem number ``seed`` of ``family``: sizes, data and radius all drawn from ``seed``."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    rng = np.random.default_rng([FAMILIES.index(family), seed])
    n, m, C = int(rng.integers(5, max_n)), int(rng.integers(5, max_m)), int(rng.integers(1, 6))
    if seed % 2:  # every other problem has more features than images
        n, m = min(n, m), max(n, m)
    y = np.arange(n) % C
    rng.shuffle(y)
    if family == "gaussian":
        X = rng.normal(size=(n, m))
    elif family == "skewed":
        X = rng.random((n, m)) ** 3
    elif family == "descriptor":
        X = descriptor_like(rng, y, m)
    elif family == "lowrank":
        r = int(rng.integers(1, max(2, min(n, m) // 4) + 1))
        X = rng.normal(size=(n, r)) @ rng.normal(size=(r, m))
    else:  # scaled
        X = rng.normal(size=(n, m)) * 10.0 ** rng.uniform(-3, 3, size=m)
    L = np.eye(C)[y]
    mu = float(10 ** rng.uniform(-2, 3))
    name = f"{family}-{seed} (N={n}, m={m}, C={C}, mu={mu:.3g})"
    return Problem(name, family, X, L, mu, GramAccumulator.from_data(X, L))


def assorted_problems(per_family: int = 12, **sizes) -> list[Problem]:
    """``per_family`` problems of every family (60 by default), in a fixed order."""
    return [family_problem(f, s, **sizes) for f in FAMILIES for s in range(per_family)]
