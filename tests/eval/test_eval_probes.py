"""Probe loss: labels from Python's tokenize, 1-D logistic fits, best-latent selection."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from lit_sae.eval.probes import TASKS, best_1d_probe, fit_1d_logistic, probe_loss, python_char_labels, token_labels


class TopKOfInput(nn.Module):
    """A stand-in SAE whose latents are the input's coordinates (top-k by value, ReLU)."""

    def __init__(self, d, k):
        super().__init__()
        self.n_latents, self.k = d, k
        self.dummy = nn.Parameter(torch.zeros(()))

    def encode(self, x):
        v, i = x.topk(self.k, dim=-1)
        return v.relu(), i


def _synthetic(n=2000, d=16, label_latent=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) < 0.3)
    acts = torch.rand(n, d, generator=g) * 0.5
    acts[:, label_latent] = y.float() * 2.0  # largest when y=1, so it is in the top-k exactly then
    labels = torch.zeros(n, len(TASKS), dtype=torch.bool)
    labels[:, 0] = y
    labels[:, 1] = torch.rand(n, generator=g) < 0.5  # unrelated to everything
    return {"acts": acts, "labels": labels, "context": torch.arange(n) // 20}


def test_latent_equal_to_label_gives_near_zero_loss():
    out = probe_loss(TopKOfInput(16, 4), _synthetic(), tasks=TASKS[:2], progress=False)
    t0, t1 = out["tasks"][TASKS[0]], out["tasks"][TASKS[1]]
    assert t0["sae_latent"] == 5 and t0["raw_dim"] == 5
    assert t0["sae_ce"] < 0.01 and t0["raw_ce"] < 0.01
    # A label unrelated to every feature: no probe beats the base rate by much.
    assert t1["sae_ce"] == pytest.approx(math.log(2), abs=0.02)
    assert t1["prior_ce"] == pytest.approx(math.log(2), abs=0.02)
    assert out["n_tasks"] == 2


def test_fit_1d_logistic_matches_known_solution():
    # Non-separable data generated from the model itself: the fit should recover w, b (in raw units).
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 1, generator=g, dtype=torch.float64)
    y = (torch.rand(20000, generator=g, dtype=torch.float64) < torch.sigmoid(1.5 * z[:, 0] - 0.5)).double()
    w, b, mu, sd = fit_1d_logistic(z, y, l2=0.0)
    assert (w / sd).item() == pytest.approx(1.5, abs=0.08)
    assert (b - w * mu / sd).item() == pytest.approx(-0.5, abs=0.05)
    res = best_1d_probe(z, y, z, y)
    assert res["test_ce"] < res["prior_ce"]


SRC = '''"""Module doc."""
import os


def f(x, y=10):
    """Doc of f."""
    # a comment
    if x:
        return "str" + y
    return 3.5
'''


def test_python_labels():
    lab = python_char_labels(SRC)
    at = lambda task, s, nth=0: bool(lab[task][_find(SRC, s, nth)])  # noqa: E731
    assert at("py_docstring", "Module doc") and at("py_docstring", "Doc of f")
    assert not at("py_docstring", '"str"') and at("py_string", '"str"')
    assert at("py_comment", "a comment") and at("py_number", "10") and at("py_number", "3.5")
    assert at("py_keyword", "import") and at("py_keyword", "return") and not at("py_keyword", "os")
    assert at("py_def_name", "f(") and at("py_operator", "+")
    assert at("py_block_start", '"""Doc of f') and at("py_block_start", "return \"str")
    assert not at("py_block_start", "# a comment") and not at("py_block_start", "return 3.5")
    assert python_char_labels("def f(:\n  x = '") is None


def _find(s, sub, nth=0):
    i = -1
    for _ in range(nth + 1):
        i = s.index(sub, i + 1)
    return i


class CharTokenizer:
    """A slow-style tokenizer: one token per character, no offsets."""

    def __call__(self, text, return_offsets_mapping=False):
        if return_offsets_mapping:
            raise NotImplementedError
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_token_labels_without_offsets():
    ids, lab = token_labels(CharTokenizer(), SRC)
    assert len(ids) == len(SRC) and lab.shape == (len(SRC), len(TASKS))
    j = SRC.index("3.5")
    assert lab[j, TASKS.index("py_number")] and lab[j, TASKS.index("prose_digit")]
    assert lab[SRC.index("Module"), TASKS.index("prose_capitalized")]
    assert lab[SRC.index("("), TASKS.index("prose_punctuation")]
    assert np.all(lab.sum(0)[:8] > 0)
