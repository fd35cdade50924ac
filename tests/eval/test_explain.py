"""N2G explanations recover latents built to fire on known token patterns; random and dead latents score as such."""

import math

import torch

from lit_sae.eval.codes import CodeBatch
from lit_sae.eval.explain import n2g_explain, render_markdown_section, summarize, templates

C, T, V = 240, 32, 30


def _synthetic(seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (C, T), generator=g)
    prev = torch.cat([torch.full((C, 1), -1), tokens[:, :-1]], dim=1)
    fires = {
        0: tokens == 5,                                  # a single token
        1: (tokens == 7) & (prev == 3),                  # a bigram
        2: prev == 11,                                   # any token after a given token
        3: torch.rand(C, T, generator=g) < 0.05,         # random
        4: torch.zeros(C, T, dtype=torch.bool),          # never
    }
    valid = torch.ones(C, T, dtype=torch.bool)
    valid[:, 0] = False
    values = torch.zeros(C, T, 6)
    indices = torch.zeros(C, T, 6, dtype=torch.long)
    for lat, mask in fires.items():
        values[..., lat] = mask * (0.6 + 0.4 * torch.rand(C, T, generator=g))
        indices[..., lat] = lat
    # a background latent that fires weakly everywhere, as real codes have k nonzeros per token
    values[..., 5], indices[..., 5] = 0.01, 5
    return CodeBatch(torch.arange(C), tokens, values, indices, valid)


def test_templates_are_ordered_shortest_first():
    t = templates(3)
    assert t[:3] == [(0,), (1,), (2,)] and (1, 0) in t and len(t) == 1 + 2 + 4
    assert all(len(a) <= len(b) for a, b in zip(t, t[1:]))


def test_known_patterns_are_recovered():
    r = n2g_explain(_synthetic(), 6)
    for lat in (0, 1, 2):
        assert r.status[lat] == "ok"
        assert r.precision[lat] >= 0.95 and r.recall[lat] >= 0.95, (lat, r.precision[lat], r.recall[lat])
    assert r.patterns[0][0][0] == [5]
    assert r.patterns[1][0][0] == [3, 7]
    assert r.patterns[2][0][0] == [11, None]
    # random firing: whatever was fitted does not generalise
    assert r.status[3] == "ok" and r.precision[3] < 0.3 and r.recall[3] < 0.3
    # never fires: said so, scores None not NaN in the summary
    assert r.status[4] == "never fired" and r.patterns[4] == []
    s = summarize(r)
    assert s["n_never_fired"] == 1 and s["n_scored"] == 5
    assert all(v is None or not (isinstance(v, float) and math.isnan(v)) for v in s.values())
    # 4 of the 5 scored latents are explained well: 0, 1, 2 and the background one (it fires on every token, so
    # the union of its single-token patterns covers everything); the random one is not
    assert s["frac_precision_recall_ge_0.8"] == 0.8
    assert r.precision[5] == 1.0 and r.recall[5] >= 0.95
    assert "| precision |" in "\n".join(render_markdown_section(s))


def test_fit_and_score_sets_are_disjoint():
    codes = _synthetic()
    fit = torch.zeros(C, dtype=torch.bool)
    fit[: C // 2] = True
    r = n2g_explain(codes, 6, fit=fit)
    assert r.settings["fit_contexts"] == C // 2 and r.settings["score_contexts"] == C - C // 2
    # a latent that fires only in the fit half is not scored (no held-out firing), never NaN in the summary
    codes.values[C // 2:, :, 1] = 0
    r = n2g_explain(codes, 6, fit=fit)
    assert r.status[1] == "no held-out firing"
    assert summarize(r)["n_no_heldout_firing"] == 1
