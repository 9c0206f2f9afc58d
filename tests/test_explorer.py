"""The explorer: its static view and its widget (quick-mode models)."""

import matplotlib.pyplot as plt
import pytest

import vefi.explorer as explorer_module
from vefi.explorer import explanation_view, explorer


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    """The quick-mode models: trained in minutes if missing, unlike the book's."""
    monkeypatch.setenv("VEFI_QUICK", "1")
    yield
    # the explorer keeps what it loaded for the session: forget the quick-mode models
    for cache in (explorer_module._model, explorer_module._relevant, explorer_module._test_set):
        cache.cache_clear()


def test_view_and_widget():
    fig = explanation_view("mnist", 3, target=2, k=2, mu=10.0)
    assert "test image 3" in fig._suptitle.get_text() and len(fig.axes) == 4
    plt.close(fig)
    box = explorer("mnist", 0)
    network, index, target = box.children[0].children
    assert network.value == "mnist" and target.value == -1
    index.value = 1  # redraws without error
    k = box.children[1].children[0]
    k.value = 1
    plt.close("all")


def test_bad_input():
    with pytest.raises(ValueError, match="dataset must be one of"):
        explanation_view("cifar")
    with pytest.raises(ValueError, match="out of range"):
        explanation_view("mnist", 10 ** 7)
