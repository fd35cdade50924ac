"""Which contexts the explainer sees and which held-out contexts the scorers see, per latent, from sparse codes.

Definitions (delphi's, EleutherAI/delphi ``delphi/config.py`` SamplerConfig / ConstructorConfig and
``delphi/latents/samplers.py``; sizes scaled down for a CPU model, every one a setting):

- An **activating context** of a latent is a context where it fires on some encoded token; the context counts once,
  at its largest activation (the earliest position on ties), as the feature browser's top table counts it.
- **Example window**: ``before`` tokens before the activating token and ``after`` after it (defaults 24 and 7: 32
  tokens with the activating token at 32 - 32 // 4, delphi's ``example_ctx_len=32`` centred example), cut at the
  context's ends; every token carries the latent's activation.
- **Split**: a context is *held out* when its row id is odd (as lit-sae's N2G fit/score split). The explainer sees
  even contexts only; detection and fuzzing are scored on odd contexts only, so no scored context was shown to the
  explainer (delphi draws train and test from one pool and can show a context to both).
- **Explainer examples**: the ``n_top`` highest activating contexts, then ``n_quantiles`` activation quantiles of
  the remaining ones (equal-count slices of the contexts sorted by activation, delphi's ``split_quantiles``) with
  ``per_quantile`` contexts drawn from each (delphi's ``train_type="mix"``; delphi's default draws 40 from
  quantiles only).
- **Held-out activating examples**: ``n_test`` contexts drawn evenly from ``n_quantiles`` quantiles of the held-out
  activating contexts (delphi's ``test_type="quantiles"``, 50 by default).
- **Non-activating examples**: ``n_negative`` held-out contexts where the latent fires on no encoded token, each
  cut at a random window (delphi's ``non_activating_source="random"``, 50 by default), so detection is balanced.

Status per latent: ``ok``; ``dead`` (never fires on this text); ``too rare`` (no activating explainer context);
``no held-out activations`` (explained, not scored).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from lit_sae.eval.codes import CodeBatch

__all__ = ["Example", "ExampleSettings", "LatentExamples", "build_examples", "latent_counts"]


@dataclass(frozen=True)
class ExampleSettings:
    """How many examples of which kind, and how wide (defaults: see the module docstring)."""

    n_top: int = 10
    """Highest activating explainer contexts."""
    n_quantiles: int = 10
    """Activation quantiles for explainer and held-out samples (delphi: 10)."""
    per_quantile: int = 1
    """Explainer contexts drawn from each quantile of the non-top contexts."""
    n_test: int = 10
    """Held-out activating contexts scored per latent (drawn evenly over the quantiles; delphi: 50)."""
    n_negative: int = 10
    """Held-out non-activating contexts scored per latent (delphi: 50)."""
    before: int = 24
    """Tokens shown before the activating token."""
    after: int = 7
    """Tokens shown after it (24 + 1 + 7 = 32, delphi's example_ctx_len)."""
    highlight: float = 0.3
    """Tokens marked <<like this>>: activation above this fraction of the example's max (delphi: 0.3)."""


@dataclass
class Example:
    """One context window: ``tokens`` (token ids) and the latent's ``acts`` on them (same length, float),
    ``ctx`` its context row, ``start`` the position of its first token, ``activating`` whether the latent fires in
    the context, ``quantile`` the quantile it was drawn from (0 = highest; None for top or non-activating)."""

    ctx: int
    start: int
    tokens: list[int]
    acts: list[float]
    activating: bool
    quantile: int | None = None

    @property
    def max_act(self) -> float:
        return max(self.acts, default=0.0)


@dataclass
class LatentExamples:
    """Everything the explainer and the scorers see of one latent."""

    latent: int
    status: str
    max_act: float = 0.0
    n_explain_contexts: int = 0
    """Activating contexts available to the explainer (even rows)."""
    n_heldout_contexts: int = 0
    """Activating held-out contexts (odd rows)."""
    explain: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)
    negative: list[Example] = field(default_factory=list)


def latent_counts(codes: CodeBatch, n_latents: int) -> torch.Tensor:
    """(n_latents,) int64: encoded tokens on which each latent fires."""
    live = codes.valid[..., None] & (codes.values > 0)
    return torch.bincount(codes.indices[live], minlength=n_latents)[:n_latents]


def _quantile_sample(items: list, n_quantiles: int, per: int, rng: random.Random) -> list[tuple[int, object]]:
    """delphi's split_quantiles: equal-count slices of ``items`` (sorted by activation, highest first), ``per``
    drawn at random from each; (quantile, item) pairs. Fewer items than quantiles: every item, quantile by rank."""
    if per <= 0 or not items:
        return []
    if len(items) < n_quantiles:
        return [(i * n_quantiles // len(items), x) for i, x in enumerate(items[:per * n_quantiles])]
    size = len(items) // n_quantiles
    out = []
    for q in range(n_quantiles):
        part = items[q * size:(q + 1) * size]
        out += [(q, x) for x in (part if len(part) <= per else rng.sample(part, per))]
    return out


def _window(codes: CodeBatch, row: int, latent: int, pos: int, s: ExampleSettings) -> tuple[int, list, list]:
    """(start, tokens, activations of ``latent``) of the window around ``pos`` in context row ``row``."""
    T = codes.tokens.shape[1]
    a, b = max(0, pos - s.before), min(T, pos + s.after + 1)
    hit = (codes.indices[row, a:b] == latent) & codes.valid[row, a:b, None]
    acts = (codes.values[row, a:b] * hit).sum(-1)
    return a, codes.tokens[row, a:b].tolist(), [float(x) for x in acts.tolist()]


def build_examples(codes: CodeBatch, latents: list[int], settings: ExampleSettings = ExampleSettings(),
                   seed: int = 0) -> dict[int, LatentExamples]:
    """The examples of each latent in ``latents`` from the codes of C contexts (``stack_codes``).

    Vectorised over the chosen latents (one pass over the C x T x k code); windows are cut per example. The draws
    are seeded by ``seed`` and the latent id, so a rerun picks the same examples (and hits the reply cache).
    """
    s = settings
    C, T, _ = codes.values.shape
    ids = torch.tensor(sorted(set(latents)), dtype=torch.long)
    out: dict[int, LatentExamples] = {}
    if ids.numel() == 0:
        return out
    lookup = torch.full((max(int(codes.indices.max()), int(ids.max())) + 1,), -1, dtype=torch.long)
    lookup[ids] = torch.arange(len(ids))
    local = lookup[codes.indices]
    c, t, j = torch.nonzero(codes.valid[..., None] & (codes.values > 0) & (local >= 0), as_tuple=True)
    lat, val = local[c, t, j], codes.values[c, t, j].float()
    # one entry per (latent, context): the largest activation, the earliest position on ties
    key = lat * C + c
    best = torch.zeros(len(ids) * C).scatter_reduce_(0, key, val, reduce="amax")
    at_best = val == best[key]
    first = torch.full((len(ids) * C,), T, dtype=torch.long).scatter_reduce_(0, key[at_best], t[at_best],
                                                                             reduce="amin")
    fired = torch.nonzero(best > 0).squeeze(1)
    f_lat, f_row = fired // C, fired % C
    f_val, f_pos = best[fired].tolist(), first[fired].tolist()
    ctx_ids = codes.ctx.tolist()
    heldout_rows = [r for r in range(C) if ctx_ids[r] % 2 == 1]
    per_latent: dict[int, list[tuple[float, int, int]]] = {}
    for li, row, v, p in zip(f_lat.tolist(), f_row.tolist(), f_val, f_pos):
        per_latent.setdefault(li, []).append((v, row, p))
    for li, latent in enumerate(ids.tolist()):
        rng = random.Random(seed * 1_000_003 + latent)
        found = per_latent.get(li, [])
        if not found:
            out[latent] = LatentExamples(latent, "dead")
            continue
        found.sort(key=lambda x: (-x[0], ctx_ids[x[1]], x[2]))
        explain = [x for x in found if ctx_ids[x[1]] % 2 == 0]
        held = [x for x in found if ctx_ids[x[1]] % 2 == 1]
        le = LatentExamples(latent, "ok", max_act=found[0][0], n_explain_contexts=len(explain),
                            n_heldout_contexts=len(held))
        out[latent] = le

        def example(item, quantile, activating=True):
            _, row, pos = item
            a, toks, acts = _window(codes, row, latent, pos, s)
            return Example(ctx_ids[row], a, toks, acts, activating, quantile)

        le.explain = [example(x, None) for x in explain[:s.n_top]]
        le.explain += [example(x, q) for q, x in _quantile_sample(explain[s.n_top:], s.n_quantiles, s.per_quantile,
                                                                   rng)]
        per_q = max(1, s.n_test // s.n_quantiles)
        le.test = [example(x, q) for q, x in _quantile_sample(held, s.n_quantiles, per_q, rng)][:s.n_test]
        firing_rows = {row for _, row, _ in found}
        quiet = [r for r in heldout_rows if r not in firing_rows]
        for row in rng.sample(quiet, min(s.n_negative, len(quiet))):
            pos = rng.randrange(min(s.before, T - 1), T)
            a, toks, acts = _window(codes, row, latent, pos, s)
            le.negative.append(Example(ctx_ids[row], a, toks, acts, False))
        if not le.explain:
            le.status = "too rare"
        elif not le.test:
            le.status = "no held-out activations"
    return out
