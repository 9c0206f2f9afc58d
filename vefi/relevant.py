"""The paper's method on any model and data: relevant features by mu-Lasso, then explanations and
interpretations from them (Sec. 3).

:func:`select_features` streams the descriptors of a model's internal responses (:mod:`vefi.descriptors`)
over a dataset batch by batch into the mu-Lasso's statistics (:mod:`vefi.statistics`), fits
:class:`vefi.selection.RelevantFeatureSelector` on them and returns a :class:`RelevantFeatures`: the model,
what each descriptor column is, the fitted selector, and the classes its weights stand for. That object is
what :func:`vefi.explain.explain` and :func:`vefi.interpret.average_images` take::

    import vefi
    relevant = vefi.select_features(model, loader, mu=10, classes=[3, 5])   # fit on a DataLoader
    explanation = relevant.explain(images)                                  # a batch, its top-3 features
    explanation.plot(0)                                                     # image, heatmap, feature maps
    averages = relevant.average_images(dataset, relevant.per_class[3][:3])  # what those features respond to

The vocabulary is the library's (see the API reference): a *target* is a class, i.e. an output unit of the
model (None: the predicted one); a *layer* is a module name, a module or a :class:`vefi.layers.Layer`; a
*feature* is a :class:`vefi.descriptors.Feature` (layer and channel); a *heatmap* is an (n, H, W) tensor.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from torch import nn

from vefi.descriptors import Feature, FeatureIndex
from vefi.selection import RelevantFeatureSelector

__all__ = ["RelevantFeatures", "model_fingerprint", "select_features"]


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of a model's parameters and buffers (names, shapes and values)."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True, eq=False)
class RelevantFeatures:
    """The features mu-Lasso selected for one model: what :func:`select_features` returns.

    Attributes
    ----------
    model : torch.nn.Module
        The model the descriptors came from.
    index : FeatureIndex
        What each descriptor column (and each column of ``selector.coef_``) is.
    selector : RelevantFeatureSelector
        Fitted; ``selector.coef_`` is (len(classes), m).
    classes : tuple of int
        The class (the model's output unit) of each row of ``selector.coef_``: every output ``0..C-1``, or the
        classes of interest it was fitted for.
    input_shape : tuple of int
        Shape of one image, ``(C, H, W)``.
    name : str
        What it was fitted on, for display.
    """

    model: nn.Module
    index: FeatureIndex
    selector: RelevantFeatureSelector
    classes: tuple[int, ...]
    input_shape: tuple[int, ...]
    name: str = ""

    def __post_init__(self):
        coef = getattr(self.selector, "coef_", None)
        if coef is None:
            raise TypeError("selector is not fitted (it has no coef_): fit it, or use vefi.select_features")
        if coef.shape != (len(self.classes), len(self.index)):
            raise ValueError(f"the selector's weights have shape {coef.shape} but there are {len(self.classes)} "
                             f"classes and {len(self.index)} features")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be distinct, got {list(self.classes)}")

    @property
    def mu(self) -> float:
        """The L1 budget per class the selector was fitted with."""
        return float(self.selector.mu)

    @property
    def features(self) -> list[Feature]:
        """Features relevant to any class, in column order."""
        return self.selector.selected_features(self.index)

    @property
    def per_class(self) -> dict[int, list[Feature]]:
        """For each class (the model's output unit), its relevant features, strongest weight first."""
        rows = self.selector.features_per_class(self.index)
        return {self.classes[row]: features for row, features in rows.items()}

    def row(self, target) -> np.ndarray:
        """Rows of ``selector.coef_`` for the classes ``target`` (an int or a sequence of them).

        Raises ValueError naming the classes it was fitted for when a class is not one of them.
        """
        position = {c: r for r, c in enumerate(self.classes)}
        targets = np.atleast_1d(np.asarray(target, dtype=np.int64))
        missing = sorted({int(t) for t in targets if int(t) not in position})
        if missing:
            raise ValueError(f"class(es) {missing} have no relevant features: these were selected for classes "
                             f"{list(self.classes)}; pass target= one of them")
        return np.array([position[int(t)] for t in targets], dtype=np.int64)

    def explain(self, images, **options):
        """:func:`vefi.explain.explain` of ``images`` by these features (``target``, ``k``, ``stride_fix``,
        ``maps``, ``score`` as there)."""
        from vefi.explain import explain

        return explain(self.model, images, self, **options)

    def average_images(self, data, features=None, **options):
        """:func:`vefi.interpret.average_images` of ``features`` (default: every relevant feature) over
        ``data`` (``top``, ``batch_size``, ``show_progress`` as there)."""
        from vefi.interpret import average_images

        return average_images(self.model, data, self.features if features is None else features,
                              input_shape=self.input_shape, **options)

    def __repr__(self) -> str:
        what = f"{self.name!r}, " if self.name else ""
        return (f"RelevantFeatures({what}mu={self.mu:g}, {len(self.classes)} classes: "
                f"{len(self.features)} of {len(self.index)} features)")


def select_features(model: nn.Module, data, mu: float = 10.0, *, labels=None, classes=None, layers=None,
                    batch_size: int = 128, input_shape: tuple[int, ...] | None = None, show_progress: bool = True,
                    name: str = "", **fit_options) -> RelevantFeatures:
    """The paper's relevant features of ``model`` on ``data``: descriptors streamed into mu-Lasso (Sec. 3.1).

    Parameters
    ----------
    model : torch.nn.Module
        A classifier whose forward returns the class scores (logits) of a batch of images. Left exactly as
        it came.
    data : DataLoader, Dataset, Tensor or iterable of (images, labels) batches
        The images to select on (usually the training set) with their labels: a Dataset or DataLoader of
        ``(image, label)`` pairs, or an image tensor (N, C, H, W) with ``labels=``. Streamed in batches.
    mu : float
        L1 budget per class (the paper: 10).
    labels : array-like of int, optional
        The labels, when ``data`` is a tensor of images.
    classes : sequence of int, optional
        Select for these classes (output units) only, e.g. five classes of interest of a 1000-class network;
        the data must then hold only images of these classes. Default: every output of the model.
    layers : sequence of str, module or Layer, optional
        The layers whose responses make the descriptor; default :func:`vefi.descriptors.default_layers`
        (every layer before the classifier).
    batch_size : int
        Images per forward pass when ``data`` is a tensor or a Dataset.
    input_shape : tuple of int, optional
        Shape of one image; default from the data.
    show_progress : bool
    name : str
        A label for display.
    **fit_options
        Passed to :func:`vefi.statistics.fit_relevant` (e.g. ``tol``, ``max_iter``, ``max_memory``,
        ``working_set``).

    Returns
    -------
    RelevantFeatures

    Warns
    -----
    vefi.lasso.ConvergenceWarning
        When the solver could not certify the selection (``selector.converged_`` is False).

    Examples
    --------
    >>> import torch, vefi
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    ...                       nn.Linear(8, 3))
    >>> images, labels = torch.rand(60, 1, 12, 12), torch.arange(60) % 3
    >>> relevant = vefi.select_features(model, images, mu=1.0, labels=labels, show_progress=False)
    >>> relevant.classes, relevant.input_shape
    ((0, 1, 2), (1, 12, 12))
    >>> explanation = relevant.explain(images[:2], k=2)
    >>> tuple(explanation.heatmap.shape)
    (2, 12, 12)
    """
    from vefi.statistics import fit_relevant, peek_image_shape

    if input_shape is None:
        input_shape = getattr(model, "input_shape", None)
    if input_shape is None:
        input_shape, data = peek_image_shape(data)
        if input_shape is None:
            raise ValueError("cannot tell the image shape from the data: pass input_shape=, e.g. (3, 224, 224)")
    selector, index = fit_relevant(model, data, mu, labels=labels, classes=classes, layers=layers,
                                   batch_size=batch_size, input_shape=input_shape, show_progress=show_progress,
                                   **fit_options)
    fitted_classes = range(selector.coef_.shape[0]) if classes is None else classes
    return RelevantFeatures(model, index, selector, tuple(int(c) for c in fitted_classes),
                            tuple(int(s) for s in input_shape), str(name))
