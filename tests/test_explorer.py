"""The explorer: its static view and its widget (quick-mode models); every redraw is seen, and a failing one
is shown in the widget and raised."""

import base64
import io

import matplotlib.pyplot as plt
import pytest
from PIL import Image

import vefi.book.explorer as explorer_module
from vefi.book.explorer import explanation_view, explorer


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    """The quick-mode models: trained in minutes if missing, unlike the book's."""
    monkeypatch.setenv("VEFI_QUICK", "1")
    yield
    # the explorer keeps what it loaded for the session: forget the quick-mode models
    for cache in (explorer_module._model, explorer_module._relevant, explorer_module._test_set):
        cache.cache_clear()
    plt.close("all")


def controls(box):
    """The explorer's widgets by name."""
    (network, index, target), (k, mu) = box.children[0].children, box.children[1].children
    return {"network": network, "index": index, "target": target, "k": k, "mu": mu, "out": box.children[2]}


def figure_shown(out):
    """The one figure the Output widget shows, as (title, PIL image); fails when it shows anything else."""
    assert len(out.outputs) == 1, out.outputs
    (shown,) = out.outputs
    assert shown["output_type"] == "display_data", shown.get("traceback", shown)
    image = Image.open(io.BytesIO(base64.b64decode(shown["data"]["image/png"])))
    image.load()
    return shown["data"]["text/plain"], image


def test_view():
    fig = explanation_view("mnist", 3, target=2, k=2, mu=10.0)
    assert "test image 3" in fig.get_suptitle() and len(fig.axes) == 4


def test_widget_redraws_on_every_change():
    w = controls(explorer("mnist", 0, k=3))
    assert w["network"].value == "mnist" and w["target"].value == -1
    title, first = figure_shown(w["out"])
    assert title.startswith("mnist, test image 0 ")
    # before each change the widget is emptied: what it shows afterwards is that change's redraw
    for control, value in (("index", 1), ("k", 1), ("target", 8), ("mu", 5.0)):
        w["out"].outputs = ()
        w[control].value = value
        title, image = figure_shown(w["out"])
        assert title.startswith("mnist, test image 1 "), (control, title)
    assert "mu = 5:" in title
    assert image.tobytes() != first.tobytes()


def test_changing_the_network_redraws_once_in_a_valid_state(monkeypatch):
    """The image index and class follow the new dataset before the one redraw (quick mode: 1000 Fashion-MNIST
    test images, fewer than the 5000th chosen on MNIST); the drawing itself is recorded, not computed."""
    w = controls(explorer("mnist", 0))
    w["index"].value = 5000
    w["target"].value = 8
    calls = []

    def recorded(*args):
        calls.append(args)
        fig = plt.figure(figsize=(1, 1))
        fig.suptitle(f"{args[0]}, test image {args[1]}")
        return fig

    monkeypatch.setattr(explorer_module, "explanation_view", recorded)
    w["network"].value = "fashion-mnist"
    index = w["index"].max
    assert index < 5000 and w["index"].value == index and w["target"].value == -1
    assert calls == [("fashion-mnist", index, None, 3, 10.0)]
    title, _ = figure_shown(w["out"])
    assert title == f"fashion-mnist, test image {index}"


def test_failing_redraw_is_shown_and_raised(monkeypatch):
    w = controls(explorer("mnist", 0))

    def broken(*args, **kwargs):
        raise RuntimeError("the drawing broke")

    monkeypatch.setattr(explorer_module, "explanation_view", broken)
    with pytest.raises(RuntimeError, match="the drawing broke"):
        w["k"].value = 2
    (shown,) = w["out"].outputs
    assert shown["output_type"] == "error" and shown["ename"] == "RuntimeError"
    assert "the drawing broke" in "".join(shown["traceback"])
    # the first drawing too: a notebook cell that builds a broken explorer fails
    with pytest.raises(RuntimeError, match="the drawing broke"):
        explorer("mnist", 0)


def test_bad_input():
    with pytest.raises(ValueError, match="dataset must be one of"):
        explanation_view("cifar")
    with pytest.raises(ValueError, match="out of range"):
        explanation_view("mnist", 10 ** 7)


def test_precomputed_explorer_draws_every_state_of_its_grid(monkeypatch):
    """One explanation_view per state, the runner-up being the network's second class for that image; the
    states differ where the explanations do."""
    import torch

    calls = []
    real = explorer_module.explanation_view

    def recorded(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(explorer_module, "explanation_view", recorded)
    ex = explorer_module.precomputed_explorer("mnist", images=[0], ks=[1, 3], mus=[5.0, 10.0], dpi=30)
    assert list(ex.controls) == ["image", "class", "k", "mu"] and len(ex) == len(calls) == 8
    assert ex.initial == {"image": 0, "class": "predicted", "k": 3, "mu": 10.0}
    with torch.no_grad():
        second = int(explorer_module._model("mnist")(explorer_module._test_set("mnist").batch([0]))
                     .topk(2, dim=1).indices[0, 1])
    assert {c[2] for c in calls} == {None, second}
    assert sorted(calls, key=str) == sorted([("mnist", 0, t, k, mu) for t in (None, second) for k in (1, 3)
                                             for mu in (5.0, 10.0)], key=str)
    assert ex.png(k=1) != ex.png(k=3) and ex.png(**{"class": "runner-up"}) != ex.png()
    assert "https://" not in ex._repr_html_()


def test_precomputed_explorer_bad_input():
    with pytest.raises(ValueError, match="dataset must be one of"):
        explorer_module.precomputed_explorer("cifar")
    with pytest.raises(ValueError, match="a target is 'predicted', 'runner-up' or a class index"):
        explorer_module.precomputed_explorer("mnist", targets=["second"])
