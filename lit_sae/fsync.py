"""Durability helper shared by every atomic writer (shards, manifests, checkpoints)."""

from __future__ import annotations

import os


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
