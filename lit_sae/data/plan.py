"""Which tokens each rank and DataLoader worker reads, in which order: pure functions, no I/O.

How one epoch of a split is laid out (deterministic given seed, epoch, world size, workers, batch and buffer sizes):

1. The split's shards (as listed in manifest.json) are put in a seeded order for the epoch (:func:`shard_order`;
   manifest order without shuffling); their tokens, concatenated in that order, form the epoch's sequence of N.
2. Ranks get contiguous slices of that sequence (:meth:`EpochPlan.rank_span`).
   *Train* (``drop_last``): each of the W ranks gets ``n * B`` tokens, ``n = N // (W * B)`` full batches, the same on
   every rank (DDP's gradient all-reduce needs equal step counts). **Drop rule:** the last ``N - W * n * B`` tokens
   (fewer than W * B) are not used in that epoch; as the shard order changes each epoch, so do the dropped tokens.
   *Eval* (val/test): every token is read exactly once whatever W: rank r gets ``N // W + (r < N % W)`` tokens, cut
   into batches of B (the rank's last batch may be short, and rank batch counts may differ by one: evaluation
   metrics are summed states synchronised once at the end, so no rank waits on a per-batch collective).
   Slices cut through shards and blocks, so any shard count works with any W and number of workers.
3. Within a rank, DataLoader worker k gets a contiguous part holding ``n // K + (k < n % K)`` of the rank's batches
   (:meth:`EpochPlan.worker_span`); the DataLoader takes batches round-robin from its workers, so batch j of the
   rank comes from part ``j % K``. After a resume at batch c, parts are rotated over workers so that the order
   continues (:func:`resume_share`).
4. Token shuffle: a worker cuts its part into windows of ``shuffle_buffer_tokens`` tokens (several blocks from
   several contexts), permutes every window with a seeded permutation (:func:`window_permutation`) and cuts batches
   from the concatenated permuted windows (:func:`window_pieces`). Batch composition is thus a pure function of
   token positions, which is what lets a resumed run skip exactly the batches already consumed without reading
   them. Rows inside a batch come in window order: the order inside a batch does not matter to training, and
   sorted gathers are twice as fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

_SHARD_SALT = 0x5A4D  # separates the shard-order stream from the token permutations of the same seed
_TOKEN_SALT = 0x70C


@dataclass(frozen=True)
class EpochPlan:
    """How N tokens of a split are shared among W ranks in batches of B tokens (see the module docstring)."""

    total_tokens: int
    """N: tokens of the split used (after ``max_tokens``)."""
    batch_size_tokens: int
    """B: tokens per batch."""
    world_size: int = 1
    """W: ranks."""
    drop_last: bool = True
    """True for training (equal full batches per rank, drop rule); False for evaluation (every token once)."""

    def __post_init__(self) -> None:
        if self.batch_size_tokens <= 0:
            raise ValueError(f"batch_size_tokens must be positive, got {self.batch_size_tokens}")
        if self.world_size <= 0 or self.total_tokens < 0:
            raise ValueError(f"bad plan: world_size {self.world_size}, total_tokens {self.total_tokens}")

    def rank_span(self, rank: int) -> tuple[int, int]:
        """[start, stop) of rank ``rank``'s tokens in the epoch's sequence."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world_size {self.world_size}")
        if self.drop_last:
            size = (self.total_tokens // (self.world_size * self.batch_size_tokens)) * self.batch_size_tokens
            return rank * size, (rank + 1) * size
        q, r = divmod(self.total_tokens, self.world_size)
        start = rank * q + min(rank, r)
        return start, start + q + (rank < r)

    def rank_tokens(self, rank: int) -> int:
        """Tokens rank ``rank`` reads per epoch."""
        start, stop = self.rank_span(rank)
        return stop - start

    def num_batches(self, rank: int) -> int:
        """Batches of rank ``rank`` per epoch (equal on every rank when ``drop_last``)."""
        return math.ceil(self.rank_tokens(rank) / self.batch_size_tokens)

    @property
    def dropped_tokens(self) -> int:
        """Tokens of the split not used in an epoch (0 for evaluation; the drop rule for training)."""
        return self.total_tokens - sum(self.rank_tokens(r) for r in range(self.world_size))

    def worker_span(self, rank: int, worker: int, num_workers: int) -> tuple[int, int, int, int]:
        """(first batch, number of batches, first token, token stop) of part ``worker`` of rank ``rank``'s slice."""
        n, k = self.num_batches(rank), num_workers
        counts = [n // k + (j < n % k) for j in range(k)]
        first = sum(counts[:worker])
        start, stop = self.rank_span(rank)
        tok_start = start + first * self.batch_size_tokens
        return first, counts[worker], tok_start, min(tok_start + counts[worker] * self.batch_size_tokens, stop)


def resume_share(consumed: int, physical_worker: int, num_workers: int) -> tuple[int, int]:
    """(part, batches of that part to skip) for a DataLoader worker after ``consumed`` batches of the pass.

    The DataLoader always starts its round-robin at worker 0, but after c consumed batches the next batch belongs to
    part c % K: parts are rotated over workers so that the output order continues where it stopped.
    """
    part = (physical_worker + consumed) % num_workers
    return part, consumed // num_workers + (part < consumed % num_workers)


def shard_order(n_shards: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """Indices of the split's shards in the epoch's reading order (seeded permutation, or manifest order)."""
    if not shuffle:
        return list(range(n_shards))
    return np.random.default_rng([seed, epoch, _SHARD_SALT]).permutation(n_shards).tolist()


def window_size(batch_size_tokens: int, shuffle: bool, shuffle_buffer_tokens: int) -> int:
    """Tokens read (and permuted) at a time: the shuffle buffer; without a shuffle any size works, so 4 batches."""
    return shuffle_buffer_tokens if (shuffle and shuffle_buffer_tokens > 1) else 4 * batch_size_tokens


def window_permutation(seed: int, epoch: int, global_start: int, n: int, shuffle: bool = True,
                       shuffle_buffer_tokens: int = 2) -> Optional[np.ndarray]:
    """Seeded permutation of the window of n tokens starting at epoch position ``global_start`` (None: keep order)."""
    if not shuffle or shuffle_buffer_tokens <= 1:
        return None
    return np.random.default_rng([seed, epoch, global_start, _TOKEN_SALT]).permutation(n)


def window_pieces(length: int, skip_batches: int, batch_size_tokens: int, window: int, perm_of) \
        -> Iterator[tuple[int, int, list[tuple[np.ndarray, bool]]]]:
    """Cut a worker's part of ``length`` tokens into windows and batches.

    Yields ``(window start, window length, pieces)`` for every window holding a batch after the first
    ``skip_batches``; a piece is ``(sorted row indices inside the window, whether this piece completes a batch)``.
    ``perm_of(window_start, n)`` gives the window's permutation or None. The part's last batch may be short.
    """
    b = batch_size_tokens
    pos = skip_batches * b  # local position of the first token to emit
    w = pos // window
    filled = 0
    while w * window < length:
        ws, we = w * window, min((w + 1) * window, length)
        n_win = we - ws
        perm = perm_of(ws, n_win)
        p = pos - ws if ws <= pos else 0
        pieces = []
        while p < n_win:
            r = min(b - filled, n_win - p)
            idx = np.arange(p, p + r) if perm is None else np.sort(perm[p:p + r])
            filled += r
            p += r
            done = filled == b or ws + p == length
            pieces.append((idx, done))
            if done:
                filled = 0
        yield ws, n_win, pieces
        w += 1


def epoch_batches(plan: EpochPlan, rank: int, num_workers: int, *, seed: int = 0, epoch: int = 0,
                  shuffle: bool = False, shuffle_buffer_tokens: int = 0, skip_batches: int = 0) -> list[np.ndarray]:
    """The epoch-sequence positions of every batch rank ``rank`` yields, in the DataLoader's output order.

    The reference the stream follows, written out for tests (exactly-once, resume) and tools; it reads nothing.
    """
    per_worker = []
    for physical in range(num_workers):
        part, skip = resume_share(skip_batches, physical, num_workers)
        _, count, tok_start, tok_stop = plan.worker_span(rank, part, num_workers)
        out, current = [], []
        if skip < count:
            window = window_size(plan.batch_size_tokens, shuffle, shuffle_buffer_tokens)

            def perm_of(ws: int, n: int, s=tok_start):
                return window_permutation(seed, epoch, s + ws, n, shuffle, shuffle_buffer_tokens)

            for ws, _, pieces in window_pieces(tok_stop - tok_start, skip, plan.batch_size_tokens, window, perm_of):
                for idx, done in pieces:
                    current.append(tok_start + ws + idx)
                    if done:
                        out.append(np.concatenate(current))
                        current = []
        per_worker.append(out)
    # Round-robin over workers, as torch's DataLoader does (a worker that ran dry is passed over).
    order, j = [], 0
    while any(per_worker):
        w = j % num_workers
        if per_worker[w]:
            order.append(per_worker[w].pop(0))
        j += 1
    return order
