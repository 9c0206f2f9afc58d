"""Run-time settings read from the environment.

``VEFI_QUICK=1``   quick mode: small data, few epochs; what nbval runs under ``make test``.
``VEFI_DATA``      where data and caches live (default: ``data/`` at the repository root, or ``~/.cache/vefi``
                   when vefi is installed elsewhere).
``VEFI_PROGRESS``  ``auto`` (default: a widget in Jupyter, text elsewhere), ``text`` or ``off``.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["quick_mode", "data_dir"]

_TRUE = {"1", "true", "yes", "on"}


def quick_mode() -> bool:
    """True when ``VEFI_QUICK`` is set to 1/true/yes/on."""
    return os.environ.get("VEFI_QUICK", "").strip().lower() in _TRUE


def data_dir() -> Path:
    """Folder for fetched data and caches, created on first use."""
    env = os.environ.get("VEFI_DATA")
    if env:
        path = Path(env).expanduser()
    else:
        repo = Path(__file__).resolve().parent.parent
        path = repo / "data" if (repo / "pyproject.toml").exists() else Path.home() / ".cache" / "vefi"
    path.mkdir(parents=True, exist_ok=True)
    return path
