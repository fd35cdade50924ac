"""Streaming activation shards into training: ``ActivationDataModule``.

How one epoch is laid out (deterministic given seed, epoch, world size, workers, batch and buffer sizes):

1. The train split's shards (as listed in manifest.json) are put in a seeded order for the epoch; their tokens,
   concatenated in that order, form the epoch's token sequence of N tokens.
2. Each of the W ranks gets an equal contiguous slice of ``n * batch_size_tokens`` tokens, with
   ``n = N // (W * batch_size_tokens)`` batches per rank. **Drop rule:** the last ``N - W * n * B`` tokens of the
   epoch's sequence (fewer than W * B tokens, so less than one batch per rank) are not used in that epoch; as the
   shard order changes each epoch, so do the dropped tokens. Every other stored token is used exactly once.
   Slices cut through shards and blocks, so any shard count works with any W and number of workers.
3. Within a rank, DataLoader worker k gets a contiguous part of the rank's slice holding the batches it returns,
   ``n // K + (k < n % K)``; the DataLoader takes batches round-robin from its workers, so batch j of the rank comes
   from part ``j % K`` (after a resume at batch c, parts are rotated over workers so that the order continues).
4. Token shuffle: each worker cuts its part into windows of ``shuffle_buffer_tokens`` tokens (several blocks from
   several contexts), permutes every window with a seeded permutation and cuts batches from the concatenated,
   permuted windows. Batch composition is thus a pure function of token positions, which is what lets a resumed run
   skip exactly the batches already consumed without reading them. (Rows inside a batch come in window order: the
   order inside a batch does not matter to training, and sorted gathers are twice as fast.)

Resume: the DataModule counts train batches in ``on_before_batch_transfer`` (main process, after Lightning's
prefetch, so a checkpoint taken after batch i counts i + 1) and saves ``{epoch, batches_consumed}`` in
``state_dict``; on resume each worker starts at its share of the consumed batches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from typing import Any, Callable, Iterator, NamedTuple, Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lit_sae.data.shards import (
    ShardError,
    ShardNotFoundError,
    decode_block_arrays,
    from_storage,
    is_url,
    iter_tar,
    manifest_location,
    nonfinite_error,
    nonfinite_rows,
    read_manifest,
)

log = logging.getLogger(__name__)

_FIX = "re-run `lit-sae harvest` for this folder (it resumes after the last complete shard) or restore the file"


class ShardRef(NamedTuple):
    """One shard of a split: where to open it, its manifest name and token count."""

    url: str
    name: str
    tokens: int


# --------------------------------------------------------------------------------------------------------------
# Reading token ranges out of shards


def _open(url: str):
    """Open a shard for reading with webdataset's gopen (local paths, file:, http(s):, pipe:, gs:, ...)."""
    import webdataset as wds

    try:
        return wds.gopen(url, "rb")
    except FileNotFoundError as exn:
        raise ShardNotFoundError(f"{url}: shard listed in manifest.json is missing; {_FIX}") from exn
    except Exception as exn:
        raise ShardError(f"{url}: cannot open shard ({type(exn).__name__}: {exn}); check the path or URL") from exn


def read_shard(
    ref: ShardRef, manifest: dict, start: int = 0, stop: Optional[int] = None, buffers: Optional[dict] = None
) -> Iterator[dict[str, np.ndarray]]:
    """Yield validated pieces of rows ``[start, stop)`` of one shard: dicts of numpy acts/tok/ctx/pos (views).

    With ``buffers`` (a dict, kept by the caller across calls) members are read into reused buffers, and each piece
    is only valid until the next one is requested: copy it out first.

    Blocks before ``start`` are skipped without being decoded (block b starts at row b * block_tokens, as
    ShardWriter writes them). Raises ShardError naming the shard for a truncated or corrupt tar, a block out of
    place, or a shard holding fewer rows than the manifest lists.
    """
    stop = ref.tokens if stop is None else stop
    if not 0 <= start <= stop <= ref.tokens:
        raise ValueError(f"bad row range [{start}, {stop}) for {ref.name} with {ref.tokens} rows")
    if start == stop:
        return
    bt = manifest["block_tokens"]
    first_block = start // bt
    prefix = ref.name[:-4] if ref.name.endswith(".tar") else ref.name

    def block_of(fname: str) -> int:
        try:
            return int(fname.split(".", 1)[0].rsplit("-", 1)[1])
        except (IndexError, ValueError):
            return first_block  # not a lit-sae member name: let decoding report it

    def wanted(fname: str) -> bool:
        return block_of(fname) >= first_block

    def buffer_for(fname: str, size: int) -> memoryview:
        ext = fname.rsplit("/", 1)[-1].partition(".")[2]
        buf = buffers.get(ext)
        if buf is None or len(buf) < size:
            buf = buffers[ext] = bytearray(size)
        return memoryview(buf)[:size]

    stream = _open(ref.url)
    offset = None
    pending: dict[str, Any] = {}
    try:
        for fname, data in iter_tar(stream, ref.url, select=wanted if first_block else None,
                                    buffer_for=buffer_for if buffers is not None else None):
            key, dot, ext = fname.rsplit("/", 1)[-1].partition(".")
            if not dot:
                continue
            if pending and pending["__key__"] != key:
                raise ShardError(f"{ref.url} (block {pending['__key__']}): incomplete block, members "
                                 f"{sorted(k for k in pending if k != '__key__')}; the shard is corrupt: {_FIX}")
            pending["__key__"] = key
            pending[ext.lower()] = data
            if len(pending) < 5:
                continue
            sample, pending = pending, {}
            if not key.startswith(prefix + "-"):
                raise ShardError(f"{ref.url}: holds block {key}, expected blocks named {prefix}-NNNNN; the file was "
                                 f"renamed or mixed up with another shard: {_FIX}")
            b = decode_block_arrays(sample, manifest, ref.url)
            n = b["acts"].shape[0]
            blk = block_of(key)
            if offset is None:
                offset = blk * bt
            if blk * bt != offset:
                raise ShardError(f"{ref.url} (block {key}): starts at row {offset}, expected {blk * bt} "
                                 f"(block_tokens={bt}); a short block sits before the end of the shard: {_FIX}")
            lo, hi = max(start - offset, 0), min(stop - offset, n)
            if hi > lo:
                yield {k: b[k][lo:hi] for k in ("acts", "tok", "ctx", "pos")}
            offset += n
            if offset >= stop:
                if offset > ref.tokens:
                    raise ShardError(f"{ref.url}: holds more than the {ref.tokens} rows manifest.json lists; the "
                                     f"shard and manifest disagree: {_FIX}")
                return
    except ShardError:
        raise
    except Exception as exn:
        raise ShardError(f"{ref.url}: truncated or corrupt tar ({type(exn).__name__}: {exn}); {_FIX}") from exn
    finally:
        stream.close()
    got = first_block * bt if offset is None else offset
    raise ShardError(f"{ref.url}: ends after {got} rows but manifest.json lists {ref.tokens}; the shard is truncated "
                     f"or was replaced after harvest: {_FIX}")


def read_range(shards: list[ShardRef], manifest: dict, start: int, stop: int,
               buffers: Optional[dict] = None) -> Iterator[dict[str, np.ndarray]]:
    """Yield pieces of tokens ``[start, stop)`` of the sequence formed by concatenating ``shards`` in order.

    ``buffers``: see :func:`read_shard` (pieces then are valid only until the next one is requested)."""
    for _, piece in read_range_with_refs(shards, manifest, start, stop, buffers):
        yield piece


def read_range_with_refs(shards: list[ShardRef], manifest: dict, start: int, stop: int,
                         buffers: Optional[dict] = None) -> Iterator[tuple[ShardRef, dict[str, np.ndarray]]]:
    """Like :func:`read_range`, yielding (shard, piece) so that errors about a piece can name its file."""
    offset = 0
    for ref in shards:
        lo, hi = offset, offset + ref.tokens
        offset = hi
        if hi <= start:
            continue
        if lo >= stop:
            return
        for piece in read_shard(ref, manifest, max(start - lo, 0), min(stop, hi) - lo, buffers):
            yield ref, piece


# --------------------------------------------------------------------------------------------------------------
# The per-rank stream


class ActivationStream(IterableDataset):
    """Dict batches of one split for one rank; splits its work over DataLoader workers itself (see module doc).

    Use with ``DataLoader(stream, batch_size=None, num_workers=K)``. ``len(stream)`` is the rank's batch count for
    the epoch (equal on every rank).

    Args:
        shards: the split's shards, in manifest order.
        manifest: the folder's manifest (d_in, dtype, block_tokens).
        batch_size_tokens: tokens per batch (B).
        rank, world_size: this process's rank and the number of ranks.
        seed: fixes the shard order and the token permutations.
        shuffle: shuffle shards and tokens (train); False reads in manifest order (val/test).
        shuffle_buffer_tokens: window of the token shuffle (tokens mixed together); 0 keeps the stored order.
        drop_last: True (train): every rank gets n = N // (W * B) full batches. False (eval): each rank gets
            N // W tokens and the last batch of a worker may be short.
        max_tokens: use only the first max_tokens tokens of the split (eval subsets).
        skip_nonfinite: drop rows holding NaN/Inf (counted in each batch's "nonfinite_skipped") instead of raising.
    """

    def __init__(
        self,
        shards: list[ShardRef],
        manifest: dict,
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
    ):
        super().__init__()
        if batch_size_tokens <= 0:
            raise ValueError(f"batch_size_tokens must be positive, got {batch_size_tokens}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.shards = list(shards)
        self.manifest = manifest
        self.batch_size_tokens = int(batch_size_tokens)
        self.rank, self.world_size = int(rank), int(world_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.shuffle_buffer_tokens = max(int(shuffle_buffer_tokens), 0)
        self.drop_last = bool(drop_last)
        self.skip_nonfinite = bool(skip_nonfinite)
        total = sum(s.tokens for s in self.shards)
        self.total_tokens = total if max_tokens is None else min(total, int(max_tokens))
        self.epoch = 0
        self.skip_batches = 0
        self._ring: Optional[_Ring] = None

    # ---- layout -------------------------------------------------------------------------------------------------
    @property
    def rank_tokens(self) -> int:
        """Tokens each rank reads per epoch (equal on every rank)."""
        if self.drop_last:
            return self.num_batches * self.batch_size_tokens
        return self.total_tokens // self.world_size

    @property
    def num_batches(self) -> int:
        """Batches per rank per epoch (equal on every rank)."""
        b = self.batch_size_tokens
        if self.drop_last:
            return self.total_tokens // (self.world_size * b)
        return math.ceil((self.total_tokens // self.world_size) / b)

    @property
    def dropped_tokens(self) -> int:
        """Tokens of the split not used in an epoch (the tail of the epoch's shard order; see the drop rule)."""
        return self.total_tokens - self.world_size * self.rank_tokens

    def __len__(self) -> int:
        return self.num_batches

    def set_position(self, epoch: int, skip_batches: int = 0) -> None:
        """Choose the epoch (shuffle order) and how many of this rank's batches to skip (resume)."""
        self.epoch, self.skip_batches = int(epoch), int(skip_batches)

    def shard_order(self, epoch: int) -> list[ShardRef]:
        """The epoch's shard order: seeded permutation when shuffling, manifest order otherwise."""
        if not self.shuffle:
            return list(self.shards)
        perm = np.random.default_rng([self.seed, epoch, 0x5A4D]).permutation(len(self.shards))
        return [self.shards[i] for i in perm]

    def worker_part(self, worker: int, num_workers: int) -> tuple[int, int, int]:
        """(first batch index, number of batches, first token) of worker ``worker`` within this rank's slice."""
        n, k = self.num_batches, num_workers
        counts = [n // k + (j < n % k) for j in range(k)]
        first = sum(counts[:worker])
        return first, counts[worker], self.rank * self.rank_tokens + first * self.batch_size_tokens

    # ---- iteration ------------------------------------------------------------------------------------------------
    def attach_ring(self, ring: Optional["_Ring"]) -> None:
        """Let workers hand batches over through preallocated shared memory (set by the loader, main process)."""
        self._ring = ring

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        physical, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        c = self.skip_batches
        # The DataLoader always starts its round-robin at worker 0, but after c consumed batches the next batch
        # belongs to part c % K: rotate parts over workers so that the output order continues where it stopped.
        worker = (physical + c) % num_workers
        first, count, tok_start = self.worker_part(worker, num_workers)
        skip = c // num_workers + (worker < c % num_workers)  # this part's share of the consumed batches
        if count == 0 or skip >= count:
            return
        tok_stop = min(tok_start + count * self.batch_size_tokens, (self.rank + 1) * self.rank_tokens)
        ring = getattr(self, "_ring", None) if info is not None else None
        yield from self._batches(self.shard_order(self.epoch), tok_start, tok_stop, skip, ring, physical)

    def _window_perm(self, n: int, global_start: int) -> Optional[np.ndarray]:
        """Seeded permutation of a window of n tokens starting at ``global_start`` (None: keep order)."""
        if not self.shuffle or self.shuffle_buffer_tokens <= 1:
            return None
        rng = np.random.default_rng([self.seed, self.epoch, global_start, 0x70C])
        return rng.permutation(n)

    def _batches(self, order: list[ShardRef], tok_start: int, tok_stop: int, skip: int,
                 ring: Optional["_Ring"], worker: int):
        b = self.batch_size_tokens
        d = self.manifest["d_in"]
        np_dtype = np.uint16 if self.manifest["dtype"] == "bfloat16" else np.float16
        length = tok_stop - tok_start
        # Window size: the shuffle buffer; without shuffling any size works, so read a few batches at a time.
        window = self.shuffle_buffer_tokens if (self.shuffle and self.shuffle_buffer_tokens > 1) else 4 * b
        pos = skip * b  # local position of the first token to emit
        w = pos // window
        dst = None
        emitted = 0
        # One reader over the worker's whole remaining part (opening each shard once), cut into windows.
        source = _Taker(read_range(order, self.manifest, tok_start + w * window, tok_stop, buffers={}))
        while w * window < length:
            ws, we = w * window, min((w + 1) * window, length)
            n_win = we - ws
            win = source.take(n_win)
            bad = nonfinite_rows(win["acts"], self.manifest["dtype"])
            any_bad = bool(bad.any())
            if any_bad and not self.skip_nonfinite:
                first_bad = int(np.flatnonzero(bad)[0])
                raise nonfinite_error(self._locate(order, tok_start + ws + first_bad), bad, win["ctx"], win["pos"])
            perm = self._window_perm(n_win, tok_start + ws)
            rows = _row_view(win["acts"])
            p = pos - ws if ws <= pos else 0
            while p < n_win:
                if dst is None:
                    dst = ring.slot(worker, emitted) if ring is not None else _Dest.fresh(b, d, np_dtype)
                r = min(b - dst.filled, n_win - p)
                # Sorting a batch's rows (their order inside a batch does not matter) makes the gather ~2x faster.
                idx = np.arange(p, p + r) if perm is None else np.sort(perm[p:p + r])
                if any_bad:
                    keep = idx[~bad[idx]]
                    dst.skipped += len(idx) - len(keep)
                    idx = keep
                dst.put(rows, win, idx)
                dst.filled += r
                p += r
                if dst.filled == b or ws + p == length:
                    if dst.kept == 0:
                        raise ShardError(f"a whole batch of {b} tokens held only NaN/Inf rows (epoch {self.epoch}, "
                                         f"rank {self.rank}); the shards are broken: re-harvest them")
                    batch = dst.batch(self.manifest["dtype"])
                    if self.skip_nonfinite:
                        batch["nonfinite_skipped"] = torch.tensor(dst.skipped, dtype=torch.int64)
                        if dst.skipped:
                            log.warning("skipped %d NaN/Inf activation rows in a batch (skip_nonfinite=True)",
                                        dst.skipped)
                    yield batch
                    emitted += 1
                    dst = None
            w += 1

    def _locate(self, order: list[ShardRef], token: int) -> str:
        """Name the shard holding token ``token`` of the epoch sequence (for error messages)."""
        offset = 0
        for ref in order:
            if offset + ref.tokens > token:
                bt = self.manifest["block_tokens"]
                return f"{ref.url} (block {(token - offset) // bt}, row {(token - offset) % bt})"
            offset += ref.tokens
        return "?"


class _Dest:
    """Where one batch is assembled: fresh arrays (in-process) or a slot of the shared ring (worker)."""

    def __init__(self, acts: np.ndarray, ids: np.ndarray, slot: Optional[tuple[int, int]] = None):
        self.acts, self.ids, self.slot = acts, ids, slot  # acts (B, d) 2-byte storage; ids (3, B) int64
        self.rows = _row_view(acts)
        self.filled = self.kept = self.skipped = 0

    @classmethod
    def fresh(cls, b: int, d: int, np_dtype) -> "_Dest":
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
        if self.slot is not None:  # the main process copies the rows out of shared memory (_Ring.unpack)
            return {"__slot__": torch.tensor([self.slot[0], self.slot[1], n], dtype=torch.int64)}
        ids = torch.from_numpy(self.ids[:, :n].copy() if n < self.ids.shape[1] else self.ids)
        return {"acts": from_storage(self.acts[:n], dtype), "tok": ids[0], "ctx": ids[1], "pos": ids[2]}


class _Ring:
    """Preallocated shared-memory batch slots, ``slots`` per worker.

    Why: a DataLoader worker normally hands each batch over in a fresh shared-memory segment, whose creation and
    page faults cap transfers at about 250k activations/s (d_in 768, fp16) on a 2-core machine. Slots are allocated
    once per pass; a worker writes batch j into its slot j % slots and sends only the slot number; the main process
    copies the rows out before it asks for the next batch. The DataLoader keeps at most prefetch_factor * workers
    batches in flight, so ``slots = prefetch_factor * workers + 2`` per worker are never overwritten while in use.
    """

    def __init__(self, workers: int, slots: int, b: int, d: int, dtype: str):
        self.slots = slots
        self.dtype = dtype
        self.acts = torch.empty((workers, slots, b, d), dtype=torch.int16).share_memory_()
        self.ids = torch.empty((workers, slots, 3, b), dtype=torch.int64).share_memory_()

    def slot(self, worker: int, j: int) -> _Dest:
        s = j % self.slots
        acts = self.acts[worker, s].numpy().view(np.uint16 if self.dtype == "bfloat16" else np.float16)
        return _Dest(acts, self.ids[worker, s].numpy(), slot=(worker, s))

    def unpack(self, batch: Any, pin_memory: bool = False) -> Any:
        """Main process: replace a slot reference by a private copy of the batch (in pinned memory if asked)."""
        if not isinstance(batch, dict) or "__slot__" not in batch:
            return batch
        worker, s, n = batch.pop("__slot__").tolist()
        src_acts, src_ids = self.acts[worker, s, :n], self.ids[worker, s, :, :n]
        if pin_memory:  # copy straight into page-locked memory (the DataLoader's pinning saw only the slot number)
            acts = torch.empty(src_acts.shape, dtype=src_acts.dtype, pin_memory=True)
            ids = torch.empty(src_ids.shape, dtype=src_ids.dtype, pin_memory=True)
            acts.numpy()[:] = src_acts.numpy()
            ids.numpy()[:] = src_ids.numpy()
        else:
            # numpy copies: torch's clone() spreads a 6 MB copy over its thread pool, 10x slower on a busy 2-core box.
            acts = torch.from_numpy(src_acts.numpy().copy())
            ids = torch.from_numpy(src_ids.numpy().copy())
        acts = acts.view(torch.bfloat16 if self.dtype == "bfloat16" else torch.float16)
        batch.update(acts=acts, tok=ids[0], ctx=ids[1], pos=ids[2])
        return batch


def _row_view(acts: np.ndarray) -> np.ndarray:
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


class _StreamLoader(DataLoader):
    """A DataLoader for an ActivationStream: calls ``on_iter(dataset)`` in the main process before each pass (to set
    the epoch and resume position) and, with workers, moves batches through a shared-memory ring (see _Ring)."""

    def __init__(self, dataset: ActivationStream, on_iter: Optional[Callable[[ActivationStream], None]] = None,
                 **kwargs):
        super().__init__(dataset, **kwargs)
        self.on_iter = on_iter

    def __iter__(self):
        if self.on_iter is not None:
            self.on_iter(self.dataset)
        ring = None
        if self.num_workers > 0 and isinstance(self.dataset, ActivationStream):
            prefetch = self.prefetch_factor or 2
            ds = self.dataset
            ring = _Ring(self.num_workers, prefetch * self.num_workers + 2, ds.batch_size_tokens,
                         ds.manifest["d_in"], ds.manifest["dtype"])
            ds.attach_ring(ring)
        it = super().__iter__()
        if isinstance(self.dataset, ActivationStream):
            self.dataset.attach_ring(None)  # the workers hold their copy; keep the main process's dataset plain
        # Pin only where an accelerator exists (the DataLoader itself ignores pin_memory otherwise).
        pin = self.pin_memory and torch.cuda.is_available()
        return it if ring is None else _unpacked(it, ring, pin)


def _unpacked(it, ring: _Ring, pin_memory: bool):
    """Yield the loader's batches with slot references replaced by private copies (before the next one is asked)."""
    for batch in it:
        yield ring.unpack(batch, pin_memory)


# --------------------------------------------------------------------------------------------------------------
# The DataModule


def _shard_base(path: str) -> str:
    """Folder or URL prefix that the manifest's shard names are relative to: the folder of ``path``'s manifest."""
    loc = manifest_location(path)
    return loc.rsplit("/", 1)[0] if "/" in loc else "."


class ActivationDataModule(L.LightningDataModule):
    """Streams activation shards written by ``lit-sae harvest`` into training, validation and test.

    Args:
        path: a shard folder, a ``manifest.json`` path, a brace pattern of shards (``dir/train-{000000..000009}.tar``:
            only the listed shards that the pattern names are used) or any URL webdataset opens
            (``https://host/shards``, ``file:``, ``gs://``, ...) whose folder holds manifest.json.
        batch_size_tokens: tokens (activation vectors) per batch.
        shuffle_buffer_tokens: tokens mixed by the token shuffle (windows of several blocks, so tokens of many
            contexts share a batch). Memory per worker: about 2 * d_in * this many bytes. 0 disables token shuffle.
        num_workers: DataLoader worker processes (0: read in the main process). On 2 cores, 1 is a good default.
        seed: fixes shard order and token permutations (with the epoch).
        skip_nonfinite: skip rows with NaN/Inf (warning, counted in ``nonfinite_skipped`` and logged as
            ``data/nonfinite_skipped``) instead of raising ShardError.
        val_tokens, test_tokens: use only the first this many tokens of the val/test split (None: all).
        shuffle: shuffle the training stream (False: manifest order, for debugging).
        manifest_path: read manifest.json from here instead of from ``path``'s folder (shards are still
            ``{path folder}/{name}``).
        pin_memory: pin batches (for GPU training).
        verify: hash every shard against manifest.json in ``setup`` (reads all data once; see verify_shards).
    """

    def __init__(
        self,
        path: str,
        batch_size_tokens: int = 4096,
        shuffle_buffer_tokens: int = 65536,
        num_workers: int = 1,
        seed: int = 0,
        skip_nonfinite: bool = False,
        val_tokens: Optional[int] = None,
        test_tokens: Optional[int] = None,
        shuffle: bool = True,
        manifest_path: Optional[str] = None,
        pin_memory: bool = False,
        verify: bool = False,
    ):
        super().__init__()
        if batch_size_tokens <= 0:
            raise ValueError(f"data.batch_size_tokens must be positive, got {batch_size_tokens}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        self.save_hyperparameters()
        self.path = str(path)
        self.batch_size_tokens = int(batch_size_tokens)
        self.shuffle_buffer_tokens = int(shuffle_buffer_tokens)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.val_tokens, self.test_tokens = val_tokens, test_tokens
        self.shuffle = bool(shuffle)
        self.pin_memory = bool(pin_memory)
        self.verify, self._verified = bool(verify), False

        source = manifest_path or self.path
        self.manifest: dict = read_manifest(source)
        self.manifest_url = manifest_location(source)
        self.d_in: int = int(self.manifest["d_in"])
        self.dtype: str = self.manifest["dtype"]
        self.hook_point: Optional[str] = self.manifest.get("hook_point")
        self.model_name: Optional[str] = (self.manifest.get("model") or {}).get("name_or_path")
        if not self.manifest.get("complete", True):
            log.warning("%s: harvest is not complete; training on the %d shards finished so far",
                        self.manifest_url, sum(len(s.get("shards", [])) for s in self.manifest["splits"].values()))
        self._splits = self._resolve_shards()

        # Stream position (see state_dict). _resume holds a loaded position until the epoch it belongs to starts.
        self._epoch = 0
        self._consumed = 0
        self._next_epoch = 0
        self._resume: Optional[dict] = None
        self.nonfinite_skipped = 0

    # ---- shards ---------------------------------------------------------------------------------------------------
    def _resolve_shards(self) -> dict[str, list[ShardRef]]:
        """Shard refs per split: manifest names, joined to the folder/URL, filtered by a brace pattern if given."""
        base = _shard_base(self.path)
        selected = None
        if "{" in self.path:
            import braceexpand

            selected = {p.rsplit("/", 1)[-1] for p in braceexpand.braceexpand(self.path)}
            listed = {s["name"] for e in self.manifest["splits"].values() for s in e["shards"]}
            unknown = sorted(selected - listed)
            if unknown:
                raise ShardError(f"{self.manifest_url}: the pattern {self.path!r} names shards the manifest does not "
                                 f"list ({unknown[:5]}{' ...' if len(unknown) > 5 else ''}); they are incomplete or "
                                 "from another harvest; use the folder path or a pattern of listed shards")
        splits: dict[str, list[ShardRef]] = {}
        missing = []
        for split, entry in self.manifest["splits"].items():
            refs = []
            for s in entry["shards"]:
                if selected is not None and s["name"] not in selected:
                    continue
                url = f"{base}/{s['name']}"
                if not is_url(url) and not os.path.exists(url):
                    missing.append(url)
                refs.append(ShardRef(url, s["name"], int(s["tokens"])))
            splits[split] = refs
        if missing:
            raise ShardNotFoundError(f"{missing[0]}: shard listed in {self.manifest_url} is missing "
                                     f"({len(missing)} missing in all); {_FIX}")
        return splits

    def verify_shards(self, splits: Optional[list[str]] = None) -> int:
        """Hash every shard of ``splits`` (default: all) against manifest.json's sha256; return the bytes hashed.

        Catches corruption the format checks cannot see (flipped bits inside activation data). Reads everything
        once, so it is opt-in: ``data.verify_shards: true`` runs it in ``setup`` on each rank.
        """
        checked = 0
        for split in splits or list(self._splits):
            by_name = {s["name"]: s for s in self.manifest["splits"][split]["shards"]}
            for ref in self._splits.get(split, []):
                want = by_name[ref.name].get("sha256")
                if not want:
                    continue
                sha = hashlib.sha256()
                stream = _open(ref.url)
                try:
                    while chunk := stream.read(1 << 22):
                        sha.update(chunk)
                        checked += len(chunk)
                finally:
                    stream.close()
                if sha.hexdigest() != want:
                    raise ShardError(f"{ref.url}: sha256 {sha.hexdigest()[:16]}... differs from manifest.json's "
                                     f"{want[:16]}...; the file is corrupt or was replaced: {_FIX}")
        return checked

    def setup(self, stage: str) -> None:
        """Optionally verify shard hashes (``verify_shards=True``) before any batch is read."""
        if self.verify and not self._verified:
            n = self.verify_shards()
            log.info("verified %.1f MB of shards against manifest.json", n / 1e6)
            self._verified = True

    def shards(self, split: str) -> list[ShardRef]:
        """The shards of ``split`` (train/val/test) in manifest order."""
        return list(self._splits.get(split, []))

    def _split_or_raise(self, split: str) -> list[ShardRef]:
        refs = self.shards(split)
        if not refs or sum(r.tokens for r in refs) == 0:
            raise ShardError(f"{self.manifest_url}: split {split!r} has no shards (or no tokens); harvest it, e.g. "
                             f"set the harvest's {split} token count above 0, or point data.path at a complete folder")
        return refs

    # ---- distribution ----------------------------------------------------------------------------------------------
    def _world(self) -> tuple[int, int]:
        """(rank, world_size) from the trainer, else torch.distributed, else (0, 1)."""
        trainer = self._trainer_or_none()
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _trainer_or_none(self):
        return getattr(self, "trainer", None)

    # ---- datasets and loaders ------------------------------------------------------------------------------------
    def train_dataset(self, rank: Optional[int] = None, world_size: Optional[int] = None) -> ActivationStream:
        """The training stream for one rank (rank/world_size default to the trainer's or torch.distributed's)."""
        r, w = self._world()
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
        ds = ActivationStream(
            self._split_or_raise("train"), self.manifest, batch_size_tokens=self.batch_size_tokens, rank=rank,
            world_size=world_size, seed=self.seed, shuffle=self.shuffle,
            shuffle_buffer_tokens=self.shuffle_buffer_tokens, drop_last=True, skip_nonfinite=self.skip_nonfinite,
        )
        if ds.num_batches == 0:
            raise ShardError(f"{self.manifest_url}: the train split has {ds.total_tokens} tokens, fewer than one "
                             f"batch per rank (world_size {world_size} x batch_size_tokens {self.batch_size_tokens}); "
                             "harvest more tokens or lower data.batch_size_tokens")
        if ds.dropped_tokens:
            log.info("train: %d of %d tokens per epoch unused (drop rule: tail of the epoch's shard order)",
                     ds.dropped_tokens, ds.total_tokens)
        return ds

    def eval_dataset(self, split: str, rank: Optional[int] = None, world_size: Optional[int] = None,
                     max_tokens: Optional[int] = None) -> ActivationStream:
        """An unshuffled stream over ``split`` for one rank (each rank gets N // world_size tokens)."""
        r, w = self._world()
        return ActivationStream(
            self._split_or_raise(split), self.manifest, batch_size_tokens=self.batch_size_tokens,
            rank=r if rank is None else rank, world_size=w if world_size is None else world_size, seed=self.seed,
            shuffle=False, drop_last=False, max_tokens=max_tokens, skip_nonfinite=self.skip_nonfinite,
        )

    def _loader(self, ds: ActivationStream, on_iter=None) -> DataLoader:
        return _StreamLoader(
            ds, on_iter=on_iter, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
            # Fresh workers each epoch: they must see the epoch and resume position set in the main process.
            persistent_workers=False,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches of this rank; the epoch and resume position are applied at each pass."""
        return self._loader(self.train_dataset(), on_iter=self._begin_train_epoch)

    def val_dataloader(self):
        """Validation batches (val split, manifest order, first ``val_tokens`` tokens); [] (no validation, with a
        warning) when the harvest has no val split or val_tokens is 0."""
        if not sum(r.tokens for r in self.shards("val")) or self.val_tokens == 0:
            log.warning("%s: no val tokens (split empty or data.val_tokens=0): validation is skipped",
                        self.manifest_url)
            return []
        return self._loader(self.eval_dataset("val", max_tokens=self.val_tokens))

    def test_dataloader(self) -> DataLoader:
        """Test batches (test split, manifest order, first ``test_tokens`` tokens)."""
        return self._loader(self.eval_dataset("test", max_tokens=self.test_tokens))

    # ---- stream position --------------------------------------------------------------------------------------------
    def _begin_train_epoch(self, ds: ActivationStream) -> None:
        """Main process, before workers start: pick the epoch and the batches to skip (after a resume)."""
        trainer = self._trainer_or_none()
        epoch = int(trainer.current_epoch) if trainer is not None else self._next_epoch
        skip = 0
        if self._resume is not None:
            if self._resume["epoch"] == epoch:
                skip = min(int(self._resume["batches_consumed"]), ds.num_batches)
                log.info("resuming the data stream at epoch %d, batch %d of %d", epoch, skip, ds.num_batches)
            self._resume = None
        ds.set_position(epoch, skip)
        self._epoch, self._consumed, self._next_epoch = epoch, skip, epoch + 1

    def advance(self, n_batches: int = 1) -> None:
        """Count train batches consumed. Lightning does this through ``on_before_batch_transfer``; call it yourself
        when iterating ``train_dataloader()`` without a Trainer and you want ``state_dict`` to track the position."""
        self._consumed += int(n_batches)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count a consumed train batch (main process, once per step) and collect the non-finite skip count."""
        if isinstance(batch, dict):
            skipped = batch.pop("nonfinite_skipped", None)
            if skipped is not None and int(skipped):
                self._note_nonfinite(int(skipped))
            trainer = self._trainer_or_none()
            if trainer is not None and trainer.training:
                self._consumed += 1
        return batch

    def _note_nonfinite(self, n: int) -> None:
        self.nonfinite_skipped += n
        log.warning("skip_nonfinite: skipped %d NaN/Inf rows (%d so far)", n, self.nonfinite_skipped)
        trainer = self._trainer_or_none()
        if trainer is not None and trainer.logger is not None:
            trainer.logger.log_metrics({"data/nonfinite_skipped": float(self.nonfinite_skipped)},
                                       step=trainer.global_step)

    def _layout(self) -> dict:
        """What the batch order depends on besides epoch: a resume with another layout cannot continue exactly."""
        _, world_size = self._world()
        names = [(r.name, r.tokens) for r in self.shards("train")]
        return {
            "world_size": world_size,
            "num_workers": max(self.num_workers, 1),
            "batch_size_tokens": self.batch_size_tokens,
            "shuffle_buffer_tokens": self.shuffle_buffer_tokens,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "train_shards": hashlib.sha256(json.dumps(names).encode()).hexdigest()[:16],
        }

    def state_dict(self) -> dict:
        """Position in the training stream (saved by Lightning in checkpoints)."""
        return {
            "version": 1,
            "epoch": self._epoch,
            "batches_consumed": self._consumed,
            "layout": self._layout(),
            "nonfinite_skipped": self.nonfinite_skipped,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the stream position; the next train pass of that epoch skips the consumed batches.

        Raises ValueError naming the settings that differ when the checkpoint's data layout does not match (the
        batch order depends on them, so the run could not continue exactly).
        """
        saved = state_dict.get("layout", {})
        now = self._layout()
        diff = {k: (saved[k], now[k]) for k in now if k in saved and saved[k] != now[k]}
        if diff:
            desc = ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"data: the checkpoint's stream position does not fit this data setup ({desc}); the batch order "
                "depends on these settings, so resuming would repeat or skip data. Set them back to the checkpoint's "
                "values (train_shards: use the same shard folder) or start a fresh run without --ckpt_path"
            )
        self._resume = {"epoch": int(state_dict["epoch"]), "batches_consumed": int(state_dict["batches_consumed"])}
        self._epoch, self._consumed = self._resume["epoch"], self._resume["batches_consumed"]
        self._next_epoch = self._epoch
        self.nonfinite_skipped = int(state_dict.get("nonfinite_skipped", 0))

    # ---- samples ----------------------------------------------------------------------------------------------------
    def sample_activations(self, n_tokens: int) -> torch.Tensor:
        """A deterministic float32 (n, d_in) sample of training activations (for b_pre / scale initialisation).

        Takes n_tokens / m tokens from each of m = min(8, shards) evenly spaced places of the seed's shard order, so
        the sample spans several parts of the corpus. Returns fewer rows if the split is smaller (or rows were
        NaN/Inf and skip_nonfinite is on).
        """
        refs = self._split_or_raise("train")
        order = ActivationStream(refs, self.manifest, batch_size_tokens=1, seed=self.seed).shard_order(0)
        total = sum(r.tokens for r in refs)
        if n_tokens > total:
            log.warning("sample_activations: asked for %d tokens, the train split has %d", n_tokens, total)
        n = min(int(n_tokens), total)
        m = max(1, min(8, len(refs), n))
        out = []
        for i in range(m):
            start = (i * total) // m
            take = n // m + (i < n % m)
            for ref, piece in read_range_with_refs(order, self.manifest, start, start + take):
                acts = piece["acts"]
                bad = nonfinite_rows(acts, self.dtype)
                if bad.any():
                    if not self.skip_nonfinite:
                        raise nonfinite_error(ref.url, bad, piece["ctx"], piece["pos"])
                    acts = acts[~bad]
                out.append(from_storage(np.array(acts), self.dtype).float())
        if not out:
            return torch.empty(0, self.d_in)
        return torch.cat(out)
