"""A fake OpenAI-compatible chat server on 127.0.0.1 for tests: scripted replies and faults, bounded in requests and
time (it stops answering after ``max_requests`` and shuts itself down after ``lifetime_s``).

``answer(messages) -> str`` writes each reply; ``faults`` is a list consumed one per request, in order: ``None``
(answer normally), ``{"status": 429 | 500 | 503 ...}``, ``{"sleep": s}`` (answer after s seconds),
``{"body": "raw text"}`` (a malformed 200). ``key``: the Bearer key required (None: any); ``models``: the served
model names (others get 404). The server records every request's messages and the most requests in flight at once.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional


class FakeOpenAI:
    def __init__(self, answer: Callable[[list[dict]], str], *, key: Optional[str] = None,
                 models: tuple[str, ...] = ("fake-model",), faults: Optional[list] = None, delay_s: float = 0.0,
                 max_requests: int = 2000, lifetime_s: float = 300.0, fault_for: Optional[Callable] = None):
        self.answer, self.key, self.models = answer, key, models
        self.faults = list(faults or [])
        self.fault_for = fault_for
        self.delay_s, self.max_requests = delay_s, max_requests
        self.requests: list[list[dict]] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, body: str, headers: Optional[dict] = None):
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with fake.lock:
                    if len(fake.requests) >= fake.max_requests:
                        return self._send(503, '{"error": {"message": "fake server: request budget spent"}}')
                    fake.requests.append(body.get("messages", []))
                    fault = fake.faults.pop(0) if fake.faults else None
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                if fault is None and fake.fault_for is not None:
                    fault = fake.fault_for(body.get("messages", []))
                try:
                    fast = {"retry-after-ms": "10"}  # the openai client honours it: retries stay quick
                    if not self.path.endswith("/chat/completions"):
                        return self._send(404, '{"error": {"message": "no such route"}}')
                    if fake.key is not None and self.headers.get("Authorization") != f"Bearer {fake.key}":
                        return self._send(401, '{"error": {"message": "Incorrect API key provided"}}')
                    if body.get("model") not in fake.models:
                        return self._send(404, json.dumps({"error": {"message": f"model {body.get('model')} "
                                                                                 "does not exist"}}))
                    if fault and "status" in fault:
                        return self._send(fault["status"], '{"error": {"message": "scripted fault"}}', fast)
                    if fault and "body" in fault:
                        return self._send(200, fault["body"])
                    time.sleep(fake.delay_s + (fault or {}).get("sleep", 0.0))
                    text = fake.answer(body["messages"])
                    self._send(200, json.dumps({
                        "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                                     "message": {"role": "assistant", "content": text}}],
                        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}))
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass
                finally:
                    with fake.lock:
                        fake.in_flight -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.timer = threading.Timer(lifetime_s, self.server.shutdown)
        self.timer.daemon = True

    def __enter__(self) -> "FakeOpenAI":
        self.thread.start()
        self.timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.timer.cancel()
        self.server.shutdown()
        self.server.server_close()


def free_port_url() -> str:
    """A base URL on 127.0.0.1 where nothing listens (a port bound and released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"
