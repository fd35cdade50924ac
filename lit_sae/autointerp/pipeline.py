"""Explain, then score: the two rounds of prompts for a set of latents, through a backend and the reply cache.

Round 1 asks one explainer prompt per latent that has explainer examples; round 2 asks every detection and fuzzing
prompt of every latent that has held-out examples. Each round sends all its uncached prompts in one ``generate``
call (the backend batches or parallelises them) and stores each reply as it arrives. Every random draw is seeded
by the settings' seed and the latent id, so the same settings build the same prompts and a rerun is served from the
cache.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Literal, Optional

from tqdm.auto import tqdm

from lit_sae.autointerp.cache import ReplyCache
from lit_sae.autointerp.examples import LatentExamples
from lit_sae.autointerp.prompts import (
    answer_probabilities,
    detection_messages,
    explainer_messages,
    fuzz_messages,
    parse_explanation,
    parse_predictions,
)
from lit_sae.autointerp.reply import Backend, Reply
from lit_sae.autointerp.scorers import Sample, batches, detection_samples, fuzz_samples, score

__all__ = ["ScoreSettings", "ask", "explain_and_score", "estimate_cost"]


@dataclass(frozen=True)
class ScoreSettings:
    """How the prompts are asked."""

    n_shown: int = 5
    """Examples per scorer prompt (delphi's run default: 5)."""
    fuzz_type: Literal["default", "active"] = "default"
    """default: wrong marks on non-activating examples (delphi's default); active: on activating examples."""
    logprobs: bool = False
    """Ask for token log-probabilities (gives AUROC; not every server supports it)."""
    explain_tokens: int = 100
    """Most tokens an explanation reply may have."""
    score_tokens: int = 24
    """Most tokens a scorer reply may have ("[1, 0, 1, 1, 0]" is about 15)."""
    highlight: float = 0.3
    """Marked tokens: activation above this fraction of the example's max (delphi: 0.3)."""
    seed: int = 0
    """Seeds the fuzzing marks and the sample order."""


def ask(backend: Backend, identity: dict, cache: ReplyCache, prompts: list[list[dict]], *, max_tokens: int,
        logprobs: bool = False, desc: str = "prompts", progress: bool = True) -> list[Reply]:
    """The replies to ``prompts``: cached ones read back, the others asked in one ``generate`` call and stored one
    by one as they arrive."""
    requests = [{"backend": identity, "messages": p, "max_tokens": max_tokens, "logprobs": logprobs,
                 "temperature": 0.0} for p in prompts]
    replies: list[Optional[Reply]] = [cache.get(r) for r in requests]
    todo = [i for i, r in enumerate(replies) if r is None]
    if not todo:
        return replies  # type: ignore[return-value]
    with tqdm(total=len(todo), desc=desc, unit="prompt", disable=not progress) as bar:
        def on_reply(j: int, reply: Reply) -> None:
            i = todo[j]
            replies[i] = reply
            cache.put(requests[i], reply)
            bar.update()

        backend.generate([prompts[i] for i in todo], max_tokens=max_tokens, logprobs=logprobs, on_reply=on_reply)
    return replies  # type: ignore[return-value]


def _scorer_prompts(le: LatentExamples, explanation: str, decode, s: ScoreSettings):
    """[(scorer name, batch of samples, messages)] of one latent."""
    rng = random.Random(s.seed * 1_000_003 + le.latent + 1)
    out = []
    for b in batches(detection_samples(le, decode), s.n_shown, rng):
        out.append(("detection", b, detection_messages(explanation, [x.text for x in b])))
    for b in batches(fuzz_samples(le, decode, rng, s.highlight, s.fuzz_type), s.n_shown, rng):
        out.append(("fuzz", b, fuzz_messages(explanation, [x.text for x in b])))
    return out


def estimate_cost(examples: dict[int, LatentExamples], decode: Callable[[int], str], s: ScoreSettings,
                  count_tokens: Callable[[list[dict]], int]) -> dict:
    """Prompts and tokens the run will ask for at most (before the cache): explainer prompts counted exactly,
    scorer prompts with a 20-word placeholder explanation, completions at their token limits."""
    placeholder = " ".join(["word"] * 20)
    n_exp = n_sc = tok_in = 0
    for le in examples.values():
        if not le.explain:
            continue
        n_exp += 1
        tok_in += count_tokens(explainer_messages(le.explain, decode, s.highlight))
        if le.test:
            prompts = _scorer_prompts(le, placeholder, decode, s)
            n_sc += len(prompts)
            tok_in += sum(count_tokens(m) for _, _, m in prompts)
    return {"latents": len(examples), "explainer_prompts": n_exp, "scorer_prompts": n_sc,
            "prompt_tokens": tok_in, "max_completion_tokens": n_exp * s.explain_tokens + n_sc * s.score_tokens}


def explain_and_score(examples: dict[int, LatentExamples], decode: Callable[[int], str], backend: Backend,
                      identity: dict, cache: ReplyCache, s: ScoreSettings = ScoreSettings(), *,
                      progress: bool = True) -> dict[int, dict]:
    """Per latent: status, explanation, detection and fuzzing scores, and the scored samples (JSON-able dicts)."""
    out: dict[int, dict] = {}
    for latent, le in examples.items():
        out[latent] = {"latent": latent, "status": le.status, "max_act": le.max_act,
                       "n_explain_contexts": le.n_explain_contexts, "n_heldout_contexts": le.n_heldout_contexts,
                       "n_explain_examples": len(le.explain), "explanation": None, "explanation_parsed": None,
                       "detection": None, "fuzz": None, "samples": {}}
    todo = [le for le in examples.values() if le.explain]
    replies = ask(backend, identity, cache, [explainer_messages(le.explain, decode, s.highlight) for le in todo],
                  max_tokens=s.explain_tokens, desc="explain", progress=progress)
    for le, rep in zip(todo, replies):
        text, parsed = parse_explanation(rep.text)
        out[le.latent].update(explanation=text, explanation_parsed=parsed)
    scored = [le for le in todo if le.test and out[le.latent]["explanation"]]
    jobs = [(le.latent, name, b, m) for le in scored
            for name, b, m in _scorer_prompts(le, out[le.latent]["explanation"], decode, s)]
    replies = ask(backend, identity, cache, [m for *_, m in jobs], max_tokens=s.score_tokens, logprobs=s.logprobs,
                  desc="score", progress=progress)
    samples: dict[tuple[int, str], list[Sample]] = {}
    for (latent, name, b, _), rep in zip(jobs, replies):
        preds = parse_predictions(rep.text, len(b))
        probs = answer_probabilities(rep.logprobs, len(b)) if preds is not None else None
        for j, x in enumerate(b):
            x.prediction = preds[j] if preds is not None else None
            x.probability = probs[j] if probs is not None else None
        samples.setdefault((latent, name), []).extend(b)
    for (latent, name), ss in samples.items():
        out[latent][name] = score(ss)
        out[latent]["samples"][name] = [x.to_json() for x in ss]
    for r in out.values():
        if r["status"] == "ok" and r["detection"] is None:
            r["status"] = "unscored"  # the explanation was empty
    return out
