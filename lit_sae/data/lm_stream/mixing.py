"""The mixing buffer: shuffles streamed token rows across many contexts before they are cut into batches.

Same scheme as the shard reader (:mod:`lit_sae.data.plan`, step 4), so that a stream and a harvest of the same tokens
give the same batches: the rank's row sequence is cut into *windows* of ``shuffle_buffer_tokens`` rows (rows of
``shuffle_buffer_tokens / kept tokens per context`` contexts), each window is permuted by
:func:`lit_sae.data.plan.window_permutation` (a pure function of seed, epoch and the window's start) and batches of
``batch_size_tokens`` rows are cut from the permuted windows in order, the rows of a batch gathered in window order.
In training the last ``N mod batch_size_tokens`` rows of an epoch are dropped (a partial batch), as the shard reader
drops them.

Memory: one window per hook point, ``shuffle_buffer_tokens x d x 2`` bytes (float16/bfloat16), plus the rows of one
LM forward carried into the next window; 0 disables mixing (windows of 4 batches, kept in order).

Resume needs no buffer contents or RNG state: a :class:`Position` names the window holding the next batch and where
its rows start in the text (forward number and rows to skip in it); resuming re-runs the LM for that one window and
skips the batches already consumed, and the permutation is recomputed from (seed, epoch, window start).
"""

from __future__ import annotations

from dataclasses import astuple, dataclass
from typing import Iterator, Optional

import numpy as np

from lit_sae.data.lm_stream.rows import LMRows
from lit_sae.data.plan import window_permutation

# Separates the ranks' permutation streams (a rank's window starts are counted in its own row sequence).
_RANK_STRIDE = 1 << 40


@dataclass(frozen=True)
class Position:
    """Where a rank's training stream continues: ``batches`` of ``epoch`` are consumed; the next batch's rows
    begin in window ``window``, which starts at forward ``lm_batch`` of the split after ``offset`` of its kept
    rows."""

    epoch: int = 0
    batches: int = 0
    window: int = 0
    lm_batch: int = 0
    offset: int = 0

    def as_list(self) -> list[int]:
        return list(astuple(self))


def window_tokens(batch_size_tokens: int, shuffle_buffer_tokens: int) -> int:
    """Rows per window: the mixing buffer, or 4 batches without mixing (as the shard reader)."""
    return shuffle_buffer_tokens if shuffle_buffer_tokens > 1 else 4 * batch_size_tokens


class _Rows:
    """Pulls rows out of a sequence of LMRows, remembering where the next unread row lies."""

    def __init__(self, rows: Iterator[LMRows], lm_batch: int, offset: int):
        self.rows, self.carry, self.skip = rows, None, offset
        self.where = (lm_batch, offset)  # (forward, kept rows of it already taken) of the next unread row

    def take(self, n: int) -> list[tuple[LMRows, int, int]]:
        """Up to n rows as (forward rows, start, stop) slices; fewer only when the text is exhausted."""
        out, got = [], 0
        while got < n:
            if self.carry is None:
                nxt = next(self.rows, None)
                if nxt is None:
                    break
                start = self.skip if nxt.index == self.where[0] else 0
                self.skip = 0
                self.carry = (nxt, start)
            piece, start = self.carry
            stop = min(len(piece), start + n - got)
            if stop > start:
                out.append((piece, start, stop))
                got += stop - start
            if stop < len(piece):
                self.carry, self.where = (piece, stop), (piece.index, stop)
            else:
                self.carry, self.where = None, (piece.index + 1, 0)
        return out


def mixed_batches(rows: Iterator[LMRows], hooks: list[str], *, batch_size_tokens: int, shuffle_buffer_tokens: int,
                  seed: int, rank: int, start: Position) -> Iterator[tuple[dict[str, np.ndarray], Position]]:
    """Training batches of one rank from ``start``: ``(rows, position after consuming it)``.

    ``rows`` must begin at forward ``start.lm_batch`` (rows of the forwards before are not expected). A batch is a
    dict of numpy arrays: ``acts@{hook}`` (B, d) storage dtype per hook point, ``tok``/``ctx``/``pos`` (B,) int64.
    """
    b = batch_size_tokens
    window = window_tokens(b, shuffle_buffer_tokens)
    source = _Rows(rows, start.lm_batch, start.offset)
    skip = start.batches * b  # rows of the epoch already consumed
    w = start.window
    parts: list[dict[str, np.ndarray]] = []
    filled, emitted = 0, start.batches
    first_of_batch: Optional[tuple[int, int, int]] = None
    while True:
        ws = w * window
        where = source.where
        pieces = source.take(window)
        n = sum(stop - begin for _, begin, stop in pieces)
        ended = n < window
        if ended:  # the epoch's row count is known now: drop the partial batch at its end
            n = min(n, ((ws + n) // b) * b - ws)
            if n <= 0:
                return
        win = _concat(pieces, hooks, n)
        perm = window_permutation(seed, start.epoch, rank * _RANK_STRIDE + ws, n, True, shuffle_buffer_tokens)
        p = max(skip - ws, 0)
        while p < n:
            if filled == 0:
                first_of_batch = (w, *where)
            r = min(b - filled, n - p)
            idx = np.arange(p, p + r) if perm is None else np.sort(perm[p:p + r])
            parts.append({k: v[idx] for k, v in win.items()})
            filled += r
            p += r
            if filled == b:
                emitted += 1
                batch = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
                yield batch, Position(start.epoch, emitted, *first_of_batch)
                parts, filled = [], 0
        if ended:
            return
        w += 1


def _concat(pieces: list[tuple[LMRows, int, int]], hooks: list[str], n: int) -> dict[str, np.ndarray]:
    """The first n rows of the pieces as one window: ``acts@{hook}``, tok, ctx, pos."""
    def cat(get):
        return np.concatenate([get(piece)[begin:stop] for piece, begin, stop in pieces])[:n]
    out = {f"acts@{h}": cat(lambda piece, h=h: piece.acts[h]) for h in hooks}
    for k in ("tok", "ctx", "pos"):
        out[k] = cat(lambda piece, k=k: getattr(piece, k))
    return out
