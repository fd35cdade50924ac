"""One rank's batches of one split: :class:`ActivationStream`, an IterableDataset that follows :mod:`lit_sae.data.plan`.

The stream reads the token windows its plan names (:func:`lit_sae.data.reader.read_range`), checks them for NaN/Inf
and gathers batches. It splits its work over DataLoader workers itself; with workers, batches may travel through the
shared-memory ring of :mod:`lit_sae.data.transport` (attached by the loader), otherwise they are fresh tensors.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from lit_sae.data.plan import EpochPlan, resume_share, shard_order, window_permutation, window_pieces, window_size
from lit_sae.data.reader import ShardRef, read_range
from lit_sae.data.shard_format import ShardError, from_storage, layout_of, nonfinite_error, nonfinite_rows

log = logging.getLogger(__name__)


class ActivationStream(IterableDataset):
    """Dict batches of one split for one rank (layout: :mod:`lit_sae.data.plan`).

    Use with ``DataLoader(stream, batch_size=None, num_workers=K)``. ``len(stream)`` is the rank's batch count for
    the epoch (equal on every rank for training).

    Args:
        shards: the split's shards, in manifest order.
        manifest: the folder's :class:`~lit_sae.data.manifest.Manifest` (or its JSON dict).
        batch_size_tokens: tokens per batch (B).
        rank, world_size: this process's rank and the number of ranks.
        seed: fixes the shard order and the token permutations.
        shuffle: shuffle shards and tokens (train); False reads in manifest order (val/test).
        shuffle_buffer_tokens: window of the token shuffle (tokens mixed together); 0 keeps the stored order.
        drop_last: True (train): every rank gets n = N // (W * B) full batches. False (eval): every token of the
            split is read exactly once over the ranks; a rank's last batch may be short.
        max_tokens: use only the first max_tokens tokens of the split (eval subsets).
        skip_nonfinite: drop rows holding NaN/Inf (counted in each batch's "nonfinite_skipped") instead of raising.
        share: ``(r, S)``: every batch of the plan is a global batch shared by S data-parallel ranks, of which this
            stream yields rows ``[r * B / S, (r + 1) * B / S)``; each rank then reads the same windows as one process
            would and keeps its part, so the S ranks together train on exactly the batches of one process (the
            reading cost per rank is one process's). Use with ``rank=0, world_size=1``; B must be divisible by S.
    """

    def __init__(
        self,
        shards: list[ShardRef],
        manifest: Any,
        *,
        batch_size_tokens: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer_tokens: int = 65536,
        drop_last: bool = True,
        max_tokens: Optional[int] = None,
        skip_nonfinite: bool = False,
        share: tuple[int, int] = (0, 1),
    ):
        super().__init__()
        if batch_size_tokens <= 0:
            raise ValueError(f"batch_size_tokens must be positive, got {batch_size_tokens}")
        part, parts = int(share[0]), int(share[1])
        if not 0 <= part < parts or batch_size_tokens % parts or (parts > 1 and world_size != 1):
            raise ValueError(f"share={share}: a part of a batch of {batch_size_tokens} tokens needs 0 <= r < S, S "
                             f"dividing the batch, and world_size 1 (got {world_size})")
        self.share = (part, parts)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.shards = list(shards)
        self.manifest = manifest
        self.d_in, self.dtype, self.block_tokens = layout_of(manifest)
        self.batch_size_tokens = int(batch_size_tokens)
        self.rank, self.world_size = int(rank), int(world_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.shuffle_buffer_tokens = max(int(shuffle_buffer_tokens), 0)
        self.drop_last = bool(drop_last)
        self.skip_nonfinite = bool(skip_nonfinite)
        total = sum(s.tokens for s in self.shards)
        self.total_tokens = total if max_tokens is None else min(total, int(max_tokens))
        self.plan = EpochPlan(self.total_tokens, self.batch_size_tokens, self.world_size, self.drop_last)
        self.epoch = 0
        self.skip_batches = 0
        self._ring = None

    # ---- layout -------------------------------------------------------------------------------------------------
    @property
    def rank_tokens(self) -> int:
        """Tokens this rank reads per epoch."""
        return self.plan.rank_tokens(self.rank)

    @property
    def num_batches(self) -> int:
        """Batches of this rank per epoch (equal on every rank for training)."""
        return self.plan.num_batches(self.rank)

    @property
    def dropped_tokens(self) -> int:
        """Tokens of the split not used in an epoch (the tail of the epoch's shard order; see the drop rule)."""
        return self.plan.dropped_tokens

    def __len__(self) -> int:
        return self.num_batches

    def set_position(self, epoch: int, skip_batches: int = 0) -> None:
        """Choose the epoch (shuffle order) and how many of this rank's batches to skip (resume)."""
        self.epoch, self.skip_batches = int(epoch), int(skip_batches)

    def shard_order(self, epoch: int) -> list[ShardRef]:
        """The epoch's shard order: seeded permutation when shuffling, manifest order otherwise."""
        return [self.shards[i] for i in shard_order(len(self.shards), self.seed, epoch, self.shuffle)]

    def worker_part(self, worker: int, num_workers: int) -> tuple[int, int, int]:
        """(first batch index, number of batches, first token) of worker ``worker`` within this rank's slice."""
        return self.plan.worker_span(self.rank, worker, num_workers)[:3]

    # ---- iteration ------------------------------------------------------------------------------------------------
    def attach_ring(self, ring) -> None:
        """Let workers hand batches over through preallocated shared memory (set by the loader, main process)."""
        self._ring = ring

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        physical, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        part, skip = resume_share(self.skip_batches, physical, num_workers)
        _, count, tok_start, tok_stop = self.plan.worker_span(self.rank, part, num_workers)
        if count == 0 or skip >= count:
            return
        ring = self._ring if info is not None else None
        yield from self._batches(self.shard_order(self.epoch), tok_start, tok_stop, skip, ring, physical)

    def _batches(self, order: list[ShardRef], tok_start: int, tok_stop: int, skip: int, ring, worker: int):
        b = self.batch_size_tokens
        part, parts = self.share
        lo, hi = part * b // parts, (part + 1) * b // parts  # this rank's rows of every (global) batch
        at = 0  # rows of the current global batch before the next piece
        np_dtype = np.uint16 if self.dtype == "bfloat16" else np.float16
        window = window_size(b, self.shuffle, self.shuffle_buffer_tokens)

        def perm_of(ws: int, n: int) -> Optional[np.ndarray]:
            return window_permutation(self.seed, self.epoch, tok_start + ws, n, self.shuffle,
                                      self.shuffle_buffer_tokens)

        first_window = (skip * b) // window * window
        # One reader over the worker's whole remaining part (opening each shard once), cut into windows.
        source = _Taker(read_range(order, self.manifest, tok_start + first_window, tok_stop, buffers={}))
        dst = None
        emitted = 0
        for ws, n_win, pieces in window_pieces(tok_stop - tok_start, skip, b, window, perm_of):
            win = source.take(n_win)
            bad = nonfinite_rows(win["acts"], self.dtype)
            any_bad = bool(bad.any())
            rows = row_view(win["acts"])
            for idx, done in pieces:
                if parts > 1:
                    m = len(idx)
                    idx = idx[min(max(lo - at, 0), m):min(max(hi - at, 0), m)]
                    at = 0 if done else at + m
                if any_bad and not self.skip_nonfinite and bad[idx].any():  # a row this rank trains on
                    first_bad = int(idx[bad[idx]].min())
                    raise nonfinite_error(self._locate(order, tok_start + ws + first_bad), bad, win["ctx"],
                                          win["pos"])
                if dst is None:
                    dst = ring.slot(worker, emitted) if ring is not None else Dest.fresh(hi - lo, self.d_in,
                                                                                        np_dtype)
                if any_bad:
                    keep = idx[~bad[idx]]
                    dst.skipped += len(idx) - len(keep)
                    idx = keep
                dst.put(rows, win, idx)
                if not done:
                    continue
                if dst.kept == 0:
                    raise ShardError(f"a whole batch of {b} tokens held only NaN/Inf rows (epoch {self.epoch}, "
                                     f"rank {self.rank}); the shards are broken: re-harvest them")
                batch = dst.batch(self.dtype)
                if self.skip_nonfinite:
                    batch["nonfinite_skipped"] = torch.tensor(dst.skipped, dtype=torch.int64)
                    if dst.skipped:
                        log.warning("skipped %d NaN/Inf activation rows in a batch (skip_nonfinite=True)",
                                    dst.skipped)
                yield batch
                emitted += 1
                dst = None

    def _locate(self, order: list[ShardRef], token: int) -> str:
        """Name the shard holding token ``token`` of the epoch sequence (for error messages)."""
        offset = 0
        for ref in order:
            if offset + ref.tokens > token:
                bt = self.block_tokens
                return f"{ref.url} (block {(token - offset) // bt}, row {(token - offset) % bt})"
            offset += ref.tokens
        return "?"


class Dest:
    """Where one batch is assembled: fresh arrays (in-process) or a slot of the shared ring (worker)."""

    def __init__(self, acts: np.ndarray, ids: np.ndarray, slot: Optional[tuple[int, int]] = None):
        self.acts, self.ids, self.slot = acts, ids, slot  # acts (B, d) 2-byte storage; ids (3, B) int64
        self.rows = row_view(acts)
        self.kept = self.skipped = 0

    @classmethod
    def fresh(cls, b: int, d: int, np_dtype) -> "Dest":
        return cls(np.empty((b, d), np_dtype), np.empty((3, b), np.int64))

    def put(self, rows: np.ndarray, win: dict, idx: np.ndarray) -> None:
        """Gather window rows ``idx`` into the next free rows (mode="clip": unbuffered take, idx are in range)."""
        m, k = len(idx), self.kept
        np.take(rows, idx, axis=0, out=self.rows[k:k + m], mode="clip")
        for c, name in enumerate(("tok", "ctx", "pos")):
            np.take(win[name], idx, out=self.ids[c, k:k + m], mode="clip")
        self.kept += m

    def batch(self, dtype: str) -> dict[str, torch.Tensor]:
        n = self.kept
        if self.slot is not None:  # the main process copies the rows out of shared memory (transport.Ring.unpack)
            return {"__slot__": torch.tensor([self.slot[0], self.slot[1], n], dtype=torch.int64)}
        ids = torch.from_numpy(self.ids[:, :n].copy() if n < self.ids.shape[1] else self.ids)
        return {"acts": from_storage(self.acts[:n], dtype), "tok": ids[0], "ctx": ids[1], "pos": ids[2]}


def row_view(acts: np.ndarray) -> np.ndarray:
    """View a (T, d) 2-byte array as (T, w) of the widest integer dividing a row, so fancy indexing copies rows in
    few wide moves instead of many 2-byte ones."""
    row_bytes = acts.shape[1] * acts.itemsize
    for wide in (np.int64, np.int32, np.int16):
        if row_bytes % np.dtype(wide).itemsize == 0:
            return acts.view(wide)
    return acts


class _Taker:
    """Pulls exactly n rows at a time out of an iterator of row pieces into one reused window buffer.

    Each piece is copied out before the next is requested (so the reader may reuse its buffers), and the returned
    window is only valid until the next ``take``. Reusing both avoids page-faulting ~100 MB of fresh memory per
    window, which costs as much as the reading itself.
    """

    def __init__(self, pieces: Iterator[dict[str, np.ndarray]]):
        self.pieces = pieces
        self.carry: Optional[dict[str, np.ndarray]] = None
        self.buf: Optional[dict[str, np.ndarray]] = None

    def _next(self) -> dict[str, np.ndarray]:
        piece = self.carry if self.carry is not None else next(self.pieces, None)
        self.carry = None
        if piece is None:  # read_range raises on short shards, so running dry here is a bug, not bad data
            raise RuntimeError("shard reader ran dry before the planned number of rows")
        return piece

    def take(self, n: int) -> dict[str, np.ndarray]:
        """The next n rows: acts in storage dtype, tok/ctx/pos as int64."""
        got = 0
        while got < n:
            piece = self._next()
            if self.buf is None or self.buf["acts"].shape[0] < n:
                a = piece["acts"]
                self.buf = {"acts": np.empty((n, a.shape[1]), a.dtype),
                            **{k: np.empty(n, np.int64) for k in ("tok", "ctx", "pos")}}
            m = piece["acts"].shape[0]
            if got + m > n:  # keep the rest for the next window; copy it, the reader reuses its buffers
                cut = n - got
                self.carry = {k: v[cut:].copy() for k, v in piece.items()}
                piece = {k: v[:cut] for k, v in piece.items()}
                m = cut
            for k in ("acts", "tok", "ctx", "pos"):
                self.buf[k][got:got + m] = piece[k]
            got += m
        return {k: v[:n] for k, v in self.buf.items()}
