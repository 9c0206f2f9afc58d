"""An interactive explorer of explanations: choose the network, the image, the class, k and mu, and look.

:func:`explanation_view` draws one state; :func:`explorer` wraps it in ipywidgets controls that redraw on
every change (with a kernel); :func:`precomputed_explorer` renders it over a finite grid of states once, as
an :class:`vefi.plotting.OfflineExplorer` whose controls work in the static page. Models, relevant features
and test sets are loaded once and kept for the session.

A redraw that fails is never hidden: its traceback replaces the figure in the widget, and the exception
goes on to the caller (the notebook cell that builds the explorer, or the change of a control).
"""

from __future__ import annotations

import base64
import io
import traceback
from functools import lru_cache

import matplotlib.pyplot as plt
import torch

from vefi.book.data import load_dataset
from vefi.book.relevant import DEFAULT_MU, relevant_features
from vefi.book.train import pretrained
from vefi.explain import explain
from vefi.plotting import OfflineExplorer, offline_explorer

__all__ = ["DATASETS", "MUS", "explanation_view", "explorer", "precomputed_explorer"]

DATASETS = ("mnist", "fashion-mnist", "an8flower-single", "an8flower-double")
MUS = (1.0, 2.0, 5.0, 10.0, 20.0)


@lru_cache(maxsize=None)
def _model(name):
    return pretrained(name)


@lru_cache(maxsize=None)
def _relevant(name, mu):
    return relevant_features(name, mu, model=_model(name))


@lru_cache(maxsize=None)
def _test_set(name):
    return load_dataset(name, "test")


def explanation_view(dataset: str = "mnist", index: int = 0, target: int | None = None, k: int = 3,
                     mu: float = DEFAULT_MU):
    """The explanation of test image ``index`` of ``dataset`` for class ``target`` (None: the predicted one)
    with ``k`` features selected at ``mu``, as a figure.

    Raises
    ------
    ValueError
        Unknown dataset, image index out of range, or any bad argument of :func:`vefi.explain.explain`.

    Examples
    --------
    >>> fig = explanation_view("mnist", 0)  # doctest: +SKIP
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    data = _test_set(dataset)
    if not 0 <= int(index) < len(data):
        raise ValueError(f"image index {index} out of range: the {dataset} test set has {len(data)} images")
    model, rel = _model(dataset), _relevant(dataset, float(mu))
    e = explain(model, data.batch([int(index)]), rel, target=target, k=int(k))
    # panels of 1.5 in, so that the titles' 8 pt stay legible at the page's resolution; the constrained layout
    # keeps the two-line titles of the features clear of the figure's title
    fig = e.plot(0, size=1.5)
    fig.set_layout_engine("constrained")
    true = data.classes[int(data.labels[int(index)])]
    fig.suptitle(f"{dataset}, test image {index} (true class: {true}); mu = {mu:g}: {len(rel.features)} "
                 f"relevant features; {e.method}", fontsize=9)
    return fig


def explorer(dataset: str = "mnist", index: int = 0, k: int = 3, mu: float = DEFAULT_MU):
    """ipywidgets controls for :func:`explanation_view`; returns the widget box (display it in a notebook).

    Examples
    --------
    >>> explorer()  # doctest: +SKIP
    """
    import ipywidgets as widgets

    style = {"description_width": "70px"}
    w_dataset = widgets.Dropdown(options=DATASETS, value=dataset, description="network", style=style)
    w_index = widgets.BoundedIntText(value=index, min=0, max=len(_test_set(dataset)) - 1, description="image",
                                     style=style)
    w_class = widgets.Dropdown(description="class", style=style)
    w_k = widgets.IntSlider(value=k, min=1, max=8, description="k", style=style)
    w_mu = widgets.SelectionSlider(options=list(MUS), value=float(mu), description="mu", style=style)
    out = widgets.Output()

    def class_options(name):
        return [("predicted", -1)] + [(c, i) for i, c in enumerate(_test_set(name).classes)]

    w_class.options, w_class.value = class_options(dataset), -1

    def redraw(*_):
        # the figure goes into the Output widget's outputs directly (not `with out: display(fig)`): that works
        # with or without a kernel, where an error inside `with out:` would be swallowed by the widget
        fig = None
        try:
            fig = explanation_view(w_dataset.value, w_index.value,
                                   None if w_class.value == -1 else w_class.value, w_k.value, w_mu.value)
            out.outputs = (figure_output(fig),)
        except Exception as error:
            # the controls offer only valid choices: any error is a failure, shown in the page and raised
            out.outputs = ({"output_type": "error", "ename": type(error).__name__, "evalue": str(error),
                            "traceback": traceback.format_exception(error)},)
            raise
        finally:
            if fig is not None:
                plt.close(fig)

    def dataset_changed(change):
        # no redraw while the image and class controls change: halfway they describe no valid state (a class
        # or image index of the old dataset that the new one lacks)
        for w in (w_index, w_class):
            w.unobserve(redraw, "value")
        try:
            w_index.max = len(_test_set(change["new"])) - 1
            w_class.options, w_class.value = class_options(change["new"]), -1
        finally:
            for w in (w_index, w_class):
                w.observe(redraw, "value")
        redraw()

    w_dataset.observe(dataset_changed, "value")
    for w in (w_index, w_class, w_k, w_mu):
        w.observe(redraw, "value")
    redraw()
    return widgets.VBox([widgets.HBox([w_dataset, w_index, w_class]), widgets.HBox([w_k, w_mu]), out])


def precomputed_explorer(dataset: str = "mnist", images=(0, 1, 2, 3), targets=("predicted", "runner-up"),
                         ks=(1, 3, 5), mus=MUS, *, dpi: float | None = None) -> OfflineExplorer:
    """:func:`explanation_view` of one network over every combination of test image, class explained, k and
    mu, rendered once: an explorer whose controls work in a static page, with no kernel.

    Parameters
    ----------
    dataset : str
        The network (one of :data:`DATASETS`): one per explorer, to keep the page light.
    images : sequence of int
        Test image indices.
    targets : sequence
        The classes explained: ``"predicted"``, ``"runner-up"`` (the class the network ranks second for
        that image), or a class index.
    ks, mus : sequence
        Numbers of features shown and budgets mu (each mu's selection is fitted, or read from the cache).
    dpi : float, optional
        Resolution of each state's PNG; default the page's (matplotlib's ``figure.dpi``), as legible as the
        page's other figures. The page carries ``len(images) * len(targets) * len(ks) * len(mus)`` of them
        (see the result's ``nbytes``).

    Raises
    ------
    ValueError
        Unknown dataset, a target that is none of the above, or a grid of more states than
        :func:`vefi.plotting.offline_explorer` allows.
    RuntimeError
        A state whose drawing failed (named in the message).

    Examples
    --------
    >>> ex = precomputed_explorer("mnist", images=[0], ks=[3])  # doctest: +SKIP
    >>> len(ex), list(ex.controls)  # doctest: +SKIP
    (10, ['image', 'class', 'k', 'mu'])
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    data = _test_set(dataset)
    for target in targets:
        if target not in ("predicted", "runner-up") and not (isinstance(target, int)
                                                             and 0 <= target < len(data.classes)):
            raise ValueError(f"a target is 'predicted', 'runner-up' or a class index below "
                             f"{len(data.classes)}, got {target!r}")
    runner_up = {}

    def class_of(index, target):
        if target == "predicted":
            return None
        if target == "runner-up":
            if index not in runner_up:
                with torch.no_grad():
                    scores = _model(dataset)(data.batch([int(index)]))
                runner_up[index] = int(scores.topk(2, dim=1).indices[0, 1])
            return runner_up[index]
        return target

    def render(**state):
        return explanation_view(dataset, state["image"], class_of(state["image"], state["class"]),
                                state["k"], state["mu"])

    initial = {"k": 3 if 3 in ks else ks[0], "mu": DEFAULT_MU if DEFAULT_MU in mus else mus[0]}
    return offline_explorer(render, {"image": list(images), "class": list(targets), "k": list(ks),
                                     "mu": [float(mu) for mu in mus]},
                            initial=initial, dpi=dpi, desc=f"explanations of {dataset}",
                            alt=f"Explanation of a {dataset} test image by its most relevant features")


def figure_output(fig) -> dict:
    """``fig`` as a Jupyter display_data output (PNG, its title as the text form), for an Output widget."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return {"output_type": "display_data", "metadata": {},
            "data": {"image/png": base64.b64encode(buffer.getvalue()).decode("ascii"),
                     "text/plain": fig.get_suptitle()}}
