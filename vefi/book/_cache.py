"""Files written atomically, and cache files verified on every read.

:func:`atomic_write` is the one way vefi writes a file (caches, and the command line's figures and CSVs): the
bytes go to a part file ``.<name>.<pid>@<host>.<random>.part`` in the target's folder, which is synced and
renamed into place, so a reader never sees half a file and a failed write leaves the old file as it was. A new
file gets the mode the umask gives any new file; an overwritten file keeps its mode. A writer killed before
the rename leaves its part file behind: the next write or read of the same target removes the part files of
writers that are dead (same host, no such pid) or, where that cannot be told, older than
:data:`STALE_SECONDS`.

A cache file is ``b"VEFI-CACHE 1 <sha256 of payload>\\n" + payload``. On reading, the digest is checked and the
reader's ``parse`` (``check`` for :func:`load_arrays`) checks the content, so a truncated, corrupted or
wrong file (another shape, dtype or length than the reader expects) is reported, removed and rebuilt, never
used. Readers may race: a file that vanishes while it is read counts as missing, and a reader removes a bad
file only if it is still the file it read, never one that another process has rebuilt meanwhile.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import re
import secrets
import socket
import stat
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vefi.book.config import data_folder_error

__all__ = ["read_verified", "write_verified", "load_arrays", "save_arrays", "check_arrays", "code_hash", "sha256_file",
           "atomic_write", "writer_tag", "left_by_dead_writer", "STALE_SECONDS"]

_MAGIC = b"VEFI-CACHE 1 "

STALE_SECONDS = 3600.0
"""Age after which a part file whose writer cannot be checked (another host, no pid in its name) is debris:
every file vefi writes is in memory before the write starts, so a live write takes seconds, not an hour."""

# the writer of a part file (or fetch folder): "<pid>@<host>"; earlier versions used tempfile's 8 characters
_TAGGED_PART = re.compile(r"(?P<pid>\d+)@(?P<host>.+)\.[0-9a-f]{8}\.part")
_UNTAGGED_PART = re.compile(r"[a-z0-9_]{8}\.part")


def writer_tag() -> str:
    """``"<pid>@<host>"`` of this process, put in the names of temporary files so that debris can be told."""
    return f"{os.getpid()}@{socket.gethostname()}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but is another user's
        return True
    return True


def left_by_dead_writer(tag: str | None, mtime: float) -> bool:
    """Whether a temporary file of writer ``tag`` (``"<pid>@<host>"``, None if unknown) last changed at
    ``mtime`` is debris: its writer ran on this host and is gone, or it cannot be checked and is old."""
    if tag is not None:
        pid, _, host = tag.partition("@")
        if host == socket.gethostname() and pid.isdigit():
            return not _pid_alive(int(pid))
    return time.time() - mtime > STALE_SECONDS


def _remove_stale_parts(path: Path) -> None:
    """Remove the part files of ``path`` left by killed writers; never fails (a read-only folder keeps them)."""
    prefix = f".{path.name}."
    with contextlib.suppress(OSError), os.scandir(path.parent) as entries:
        for entry in entries:
            if not entry.name.startswith(prefix):
                continue
            rest = entry.name[len(prefix):]
            tagged = _TAGGED_PART.fullmatch(rest)
            if tagged is None and _UNTAGGED_PART.fullmatch(rest) is None:
                continue  # not a part file of this target (of another whose name starts like it, say)
            with contextlib.suppress(OSError):
                tag = f"{tagged['pid']}@{tagged['host']}" if tagged else None
                if left_by_dead_writer(tag, entry.stat(follow_symlinks=False).st_mtime):
                    os.unlink(entry.path)


def _fsync_folder(folder: Path) -> None:
    # the rename is durable only once the folder is synced; some file systems cannot, which costs nothing else
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` whole or not at all: through a part file in the same folder, a sync and
    a rename. A new file's mode follows the umask; an existing file keeps its mode.

    Raises the ``OSError`` of the failed step; the old file (if any) is then untouched and no part file is
    left.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_parts(path)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = None
    tmp = path.parent / f".{path.name}.{writer_tag()}.{secrets.token_hex(4)}.part"
    # os.open applies the umask to 0o666, as for any new file (tempfile.mkstemp would make it 0600)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None:
                os.chmod(tmp, mode)  # the umask must not change the mode of a file that is overwritten
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_folder(path.parent)


def write_verified(path: Path, payload: bytes) -> None:
    """Store ``payload`` with its SHA-256 so that :func:`read_verified` can tell a damaged file.

    Raises
    ------
    vefi.book.config.DataFolderError
        When the file cannot be written (a read-only data folder, a full disk, ...); the message names the
        file and says what to do.
    """
    digest = hashlib.sha256(payload).hexdigest().encode()
    try:
        atomic_write(path, _MAGIC + digest + b"\n" + payload)
    except OSError as err:
        raise data_folder_error(path, err, "write the cache file") from err


def _identity(st: os.stat_result) -> tuple:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _discard(path: Path, identity: tuple, why: str, remove: bool = True) -> None:
    # warn before removing: tests hook the warning to play a second reader at this very moment
    if not remove:
        warnings.warn(f"file {path} {why}; not using it", RuntimeWarning, stacklevel=4)
        return
    warnings.warn(f"cache file {path} {why}; removing it and rebuilding", RuntimeWarning, stacklevel=4)
    with contextlib.suppress(OSError):  # gone already, or a read-only folder: the rebuild then says so
        if _identity(os.stat(path)) == identity:  # not a file another reader has rebuilt meanwhile
            os.unlink(path)


def read_verified(path: Path, parse: Callable[[bytes], Any] | None = None, *, remove_bad: bool = True) -> Any:
    """The payload of a cache file (or ``parse(payload)``), or None when the file is missing or bad.

    Parameters
    ----------
    path : path-like
    parse : callable, optional
        Turns the payload into what the caller uses, and checks it: a ``ValueError`` from it means the file
        holds the wrong content.
    remove_bad : bool
        A bad file (truncated, corrupted, not a cache file, or refused by ``parse``) is removed with a warning
        naming it, so that the caller rebuilds it; with False (a file the repository ships) it is only warned
        of, and left where it is.
    """
    path = Path(path)
    if remove_bad:
        _remove_stale_parts(path)
    try:
        with open(path, "rb") as f:
            identity = _identity(os.fstat(f.fileno()))
            raw = f.read()
    except FileNotFoundError:  # missing, or removed by another reader a moment ago
        return None
    head, _, payload = raw.partition(b"\n")
    if not (head.startswith(_MAGIC) and hashlib.sha256(payload).hexdigest().encode() == head[len(_MAGIC):]):
        _discard(path, identity, "is damaged (truncated or corrupted)", remove_bad)
        return None
    if parse is None:
        return payload
    try:
        return parse(payload)
    except ValueError as err:
        _discard(path, identity, f"holds the wrong content ({err})", remove_bad)
        return None


def save_arrays(path: Path, **arrays: np.ndarray) -> None:
    """Save named numpy arrays as a verified cache file."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_verified(path, buf.getvalue())


def load_arrays(path: Path, check: Callable[[dict[str, np.ndarray]], None] | None = None
                ) -> dict[str, np.ndarray] | None:
    """Arrays saved by :func:`save_arrays`, or None when missing, damaged, or refused by ``check``.

    ``check(arrays)`` raises ``ValueError`` saying what is wrong when the arrays are not what the caller
    expects (see :func:`check_arrays`); the file is then removed with a warning, like a damaged one.
    """
    def parse(payload: bytes) -> dict[str, np.ndarray]:
        try:
            npz = np.load(io.BytesIO(payload), allow_pickle=False)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise ValueError(f"not a numpy .npz archive: {err}") from err
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not a numpy .npz archive")
        try:
            with npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise ValueError(f"an unreadable numpy .npz archive: {err}") from err
        if check is not None:
            check(arrays)
        return arrays

    return read_verified(path, parse)


def check_arrays(arrays: dict[str, np.ndarray], spec: dict[str, tuple[Any, tuple]]) -> dict[str, int]:
    """Check that ``arrays`` holds exactly the arrays of ``spec``, each of the dtype and shape it gives.

    Parameters
    ----------
    arrays : dict of numpy.ndarray
    spec : dict
        ``name -> (dtype, shape)``; a shape entry is an int (that size), None (any size) or a str naming a
        size that must be the same wherever it appears (``("n", 28, 28)`` and ``("n",)``).

    Returns
    -------
    dict
        The named sizes found, e.g. ``{"n": 60000}``.

    Raises
    ------
    ValueError
        Naming the first array that differs and how.
    """
    missing, extra = sorted(set(spec) - set(arrays)), sorted(set(arrays) - set(spec))
    if missing or extra:
        raise ValueError(f"missing {', '.join(map(repr, missing)) or 'nothing'}, "
                         f"unexpected {', '.join(map(repr, extra)) or 'nothing'}")
    sizes: dict[str, tuple[int, str]] = {}
    for name, (dtype, shape) in spec.items():
        a = arrays[name]
        if a.dtype != np.dtype(dtype):
            raise ValueError(f"{name!r} has dtype {a.dtype}, expected {np.dtype(dtype)}")
        if a.ndim != len(shape) or any(isinstance(s, int) and d != s for d, s in zip(a.shape, shape)):
            expected = ", ".join("?" if s is None else str(s) for s in shape)
            raise ValueError(f"{name!r} has shape {a.shape}, expected ({expected}{',' if len(shape) == 1 else ''})")
        for axis, (d, s) in enumerate(zip(a.shape, shape)):
            if isinstance(s, str):
                seen, where = sizes.setdefault(s, (d, name))
                if d != seen:
                    raise ValueError(f"{name!r} has {d} rows along axis {axis} where {where!r} has {seen}")
    return {s: d for s, (d, _) in sizes.items()}


def sha256_file(path: Path) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def code_hash(*modules: str) -> str:
    """A short hash of the source of ``modules`` (dotted names, e.g. ``"vefi.ablation"``) and of every vefi
    module they import, at any depth: a cached result keyed by it is recomputed when the code that computes it
    changes, and only then.

    Examples
    --------
    >>> code_hash("vefi.ablation") == code_hash("vefi.ablation") != code_hash("vefi.lasso")
    True
    """
    package = Path(__file__).resolve().parents[1]  # the vefi folder
    seen: dict[str, Path] = {}
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in seen or name.split(".")[0] != "vefi":
            continue
        parts = name.split(".")[1:]
        candidates = [package / "__init__.py"] if not parts else \
            [package.joinpath(*parts).with_suffix(".py"), package.joinpath(*parts, "__init__.py")]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            continue  # a name imported from a module rather than a module
        seen[name] = found
        todo.extend(_source_facts(found, *_stamp(found))[1])
    h = hashlib.sha256()
    for name in sorted(seen):
        h.update(name.encode())
        h.update(_source_facts(seen[name], *_stamp(seen[name]))[0].encode())
    return h.hexdigest()[:16]


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=None)
def _source_facts(path: Path, mtime_ns: int, size: int) -> tuple[str, tuple[str, ...]]:
    """The SHA-256 of a module's file and the vefi modules (or names) it imports; read once per version of the
    file (its modification time and size), since parsing every module again made each study call slow."""
    import ast

    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vefi"):
            names.append(node.module)
            names.extend(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names if alias.name.startswith("vefi"))
    return sha256_file(path), tuple(names)
