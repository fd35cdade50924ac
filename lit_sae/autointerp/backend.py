"""The settings that choose the answering model, and the factory that builds it.

The interface every backend implements is in :mod:`lit_sae.autointerp.reply`. Implementations:
:mod:`lit_sae.autointerp.local` (a transformers chat model) and :mod:`lit_sae.autointerp.openai_api` (any
OpenAI-compatible endpoint).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from lit_sae.autointerp.reply import Backend, Reply

__all__ = ["Reply", "Backend", "BackendSpec", "make_backend"]  # Reply, Backend: re-exported


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
