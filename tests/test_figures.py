"""The book's figures are legible in its column: no text under 8 pt, no figure wider than 12 inches, none
saved below the page's 100 dpi (8 pt is 11 px at 100 dpi, 6.7 px at 60).

Checked in the sources (the notebooks' code and the library's plotting code), where a size is written; what
a size computed at run time gives is checked on the built page (tests/browser: a figure shown below 0.75 of
its natural width fails there).
"""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MIN_POINTS = 8
MAX_INCHES = 12
# matplotlib's named sizes, as multiples of the default 10 pt
_NAMED = {"xx-small": 0.579, "x-small": 0.694, "small": 0.833, "medium": 1.0, "large": 1.2, "x-large": 1.44,
          "xx-large": 1.728, "larger": 1.2, "smaller": 0.833}
_SIZE = re.compile(r"""\b(?:fontsize|labelsize|titlesize)\s*[=:]\s*(?:(\d+(?:\.\d+)?)\b|["']([a-z-]+)["'])""")
_PROP_SIZE = re.compile(r"""["']size["']\s*:\s*(\d+(?:\.\d+)?)""")
_FIGSIZE = re.compile(r"figsize\s*=\s*\(\s*(\d+(?:\.\d+)?)\s*,")
# a resolution written as a number (`dpi=60`, `"dpi": 60`, a default `dpi: float = 60`); doctests may draw small
_DPI = re.compile(r"""\bdpi["']?\s*(?::\s*[\w |]+?)?[=:]\s*(\d+(?:\.\d+)?)""")
PAGE_DPI = 100


def _sources():
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        for i, cell in enumerate(cells):
            if cell["cell_type"] == "code":
                yield f"{path.name}[{i}]", "".join(cell["source"])
    for path in sorted((ROOT / "vefi").rglob("*.py")):
        text = path.read_text()
        if "matplotlib" in text:  # the modules that draw
            yield str(path.relative_to(ROOT)), text


def _points(number, name):
    return float(number) if number else 10 * _NAMED.get(name, 1.0)


def _text_sizes(text):
    for match in _SIZE.finditer(text):
        line = text[:match.start()].count("\n") + 1
        if match.group(2) and match.group(2) not in _NAMED:
            continue  # not a size matplotlib knows: its own error says so
        yield line, match.group(0), _points(match.group(1), match.group(2))
    for match in _PROP_SIZE.finditer(text):
        yield text[:match.start()].count("\n") + 1, match.group(0), float(match.group(1))


def test_no_text_under_8_points():
    small = [f"{where}, line {line}: {found}" for where, text in _sources()
             for line, found, points in _text_sizes(text) if points < MIN_POINTS]
    assert not small, f"text under {MIN_POINTS} pt, illegible once the figure is in the column: {small}"


def test_no_figure_wider_than_12_inches():
    wide = [f"{where}: {m.group(0)}" for where, text in _sources() for m in _FIGSIZE.finditer(text)
            if float(m.group(1)) > MAX_INCHES]
    assert not wide, f"figures wider than {MAX_INCHES} in (shrunk below a legible scale in the column): {wide}"


def _low_resolutions(text):
    for line_number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith((">>>", "...")):
            continue  # a doctest's figure is never shown
        for match in _DPI.finditer(line):
            if float(match.group(1)) < PAGE_DPI:
                yield line_number, match.group(0)


def test_no_figure_saved_below_the_page_resolution():
    """An explorer's PNGs at 60 dpi showed 5-6 px titles (issue #14): every figure is saved at >= 100 dpi."""
    low = [f"{where}, line {line}: {found}" for where, text in _sources() for line, found in _low_resolutions(text)]
    assert not low, f"figures saved below {PAGE_DPI} dpi, their text shrunk with them: {low}"


@pytest.mark.parametrize("text, expected", [("offline_explorer(f, c, dpi=60)", [(1, "dpi=60")]),
                                            ('savefig(b, dpi=150)', []), ("*, dpi: float = 60)", [(1, "dpi: float = 60")]), ('{"dpi": 72}', [(1, 'dpi": 72')]),
                                            (">>> ex = offline_explorer(render, c, dpi=20)", [])])
def test_the_resolution_check_sees_what_it_should(text, expected):
    assert list(_low_resolutions(text)) == expected


@pytest.mark.parametrize("text, expected", [("ax.set_title(t, fontsize=7)", [7.0]), ("fontsize='x-small'", [6.94]),
                                            ("image_grid(x, size=1.6)", []), ('prop={"size": 6}', [6.0]),
                                            ("labelsize=9", [9.0])])
def test_the_checks_see_what_they_should(text, expected):
    assert [round(p, 2) for _, _, p in _text_sizes(text)] == expected


def test_every_method_has_its_own_colour():
    """Chapters 8, 9 and 12 compare methods in one figure: one colour each, and only the paper's method red."""
    import matplotlib.colors as mcolors

    from vefi.heatmaps import METHODS
    from vefi.plotting import METHOD_COLOURS

    assert set(METHOD_COLOURS) == set(METHODS), "a method without a colour, or a colour without a method"
    assert len(set(METHOD_COLOURS.values())) == len(METHOD_COLOURS), "two methods share a colour"

    def reddish(colour):
        hue, saturation, value = mcolors.rgb_to_hsv(mcolors.to_rgb(colour))
        return (hue < 0.04 or hue > 0.96) and saturation > 0.4 and value > 0.6  # not a brown
    assert [m for m, c in METHOD_COLOURS.items() if reddish(c)] == ["ours"]
