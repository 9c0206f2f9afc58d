"""Cache files that are written atomically and verified on every read.

A cache file is ``b"VEFI-CACHE 1 <sha256 of payload>\\n" + payload``. It is written to a temporary file in the
same folder and renamed into place, so a reader never sees half a file; on reading, the digest is checked, so
a truncated or corrupted file is reported, removed and rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

__all__ = ["read_verified", "write_verified", "load_arrays", "save_arrays", "sha256_file", "atomic_write"]

_MAGIC = b"VEFI-CACHE 1 "


def atomic_write(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_verified(path: Path, payload: bytes) -> None:
    """Store ``payload`` with its SHA-256 so that :func:`read_verified` can tell a damaged file."""
    digest = hashlib.sha256(payload).hexdigest().encode()
    atomic_write(path, _MAGIC + digest + b"\n" + payload)


def read_verified(path: Path) -> bytes | None:
    """The payload of a cache file, or None when the file is missing or damaged.

    A damaged file (truncated, corrupted, not a cache file) is removed with a warning naming it, so that
    the caller rebuilds it.
    """
    path = Path(path)
    if not path.exists():
        return None
    raw = path.read_bytes()
    head, _, payload = raw.partition(b"\n")
    ok = head.startswith(_MAGIC) and hashlib.sha256(payload).hexdigest().encode() == head[len(_MAGIC):]
    if not ok:
        warnings.warn(f"cache file {path} is damaged (truncated or corrupted); removing it and rebuilding",
                      RuntimeWarning, stacklevel=2)
        path.unlink(missing_ok=True)
        return None
    return payload


def save_arrays(path: Path, **arrays: np.ndarray) -> None:
    """Save named numpy arrays as a verified cache file."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_verified(path, buf.getvalue())


def load_arrays(path: Path) -> dict[str, np.ndarray] | None:
    """Arrays saved by :func:`save_arrays`, or None when missing or damaged."""
    payload = read_verified(path)
    if payload is None:
        return None
    with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def sha256_file(path: Path) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
