"""Give every image of the book an alt text a screen reader can use.

Sphinx writes ``alt`` from an image's ``:alt:`` option and falls back to the image's file name, which for a
glued or executed figure is a hash such as ``../_images/3f2a....png``. The chapters caption every
``{glue:figure}`` and the caption's first sentence describes the figure for a reader who cannot see it
(house style), so an image inside a figure without an explicit ``:alt:`` gets that sentence. An image a code
cell prints outside any figure gets a plain description of what it is, never a file name.
"""

from __future__ import annotations

import re

from docutils import nodes

__version__ = "1.0"

#: Alt text of an image printed by a code cell outside any captioned figure.
OUTPUT_ALT = "Figure drawn by the code cell above."

_SENTENCE_END = re.compile(r"[.!?]\s+(?=[A-Z(\"'])")
# a full stop after these ends an abbreviation, not a sentence ("as in Fig. 3", "et al. 2018")
_ABBREVIATIONS = {"fig", "figs", "eq", "eqs", "sec", "ch", "no", "e.g", "i.e", "cf", "vs", "al", "approx"}
# LaTeX a caption's inline maths may carry, read aloud; other commands lose their backslash
_LATEX = {r"\times": "×", r"\mu": "μ", r"\le": "≤", r"\leq": "≤", r"\ge": "≥", r"\geq": "≥",
          r"\cdot": "·", r"\alpha": "α", r"\beta": "β", r"\sum": "Σ", r"\ell": "ℓ", r"\infty": "∞"}


def _plain(text: str) -> str:
    text = re.sub(r"\\[a-zA-Z]+", lambda m: _LATEX.get(m.group(0), m.group(0)[1:]), text)
    text = re.sub(r"\\[()\[\]]|[${}]|\\(?=[,;! ])", "", text)
    return " ".join(text.split())


def first_sentence(text: str) -> str:
    r"""The first sentence of ``text``, whitespace collapsed and inline LaTeX made readable.

    >>> first_sentence("Ten digits, one per class. Look at the loops.")
    'Ten digits, one per class.'
    >>> first_sentence("The feature of Fig. 3 at $11 \\times 11$, stride 4. Look.")
    'The feature of Fig. 3 at 11 × 11, stride 4.'
    >>> first_sentence("  No full stop here ")
    'No full stop here'
    """
    text = _plain(text)
    for match in _SENTENCE_END.finditer(text):
        words = text[:match.start()].split()
        if words and words[-1].lower().rstrip(".") not in _ABBREVIATIONS:
            return text[:match.start() + 1]
    return text


def set_alt_texts(app, doctree, docname) -> None:
    for image in doctree.findall(nodes.image):
        if image.get("alt"):
            continue
        figure = image.parent
        while figure is not None and not isinstance(figure, nodes.figure):
            figure = figure.parent
        captions = list(figure.findall(nodes.caption)) if figure is not None else []
        alt = first_sentence(captions[0].astext()) if captions else ""
        image["alt"] = alt or OUTPUT_ALT


def setup(app):
    # doctree-resolved runs after myst-nb has pasted glued outputs into their figures
    app.connect("doctree-resolved", set_alt_texts)
    return {"version": __version__, "parallel_read_safe": True, "parallel_write_safe": True}
