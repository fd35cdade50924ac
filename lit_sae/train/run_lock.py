"""One owner per run folder: an OS file lock taken before a command writes anything into the folder.

Two commands given the same ``trainer.default_root_dir`` (a copied command line, a job array whose jobs share a root)
would otherwise interleave their checkpoints, ``config.yaml``, export and TensorBoard events. The command that comes
second stops at once with one line naming the holder.

The lock is ``<root>/.lit-sae.lock``, held through ``filelock.FileLock`` (``fcntl.flock`` on Unix, ``msvcrt`` on
Windows): the operating system releases it when the holding process ends in any way, kill -9 included, so a crash
never leaves a folder blocked. Beside it, ``<root>/.lit-sae.lock.json`` says who holds it (pid, host, start time,
command line); it is information for the message only, never what decides ownership. Under DDP only global rank 0 of
a launch takes the lock (the other ranks write nothing of their own into the folder).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Union

from filelock import FileLock, Timeout

PathLike = Union[str, Path]

LOCK = ".lit-sae.lock"
HOLDER = ".lit-sae.lock.json"

__all__ = ["RunFolderBusy", "RunLock", "holder_of"]


class RunFolderBusy(FileExistsError):
    """Another process holds the run folder (its holder is named in the message)."""


def holder_of(root: PathLike) -> Optional[dict]:
    """What the holder of ``root``'s lock wrote about itself (pid, host, started, command), or None."""
    try:
        return json.loads((Path(root) / HOLDER).read_text())
    except (OSError, ValueError):
        return None


def _describe(holder: Optional[dict]) -> str:
    if not holder:
        return "a process that has not yet said who it is"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {started}: {holder.get('command')}"


class RunLock:
    """The lock of one run folder, held from :meth:`acquire` to :meth:`release` (or the end of the process).

    Args:
        root: the run folder (created if missing).
        command: what this process is doing there, for the holder line of a refused second command.
        elsewhere: the option that sends this command's output to another folder (the fix named when refused).

    Raises:
        RunFolderBusy (a ``FileExistsError``, exit 2 from the CLI): :meth:`acquire` while another process holds it.
    """

    def __init__(self, root: PathLike, command: str = "", elsewhere: str = "--trainer.default_root_dir") -> None:
        self.root = Path(root)
        self.command = command or " ".join(["lit-sae", *sys.argv[1:]])
        self.elsewhere = elsewhere
        self._lock: Optional[FileLock] = None

    def acquire(self) -> "RunLock":
        """Take the lock without waiting, then record who holds it."""
        self.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.root / LOCK), timeout=0, thread_local=False)
        try:
            lock.acquire()
        except Timeout:
            raise RunFolderBusy(
                f"{self.root} is in use by {_describe(holder_of(self.root))}; wait for it to end, or give this "
                f"command another folder with {self.elsewhere} NEW_FOLDER"
            ) from None
        self._lock = lock
        self._write_holder()
        return self

    def _write_holder(self) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": self.command}
        fd, tmp = tempfile.mkstemp(prefix=".lit-sae.lock.", suffix=".tmp", dir=self.root)  # an unpredictable name
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
            os.replace(tmp, self.root / HOLDER)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def release(self) -> None:
        """Give the folder back (the holder line is removed first, so it never names a process that let go)."""
        if self._lock is None:
            return
        (self.root / HOLDER).unlink(missing_ok=True)
        self._lock.release()
        self._lock = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
