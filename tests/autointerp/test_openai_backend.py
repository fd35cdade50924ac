"""The OpenAI-compatible backend against a fake server on 127.0.0.1: replies, concurrency, retries on 429 and 5xx,
timeouts, malformed replies, and one clear line for a refused key, a missing model and a wrong URL."""

import pytest

from lit_sae.autointerp.openai_api import OpenAIChatBackend
from tests.support.fake_openai import FakeOpenAI, free_port_url

pytest.importorskip("openai")


def echo(messages):
    return "re: " + messages[-1]["content"]


def chats(n):
    return [[{"role": "user", "content": f"q{i}"}] for i in range(n)]


def backend(url, **kw):
    kw = {"max_retries": 3, "timeout_s": 10.0, **kw}
    return OpenAIChatBackend("fake-model", base_url=url, **kw)


def test_replies_in_order_with_usage_and_callback():
    got = {}
    with FakeOpenAI(echo) as srv:
        out = backend(srv.url).generate(chats(5), max_tokens=8, on_reply=lambda i, r: got.setdefault(i, r.text))
    assert [r.text for r in out] == [f"re: q{i}" for i in range(5)]
    assert got == {i: f"re: q{i}" for i in range(5)}
    assert out[0].prompt_tokens == 10 and out[0].completion_tokens == 5 and out[0].error is None


def test_concurrency_limit_is_kept():
    with FakeOpenAI(echo, delay_s=0.15) as srv:
        backend(srv.url, concurrency=3).generate(chats(10), max_tokens=8)
    # the first request goes alone (it checks URL, key and model), then at most 3 at once
    assert srv.max_in_flight == 3, srv.max_in_flight
    assert len(srv.requests) == 10


@pytest.mark.parametrize("status", [429, 500, 503])
def test_retries_on_rate_limit_and_server_errors(status):
    with FakeOpenAI(echo, faults=[{"status": status}, {"status": status}]) as srv:
        out = backend(srv.url).generate(chats(1), max_tokens=8)
    assert out[0].text == "re: q0"
    assert len(srv.requests) == 3  # two scripted failures, then the answer


def test_retries_exhausted_is_one_line():
    with FakeOpenAI(echo, faults=[{"status": 500}] * 3) as srv:
        with pytest.raises(ValueError, match=r"answered 500 after the retries.*rerun to resume"):
            backend(srv.url, max_retries=2).generate(chats(1), max_tokens=8)
    assert len(srv.requests) == 3


def test_timeout_is_retried_then_reported():
    with FakeOpenAI(echo, faults=[{"sleep": 1.5}]) as srv:
        out = backend(srv.url, timeout_s=0.4, max_retries=1).generate(chats(1), max_tokens=8)
        assert out[0].text == "re: q0" and len(srv.requests) == 2
    with FakeOpenAI(echo, delay_s=1.5) as srv:
        with pytest.raises(ValueError, match="no reply within the timeout"):
            backend(srv.url, timeout_s=0.3, max_retries=0).generate(chats(1), max_tokens=8)


@pytest.mark.parametrize("body", ["not json at all", '{"choices": []}', '{"choices": [{"message": {}}]}'])
def test_malformed_reply_is_marked_not_fatal(body):
    with FakeOpenAI(echo, faults=[None, {"body": body}]) as srv:
        out = backend(srv.url, concurrency=1).generate(chats(3), max_tokens=8)
    assert out[0].text == "re: q0" and out[2].text == "re: q2"
    assert out[1].text == "" and out[1].error and "malformed" in out[1].error


def test_refused_key_is_one_line_naming_the_variable(monkeypatch):
    monkeypatch.setenv("FAKE_KEY", "sk-wrong")
    with FakeOpenAI(echo, key="sk-right") as srv:
        with pytest.raises(ValueError, match=r"key in \$FAKE_KEY was refused \(401\)"):
            backend(srv.url, api_key_env="FAKE_KEY").generate(chats(4), max_tokens=8)
        assert len(srv.requests) == 1  # the first request alone: nothing else was sent
    monkeypatch.setenv("FAKE_KEY", "sk-right")
    with FakeOpenAI(echo, key="sk-right") as srv:
        assert backend(srv.url, api_key_env="FAKE_KEY").generate(chats(1), max_tokens=8)[0].text == "re: q0"


def test_missing_model_and_wrong_url():
    with FakeOpenAI(echo) as srv:
        b = OpenAIChatBackend("no-such-model", base_url=srv.url, max_retries=0)
        with pytest.raises(ValueError, match=r"model 'no-such-model' not found"):
            b.generate(chats(2), max_tokens=8)
    with pytest.raises(ValueError, match="cannot connect"):
        backend(free_port_url(), max_retries=0).generate(chats(2), max_tokens=8)
