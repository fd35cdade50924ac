"""Two small threads that let harvest keep the LM busy: one reads ahead in an iterator (tokenizing), one runs the
shard-writing work behind the forward passes.

Both keep order, hold at most ``depth`` items, and hand an exception raised in the thread to the caller (at its next
call, or when the ``with`` block ends). Threads, not processes: tokenizers, numpy, hashing and file writes release the
GIL for their heavy parts, and the shard writer's state (its buffer, the manifest) stays in one process.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator, Optional

_END = object()


class Prefetch:
    """Iterate ``source`` in a daemon thread, up to ``depth`` items ahead; ``with Prefetch(it) as items: ...``.

    Raises in the consumer whatever ``source`` raised. Leaving the ``with`` block early stops the thread at its next
    item (the source is not drained)."""

    def __init__(self, source: Iterator, depth: int = 2):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(source,), name="lit-sae-prefetch", daemon=True)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, source: Iterator) -> None:
        try:
            for item in source:
                if not self._put((item, None)):
                    return
        except BaseException as e:  # handed to the consumer
            self._put((_END, e))
            return
        self._put((_END, None))

    def __enter__(self) -> Iterator:
        self._thread.start()
        return self._iter()

    def _iter(self) -> Iterator:
        while True:
            item, err = self._q.get()
            if err is not None:
                raise err
            if item is _END:
                return
            yield item

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class BackgroundWorker:
    """Run submitted calls one at a time, in order, in a thread; at most ``depth`` wait behind the running one.

    ``submit`` blocks while the queue is full and raises the first error a call raised (later calls are skipped).
    On leaving the ``with`` block the calls already submitted are finished (also when the block raised: what was
    computed is written, as it would have been without the thread), then the worker's own error, if any, is raised.
    """

    def __init__(self, depth: int = 2):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="lit-sae-writer", daemon=True)

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is _END:
                return
            if self._error is None:
                fn, args = job
                try:
                    fn(*args)
                except BaseException as e:
                    self._error = e

    def submit(self, fn: Callable[..., Any], *args) -> None:
        """Queue ``fn(*args)``; raises the error of an earlier call, if one failed."""
        if self._error is not None:
            raise self._error
        self._q.put((fn, args))

    def __enter__(self) -> "BackgroundWorker":
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._q.put(_END)
        self._thread.join()
        if exc_type is None and self._error is not None:
            raise self._error
