"""Writing activation shards crash-safely: :class:`ShardWriter`.

A tar is written under a temporary name, fsynced and renamed when complete, and readers only ever open names listed
in ``manifest.json`` (itself replaced atomically), so no reader can see a half-written shard.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tarfile
from typing import Any, Callable, Optional

import numpy as np
import torch

from lit_sae.data.shard_format import DTYPES, MEMBERS, block_key, npy_bytes, shard_name, to_storage
from lit_sae.fsync import atomic_write

log = logging.getLogger(__name__)


class _HashingFile:
    """A write-only file wrapper that hashes what passes through (saves re-reading a shard to hash it)."""

    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()
        self.pos = 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.pos += len(b)
        return self.f.write(b)

    def tell(self) -> int:
        return self.pos


def _as_1d(x, name: str, np_dtype, n: int) -> np.ndarray:
    """Convert token/ctx/pos ids to a contiguous 1-D array of the stored integer dtype, checking the length."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu").numpy()
    a = np.asarray(x)
    if a.ndim != 1 or a.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) to match acts, got {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name} must be integers, got {a.dtype}")
    return np.ascontiguousarray(a.astype(np_dtype, copy=False))


class ShardWriter:
    """Buffers activation rows and writes complete shards crash-safely.

    Rows added with :meth:`add` are cut into blocks of ``block_tokens``; every ``tokens_per_shard`` rows a shard
    ``{split}-{index:06d}.tar`` is written into an exclusive temporary file, fsynced, and renamed over the final name,
    then ``on_shard({"name", "tokens", "blocks", "sha256"})`` is called (harvest appends the info to the manifest and
    rewrites it with :func:`write_manifest_atomic`). Tars are byte-deterministic (fixed mtime/owner), so a resumed
    harvest that writes the same rows writes the same bytes.

    Args:
        out_dir: shard folder (created if missing).
        split: "train", "val" or "test" (any name without "-" or "." works).
        d_in: activation width.
        dtype: storage dtype, "float16" or "bfloat16".
        block_tokens: rows per block (one tar sample).
        tokens_per_shard: rows per shard; must be a multiple of block_tokens so that only the last block of a
            split can be short.
        start_index: index of the first shard written (harvest resumes after its last complete shard).
        on_shard: callback receiving each completed shard's info dict.
    """

    def __init__(
        self,
        out_dir: str,
        split: str,
        d_in: int,
        dtype: str,
        block_tokens: int,
        tokens_per_shard: int,
        start_index: int = 0,
        on_shard: Optional[Callable[[dict], Any]] = None,
    ):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if "-" in split or "." in split or "/" in split or not split:
            raise ValueError(f"split name {split!r} must be non-empty and contain no '-', '.' or '/'")
        if d_in <= 0 or block_tokens <= 0 or tokens_per_shard <= 0:
            raise ValueError(
                f"d_in, block_tokens and tokens_per_shard must be positive, got {d_in}, {block_tokens}, "
                f"{tokens_per_shard}"
            )
        if tokens_per_shard % block_tokens:
            raise ValueError(
                f"tokens_per_shard ({tokens_per_shard}) must be a multiple of block_tokens ({block_tokens}) so that "
                "only the last block of a split is short"
            )
        if start_index < 0:
            raise ValueError(f"start_index must be >= 0, got {start_index}")
        self.out_dir = str(out_dir)
        self.split = split
        self.d_in = int(d_in)
        self.dtype = dtype
        self.block_tokens = int(block_tokens)
        self.tokens_per_shard = int(tokens_per_shard)
        self.index = int(start_index)
        self.on_shard = on_shard
        self.written: list[dict] = []
        self._chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self._buffered = 0
        self._closed = False
        os.makedirs(self.out_dir, exist_ok=True)

    @property
    def buffered_tokens(self) -> int:
        """Rows added but not yet written to a shard."""
        return self._buffered

    def add(self, acts, tok, ctx, pos) -> None:
        """Buffer rows: acts (T, d_in) float tensor/array, tok (T,), ctx (T,), pos (T,) integer ids.

        Writes every shard that becomes complete.
        """
        if self._closed:
            raise RuntimeError("ShardWriter.add() after close()")
        a = to_storage(acts, self.dtype)
        if a.ndim != 2 or a.shape[1] != self.d_in:
            raise ValueError(f"acts must have shape (T, {self.d_in}), got {tuple(a.shape)}")
        n = a.shape[0]
        if n == 0:
            return
        chunk = (
            a,
            _as_1d(tok, "tok", np.int32, n),
            _as_1d(ctx, "ctx", np.int64, n),
            _as_1d(pos, "pos", np.int32, n),
        )
        self._chunks.append(chunk)
        self._buffered += n
        while self._buffered >= self.tokens_per_shard:
            self._write_shard(self._take(self.tokens_per_shard))

    def _take(self, n: int) -> list[np.ndarray]:
        """Remove the first n buffered rows and return them as 4 concatenated arrays."""
        out, got = [], 0
        while got < n:
            c = self._chunks[0]
            need = n - got
            if c[0].shape[0] <= need:
                out.append(c)
                self._chunks.pop(0)
                got += c[0].shape[0]
            else:
                out.append(tuple(x[:need] for x in c))
                self._chunks[0] = tuple(x[need:] for x in c)
                got += need
        self._buffered -= n
        return [np.concatenate([c[i] for c in out]) if len(out) > 1 else out[0][i] for i in range(4)]

    def _write_shard(self, arrays: list[np.ndarray]) -> dict:
        """Write one shard from (acts, tok, ctx, pos) rows via tmp + fsync + os.replace; report it."""
        acts, tok, ctx, pos = arrays
        n = acts.shape[0]
        name = shard_name(self.split, self.index)
        final = os.path.join(self.out_dir, name)
        n_blocks = 0
        # an exclusive, unpredictable temporary name ending in .tar.tmp (a harvest's restart removes leftovers)
        with atomic_write(final, suffix=".tar.tmp") as raw:
            hf = _HashingFile(raw)
            with tarfile.open(fileobj=hf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for b, start in enumerate(range(0, n, self.block_tokens)):
                    sl = slice(start, min(start + self.block_tokens, n))
                    key = block_key(self.split, self.index, b)
                    for member, arr in zip(MEMBERS, (acts[sl], tok[sl], ctx[sl], pos[sl])):
                        data = npy_bytes(arr)
                        info = tarfile.TarInfo(f"{key}.{member}")
                        info.size = len(data)
                        info.mtime = 0  # fixed metadata: identical rows -> identical bytes
                        info.mode = 0o644
                        tar.addfile(info, io.BytesIO(data))
                    n_blocks += 1
        info = {"name": name, "tokens": int(n), "blocks": n_blocks, "sha256": hf.sha.hexdigest()}
        log.debug("wrote shard %s (%d tokens, %d blocks)", final, n, n_blocks)
        self.written.append(info)
        self.index += 1
        if self.on_shard is not None:
            self.on_shard(dict(info))
        return info

    def close(self) -> list[dict]:
        """Write the last partial shard (if any rows are buffered); return the infos of all shards written."""
        if not self._closed:
            if self._buffered:
                self._write_shard(self._take(self._buffered))
            self._closed = True
        return list(self.written)

    def abort(self) -> None:
        """Drop buffered rows without writing them (e.g. on an exception: a partial shard must not appear)."""
        self._chunks.clear()
        self._buffered = 0
        self._closed = True

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
