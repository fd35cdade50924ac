"""Token contexts: the one place that cuts text into the windows the language model sees.

Harvest (training activations), the evaluation suite (downstream loss, ablation) and the feature browser all build
their contexts here, so the windows can never differ between training and evaluation:

* a document is tokenized **without special tokens** (no BOS/EOS is added, whatever the tokenizer's default), so
  position 0 of a context is the document's own token (an attention sink; harvest drops it by default and the
  manifest's ``exclusions.drop_first_position`` says so);
* each document is cut into consecutive windows of ``context_length`` tokens; windows never cross documents and a
  document's tail shorter than a window is dropped; at most ``max_contexts_per_document`` windows per document;
* windows are numbered 0, 1, 2, ... in stream order (the *context id*), and :func:`split_of` assigns each id to
  train / val / test by a hash of (seed, id), so splits never share a context.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional

SPLITS = ("train", "val", "test")


def tokenize(tokenizer, document: str) -> list[int]:
    """Token ids of one document, without special tokens (a Hugging Face tokenizer, called as harvest calls it)."""
    return tokenizer(document, add_special_tokens=False, verbose=False)["input_ids"]


def first_position(drop_first_position: bool) -> int:
    """First position of a context whose activation is used: 1 when position 0 (the attention sink) is dropped."""
    return 1 if drop_first_position else 0


def iter_contexts(tokenizer, documents: Iterable[str], context_length: int, n_contexts: Optional[int] = None,
                  max_contexts_per_document: Optional[int] = None, content_hash=None) \
        -> Iterator[tuple[int, list[int]]]:
    """Yield ``(context id, token ids)`` for the first ``n_contexts`` contexts of the stream (None: all).

    ``content_hash`` (a :class:`lit_sae.data.text.ContentHash`, optional) is updated with every document consumed
    and its ``contexts`` ends as the number of contexts yielded (fewer than asked if the source runs out).
    Raises ValueError for a non-positive ``context_length``.
    """
    if context_length <= 0:
        raise ValueError(f"context_length must be positive, got {context_length}")
    count = 0
    if content_hash is not None:
        content_hash.contexts = 0
    if n_contexts is not None and n_contexts <= 0:
        return
    for doc in documents:
        if content_hash is not None:
            content_hash.update(doc)
        ids = tokenize(tokenizer, doc)
        n = len(ids) // context_length
        if max_contexts_per_document is not None:
            n = min(n, max_contexts_per_document)
        for j in range(n):
            yield count, ids[j * context_length:(j + 1) * context_length]
            count += 1
            if content_hash is not None:
                content_hash.contexts = count
            if n_contexts is not None and count >= n_contexts:
                return


def _mix64(seed: int, i: int) -> int:
    """splitmix64 of (seed, i): a fixed, platform-independent hash for assigning contexts to splits."""
    z = (seed * 0x9E3779B97F4A7C15 + i + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


def split_of(context_id: int, seed: int, val_fraction: float, test_fraction: float) -> str:
    """The split ("train", "val" or "test") that context ``context_id`` belongs to."""
    u = _mix64(seed, context_id) / 2.0**64
    if u < val_fraction:
        return "val"
    if u < val_fraction + test_fraction:
        return "test"
    return "train"


def split_contexts(tokenizer, documents: Iterable[str], split: str, n: int, *, context_length: int,
                   n_contexts: Optional[int], max_contexts_per_document: Optional[int], seed: int,
                   val_fraction: float, test_fraction: float) -> list[tuple[int, list[int]]]:
    """The first ``n`` contexts ``(id, token ids)`` of ``split`` among the first ``n_contexts`` of the stream.

    With a harvest's settings (see :class:`lit_sae.data.manifest.Manifest`'s ``config``) these are exactly the
    contexts whose activations that split's shards hold, cut the same way.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    out = []
    for c, ids in iter_contexts(tokenizer, documents, context_length, n_contexts, max_contexts_per_document):
        if split_of(c, seed, val_fraction, test_fraction) == split:
            out.append((c, ids))
            if len(out) >= n:
                break
    return out
