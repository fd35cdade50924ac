"""Text -> contexts -> LM forward -> filters: the kept rows of one split, LM batch by LM batch, for one rank.

The rows are exactly those a harvest with the same settings stores, in the same order: contexts are cut by
:func:`lit_sae.data.contexts.iter_contexts`, grouped per split into forwards of ``batch_size`` contexts by
:func:`lit_sae.data.harvest.split_batches`, run by :func:`lit_sae.data.harvest.forward_hooks` and filtered by
:func:`lit_sae.data.filters.keep_masks` with the harvest's own arithmetic, then cast to the storage dtype as the
shard writer does. Under DDP, forward ``i`` of the split belongs to rank ``i % world_size``: each rank runs the LM on
its own contexts only, and every context is used once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

from lit_sae.data.contexts import first_position, iter_contexts
from lit_sae.data.filters import keep_masks
from lit_sae.data.harvest import forward_hooks, split_batches
from lit_sae.data.shard_format import to_storage

STORAGE = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LMRows:
    """The kept rows of one LM forward (``index``: its number among the split's forwards)."""

    index: int
    acts: dict[str, np.ndarray]
    """Hook point -> (n, d) rows in the storage dtype (float16, or bfloat16 bits as uint16)."""
    tok: np.ndarray
    ctx: np.ndarray
    pos: np.ndarray
    dropped_norm: int
    dropped_nonfinite: int

    def __len__(self) -> int:
        return len(self.tok)


def n_contexts(config: dict) -> int:
    """Contexts of the text stream used (over all splits): ``ceil(total_tokens / kept tokens per context)``."""
    kept = config["context_length"] - first_position(config["drop_first_position"])
    return math.ceil(config["total_tokens"] / kept)


def lm_batches(tokenizer, text, config: dict, split: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(context ids (B,), token ids (B, T)) of every forward of ``split``, in harvest order (tokenizing only)."""
    contexts = iter_contexts(tokenizer, text.documents(), config["context_length"], n_contexts(config),
                             config["max_contexts_per_document"])
    return split_batches(contexts, split, config["batch_size"], config["seed"], config["val_fraction"],
                         config["test_fraction"])


def lm_rows(lm, tokenizer, text, config: dict, hooks: list[str], thresholds: dict[str, float], split: str, *,
            rank: int = 0, world_size: int = 1, start: int = 0, device: Optional[torch.device] = None,
            drop_token_ids: Optional[np.ndarray] = None) -> Iterator[LMRows]:
    """The kept rows of this rank's forwards of ``split`` from forward number ``start`` on (earlier forwards are
    tokenized and skipped without running the LM). ``drop_token_ids``: rows of these tokens are dropped too (a chat
    template's special tokens; counted with the norm filter's drops)."""
    L = config["context_length"]
    first = first_position(config["drop_first_position"])
    kept = L - first
    positions = np.arange(first, L, dtype=np.int64)
    storage = STORAGE[config["dtype"]]
    device = device if device is not None else next(lm.parameters()).device
    for i, (ctx, ids) in enumerate(lm_batches(tokenizer, text, config, split)):
        if i % world_size != rank or i < start:
            continue
        with torch.inference_mode():
            out = forward_hooks(lm, torch.from_numpy(ids).to(device), hooks)
            acts = {h: a[:, first:].reshape(len(ctx) * kept, -1).float().cpu() for h, a in out.items()}
        finite, small = keep_masks(acts, thresholds, storage)
        if drop_token_ids is not None and len(drop_token_ids):
            small &= ~np.isin(ids[:, first:].reshape(-1), drop_token_ids)
        keep = finite & small
        rows = np.flatnonzero(keep)
        keys = (ctx[:, None] * L + positions[None, :]).reshape(-1)[rows]
        yield LMRows(i, {h: to_storage(a[rows], config["dtype"]) for h, a in acts.items()},
                     ids[:, first:].reshape(-1)[rows].astype(np.int64), keys // L, keys % L,
                     int((finite & ~small).sum()), int((~finite).sum()))
