"""Any OpenAI-compatible chat endpoint (vLLM, llama.cpp's server, OpenAI, OpenRouter) through the ``openai`` client.

HTTP, timeouts and retries are the client's: ``max_retries`` retries with exponential backoff (and the server's
Retry-After) on timeouts, connection errors, 408/409/429 and 5xx. This module adds a thread pool of ``concurrency``
requests in flight, a first request sent alone (a wrong URL, a refused key or a missing model fails once, with one
line, before the rest are sent), and the mapping of the client's typed errors to one clear ValueError each.
A reply that arrives but is malformed (no choices, no content) becomes a :class:`Reply` with ``error`` set, which
the scorers count as unparsed.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Callable, Optional

from lit_sae.autointerp.reply import Reply

log = logging.getLogger(__name__)

__all__ = ["OpenAIChatBackend", "DEFAULT_BASE_URL"]

DEFAULT_BASE_URL = "https://api.openai.com/v1"
TOP_LOGPROBS = 5  # delphi's top_logprobs


class OpenAIChatBackend:
    """``generate`` against ``base_url`` serving ``model``; the key is read from the environment variable
    ``api_key_env`` (unset: no key, for local servers)."""

    kind = "openai"

    def __init__(self, model: str, *, base_url: Optional[str] = None, api_key_env: str = "OPENAI_API_KEY",
                 concurrency: int = 8, timeout_s: float = 120.0, max_retries: int = 4):
        try:
            import openai
        except ModuleNotFoundError as exn:
            raise ValueError("the openai backend needs the openai package: pip install 'lit-sae[autointerp]'") from exn
        self.model, self.base_url = model, base_url or DEFAULT_BASE_URL
        self.api_key_env, self.concurrency = api_key_env, max(1, concurrency)
        key = os.environ.get(api_key_env)
        if not key:
            log.info("$%s is not set: requests to %s carry no key", api_key_env, self.base_url)
        self.client = openai.OpenAI(base_url=self.base_url, api_key=key or "no-key", timeout=timeout_s,
                                    max_retries=max_retries)
        self._openai = openai

    def _error(self, exn: Exception) -> ValueError:
        """One line for what went wrong, naming the URL, the model or the key's variable, and the fix."""
        o, url = self._openai, self.base_url
        if isinstance(exn, (o.AuthenticationError, o.PermissionDeniedError)):
            return ValueError(f"{url}: the key in ${self.api_key_env} was refused ({exn.status_code}); set "
                              f"{self.api_key_env} to a valid key, or --backend.api_key_env to the variable that "
                              "holds it")
        if isinstance(exn, o.NotFoundError):
            return ValueError(f"{url}: model {self.model!r} not found, or this is not the API's base URL (404); check "
                              "--backend.model against the server's /models list and that base_url ends in /v1")
        if isinstance(exn, o.APITimeoutError):
            return ValueError(f"{url}: no reply within the timeout after the retries; raise --backend.timeout_s or "
                              "lower --backend.concurrency (replies received so far are cached: rerun to resume)")
        if isinstance(exn, o.APIConnectionError):
            return ValueError(f"{url}: cannot connect ({type(exn.__cause__ or exn).__name__}); check "
                              "--backend.base_url and that the server is running")
        if isinstance(exn, o.APIStatusError):
            return ValueError(f"{url}: the server answered {exn.status_code} after the retries "
                              f"({str(exn)[:200]}); replies received so far are cached: rerun to resume")
        return ValueError(f"{url}: {type(exn).__name__}: {str(exn)[:300]}")

    def _one(self, prompt: list[dict], max_tokens: int, logprobs: bool) -> Reply:
        kwargs = {"logprobs": True, "top_logprobs": TOP_LOGPROBS} if logprobs else {}
        try:
            r = self.client.chat.completions.create(model=self.model, messages=prompt, max_tokens=max_tokens,
                                                    temperature=0.0, **kwargs)
        except (self._openai.APIResponseValidationError, json.JSONDecodeError) as exn:  # a 200 that is not a reply
            return Reply("", error=f"malformed reply: {str(exn)[:200]}")
        except self._openai.OpenAIError as exn:
            raise self._error(exn) from exn
        try:
            choice = r.choices[0]
            text = choice.message.content
            if not isinstance(text, str):
                raise TypeError("no message content")
        except (AttributeError, IndexError, TypeError, KeyError) as exn:
            return Reply("", error=f"malformed reply: {exn}")
        lp = None
        content = getattr(getattr(choice, "logprobs", None), "content", None)
        if logprobs and content:
            lp = [[t.token, [[a.token, a.logprob] for a in (t.top_logprobs or [])]] for t in content]
        usage = getattr(r, "usage", None)
        return Reply(text.strip(), lp, getattr(usage, "prompt_tokens", None), getattr(usage, "completion_tokens", None))

    def generate(self, prompts: list[list[dict]], *, max_tokens: int, logprobs: bool = False,
                 on_reply: Optional[Callable[[int, Reply], None]] = None) -> list[Reply]:
        out: list[Optional[Reply]] = [None] * len(prompts)
        if not prompts:
            return []
        out[0] = self._one(prompts[0], max_tokens, logprobs)  # alone: a bad URL, key or model fails once
        if on_reply is not None:
            on_reply(0, out[0])
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="autointerp")
        try:
            pending = {pool.submit(self._one, p, max_tokens, logprobs): i for i, p in enumerate(prompts) if i > 0}
            while pending:
                done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)  # wakes for Ctrl-C
                for f in done:
                    i = pending.pop(f)
                    out[i] = f.result()
                    if on_reply is not None:
                        on_reply(i, out[i])
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return out  # type: ignore[return-value]
