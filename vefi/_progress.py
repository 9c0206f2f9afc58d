"""Progress bars for everything slow; ``VEFI_PROGRESS`` picks widget, text or none."""

from __future__ import annotations

import os
import sys

__all__ = ["progress"]


def progress(iterable=None, **kwargs):
    """A ``tqdm`` bar over ``iterable``: a widget in Jupyter, text on a terminal, none when
    ``VEFI_PROGRESS=off`` (the book build sets it, so pages show results, not bars)."""
    mode = os.environ.get("VEFI_PROGRESS", "auto").strip().lower()
    if mode == "off":
        kwargs["disable"] = True
    if mode == "text":
        from tqdm.std import tqdm
        kwargs.setdefault("file", sys.stderr)
    else:
        from tqdm.auto import tqdm
    kwargs.setdefault("leave", False)
    return tqdm(iterable, **kwargs)
