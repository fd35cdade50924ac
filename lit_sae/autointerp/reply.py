"""The one interface every answering model implements, and its reply.

``Backend.generate(prompts, max_tokens=..., logprobs=False, on_reply=None) -> list[Reply]``: one reply per chat
(a chat is a list of ``{"role", "content"}`` messages), in order; ``on_reply(i, reply)`` is called as each reply
arrives (the cache stores it at once, so an interrupted run loses nothing it already received). Greedy decoding
(temperature 0, delphi's default for explainer and scorers).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional, Protocol

__all__ = ["Reply", "Backend"]


@dataclass
class Reply:
    """A model's answer: ``text``; ``logprobs`` [[token, [[alternative, logprob], ...]], ...] per generated token
    when asked for and available; token counts when the backend reports them; ``error`` a short reason when the
    reply was malformed (then ``text`` is empty)."""

    text: str
    logprobs: Optional[list] = None
    prompt_tokens: Optional[int] = None
    completion_tokens: Optional[int] = None
    error: Optional[str] = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Reply":
        return cls(**{k: d.get(k) for k in ("text", "logprobs", "prompt_tokens", "completion_tokens", "error")})


class Backend(Protocol):
    """What the pipeline needs from a model (see the module docstring)."""

    kind: str
    model: str

    def generate(self, prompts: list[list[dict]], *, max_tokens: int, logprobs: bool = False,
                 on_reply: Optional[Callable[[int, Reply], None]] = None) -> list[Reply]: ...
