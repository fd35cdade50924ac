"""``lit-sae features``: collect per-latent statistics of a trained SAE on the harvest's text and write the browser.

Flow: load the SAE (checkpoint or export) and the harvest manifest -> rebuild the text (the test split, as the
evaluation report does, or a token budget of the train split) -> run the LM up to the hook in batches, encode
sparsely, stream the statistics (three passes, :mod:`lit_sae.features.collect`) -> N2G explanations
(:mod:`lit_sae.eval.explain`) -> logit effects and decoder neighbours (:mod:`lit_sae.features.decoder`) -> write
``<run root>/features/`` (:mod:`lit_sae.features.write`).
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional

if TYPE_CHECKING:  # torch is imported where it is used: `lit-sae --help` lists this command without loading torch
    from torch import Tensor

from lit_sae.eval.inputs import find_manifest, load_sae, run_root  # load_sae, run_root: re-exported (former home)

log = logging.getLogger(__name__)

__all__ = ["features", "load_sae", "run_root"]

N2G_CONTEXTS = 2048  # contexts whose codes are kept for N2G (k x 12 bytes per token: 50 MB at 64-token contexts)


def _autointerp_into(browser: Path, root: Path, sae_path: str) -> None:
    """Copy ``lit-sae explain``'s results of this SAE (``<run root>/autointerp/results.json``) into the browser."""
    from lit_sae.autointerp.publish import browser_payload, read_results, write_browser_data

    data = read_results(root / "autointerp" / "results.json")
    if data is None:
        return
    if Path(data.get("sae", {}).get("path", "")).resolve() != Path(sae_path).resolve():
        log.info("%s: autointerp results of another SAE (%s), not shown", root / "autointerp",
                 data.get("sae", {}).get("path"))
        return
    write_browser_data(browser, browser_payload(data))


def _latest_report(root: Path) -> Optional[dict]:
    """Headline numbers of the newest report.json under ``root`` (None when there is none)."""
    found = sorted(root.glob("**/report.json"), key=lambda q: q.stat().st_mtime)
    if not found:
        return None
    try:
        rep = json.loads(found[-1].read_text())
    except (OSError, json.JSONDecodeError):
        log.warning("%s: unreadable report, not shown in the browser", found[-1])
        return None
    head = {}
    for section, keys in (("metrics", ("nmse", "l0", "dead_fraction", "n_tokens")),
                          ("downstream", ("delta_ce", "frac_recovered", "kl_sae")),
                          ("probes", ("mean_sae_ce",)), ("ablation", ("mean",))):
        for k in keys:
            v = (rep.get(section) or {}).get(k)
            if v is not None:
                head[f"{section}.{k}"] = v
    n = (rep.get("metrics") or {}).get("n_tokens")
    return {"path": str(found[-1]), "headline": head,
            "text": f"lit-sae test on the harvest's test split{f' ({n} tokens)' if n else ''}"}


def _train_contexts(settings: dict, tokenizer, n_tokens: int) -> Tensor:
    """The first train-split contexts holding about ``n_tokens`` encoded tokens, rebuilt from the text source."""
    import torch

    from lit_sae.data.harvest import iter_contexts, split_of
    from lit_sae.data.text import ContentHash
    from lit_sae.eval.report import _text

    per = settings["context_length"] - settings["first_position"]
    rows = []
    total = settings["n_contexts"] if settings["n_contexts"] is not None else 1 << 62
    text = _text(settings, tokenizer)  # verified to be what the harvest read
    for c, ids in iter_contexts(tokenizer, text.documents(), settings["context_length"], total,
                                settings["max_contexts_per_document"], ContentHash()):
        if split_of(c, settings["seed"], settings["val_fraction"], settings["test_fraction"]) == "train":
            rows.append(ids)
            if len(rows) * per >= n_tokens:
                break
    if not rows:
        raise ValueError("no train-split context could be rebuilt from the manifest's text source")
    return torch.tensor(rows, dtype=torch.long)


def _vocab(tokenizer, ids) -> dict[int, str]:
    return {int(i): tokenizer.decode([int(i)]) for i in ids}


def _holding_the_run(fn):
    """``fn`` run holding the run folder's lock (``lit_sae.train.run_lock``) when the browser goes into the run folder:
    a fit, test or other browser writing there at the same time stops one of them with a line naming the other."""

    @functools.wraps(fn)  # keeps the signature and docstring jsonargparse builds the command's options from
    def holding(**kwargs):
        from lit_sae.train.run_lock import RunLock

        root = run_root(kwargs["ckpt_path"])
        out = Path(kwargs.get("out_dir") or root / "features")
        if not root.is_dir() or not out.resolve().is_relative_to(root.resolve()):
            return fn(**kwargs)
        with RunLock(root, elsewhere="--out_dir"):
            return fn(**kwargs)

    return holding


@_holding_the_run
def features(
    *,
    ckpt_path: str,
    manifest: Optional[str] = None,
    out_dir: Optional[str] = None,
    split: Literal["test", "train"] = "train",
    n_contexts: Optional[int] = None,
    train_tokens: int = 40_000,
    batch_size: int = 32,
    device: str = "cpu",
    cache_mb: int = 2048,
    n2g: bool = True,
    allow_untrained: bool = False,
    progress: bool = True,
) -> Path:
    """Collect per-latent statistics of an SAE and write the feature browser; returns the path of index.html.

    Args:
        ckpt_path: a checkpoint written by ``lit-sae fit`` (e.g. runs/demo/checkpoints/last.ckpt) or an exported
            SAE folder (cfg.json + sae_weights.safetensors).
        manifest: the harvest manifest (manifest.json or its shard folder) naming the LM, hook point, tokenizer,
            text source and split assignment; default: the shard folder the checkpoint was trained on, or for an
            export, ``<run root>/shards`` when it exists.
        out_dir: where the browser goes (default: ``<run root>/features``, the run root being the checkpoint
            folder's parent, or the export folder's parent).
        split: ``train`` (default: ``train_tokens`` tokens of the train split) or ``test`` (the harvest's held-out
            contexts, rebuilt as ``lit-sae test`` rebuilds them; the demo's is 7.9k tokens, too little for rare
            latents: 464 of its 4,096 latents fired fewer than 20 times there). N2G is scored on contexts it was
            not fitted on either way.
        n_contexts: at most this many contexts (default: the whole test split).
        train_tokens: the token budget when ``split`` is ``train`` (40k: about 5x the demo's test split).
        batch_size: contexts per LM forward.
        cache_mb: keep the text's sparse codes in memory (k x 12 bytes per token) when they fit in this many MB,
            so the LM runs once; above it, the LM re-encodes the text in each of the three passes.
        device: where the LM and the SAE run.
        n2g: fit and score N2G explanations (even contexts fit, odd contexts score).
        allow_untrained: accept a checkpoint that has seen no training tokens (refused otherwise).
        progress: show a progress bar (tokens/s).

    Raises:
        FileNotFoundError: the checkpoint, export or manifest is missing.
        ValueError: an unreadable input, an untrained checkpoint, or an SAE whose d_in (or hook point) differs from
            the manifest's.
    """
    from tqdm.auto import tqdm

    from lit_sae.data.lm import load_lm
    from lit_sae.eval.codes import CodeBatch, context_codes, stack_codes
    from lit_sae.eval.explain import n2g_explain, summarize
    from lit_sae.eval.report import held_out_contexts, settings_from_manifest
    from lit_sae.features.collect import FeatureCollector, memory_estimate
    from lit_sae.features.decoder import decoder_neighbours, final_norm_and_unembedding, logit_effects
    from lit_sae.features.write import check_out_dir, latent_records, write_browser

    sae, info = load_sae(ckpt_path)
    if info["tokens_seen"] == 0 and not allow_untrained:
        raise ValueError(f"{ckpt_path}: this checkpoint has seen no training tokens (untrained weights); train it "
                         "first, or pass --allow_untrained true to browse it anyway")
    man, where = find_manifest(sae, info, ckpt_path, manifest)
    s = settings_from_manifest(man, where)
    out = Path(out_dir) if out_dir else run_root(ckpt_path) / "features"
    check_out_dir(out)  # before any work: a folder that is not an earlier browser is never replaced
    from lit_sae.fsync import check_writable

    check_writable(out.parent, "--out_dir")  # the browser is written beside it, then renamed: before any work too
    L = sae.n_latents
    mem = memory_estimate(L)
    log.info("estimated memory for %d latents: %.1f MB (%s), plus the LM and, for N2G, k x 12 bytes per token of "
             "up to %d contexts", L, sum(mem.values()) / 2**20,
             ", ".join(f"{k} {v / 2**20:.1f} MB" for k, v in mem.items()), N2G_CONTEXTS)

    t0 = time.perf_counter()
    model, tokenizer = load_lm(s["model"], gguf_file=s["gguf_file"], device=device)
    sae.to(device)
    if split == "test":
        n = n_contexts or int(man["splits"].get("test", {}).get("contexts") or 0) or 1024
        ids = held_out_contexts(s, tokenizer, n)
    else:
        ids = _train_contexts(s, tokenizer, train_tokens)
        ids = ids[:n_contexts] if n_contexts else ids
    width = model.config.hidden_size if hasattr(model.config, "hidden_size") else None
    if width is not None and width != sae.d_in:
        raise ValueError(f"{ckpt_path}: the SAE's d_in={sae.d_in} differs from the width {width} of {s['model']} "
                         f"at {s['hook_point']} (from {where})")
    collector = FeatureCollector(L)
    n_tok, k = int(ids.numel()), int(sae.k)
    # The sparse codes of the whole text are kept in memory when small (k x 12 bytes per token): the LM then runs
    # once instead of once per pass (3x less time); otherwise each pass re-encodes the text.
    cached = n_tok * k * 12 <= cache_mb * 2**20
    bar = tqdm(total=n_tok * (1 if cached else 3), unit="tok", unit_scale=True, disable=not progress,
               desc="LM + SAE encode" if cached else "LM + SAE encode (3 passes)")
    common = dict(first_position=s["first_position"], norm_threshold=s["norm_threshold"], batch_size=batch_size,
                  on_batch=bar.update)
    kept = []
    if cached:
        codes = stack_codes(context_codes(model, s["hook_point"], sae, ids, **common))
        bar.close()
        per = max(1, (1 << 15) // ids.shape[1])  # about 32k tokens per collector batch
        batches = [CodeBatch(*(getattr(codes, f)[a:a + per] for f in ("ctx", "tokens", "values", "indices", "valid")))
                   for a in range(0, len(ids), per)]
        for step in tqdm((collector.pass1, collector.pass2, collector.pass3), desc="statistics", unit="pass",
                         disable=not progress):
            for b in batches:
                step(b)
        kept = [CodeBatch(*(getattr(codes, f)[:N2G_CONTEXTS] for f in ("ctx", "tokens", "values", "indices",
                                                                       "valid")))] if n2g else []
        del batches, codes
    else:
        for step in (collector.pass1, collector.pass2, collector.pass3):
            for b in context_codes(model, s["hook_point"], sae, ids, **common):
                step(b)
                if step == collector.pass2 and n2g and int(b.ctx[0]) < N2G_CONTEXTS:
                    kept.append(b)
        bar.close()
    stats = collector.result()
    result = n2g_explain(stack_codes(kept), L) if n2g and kept else None
    del kept
    g, W_U = final_norm_and_unembedding(model)
    W_dec = sae.W_dec.detach()
    if getattr(sae, "normalize", "none") == "scalar":
        W_dec = W_dec / sae.norm_scale  # into the LM's activation space
    logits = logit_effects(W_dec, W_U, g, center=True, scale=True)
    mean_top = logit_effects(W_dec.float().mean(0, keepdim=True), W_U, g)[1][0].tolist()
    neighbours = decoder_neighbours(W_dec)
    records = latent_records(stats, logits=logits, neighbours=neighbours, n2g=result)
    contexts = ids.tolist()
    used = {t for row in contexts for t in row} | set(logits[1].flatten().tolist()) | set(logits[3].flatten().tolist())
    used |= set(mean_top)
    for pats in (result.patterns if result else []):
        used.update(t for p, _ in pats[:10] for t in p if t is not None)
    meta = {"sae": {**info["config"], "path": info["path"], "tokens_seen": info["tokens_seen"]},
            "source": {"model": s["model"], "hook_point": s["hook_point"], "manifest": where, "split": split,
                       "n_contexts": len(ids), "context_length": int(ids.shape[1]),
                       "first_position": s["first_position"], "norm_threshold": s["norm_threshold"]},
            "report": _latest_report(run_root(ckpt_path)),
            "explainability": summarize(result) if result else None,
            "window": list(stats.window),
            "logits": {"formula": "z = W_U (g * (W_dec[i] - mean_j W_dec[j])) / (the token's standard deviation over "
                       "latents)", "subtracted": "the mean over latents of the direct logit effect (then divided by "
                       "each token's spread over latents)", "mean_top": mean_top}}
    page = write_browser(out, records, contexts, _vocab(tokenizer, used), stats, meta, tokenizer=tokenizer)
    _autointerp_into(page.parent, run_root(ckpt_path), info["path"])
    log.info("feature browser for %d latents (%d dead) on %d tokens written in %.1f s: %s", L,
             int((stats.count == 0).sum()), stats.n_tokens, time.perf_counter() - t0, page)
    return page


def cli_main(args: Optional[list[str]] = None) -> None:
    """``lit-sae features --ckpt_path PATH [--manifest ...]``: the arguments of :func:`features`."""
    from jsonargparse import CLI

    page = CLI(features, args=args, as_positional=False, prog="lit-sae features", allow_abbrev=False)
    print(page)
