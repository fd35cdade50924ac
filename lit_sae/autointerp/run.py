"""``lit-sae explain``: explain a sample of an SAE's latents in words and score the explanations on held-out text.

Flow: load the SAE and its harvest manifest (as ``lit-sae features``) -> rebuild the text (a token budget of the
train split by default, or the test split) -> LM up to the hook, sparse codes of every context -> choose the
latents (all, a random sample, or N per density band) -> examples (:mod:`lit_sae.autointerp.examples`) -> print the
cost -> explain, then score by detection and fuzzing (:mod:`lit_sae.autointerp.pipeline`), every reply cached in
``<out_dir>/cache`` -> optionally the same on a sample with a reference backend -> results.json, explanations.json,
report.json / report.md's ``autointerp`` section, TensorBoard scalars, and the feature browser's data when a browser
is in ``<run root>/features``.
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path
from typing import Literal, Optional

from lit_sae.autointerp.backend import BackendSpec
from lit_sae.autointerp.examples import ExampleSettings
from lit_sae.autointerp.pipeline import ScoreSettings

log = logging.getLogger(__name__)

__all__ = ["explain", "choose_latents"]


def choose_latents(counts: list[int], n_tokens: int, how: str, n: int, seed: int) -> tuple[list[int], str]:
    """(latent ids, a description) by ``how``: ``all``; ``sample`` (``n`` drawn at random, seeded); ``per_band``
    (``n`` drawn from each decade of firing density: [1e-1, 1], [1e-2, 1e-1), ... down to the rarest live latent,
    plus ``n`` of the latents that never fired on this text)."""
    L = len(counts)
    rng = random.Random(seed)
    if how == "all":
        return list(range(L)), f"all {L} latents"
    if how == "sample":
        return sorted(rng.sample(range(L), min(n, L))), f"a random sample of {min(n, L)} of {L} latents (seed {seed})"
    if how != "per_band":
        raise ValueError(f"--latents {how!r}: use all, sample or per_band")
    bands: dict[int, list[int]] = {}
    for i, c in enumerate(counts):
        band = -1 if c == 0 else min(int(math.floor(-math.log10(c / max(n_tokens, 1)))), 12)
        bands.setdefault(band, []).append(i)
    chosen = []
    for band in sorted(bands):
        chosen += rng.sample(bands[band], min(n, len(bands[band])))
    names = ", ".join(("never fired" if b < 0 else f"1e-{b + 1}..1e-{b}") + f": {min(n, len(v))}"
                      for b, v in sorted(bands.items()))
    return sorted(chosen), f"{n} per density decade ({names})"


def explain(
    *,
    ckpt_path: str,
    manifest: Optional[str] = None,
    out_dir: Optional[str] = None,
    latents: Literal["sample", "per_band", "all"] = "sample",
    n: int = 16,
    seed: int = 0,
    split: Literal["train", "test"] = "train",
    train_tokens: int = 40_000,
    n_contexts: Optional[int] = None,
    batch_size: int = 32,
    device: str = "cpu",
    backend: BackendSpec = BackendSpec(),
    reference: Optional[BackendSpec] = None,
    reference_n: int = 8,
    examples: ExampleSettings = ExampleSettings(),
    scoring: ScoreSettings = ScoreSettings(),
    dry_run: bool = False,
    progress: bool = True,
) -> Path:
    """Explain a sample of an SAE's latents with an LLM and score them by detection and fuzzing; returns results.json.

    Args:
        ckpt_path: a checkpoint written by ``lit-sae fit`` or an exported SAE folder (as ``lit-sae features``).
        manifest: the harvest manifest (manifest.json or its shard folder); default: the one the SAE records, or
            ``<run root>/shards``.
        out_dir: where results, the reply cache and TensorBoard events go (default ``<run root>/autointerp``).
        latents: which latents: ``sample`` (``n`` at random), ``per_band`` (``n`` per decade of firing density, and
            ``n`` never-firing ones) or ``all``.
        n: latents for ``sample``, latents per band for ``per_band``.
        seed: the latent sample and every example draw.
        split: ``train``: ``train_tokens`` tokens of the harvest's train split (enough activations for most
            latents); ``test``: the harvest's held-out test split. Either way, the explainer sees even contexts
            and the scores come from odd ones.
        train_tokens: token budget of the train split (40k, as ``lit-sae features``: about 20 explainer and 20
            held-out contexts for a latent of density 1e-3 in 64-token contexts).
        n_contexts: at most this many contexts.
        batch_size: contexts per LM forward when encoding the text.
        device: where the subject LM and the SAE run (the backend has its own ``device``).
        backend: who explains and judges (``--backend.kind openai --backend.base_url URL --backend.model NAME``).
        reference: a second backend run on ``reference_n`` of the scored latents; the report says how far the two
            agree.
        reference_n: latents for the reference backend.
        examples: which examples and how many (delphi-like defaults, see docs/autointerp.md).
        scoring: prompts per scorer call, fuzzing type, log-probabilities, token limits.
        dry_run: print the cost and stop before asking anything.
        progress: progress bars.

    Raises:
        FileNotFoundError: the SAE or the manifest is missing.
        ValueError: unreadable inputs, a manifest that does not match the SAE, or a backend that refuses (wrong URL,
            refused key, missing model: one line each).
    """
    import torch

    from lit_sae.autointerp.cache import ReplyCache
    from lit_sae.autointerp.examples import build_examples, latent_counts
    from lit_sae.autointerp.pipeline import estimate_cost, explain_and_score
    from lit_sae.data.contexts import split_contexts
    from lit_sae.data.lm import load_lm
    from lit_sae.eval.codes import context_codes, stack_codes
    from lit_sae.eval.inputs import find_manifest, load_sae, run_root
    from lit_sae.eval.report import _text, held_out_contexts, settings_from_manifest

    t0 = time.perf_counter()
    sae, info = load_sae(ckpt_path)
    man, where = find_manifest(sae, info, ckpt_path, manifest)
    s = settings_from_manifest(man)
    root = run_root(ckpt_path)
    out = Path(out_dir) if out_dir else root / "autointerp"
    model, tokenizer = load_lm(s["model"], gguf_file=s["gguf_file"], device=device)
    sae.to(device)
    if split == "test":
        n_ctx = n_contexts or int(man["splits"].get("test", {}).get("contexts") or 0) or 1024
        ids = held_out_contexts(s, tokenizer, n_ctx)
    else:
        per = s["context_length"] - s["first_position"]
        want = n_contexts or max(2, math.ceil(train_tokens / per))
        rows = [r for _, r in split_contexts(
            tokenizer, _text(s).documents(), "train", want, context_length=s["context_length"],
            n_contexts=s["n_contexts"], max_contexts_per_document=s["max_contexts_per_document"], seed=s["seed"],
            val_fraction=s["val_fraction"], test_fraction=s["test_fraction"])]
        if not rows:
            raise ValueError(f"{where}: no train-split context could be rebuilt from the manifest's text source")
        ids = torch.tensor(rows, dtype=torch.long)
    from tqdm.auto import tqdm

    with tqdm(total=int(ids.numel()), desc="LM + SAE encode", unit="tok", unit_scale=True,
              disable=not progress) as bar:
        codes = stack_codes(context_codes(model, s["hook_point"], sae, ids, first_position=s["first_position"],
                                          norm_threshold=s["norm_threshold"], batch_size=batch_size,
                                          on_batch=bar.update))
    del model
    n_tokens = int(codes.valid.sum())
    counts = latent_counts(codes, int(sae.n_latents)).tolist()
    chosen, selection = choose_latents(counts, n_tokens, latents, n, seed)
    ex = build_examples(codes, chosen, examples, seed)
    names: dict[int, str] = {}

    def decode(t: int) -> str:
        if t not in names:
            names[t] = tokenizer.decode([int(t)])
        return names[t]

    text = {"split": split, "n_contexts": int(len(ids)), "n_tokens": n_tokens, "context_length": int(ids.shape[1])}
    log.info("text: %s split, %d contexts, %d encoded tokens; latents: %s", split, len(ids), n_tokens, selection)

    def count(prompt):  # the subject LM's tokenizer: exact for the local default, an estimate for other models
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        else:
            text = "\n".join(m["content"] for m in prompt)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    cost = estimate_cost(ex, decode, scoring, count)
    status = {}
    for le in ex.values():
        status[le.status] = status.get(le.status, 0) + 1
    log.info("cost: %d latents (%s); %d explainer + %d scorer prompts; about %d prompt tokens and at most %d "
             "completion tokens, before the cache in %s", cost["latents"],
             ", ".join(f"{v} {k}" for k, v in sorted(status.items())), cost["explainer_prompts"],
             cost["scorer_prompts"], cost["prompt_tokens"], cost["max_completion_tokens"], out / "cache")
    log.info("latents: %s", " ".join(map(str, chosen)) if len(chosen) <= 64 else f"{len(chosen)} ids in results.json")
    if dry_run:
        return out / "results.json"

    from lit_sae.autointerp.backend import make_backend

    cache = ReplyCache(out / "cache")
    t1 = time.perf_counter()
    results = explain_and_score(ex, decode, make_backend(backend), backend.identity(), cache, scoring,
                                progress=progress)
    seconds = time.perf_counter() - t1
    ref_results = agree = None
    if reference is not None:
        from lit_sae.autointerp.agreement import agreement

        pool = [i for i, r in results.items() if r["status"] == "ok"]
        sub = sorted(random.Random(seed + 1).sample(pool, min(reference_n, len(pool))))
        ref_results = explain_and_score({i: ex[i] for i in sub}, decode, make_backend(reference),
                                        reference.identity(), cache, scoring, progress=progress)
        agree = {"backend": reference.identity(), **agreement(results, ref_results)}
    return _publish(out, root, results, ref_results, agree, backend, ex, decode, info, s, text, selection, scoring,
                    examples, cache, seconds, t0)


def _publish(out, root, results, ref_results, agree, backend, ex, decode, info, s, text, selection, scoring,
             examples, cache, seconds, t0) -> Path:
    from dataclasses import asdict

    from lit_sae.autointerp.publish import (
        browser_payload,
        read_results,
        update_report,
        write_browser_data,
        write_results,
        write_tensorboard,
    )
    from lit_sae.eval.autointerp_summary import summarize_scores

    summary = summarize_scores(results, backend.identity())
    n_asked = sum(1 for r in results.values() if r.get("explanation") is not None)
    summary.update(selection=selection, text=text, reference=agree,
                   seconds={"ask": seconds, "per_explained_latent": seconds / max(1, n_asked),
                            "total": time.perf_counter() - t0},
                   cache={"hits": cache.hits, "asked": cache.misses})
    vocab = {str(t): decode(t) for r in list(results.values()) + list((ref_results or {}).values())
             for ss in r["samples"].values() for x in ss for t in x["tokens"]}
    for le in ex.values():
        vocab.update({str(t): decode(t) for e in le.explain for t in e.tokens})
    for r in results.values():
        r["explain_examples"] = [{"ctx": e.ctx, "start": e.start, "tokens": e.tokens,
                                  "acts": [round(a, 4) for a in e.acts], "quantile": e.quantile}
                                 for e in ex[r["latent"]].explain]
    meta = {"sae": {"path": info["path"], "tokens_seen": info["tokens_seen"], **info["config"]},
            "source": {"model": s["model"], "hook_point": s["hook_point"], **text},
            "settings": {"examples": asdict(examples), "scoring": asdict(scoring)}, "vocab": vocab}
    paths = write_results(out, results, summary, meta, ref_results)
    write_tensorboard(out / "tensorboard", summary, results, int(info["tokens_seen"] or 0))
    report = update_report(root, summary)
    browser = root / "features"
    if write_browser_data(browser, browser_payload(read_results(paths["results"]) or {})):
        log.info("feature browser updated: %s", browser / "index.html")
    det, fz = summary["detection"]["accuracy"], summary["fuzz"]["accuracy"]
    log.info("autointerp: %d latents scored; detection accuracy mean %s (n=%d), fuzzing mean %s (n=%d); %.1f s per "
             "explained latent; %d replies from the cache, %d asked; report %s", summary["n_ok"],
             _f(det["mean"]), det["n"], _f(fz["mean"]), fz["n"], summary["seconds"]["per_explained_latent"],
             cache.hits, cache.misses, report or "-")
    return paths["results"]


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"
