"""The one interface every answering model implements, its reply, and the settings that choose one.

``Backend.generate(prompts, max_tokens=..., logprobs=False, on_reply=None) -> list[Reply]``: one reply per chat
(a chat is a list of ``{"role", "content"}`` messages), in order; ``on_reply(i, reply)`` is called as each reply
arrives (the cache stores it at once, so an interrupted run loses nothing it already received). Greedy decoding
(temperature 0, delphi's default for explainer and scorers). Implementations: :mod:`lit_sae.autointerp.local`
(a transformers chat model) and :mod:`lit_sae.autointerp.openai_api` (any OpenAI-compatible endpoint).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Literal, Optional, Protocol

__all__ = ["Reply", "Backend", "BackendSpec", "make_backend"]


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


@dataclass
class BackendSpec:
    """Which model answers, and how to reach it."""

    kind: Literal["local", "openai"] = "local"
    """local: a transformers chat model in this process; openai: an OpenAI-compatible chat endpoint (vLLM,
    llama.cpp's server, OpenAI, OpenRouter)."""
    model: str = "smollm2-135m"
    """local: a transformers model name or folder, or smollm2-135m (the embedded SmolLM2-135M-Instruct); openai:
    the model name the server serves."""
    base_url: Optional[str] = None
    """openai: the endpoint, e.g. http://127.0.0.1:8000/v1 (vLLM), http://127.0.0.1:8080/v1 (llama.cpp),
    https://openrouter.ai/api/v1; default https://api.openai.com/v1."""
    api_key_env: str = "OPENAI_API_KEY"
    """openai: the environment variable holding the key (never passed on the command line); unset: no key (local
    servers)."""
    concurrency: int = 8
    """openai: requests in flight at once."""
    timeout_s: float = 120.0
    """openai: seconds per request before it is retried."""
    max_retries: int = 4
    """openai: retries with exponential backoff on timeouts, connection errors, 429 and 5xx."""
    batch_size: int = 8
    """local: chats generated together (left-padded)."""
    device: str = "cpu"
    """local: where the model runs (cpu, cuda)."""

    def identity(self) -> dict:
        """What makes two backends' replies interchangeable: the cache key part."""
        return {"kind": self.kind, "model": self.model,
                "base_url": (self.base_url or "https://api.openai.com/v1") if self.kind == "openai" else None}


def make_backend(spec: BackendSpec) -> Backend:
    """The backend ``spec`` names (loading a local model takes seconds; nothing is sent before the first call)."""
    if spec.kind == "local":
        from lit_sae.autointerp.local import LocalChatBackend

        return LocalChatBackend(spec.model, device=spec.device, batch_size=spec.batch_size)
    if spec.kind == "openai":
        from lit_sae.autointerp.openai_api import OpenAIChatBackend

        return OpenAIChatBackend(spec.model, base_url=spec.base_url, api_key_env=spec.api_key_env,
                                 concurrency=spec.concurrency, timeout_s=spec.timeout_s, max_retries=spec.max_retries)
    raise ValueError(f"backend kind {spec.kind!r}: use local or openai")
