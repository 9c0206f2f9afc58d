"""An interactive explorer of explanations: choose the network, the image, the class, k and mu, and look.

:func:`explanation_view` draws one state (what the static book shows); :func:`explorer` wraps it in
ipywidgets controls that redraw on every change. Models, relevant features and test sets are loaded once
and kept for the session.
"""

from __future__ import annotations

from functools import lru_cache

import matplotlib.pyplot as plt

from vefi.data import load_dataset
from vefi.explain import explain
from vefi.relevant import DEFAULT_MU, relevant_features
from vefi.train import pretrained

__all__ = ["DATASETS", "MUS", "explanation_view", "explorer"]

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
    fig = e.plot(0, size=2.0)
    true = data.classes[int(data.labels[int(index)])]
    fig.suptitle(f"{dataset}, test image {index} (true class: {true}); mu = {mu:g}: {len(rel.features)} "
                 f"relevant features; {e.method}", fontsize=9)
    fig.tight_layout()
    return fig


def explorer(dataset: str = "mnist", index: int = 0, k: int = 3, mu: float = DEFAULT_MU):
    """ipywidgets controls for :func:`explanation_view`; returns the widget box (display it in a notebook).

    Examples
    --------
    >>> explorer()  # doctest: +SKIP
    """
    import ipywidgets as widgets
    from IPython.display import display

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
        out.clear_output(wait=True)
        with out:
            try:
                fig = explanation_view(w_dataset.value, w_index.value,
                                       None if w_class.value == -1 else w_class.value, w_k.value, w_mu.value)
                display(fig)
                plt.close(fig)
            except ValueError as error:
                print(error)

    def dataset_changed(change):
        w_index.max = len(_test_set(change["new"])) - 1
        w_class.unobserve(redraw, "value")
        w_class.options, w_class.value = class_options(change["new"]), -1
        w_class.observe(redraw, "value")
        redraw()

    w_dataset.observe(dataset_changed, "value")
    for w in (w_index, w_class, w_k, w_mu):
        w.observe(redraw, "value")
    redraw()
    return widgets.VBox([widgets.HBox([w_dataset, w_index, w_class]), widgets.HBox([w_k, w_mu]), out])
