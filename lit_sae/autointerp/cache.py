"""Every prompt and reply, stored in the run folder under the hash of its content.

A request's key is the sha256 of its canonical JSON: the backend's identity (kind, model, base URL), the messages
and the generation settings. ``<folder>/<key[:2]>/<key>.json`` holds ``{"request": ..., "reply": ...}``, written to
a temporary file in the same folder, flushed and renamed into place, so a file is either complete or absent: an
interrupted run resumes without asking a stored question again, and a rerun with the same settings asks nothing.
An unreadable entry is treated as missing (asked again and rewritten).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Optional

from lit_sae.autointerp.reply import Reply

log = logging.getLogger(__name__)

__all__ = ["ReplyCache", "request_key"]


def request_key(request: dict) -> str:
    """Hex sha256 of the request's canonical JSON (sorted keys, no spaces, UTF-8)."""
    text = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class ReplyCache:
    """Replies by request content under ``folder`` (created on the first write); counts hits and misses."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.hits = self.misses = 0

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, request: dict) -> Optional[Reply]:
        """The stored reply to ``request``, or None."""
        p = self._path(request_key(request))
        try:
            reply = Reply.from_json(json.loads(p.read_text(encoding="utf-8"))["reply"])
        except FileNotFoundError:
            self.misses += 1
            return None
        except (OSError, ValueError, KeyError, TypeError) as exn:
            log.warning("%s: unreadable cache entry (%s), asking again", p, type(exn).__name__)
            self.misses += 1
            return None
        self.hits += 1
        return reply

    def put(self, request: dict, reply: Reply) -> Path:
        """Store ``reply`` to ``request`` atomically; returns its path."""
        p = self._path(request_key(request))
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.stem[:12]}.", suffix=".tmp", dir=p.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"request": request, "reply": reply.to_json()}, f, ensure_ascii=False)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp made it 0600
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return p
