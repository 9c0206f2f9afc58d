"""Run-time settings read from the environment.

``VEFI_QUICK=1``   quick mode: small data, few epochs; what nbval runs under ``make test``.
``VEFI_DATA``      where data and caches live (default: ``data/`` at the repository root, or ``~/.cache/vefi``
                   when vefi is installed elsewhere).
``VEFI_PROGRESS``  ``auto`` (default: a widget in Jupyter, text elsewhere), ``text`` or ``off``.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

__all__ = ["quick_mode", "data_dir", "DataFolderError", "data_folder_error"]

_TRUE = {"1", "true", "yes", "on"}


class DataFolderError(OSError):
    """The data folder cannot be created or written; the message names it, says why and what to do."""


def quick_mode() -> bool:
    """True when ``VEFI_QUICK`` is set to 1/true/yes/on."""
    return os.environ.get("VEFI_QUICK", "").strip().lower() in _TRUE


def _origin() -> str:
    return "set by VEFI_DATA" if os.environ.get("VEFI_DATA") else "the default; VEFI_DATA is not set"


def data_folder_error(path: Path, err: OSError, what: str = "use the data folder") -> DataFolderError:
    """A :class:`DataFolderError` for ``err``, met while trying to ``what`` ``path`` in the data folder."""
    why = {errno.EEXIST: "it exists and is not a folder",
           errno.ENOTDIR: "a part of that path is a file, not a folder",
           errno.EACCES: "permission denied", errno.EPERM: "permission denied",
           errno.EROFS: "the file system is read-only",
           errno.ENOSPC: "no space left on the device"}.get(err.errno, err.strerror or str(err))
    folder = _data_dir_path()
    where = f"({_origin()})" if Path(path) == folder else f"in the data folder {folder} ({_origin()})"
    return DataFolderError(f"cannot {what} {path} {where}: {why}; set VEFI_DATA to a writable folder "
                           "(it is created if missing), e.g. VEFI_DATA=~/vefi-data")


def _data_dir_path() -> Path:
    """The data folder :func:`data_dir` uses, without creating it."""
    env = os.environ.get("VEFI_DATA")
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[2]  # vefi/book/config.py -> the repository
    return repo / "data" if (repo / "pyproject.toml").exists() else Path.home() / ".cache" / "vefi"


def data_dir() -> Path:
    """Folder for fetched data and caches, created on first use.

    Raises
    ------
    DataFolderError
        When the folder cannot be created (a file is in its place or on its path, permission denied, ...).
    """
    path = _data_dir_path()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise data_folder_error(path, err) from err
    return path
