"""Latents built to fire on known tokens, explained and scored through the OpenAI backend and a fake server whose
explainer reads the rule off the marked tokens and whose judge applies the explanation it is given: the true rule
scores >= 0.9 on detection and fuzzing, a wrong rule scores near chance, a dead latent is reported as dead."""

import random
import re
from collections import Counter

import pytest
import torch

from lit_sae.autointerp.cache import ReplyCache
from lit_sae.autointerp.examples import ExampleSettings, build_examples
from lit_sae.autointerp.openai_api import OpenAIChatBackend
from lit_sae.autointerp.pipeline import ScoreSettings, explain_and_score
from lit_sae.eval.autointerp_summary import summarize_scores
from lit_sae.eval.codes import CodeBatch
from tests.support.fake_openai import FakeOpenAI

pytest.importorskip("openai")

WORDS = [f" w{i}" for i in range(40)] + [" cat", " dog"]
CAT, DOG = WORDS.index(" cat"), WORDS.index(" dog")
RULES = {0: CAT, 1: DOG}  # latent -> the token it fires on; latent 2 never fires; 3..9 fire at random


def decode(t):
    return WORDS[t]


def synthetic_codes(C=240, T=48, seed=0) -> CodeBatch:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, len(WORDS), (C, T), generator=g)
    values = torch.zeros(C, T, 2)
    indices = torch.zeros(C, T, 2, dtype=torch.long)
    for lat, tok in RULES.items():
        hit = tokens == tok
        values[..., 0] += hit * (2.0 + torch.rand(C, T, generator=g))
        indices[..., 0] += hit * lat
    indices[..., 1] = torch.randint(3, 10, (C, T), generator=g)
    values[..., 1] = torch.rand(C, T, generator=g) * 0.5
    valid = torch.ones(C, T, dtype=torch.bool)
    valid[:, 0] = False
    return CodeBatch(torch.arange(C), tokens, values, indices, valid)


def oracle(wrong: bool = False):
    """Explainer: 'the token "X"' for the most often marked token (or a wrong token); judge: applies the rule."""
    def answer(messages):
        system, last = messages[0]["content"], messages[-1]["content"]
        if "[EXPLANATION]" in system:
            marked = Counter(m.strip() for m in re.findall(r"<<(.*?)>>", last))
            word = marked.most_common(1)[0][0]
            if wrong:
                word = "w7" if word != "w7" else "w8"
            return f'[EXPLANATION]: the token "{word}"'
        word = re.search(r'Pattern: the token "(.*?)"', last).group(1)
        answers = []
        for line in re.findall(r"^Example \d+: (.*)$", last, flags=re.M):
            if "<<" in line:
                segs = [s.strip() for s in re.findall(r"<<(.*?)>>", line)]
                answers.append(int(bool(segs) and all(s.split() == [word] * len(s.split()) for s in segs)))
            else:
                answers.append(int(f" {word} " in line + " "))
        return str(answers)
    return answer


def run(tmp_path, wrong=False, latents=(0, 1, 2, 3)):
    codes = synthetic_codes()
    ex = build_examples(codes, list(latents), ExampleSettings(n_test=20, n_negative=20))
    with FakeOpenAI(oracle(wrong)) as srv:
        b = OpenAIChatBackend("fake-model", base_url=srv.url, concurrency=4)
        res = explain_and_score(ex, decode, b, {"kind": "openai", "model": "fake-model"}, ReplyCache(tmp_path),
                                ScoreSettings(seed=1), progress=False)
    return ex, res, srv


def test_oracle_scores_high_wrong_near_chance_dead_reported(tmp_path):
    ex, res, srv = run(tmp_path / "a")
    assert res[2]["status"] == "dead" and res[2]["explanation"] is None and res[2]["detection"] is None
    for lat in RULES:
        r = res[lat]
        assert r["status"] == "ok" and r["explanation"] == f'the token "{WORDS[RULES[lat]].strip()}"'
        assert r["detection"]["n"] == 40 and r["detection"]["n_pos"] == 20, r["detection"]
        assert r["detection"]["accuracy"] >= 0.9 and r["fuzz"]["accuracy"] >= 0.9, (r["detection"], r["fuzz"])
        assert r["detection"]["f1"] >= 0.9
    # no scored context was shown to the explainer
    for lat in RULES:
        shown = {e.ctx for e in ex[lat].explain}
        scored = {s["ctx"] for s in res[lat]["samples"]["detection"]}
        assert shown and scored and not shown & scored
    summary = summarize_scores(res, {"kind": "openai", "model": "fake-model"})
    assert summary["n_dead"] == 1 and summary["detection"]["accuracy"]["n"] == 3
    # a wrong explanation: chance (0.5); 40 samples per latent over two latents: sd about 0.06, allow 4 sd
    _, bad, _ = run(tmp_path / "b", wrong=True, latents=(0, 1))
    for name in ("detection", "fuzz"):
        acc = sum(bad[lat][name]["accuracy"] for lat in RULES) / 2
        assert abs(acc - 0.5) <= 0.25, (name, acc)


def test_rerun_is_served_from_the_cache(tmp_path):
    _, first, srv1 = run(tmp_path)
    _, again, srv2 = run(tmp_path)
    assert len(srv1.requests) > 0 and len(srv2.requests) == 0
    assert {k: v["detection"] for k, v in first.items()} == {k: v["detection"] for k, v in again.items()}


def test_examples_follow_the_settings():
    codes = synthetic_codes()
    s = ExampleSettings(n_top=4, n_quantiles=5, per_quantile=2, n_test=5, n_negative=7, before=6, after=3)
    le = build_examples(codes, [0], s, seed=3)[0]
    tops = le.explain[:4]
    assert [e.quantile for e in tops] == [None] * 4 and len(le.explain) == 4 + 10
    assert all(e.ctx % 2 == 0 for e in le.explain) and all(e.ctx % 2 == 1 for e in le.test + le.negative)
    assert len(le.test) == 5 and len(le.negative) == 7
    assert all(len(e.tokens) <= 10 and len(e.tokens) == len(e.acts) for e in le.explain + le.test + le.negative)
    assert all(max(e.acts) == 0 for e in le.negative) and all(max(e.acts) > 0 for e in le.test)
    # the top examples are the highest per-context maxima of the explainer half, highest first
    best = sorted(((float((codes.values[c, :, 0] * (codes.indices[c, :, 0] == 0)).max()), c)
                   for c in range(0, 240, 2)), reverse=True)
    assert [round(e.max_act, 5) for e in tops] == [round(v, 5) for v, _ in best[:4]]
    again = build_examples(codes, [0], s, seed=3)[0]
    assert [(e.ctx, e.start) for e in again.test] == [(e.ctx, e.start) for e in le.test]


def test_parsers():
    from lit_sae.autointerp.prompts import answer_probabilities, mark, parse_explanation, parse_predictions

    assert mark(["a", " b", " c", " d"], [False, True, True, False]) == "a<< b c>> d"
    assert mark(["a", "b"], [True, True]) == "<<ab>>"
    assert parse_explanation("blah\n[EXPLANATION]: cats") == ("cats", True)
    assert parse_explanation("\n  cats and dogs\nmore") == ("cats and dogs", False)
    assert parse_predictions("sure: [1, 0, 1]", 3) == [True, False, True]
    assert parse_predictions("[1, 0]", 3) is None and parse_predictions("[1, 2, 0]", 3) is None
    assert parse_predictions("no list", 1) is None and parse_predictions("[0.5]", 1) is None
    lp = [["[", []], ["1", [["1", -0.1], ["0", -2.4]]], [",", []], ["0", [["0", -0.2], ["1", -1.7]]], ["]", []]]
    p = answer_probabilities(lp, 2)
    assert p is not None and p[0] > 0.8 and p[1] < 0.3


def test_scores_and_auroc():
    from lit_sae.autointerp.examples import Example
    from lit_sae.autointerp.scorers import Sample, score

    e = Example(0, 0, [1], [1.0], True)
    rng = random.Random(0)
    ss = []
    for pos in [True] * 10 + [False] * 10:
        p = rng.random() * 0.5 + (0.5 if pos else 0.0)
        ss.append(Sample("x", pos, e, prediction=p > 0.5, probability=p))
    ss.append(Sample("x", True, e))  # unparsed
    r = score(ss)
    assert r["n"] == 20 and r["n_unparsed"] == 1 and r["accuracy"] == 1.0 and r["f1"] == 1.0 and r["auroc"] == 1.0
