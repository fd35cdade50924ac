"""The activation shard format: writing shards crash-safely, reading and validating the manifest and blocks.

A shard folder holds ``manifest.json`` and webdataset tars named ``{split}-{index:06d}.tar``. Each tar sample is
one *block* of T tokens (T = ``block_tokens`` except possibly the last block of a split) with four members::

    {key}.acts.npy  (T, d_in) float16, or bfloat16 stored as its uint16 bit pattern
    {key}.tok.npy   (T,) int32 token ids
    {key}.ctx.npy   (T,) int64 global context ids
    {key}.pos.npy   (T,) int32 positions in the context

with ``key = f"{split}-{index:06d}-{block:05d}"``. A tar is written under a temporary name, fsynced and renamed when
complete, and readers only ever open names listed in ``manifest.json`` (itself replaced atomically), so no reader
can see a half-written shard. See docs/CONTRACT.md for the manifest's fields.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from typing import Any, Callable, Optional, Union

import numpy as np
import torch

from lit_sae.fsync import fsync_dir

log = logging.getLogger(__name__)

FORMAT = "lit-sae-shards/1"
MANIFEST_NAME = "manifest.json"
DTYPES = ("float16", "bfloat16")
# numpy dtype each storage dtype is written as (numpy has no bfloat16: its bits are stored as uint16).
_NP_STORAGE = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(np.uint16)}
_TORCH_DTYPE = {"float16": torch.float16, "bfloat16": torch.bfloat16}
MEMBERS = ("acts.npy", "tok.npy", "ctx.npy", "pos.npy")
_REQUIRED_KEYS = ("d_in", "dtype", "block_tokens", "splits")
# Harvest hint repeated in error messages: how a user gets a valid shard folder.
_FIX_HINT = "re-run `lit-sae harvest` for this folder (it resumes after the last complete shard)"


class ShardError(ValueError):
    """A shard, block or manifest is missing or invalid; the message starts with the offending file."""


class ShardNotFoundError(ShardError, FileNotFoundError):
    """A shard folder, manifest or shard file does not exist."""


def shard_name(split: str, index: int) -> str:
    """File name of shard ``index`` of ``split``: ``{split}-{index:06d}.tar``."""
    return f"{split}-{index:06d}.tar"


def block_key(split: str, index: int, block: int) -> str:
    """webdataset ``__key__`` of a block: ``{split}-{index:06d}-{block:05d}``."""
    return f"{split}-{index:06d}-{block:05d}"


# --------------------------------------------------------------------------------------------------------------
# Writing


def write_manifest_atomic(out_dir: str, manifest: dict) -> str:
    """Write ``out_dir/manifest.json`` atomically (tmp file, fsync, os.replace); return its path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, MANIFEST_NAME)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(out_dir)
    return path


def to_storage(acts: Union[torch.Tensor, np.ndarray], dtype: str) -> np.ndarray:
    """Convert activations (T, d_in) to the numpy array stored on disk for ``dtype``.

    float16 -> np.float16; bfloat16 -> the bf16 bit pattern as np.uint16. Inputs already in the storage dtype are
    kept bit-exactly; wider floats are rounded to nearest (torch's rounding, identical to numpy's for fp16).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if isinstance(acts, np.ndarray):
        if dtype == "bfloat16" and acts.dtype == np.uint16:
            return np.ascontiguousarray(acts)  # already bf16 bits
        t = torch.from_numpy(np.ascontiguousarray(acts))
    elif isinstance(acts, torch.Tensor):
        t = acts.detach().to("cpu")
    else:
        raise TypeError(f"acts must be a torch.Tensor or np.ndarray, got {type(acts).__name__}")
    if not (t.is_floating_point()):
        raise TypeError(f"acts must be floating point, got {t.dtype}")
    t = t.to(_TORCH_DTYPE[dtype]).contiguous()
    if dtype == "bfloat16":
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def from_storage(arr: np.ndarray, dtype: str) -> torch.Tensor:
    """Inverse of :func:`to_storage`: a torch tensor of dtype float16 / bfloat16 sharing memory where possible."""
    t = torch.from_numpy(arr)
    if dtype == "bfloat16":
        return t.view(torch.int16).view(torch.bfloat16) if t.dtype == torch.uint16 else t.view(torch.bfloat16)
    return t


def _npy_bytes(arr: np.ndarray) -> bytes:
    """Serialise an array as .npy (no pickle; deterministic bytes for identical arrays)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


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
    ``{split}-{index:06d}.tar`` is written into ``{name}.tmp``, fsynced, and renamed over the final name, then
    ``on_shard({"name", "tokens", "blocks", "sha256"})`` is called (harvest appends the info to the manifest and
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
        tmp = final + ".tmp"
        n_blocks = 0
        with open(tmp, "wb") as raw:
            hf = _HashingFile(raw)
            with tarfile.open(fileobj=hf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for b, start in enumerate(range(0, n, self.block_tokens)):
                    sl = slice(start, min(start + self.block_tokens, n))
                    key = block_key(self.split, self.index, b)
                    for member, arr in zip(MEMBERS, (acts[sl], tok[sl], ctx[sl], pos[sl])):
                        data = _npy_bytes(arr)
                        info = tarfile.TarInfo(f"{key}.{member}")
                        info.size = len(data)
                        info.mtime = 0  # fixed metadata: identical rows -> identical bytes
                        info.mode = 0o644
                        tar.addfile(info, io.BytesIO(data))
                    n_blocks += 1
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, final)
        fsync_dir(self.out_dir)
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


# --------------------------------------------------------------------------------------------------------------
# Reading


def is_url(path: str) -> bool:
    """True for anything webdataset opens by scheme (http://, pipe:, gs://, ...), False for local paths."""
    head = str(path).split("/", 1)[0]
    return ":" in head and not (len(head) == 2 and head[1] == ":")  # "C:" is a Windows drive, not a scheme


def manifest_location(path_or_url: str) -> str:
    """Where the manifest of ``path_or_url`` lives: the path itself if it ends in .json, else ``path/manifest.json``.

    A brace pattern or a single .tar shard resolves to ``manifest.json`` in its folder.
    """
    p = str(path_or_url)
    if p.endswith(".json"):
        return p
    if p.endswith(".tar") or "{" in p:
        base = p.rsplit("/", 1)[0] if "/" in p else "."
        return f"{base}/{MANIFEST_NAME}"
    return p.rstrip("/") + "/" + MANIFEST_NAME


def _read_bytes(url: str) -> bytes:
    """Read a whole local file or URL (via webdataset's gopen, so every scheme webdataset supports works)."""
    if not is_url(url) or url.startswith("file:"):
        local = url[len("file://"):] if url.startswith("file://") else url
        folder = os.path.dirname(local) or "."
        if not os.path.isdir(folder):
            raise ShardNotFoundError(
                f"{folder}: shard folder does not exist; check data.path or run `lit-sae harvest` to create it"
            )
        if not os.path.exists(local):
            listing = sorted(os.listdir(folder))
            what = "the folder is empty" if not listing else f"the folder holds {len(listing)} other entries"
            raise ShardNotFoundError(
                f"{local}: manifest not found ({what}); point data.path at a folder written by `lit-sae harvest`, "
                "or " + _FIX_HINT
            )
        with open(local, "rb") as f:
            return f.read()
    import webdataset as wds

    try:
        with wds.gopen(url, "rb") as f:
            data = f.read()
    except Exception as exn:  # the transport's own error, re-raised with the file name first
        raise ShardNotFoundError(f"{url}: cannot read manifest ({exn}); check the URL and your credentials") from exn
    if not data:
        raise ShardNotFoundError(f"{url}: manifest is empty or could not be fetched; check the URL")
    return data


def validate_manifest(manifest: Any, source: str = MANIFEST_NAME) -> dict:
    """Check the fields readers rely on; raise ShardError naming ``source`` and the bad field."""
    if not isinstance(manifest, dict):
        raise ShardError(f"{source}: expected a JSON object, got {type(manifest).__name__}; {_FIX_HINT}")
    fmt = manifest.get("format")
    if fmt != FORMAT:
        raise ShardError(f"{source}: format is {fmt!r}, expected {FORMAT!r}; {_FIX_HINT}")
    missing = [k for k in _REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ShardError(f"{source}: missing keys {missing}; {_FIX_HINT}")
    if manifest["dtype"] not in DTYPES:
        raise ShardError(f"{source}: dtype {manifest['dtype']!r} is not one of {DTYPES}")
    for k in ("d_in", "block_tokens"):
        if not isinstance(manifest[k], int) or manifest[k] <= 0:
            raise ShardError(f"{source}: {k} must be a positive integer, got {manifest[k]!r}")
    splits = manifest["splits"]
    if not isinstance(splits, dict):
        raise ShardError(f"{source}: 'splits' must be an object of split name -> {{shards: [...]}}")
    for split, entry in splits.items():
        shards = entry.get("shards") if isinstance(entry, dict) else None
        if not isinstance(shards, list):
            raise ShardError(f"{source}: splits.{split}.shards must be a list")
        for i, s in enumerate(shards):
            if not isinstance(s, dict) or not isinstance(s.get("name"), str) or not isinstance(s.get("tokens"), int):
                raise ShardError(f"{source}: splits.{split}.shards[{i}] needs a 'name' (str) and 'tokens' (int)")
            if s["tokens"] < 0 or "/" in s["name"]:
                raise ShardError(f"{source}: splits.{split}.shards[{i}] has an invalid name or token count: {s}")
    return manifest


def read_manifest(path_or_url: str) -> dict:
    """Read and validate the manifest of a shard folder, a manifest.json path, a brace pattern or a URL.

    Raises ShardNotFoundError (missing folder/manifest) or ShardError (invalid JSON or fields), naming the file.
    """
    loc = manifest_location(path_or_url)
    data = _read_bytes(loc)
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise ShardError(f"{loc}: not valid JSON ({exn}); the file is corrupt: {_FIX_HINT}") from exn
    return validate_manifest(manifest, loc)


def _read_exact(stream, n: int) -> bytes:
    """Read n bytes (fewer only at end of stream), looping over short reads of pipes and sockets."""
    data = stream.read(n)
    if data is None:
        data = b""
    if len(data) == n or not data:
        return data
    parts, got = [data], len(data)
    while got < n:
        chunk = stream.read(n - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _readinto_exact(stream, view: memoryview) -> int:
    """Fill ``view`` from the stream (fewer bytes only at end of stream); return the count read."""
    got, n = 0, len(view)
    while got < n:
        k = stream.readinto(view[got:])
        if not k:
            break
        got += k
    return got


def _skip(stream, n: int) -> int:
    """Skip n bytes (seek where possible); return how many were skipped."""
    if n <= 0:
        return 0
    seekable = getattr(stream, "seekable", None)
    if seekable is not None and seekable():
        here = stream.tell()
        end = stream.seek(0, os.SEEK_END)
        stream.seek(min(here + n, end))
        return min(n, end - here)
    got = 0
    while got < n:
        chunk = stream.read(min(n - got, 1 << 20))
        if not chunk:
            break
        got += len(chunk)
    return got


def _pax_records(data: bytes) -> dict[str, str]:
    """Parse pax extended-header records ``"LEN key=value\n"``."""
    out, i = {}, 0
    while i < len(data):
        sp = data.index(b" ", i)
        length = int(data[i:sp])
        key, _, value = data[sp + 1:i + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        i += length
    return out


def iter_tar(
    stream,
    source: str,
    select: Optional[Callable[[str], bool]] = None,
    buffer_for: Optional[Callable[[str, int], Optional[memoryview]]] = None,
):
    """Yield ``(name, data)`` for the regular files of an uncompressed tar stream, each read in one call.

    ``buffer_for(name, size)`` may return a writable memoryview of ``size`` bytes to read the member into (reused
    buffers avoid page-faulting fresh memory for every block); the data is then only valid until the next member.

    Why not tarfile's stream mode (which webdataset's tar iterator uses): it reads through 10 KB records and joins
    them, about 300 MB/s here, below what training needs; this reader reaches several GB/s. It handles ustar, GNU
    long names and pax headers (what Python's tarfile, GNU tar and webdataset's TarWriter write). Members for which
    ``select(name)`` is False are skipped without being read where the stream can seek.

    Raises ShardError naming ``source`` on a corrupt header or a truncated archive (including one cut exactly at a
    member boundary: a complete tar ends with a zero block).
    """
    pos = 0
    long_name: Optional[str] = None
    pax: dict[str, str] = {}
    while True:
        header = _read_exact(stream, 512)
        if len(header) < 512:
            raise ShardError(f"{source}: truncated tar: ends at byte {pos + len(header)} without the end-of-archive "
                             f"marker; {_FIX_HINT}")
        if header == b"\0" * 512:
            return
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exn:
            raise ShardError(f"{source}: corrupt tar: invalid header at byte {pos} ({exn}); {_FIX_HINT}") from exn
        pos += 512
        size = int(pax.get("size", info.size))
        name = pax.get("path", long_name or info.name)
        padded = size + (-size % 512)
        if info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
            data = _read_exact(stream, padded)
            if len(data) < padded:
                raise ShardError(f"{source}: truncated tar: header data at byte {pos} is cut short; {_FIX_HINT}")
            pos += padded
            if info.type == tarfile.XHDTYPE:
                pax = _pax_records(data[:size])
            elif info.type == tarfile.GNUTYPE_LONGNAME:
                long_name = data[:size].rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        long_name, pax = None, {}
        if info.type in tarfile.REGULAR_TYPES and (select is None or select(name)):
            view = buffer_for(name, size) if buffer_for is not None and hasattr(stream, "readinto") else None
            if view is None:
                data = _read_exact(stream, size)
            else:
                data = view[:_readinto_exact(stream, view)]
            skipped = _skip(stream, padded - size) if len(data) == size else 0
            if len(data) < size or skipped < padded - size:
                raise ShardError(f"{source}: truncated tar: member {name} at byte {pos} has {len(data)} of its "
                                 f"{size} bytes; {_FIX_HINT}")
            pos += padded
            yield name, data
        else:
            if _skip(stream, padded) < padded:
                raise ShardError(f"{source}: truncated tar: member {name} at byte {pos} is cut short; {_FIX_HINT}")
            pos += padded


def _load_npy(data: Any, source: str, member: str) -> np.ndarray:
    """Parse one .npy member without pickle and without copying (a read-only view on ``data``)."""
    if isinstance(data, np.ndarray):
        return data
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ShardError(f"{source}: member {member} is {type(data).__name__}, expected .npy bytes")
    try:
        # Parse the header from a copy of the header bytes only (BytesIO copies its input: not the 6 MB payload).
        view = memoryview(data)
        head = bytes(view[:12])
        hlen = int.from_bytes(head[8:10], "little") + 10 if head[6:7] == b"\x01" else \
            int.from_bytes(head[8:12], "little") + 12
        f = io.BytesIO(bytes(view[:hlen]))
        major, _ = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        if dtype.hasobject or fortran:
            raise ValueError(f"unsupported array layout (dtype {dtype}, fortran_order={fortran})")
        count = int(np.prod(shape)) if shape else 1
        return np.frombuffer(data, dtype=dtype, count=count, offset=f.tell()).reshape(shape)
    except Exception as exn:
        raise ShardError(f"{source}: member {member} is not a valid .npy array ({exn}); the shard is corrupt: "
                         f"{_FIX_HINT}") from exn


def nonfinite_rows(acts: np.ndarray, dtype: str) -> np.ndarray:
    """Boolean (T,) mask of rows with any NaN/Inf, for stored fp16 or bf16-bits arrays."""
    # A float is non-finite iff all its exponent bits are set. Testing the bits is ~8x faster than np.isfinite on
    # fp16 and works for bf16 (stored as uint16) too. Chunks of 1024 rows keep the temporary in cache (3x faster
    # than one pass over a large window), and only chunks with a hit build the per-row mask.
    mask = np.uint16(0x7F80 if dtype == "bfloat16" else 0x7C00)
    bits = acts.view(np.uint16)
    bad = np.zeros(acts.shape[0], dtype=bool)
    if acts.size == 0:
        return bad
    step = 1024
    buf = np.empty((min(step, acts.shape[0]), acts.shape[1]), np.uint16)
    for i in range(0, acts.shape[0], step):
        chunk = bits[i:i + step]
        out = buf[:chunk.shape[0]]
        np.bitwise_and(chunk, mask, out=out)
        if out.max() == mask:
            bad[i:i + step] = (out == mask).any(axis=1)
    return bad


def decode_block_arrays(sample: dict, manifest: dict, source_name: str) -> dict:
    """Validate one tar sample against the manifest and return zero-copy numpy views (no non-finite check).

    Returns ``{"key", "acts": (T, d_in) np.float16 or bf16 bits as np.uint16, "tok": (T,) int32,
    "ctx": (T,) int64, "pos": (T,) int32}``; arrays may be read-only views on the sample's bytes.
    Raises ShardError naming ``source_name`` and the block on a missing member, wrong shape or wrong dtype.
    """
    key = sample.get("__key__", "?")
    where = f"{source_name} (block {key})"
    dtype = manifest["dtype"]
    d_in = manifest["d_in"]
    missing = [m for m in MEMBERS if m not in sample]
    if missing:
        raise ShardError(f"{where}: missing members {missing}; the shard is corrupt or not a lit-sae shard: "
                         f"{_FIX_HINT}")
    acts = _load_npy(sample["acts.npy"], where, "acts.npy")
    want = _NP_STORAGE[dtype]
    if acts.dtype != want:
        raise ShardError(
            f"{where}: acts dtype is {acts.dtype}, but manifest dtype {dtype!r} means {want} on disk; the shard was "
            f"written with another dtype than its manifest says: {_FIX_HINT}"
        )
    if acts.ndim != 2 or acts.shape[1] != d_in or acts.shape[0] == 0:
        raise ShardError(
            f"{where}: acts shape is {acts.shape}, expected (T, {d_in}) with 0 < T <= {manifest['block_tokens']} "
            f"(manifest d_in={d_in}); the shard belongs to another harvest or is corrupt: {_FIX_HINT}"
        )
    t = acts.shape[0]
    if t > manifest["block_tokens"]:
        raise ShardError(f"{where}: block has {t} rows, more than manifest block_tokens={manifest['block_tokens']}; "
                         f"{_FIX_HINT}")
    out = {"key": key, "acts": acts}
    for name, np_dtype in (("tok", np.int32), ("ctx", np.int64), ("pos", np.int32)):
        a = _load_npy(sample[f"{name}.npy"], where, f"{name}.npy")
        if a.shape != (t,) or a.dtype != np.dtype(np_dtype):
            raise ShardError(f"{where}: {name}.npy is {a.dtype}{a.shape}, expected {np.dtype(np_dtype)}({t},); "
                             f"{_FIX_HINT}")
        out[name] = a
    return out


def nonfinite_error(where: str, bad: np.ndarray, ctx: np.ndarray, pos: np.ndarray) -> ShardError:
    """The ShardError for a block with non-finite rows (``bad``: (T,) bool mask)."""
    first = int(np.flatnonzero(bad)[0])
    return ShardError(
        f"{where}: {int(bad.sum())} of {bad.shape[0]} rows hold NaN/Inf activations (first at row {first}, ctx "
        f"{int(ctx[first])}, pos {int(pos[first])}); re-harvest with a finite model/dtype, or set "
        "data.skip_nonfinite=true to skip such rows with a warning"
    )


def decode_block(
    sample: dict,
    manifest: dict,
    source_name: str,
    *,
    nonfinite: str = "raise",
) -> dict:
    """Decode and validate one tar sample (a block) against the manifest, as torch tensors.

    Args:
        sample: webdataset sample: ``{"__key__", "acts.npy", "tok.npy", "ctx.npy", "pos.npy"}`` with .npy bytes
            (already-decoded numpy arrays are accepted too).
        manifest: the shard folder's manifest (d_in, dtype, block_tokens).
        source_name: file name used in error messages (the shard's URL or path).
        nonfinite: "raise" (default) raises ShardError on NaN/Inf; "drop" removes those rows; "keep" skips the check.

    Returns:
        ``{"key", "acts": torch (T, d_in) float16/bfloat16, "tok": torch (T,) int32, "ctx": torch (T,) int64,
        "pos": torch (T,) int32, "n_nonfinite": int}`` (rows dropped when nonfinite="drop").

    Raises:
        ShardError(f"{source_name} (block KEY): {problem}") on a missing member, wrong shape or dtype, or NaN/Inf.
    """
    if nonfinite not in ("raise", "drop", "keep"):
        raise ValueError(f"nonfinite must be 'raise', 'drop' or 'keep', got {nonfinite!r}")
    b = decode_block_arrays(sample, manifest, source_name)
    arrays = {k: b[k] for k in ("acts", "tok", "ctx", "pos")}
    n_bad = 0
    if nonfinite != "keep":
        bad = nonfinite_rows(arrays["acts"], manifest["dtype"])
        n_bad = int(bad.sum())
        if n_bad and nonfinite == "raise":
            raise nonfinite_error(f"{source_name} (block {b['key']})", bad, arrays["ctx"], arrays["pos"])
        if n_bad:
            arrays = {k: v[~bad] for k, v in arrays.items()}
    arrays = {k: np.array(v) for k, v in arrays.items()}  # writable copies (the views share the tar bytes)
    return {
        "key": b["key"],
        "acts": from_storage(arrays["acts"], manifest["dtype"]),
        "tok": torch.from_numpy(arrays["tok"]),
        "ctx": torch.from_numpy(arrays["ctx"]),
        "pos": torch.from_numpy(arrays["pos"]),
        "n_nonfinite": n_bad,
    }
