"""Durability and temporary-file helpers shared by every atomic writer (shards, manifests, checkpoints, reports).

Temporary files are created exclusively (``O_CREAT | O_EXCL`` through ``tempfile.mkstemp`` / ``mkdtemp``) under an
unpredictable name in the destination folder: a link planted at a guessable name in a folder others can write
(shard folders on shared scratch, run folders) is never followed or written through (see SECURITY.md).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator, Optional


def fsync_dir(path: "str | os.PathLike") -> None:
    """fsync a folder so that a completed rename inside it survives a power loss (best effort: a no-op where the OS
    does not support it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (``/proc/self/status``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read by setting (not thread-safe, but only where /proc is missing)
    os.umask(mask)
    return mask


def temp_dir_beside(path: "str | os.PathLike", tag: str = "") -> Path:
    """Create (exclusively, mode 0777 & ~umask) an empty folder ``.{name}.{tag}XXXXXXXX`` beside ``path`` (its
    parent folder is created if missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{tag}", dir=path.parent))
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


@contextlib.contextmanager
def atomic_write(path: "str | os.PathLike", mode: str = "wb", encoding: Optional[str] = None,
                 suffix: str = ".tmp") -> Iterator[IO]:
    """Write ``path`` all or nothing, through a temporary file that no one else can have planted.

    Yields a file object on a new file ``.{name}.XXXXXXXX{suffix}`` in ``path``'s folder, created exclusively
    (``tempfile.mkstemp``: ``O_EXCL``, unpredictable name) and written through the descriptor mkstemp returned, so
    nothing can swap it for a link between creation and writing; its mode is 0666 & ~umask, as ``open()`` gives. On a
    clean exit: flush, fsync, ``os.replace`` over ``path``, fsync the folder. On any error the temporary file is
    removed and ``path`` is left as it was.

    Args:
        mode: ``"wb"`` or ``"w"`` (text, with ``encoding``).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes it 0600
        with os.fdopen(fd, mode, encoding=encoding) as f:
            fd = -1  # owned by f now
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def check_writable(folder: "str | os.PathLike", key: str) -> None:
    """Raise a one-line ValueError unless files can be created in ``folder`` (or in the folder that will hold it).

    The check writes and removes a probe file (``tempfile.mkstemp``) in ``folder``, or in its nearest existing
    ancestor when it does not exist yet (nothing is created for it), so it sees what a write would see: permissions,
    a read-only or full file system, a file in the way (which ``os.access`` misses, e.g. when running as root).

    Args:
        folder: where a run will write (checkpoints, the export, the report, TensorBoard files).
        key: the setting that names it, for the message (e.g. ``"trainer.default_root_dir"``).
    """
    path = Path(folder).expanduser().absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{key}: {path} cannot be created: {existing} is a file, not a folder; set {key} to another "
                         "path (or move the file away)")
    try:
        fd, probe = tempfile.mkstemp(prefix=".lit-sae-write-check.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exn:
        where = "" if existing == path else f" (it does not exist yet; {existing} would hold it)"
        raise ValueError(f"{key}: cannot write in {existing}{where}: {exn.strerror or exn}; set {key} to a "
                         "writable folder or fix its permissions, before any step is computed") from None
