"""One rank's batches of one split, computed by the LM as they are read: :class:`LMStream` (an IterableDataset),
and :class:`LMStreamLoader`, its DataLoader (same position protocol as :class:`lit_sae.data.transport.StreamLoader`,
plus the DDP stop rule).

Training batches come from :func:`lit_sae.data.lm_stream.mixing.mixed_batches`; each carries ``stream_pos`` (the
:class:`~lit_sae.data.lm_stream.mixing.Position` after it, and 1 if it ends the epoch), which the DataModule pops in
``on_before_batch_transfer`` (main process), so the saved position is that of the last batch the step consumed,
wherever the LM ran. Evaluation batches hold every kept row of the rank's forwards once, in order, the last batch
possibly short.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lit_sae.data.lm_stream.mixing import Position, mixed_batches
from lit_sae.data.lm_stream.rows import lm_rows
from lit_sae.data.multi_hook import TARGET_KEY, batch_key
from lit_sae.data.shard_format import from_storage


class LMStream(IterableDataset):
    """Dict batches of one split for one rank, the LM running as they are read.

    Args:
        context: ``(lm, tokenizer, text source, config dict)``: the harvest settings (:mod:`lit_sae.data.harvest`).
        hooks: hook points read, the main one first; ``target``: the one also given as ``batch["target"]``.
        thresholds: hook point -> norm filter threshold.
        split: "train" (mixed, partial tail dropped, positions attached) or "val"/"test" (in order, every row).
        batch_size_tokens, shuffle_buffer_tokens, seed: see :mod:`lit_sae.data.lm_stream.mixing`.
        max_tokens: evaluation only: the first this many rows of the rank (None: all).
        drop_token_ids: rows of these token ids are dropped (a chat template's special tokens).
    """

    def __init__(self, context: tuple, hooks: list[str], thresholds: dict[str, float], split: str, *,
                 batch_size_tokens: int, shuffle_buffer_tokens: int = 0, seed: int = 0, rank: int = 0,
                 world_size: int = 1, target: Optional[str] = None, max_tokens: Optional[int] = None,
                 drop_token_ids=None):
        super().__init__()
        self.lm, self.tokenizer, self.text, self.config = context
        self.hooks, self.thresholds, self.split, self.target = list(hooks), dict(thresholds), split, target
        self.batch_size_tokens, self.shuffle_buffer_tokens = int(batch_size_tokens), int(shuffle_buffer_tokens)
        self.seed, self.rank, self.world_size, self.max_tokens = int(seed), int(rank), int(world_size), max_tokens
        self.position = Position()
        self.drop_token_ids = drop_token_ids

    def set_position(self, position: Position) -> None:
        """Where the next pass starts (training)."""
        self.position = position

    def _rows(self, start: int = 0):
        return lm_rows(self.lm, self.tokenizer, self.text, self.config, self.hooks, self.thresholds, self.split,
                       rank=self.rank, world_size=self.world_size, start=start, drop_token_ids=self.drop_token_ids)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        if info is not None and info.num_workers > 1:
            raise ValueError("data.num_workers: the LM stream runs in at most one worker process (0 or 1)")
        if self.split != "train":
            yield from self._eval_batches()
            return
        pos = self.position
        batches = mixed_batches(self._rows(pos.lm_batch), self.hooks, batch_size_tokens=self.batch_size_tokens,
                                shuffle_buffer_tokens=self.shuffle_buffer_tokens, seed=self.seed, rank=self.rank,
                                start=pos)
        ahead = next(batches, None)
        while ahead is not None:  # one batch of look-ahead tells whether a batch ends the epoch
            nxt = next(batches, None)
            batch, after = ahead
            out = self._tensors(batch)
            out["stream_pos"] = torch.tensor([*after.as_list(), int(nxt is None)], dtype=torch.int64)
            yield out
            ahead = nxt

    def _eval_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        b, budget = self.batch_size_tokens, self.max_tokens
        parts, filled = [], 0
        for rows in self._rows():
            arrays = {**{batch_key(h): rows.acts[h] for h in self.hooks}, "tok": rows.tok, "ctx": rows.ctx,
                      "pos": rows.pos}
            p = 0
            while p < len(rows) and budget != 0:
                r = min(b - filled, len(rows) - p, budget if budget is not None else b)
                parts.append({k: v[p:p + r] for k, v in arrays.items()})
                p, filled = p + r, filled + r
                budget = None if budget is None else budget - r
                if filled == b:
                    yield self._tensors({k: np.concatenate([x[k] for x in parts]) for k in parts[0]})
                    parts, filled = [], 0
            if budget == 0:
                break
        if parts:
            yield self._tensors({k: np.concatenate([x[k] for x in parts]) for k in parts[0]})

    def _tensors(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """The batch format of :mod:`lit_sae.data.multi_hook`: acts (main hook), target, acts@{hook}, tok/ctx/pos."""
        dtype = self.config["dtype"]
        out = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items() if not k.startswith("acts@")}
        acts = {h: from_storage(np.ascontiguousarray(batch[batch_key(h)]), dtype) for h in self.hooks}
        out["acts"] = acts[self.hooks[0]]
        if len(self.hooks) > 1 or self.target is not None:
            out.update({batch_key(h): a for h, a in acts.items()})
        if self.target is not None:
            out[TARGET_KEY] = acts[self.target]
        return out


class LMStreamLoader(DataLoader):
    """DataLoader of an :class:`LMStream`: ``on_iter(dataset)`` sets the pass's position (main process); ``state``
    (the DataModule) is exposed as ``state_dict``/``load_state_dict`` so Lightning treats the loader as resumable.

    DDP stop rule (training): ranks stream different contexts whose kept-row counts differ, so they would run out
    of batches at different steps and the gradient all-reduce would hang. Before handing out each batch, the ranks
    agree (an all-reduce MIN of "I have a batch") and all end the epoch at the first batch some rank lacks; each
    rank's rows beyond that point are not used in that epoch (as the shard reader drops an epoch's tail).
    """

    def __init__(self, dataset: LMStream, on_iter: Optional[Callable[[LMStream], None]] = None, state: Any = None,
                 sync_ranks: bool = False, **kwargs):
        super().__init__(dataset, batch_size=None, **kwargs)
        self.on_iter, self.state, self.sync_ranks = on_iter, state, sync_ranks

    def state_dict(self) -> dict:
        return self.state.state_dict() if self.state is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if self.state is not None and state_dict:
            self.state.load_state_dict(state_dict)

    def __iter__(self):
        if self.on_iter is not None:
            self.on_iter(self.dataset)
        it = super().__iter__()
        if not (self.sync_ranks and torch.distributed.is_available() and torch.distributed.is_initialized()
                and torch.distributed.get_world_size() > 1):
            return it
        return _all_ranks_have_one(it)


def _all_ranks_have_one(it):
    device = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" \
        else torch.device("cpu")
    while True:
        batch = next(it, None)
        flag = torch.tensor([0 if batch is None else 1], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        if int(flag.item()) == 0:
            return
        yield batch
