"""vefi.plotting.offline_explorer: every state rendered once, HTML that needs nothing from outside, ids that
never collide, a failing state named at build time, and a cap on the number of states."""

import base64
import io
import json
import re
from collections import Counter

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from vefi.plotting import OfflineExplorer, offline_explorer


def square(n, colour):
    """A figure whose pixels depend on both controls."""
    fig, ax = plt.subplots(figsize=(1, 1))
    ax.imshow(np.full((4, 4, 3), {"red": (1.0, 0, 0), "blue": (0, 0, 1.0)}[colour]) * n / 3)
    ax.axis("off")
    return fig


CONTROLS = {"n": [1, 2, 3], "colour": ["red", "blue"]}


@pytest.fixture(autouse=True)
def no_figure_left():
    plt.close("all")
    yield
    assert plt.get_fignums() == [], "the explorer left figures open"


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_every_state_is_rendered_once_and_closed():
    calls = []

    def recorded(**state):
        calls.append(tuple(sorted(state.items())))
        return square(**state)

    ex = offline_explorer(recorded, CONTROLS, dpi=20)
    assert isinstance(ex, OfflineExplorer) and len(ex) == 6
    assert Counter(calls) == Counter(tuple(sorted({"n": n, "colour": c}.items()))
                                     for n in CONTROLS["n"] for c in CONTROLS["colour"])
    assert max(Counter(calls).values()) == 1
    assert ex.nbytes == sum(len(ex.png(n=n, colour=c)) for n in (1, 2, 3) for c in ("red", "blue"))
    assert ex.seconds >= 0


def test_states_differ_where_the_render_differs():
    ex = offline_explorer(square, CONTROLS, dpi=20)
    assert not np.array_equal(pixels(ex.png(n=3, colour="red")), pixels(ex.png(n=3, colour="blue")))
    assert not np.array_equal(pixels(ex.png(n=1, colour="red")), pixels(ex.png(n=3, colour="red")))
    red = pixels(ex.png(n=3, colour="red")).reshape(-1, 3).astype(int)
    assert (red[:, 0] - red[:, 2]).max() > 200, "the red state is not red"


def test_html_is_self_contained_and_lists_the_values():
    ex = offline_explorer(square, CONTROLS, initial={"n": 2}, dpi=20, alt="A square")
    page = ex._repr_html_()
    assert not re.search(r"https?://|//cdn|<link|\bsrc=\"(?!data:)", page), "the HTML loads something"
    assert page.count("<script") == 2 and "<script src" not in page
    # one slider for the numbers, one list for the names, with every value
    assert page.count('type="range"') == 1 and page.count("<select") == 1
    assert all(f">{c}</option>" in page for c in CONTROLS["colour"])
    assert 'max="2"' in page and 'value="1"' in page  # the slider's three positions, at n=2
    # the image shown first is the initial state's, with an alt text naming it
    shown = re.search(r'<img id="[^"]+" src="data:image/png;base64,([^"]+)" alt="([^"]+)"', page)
    assert base64.b64decode(shown.group(1)) == ex.png(n=2, colour="red")
    assert shown.group(2) == "A square (n: 2, colour: red)"
    states = json.loads(re.search(r'<script type="application/json"[^>]*>(.*?)</script>', page).group(1))
    assert states["labels"] == [["1", "2", "3"], ["red", "blue"]] and len(states["images"]) == 6


def test_ids_are_unique_across_two_explorers_on_one_page():
    first = offline_explorer(square, CONTROLS, dpi=20)
    second = offline_explorer(square, CONTROLS, dpi=20)
    page = first._repr_html_() + second._repr_html_() + first._repr_html_()
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids)) and len(ids) == 3 * 6  # root, two controls, the slider's value, image, states
    # each script reaches only its own elements
    scripts = re.findall(r"<script>(.*?)</script>", page, re.S)
    roots = re.findall(r'class="vefi-offline-explorer" id="([^"]+)"', page)
    assert all(root in script and all(other not in script for other in roots if other != root)
               for root, script in zip(roots, scripts))


def test_a_failing_state_is_an_error_that_names_it():
    def broken(n, colour):
        if (n, colour) == (2, "blue"):
            plt.figure()  # opened before failing: closed all the same
            raise ValueError("no such square")
        return square(n, colour)

    with pytest.raises(RuntimeError, match=r"state \{'n': 2, 'colour': 'blue'\} failed: ValueError: no such"):
        offline_explorer(broken, CONTROLS, dpi=20)
    with pytest.raises(RuntimeError, match=r"'n': 1.*not a matplotlib Figure"):
        offline_explorer(lambda n, colour: None, CONTROLS)


def test_the_cap_and_bad_controls():
    with pytest.raises(ValueError, match=r"6 states \(3 n x 2 colour\) are more than max_states=5: use fewer"):
        offline_explorer(square, CONTROLS, max_states=5)
    with pytest.raises(ValueError, match="no control"):
        offline_explorer(square, {})
    with pytest.raises(ValueError, match="'n' has no value"):
        offline_explorer(square, {"n": [], "colour": ["red"]})
    with pytest.raises(ValueError, match="same label"):
        offline_explorer(square, {"n": [1, "1"], "colour": ["red"]})
    with pytest.raises(ValueError, match="initial value 7"):
        offline_explorer(square, CONTROLS, initial={"n": 7})
    with pytest.raises(ValueError, match="unknown controls"):
        offline_explorer(square, CONTROLS, initial={"size": 1})


def test_floats_show_without_trailing_zeros():
    ex = offline_explorer(lambda mu: square(1, "red"), {"mu": [1.0, 2.5, 10.0]}, dpi=20)
    assert ">1</output>" in ex._repr_html_()
    states = json.loads(re.search(r'<script type="application/json"[^>]*>(.*?)</script>',
                                  ex._repr_html_()).group(1))
    assert states["labels"] == [["1", "2.5", "10"]]
