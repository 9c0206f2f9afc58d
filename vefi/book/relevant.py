"""The relevant features of the book's trained networks: descriptors of the training set, mu-Lasso, cached.

Every chapter after the third needs the same thing: "the features mu-Lasso selects for network X at mu".
:func:`relevant_features` computes the descriptor statistics of the training set once per trained model
(only the Gram pair of :class:`vefi.lasso.GramAccumulator`, cached on disk under a hash of the weights),
and fits :class:`vefi.selection.RelevantFeatureSelector` on them, for every layer before the classifier
("All") or for the convolutional part only ("OnlyConv", Fig. 4 of the paper).
"""

from __future__ import annotations

import warnings

import numpy as np
from torch import nn

from vefi.book._cache import code_hash, load_arrays, save_arrays
from vefi.book.config import data_dir
from vefi.book.data import load_dataset
from vefi.book.train import pretrained
from vefi.descriptors import FeatureIndex, default_layers
from vefi.lasso import ConvergenceWarning, GramAccumulator
from vefi.relevant import RelevantFeatures, model_fingerprint
from vefi.selection import RelevantFeatureSelector
from vefi.statistics import gram_statistics

__all__ = ["DEFAULT_MU", "relevant_features", "training_gram"]

DEFAULT_MU = 10.0
"""The paper's budget (Sec. 4.1: mu=10 for MNIST and ImageNet); the book uses it for every network."""


def training_gram(name: str, model: nn.Module | None = None, *, network: int = 0
                  ) -> tuple[GramAccumulator, FeatureIndex]:
    """The Gram pair of the default descriptors (every layer before the classifier) of the training set of
    ``name`` under ``model`` (default: the book's trained network of seed ``network``), cached on disk under
    the weights, the data and the code that computes it."""
    model = pretrained(name, network) if model is None else model
    data = load_dataset(name, "train")
    index = FeatureIndex.from_layers(default_layers(model))
    key = f"{model_fingerprint(model)}-{code_hash('vefi.descriptors', 'vefi.lasso', 'vefi.statistics')}"
    path = data_dir() / "descriptors" / f"{name}-gram-{key}-n{len(data)}.npz"
    stored = load_arrays(path)
    gram = GramAccumulator()
    if stored is None:
        # streamed: the descriptors of each batch go into the Gram pair; the (N, m) matrix never exists
        gram, index = gram_statistics(model, data, index.layers, classes=range(len(data.classes)),
                                      batch_size=250)
        save_arrays(path, Q=gram.Q, q=gram.q, lsq=gram.lsq, n=np.array(gram.n_samples))
    else:
        gram.Q, gram.q, gram.lsq, gram.n_samples = stored["Q"], stored["q"], stored["lsq"], int(stored["n"])
    return gram, index


def _sub_gram(gram: GramAccumulator, columns: np.ndarray) -> GramAccumulator:
    sub = GramAccumulator()
    sub.Q = gram.Q[np.ix_(columns, columns)].copy()
    sub.q = gram.q[columns].copy()
    sub.lsq = gram.lsq.copy()
    sub.n_samples = gram.n_samples
    return sub


def relevant_features(name: str, mu: float = DEFAULT_MU, *, only_conv: bool = False,
                      model: nn.Module | None = None, network: int = 0) -> RelevantFeatures:
    """The features mu-Lasso selects for the book's network of dataset ``name`` (a
    :class:`vefi.relevant.RelevantFeatures`, as :func:`vefi.select_features` returns for any model).

    Parameters
    ----------
    name : str
        A dataset of :data:`vefi.book.data.DATASETS`.
    mu : float
        L1 budget per class.
    only_conv : bool
        Select among the convolutional part only (the paper's "OnlyConv").
    model : torch.nn.Module, optional
        A network trained on ``name``; default the book's (:func:`vefi.book.train.pretrained`).
    network : int
        Without ``model``: the seed of the book's trained network (see :data:`vefi.book.train.NETWORK_SEEDS`).

    Warns
    -----
    vefi.lasso.ConvergenceWarning
        When the solver could not certify the selection (``rel.selector.converged_`` is False); the message
        names the network and says why and what to do.

    Examples
    --------
    >>> rel = relevant_features("mnist")  # doctest: +SKIP
    >>> rel.per_class[3][:3]  # doctest: +SKIP
    """
    label = f"{name}, {'OnlyConv' if only_conv else 'All'}" + (f", network {network}" if model is None and network else "")
    model = pretrained(name, network) if model is None else model
    gram, index = training_gram(name, model)
    if only_conv:
        conv_layers = default_layers(model, only_conv=True)
        gram = _sub_gram(gram, index.columns(conv_layers))
        index = FeatureIndex.from_layers(conv_layers)
    with warnings.catch_warnings():  # warned once, below, with the network's name
        warnings.simplefilter("ignore", ConvergenceWarning)
        selector = RelevantFeatureSelector(mu=mu).fit(gram)
    if not selector.converged_:
        # The book keeps warnings visible: a selection that is not certified must not pass for one.
        warnings.warn(f"the relevant features of {name!r} at mu={float(mu):g} "
                      f"({'OnlyConv' if only_conv else 'All'}) are not certified optimal: {selector.message_}",
                      ConvergenceWarning, stacklevel=2)
    return RelevantFeatures(model, index, selector, tuple(range(selector.coef_.shape[0])), tuple(model.input_shape),
                            label)
