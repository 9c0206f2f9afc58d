"""The relevant features of the book's trained networks: descriptors of the training set, mu-Lasso, cached.

Every chapter after the third needs the same thing: "the features mu-Lasso selects for network X at mu".
:func:`relevant_features` computes the descriptor statistics of the training set once per trained model
(only the Gram pair of :class:`vefi.lasso.GramAccumulator`, cached on disk under a hash of the weights),
and fits :class:`vefi.selection.RelevantFeatureSelector` on them, for every layer before the classifier
("All") or for the convolutional part only ("OnlyConv", Fig. 4 of the paper).
"""

from __future__ import annotations

import math
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

__all__ = ["DEFAULT_MU", "conv_part", "relevant_features", "training_gram"]

DEFAULT_MU = 10.0
"""The paper's budget (Sec. 4.1: mu=10 for MNIST and ImageNet); the book uses it for every network."""


def training_gram(name: str, model: nn.Module | None = None, *, network: int = 0, architecture: str | None = None,
                  squared: bool = False) -> tuple[GramAccumulator, FeatureIndex]:
    """The Gram pair of the default descriptors (every layer before the classifier) of the training set of
    ``name`` under ``model`` (default: the book's trained network of seed ``network`` and ``architecture``),
    cached on disk under the weights, the data, the descriptor and the code that computes it. ``squared``:
    the demo's squared L2 norms instead of the paper's L2 norms (:func:`vefi.descriptors.descriptors`)."""
    model = pretrained(name, network, architecture=architecture) if model is None else model
    data = load_dataset(name, "train")
    index = FeatureIndex.from_layers(default_layers(model))
    key = f"{model_fingerprint(model)}-{code_hash('vefi.descriptors', 'vefi.lasso', 'vefi.statistics')}"
    path = data_dir() / "descriptors" / f"{name}-gram-{key}-n{len(data)}{'-squared' if squared else ''}.npz"
    stored = load_arrays(path)
    gram = GramAccumulator()
    if stored is None:
        # streamed: the descriptors of each batch go into the Gram pair; the (N, m) matrix never exists
        gram, index = gram_statistics(model, data, index.layers, classes=range(len(data.classes)),
                                      batch_size=250, squared=bool(squared))
        save_arrays(path, Q=gram.Q, q=gram.q, lsq=gram.lsq, n=np.array(gram.n_samples))
    else:
        gram.Q, gram.q, gram.lsq, gram.n_samples = stored["Q"], stored["q"], stored["lsq"], int(stored["n"])
    return gram, index


def conv_part(model: nn.Module) -> list:
    """The layers of the paper's "OnlyConv" selection (Fig. 4): the default layers before the first fully
    connected one (:func:`vefi.descriptors.default_layers` with ``only_conv=True``), and before the first layer
    whose output is a single position. The second condition matters for MatConvNet's nets, which write their
    fully connected layers as convolutions (the 4x4 ``conv3`` of the authors' kind of MNIST network, whose
    kernel covers its whole input); for the book's own nets it changes nothing.

    Examples
    --------
    >>> from vefi.book.models import build_model
    >>> [layer.name for layer in conv_part(build_model("mnist", "matconvnet-mnist"))]
    ['conv1', 'pool1', 'conv2', 'pool2']
    """
    layers = default_layers(model, only_conv=True)
    single = next((i for i, layer in enumerate(layers) if math.prod(layer.output_shape[1:]) == 1), len(layers))
    return layers[:single]


def _sub_gram(gram: GramAccumulator, columns: np.ndarray) -> GramAccumulator:
    sub = GramAccumulator()
    sub.Q = gram.Q[np.ix_(columns, columns)].copy()
    sub.q = gram.q[columns].copy()
    sub.lsq = gram.lsq.copy()
    sub.n_samples = gram.n_samples
    return sub


def relevant_features(name: str, mu: float = DEFAULT_MU, *, only_conv: bool = False,
                      model: nn.Module | None = None, network: int = 0, architecture: str | None = None,
                      squared: bool = False) -> RelevantFeatures:
    """The features mu-Lasso selects for the book's network of dataset ``name`` (a
    :class:`vefi.relevant.RelevantFeatures`, as :func:`vefi.select_features` returns for any model).

    Parameters
    ----------
    name : str
        A dataset of :data:`vefi.book.data.DATASETS`.
    mu : float
        L1 budget per class.
    only_conv : bool
        Select among the convolutional part only (the paper's "OnlyConv", :func:`conv_part`).
    model : torch.nn.Module, optional
        A network trained on ``name``; default the book's (:func:`vefi.book.train.pretrained`).
    network : int
        Without ``model``: the seed of the book's trained network (see :data:`vefi.book.train.NETWORK_SEEDS`).
    architecture : str, optional
        Without ``model``: another architecture of :data:`vefi.book.models.ARCHITECTURES` (default the book's
        own net for the dataset).
    squared : bool
        The authors' demo's descriptor: squared L2 norms per channel (default: the paper's L2 norms).

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
    part = "OnlyConv" if only_conv else "All"
    label = ", ".join([name] + ([architecture] if model is None and architecture else []) + [part]
                      + (["squared"] if squared else [])
                      + ([f"network {network}"] if model is None and network else []))
    model = pretrained(name, network, architecture=architecture) if model is None else model
    gram, index = training_gram(name, model, squared=squared)
    if only_conv:
        conv_layers = conv_part(model)
        gram = _sub_gram(gram, index.columns(conv_layers))
        index = FeatureIndex.from_layers(conv_layers)
    with warnings.catch_warnings():  # warned once, below, with the network's name
        warnings.simplefilter("ignore", ConvergenceWarning)
        selector = RelevantFeatureSelector(mu=mu).fit(gram)
    if not selector.converged_:
        # The book keeps warnings visible: a selection that is not certified must not pass for one.
        warnings.warn(f"the relevant features of {label} at mu={float(mu):g} are not certified optimal: "
                      f"{selector.message_}", ConvergenceWarning, stacklevel=2)
    return RelevantFeatures(model, index, selector, tuple(range(selector.coef_.shape[0])), tuple(model.input_shape),
                            label)
