"""The activation shard format, in bytes: names, storage dtypes, .npy members and block validation.

This file is the only place that knows how a block is laid out; ``docs/shard-format.md`` describes the format in
prose. A shard folder holds ``manifest.json`` (:mod:`lit_sae.data.manifest`) and webdataset tars named
``{split}-{index:06d}.tar`` (:mod:`lit_sae.data.writer` writes them, :mod:`lit_sae.data.reader` reads row ranges).
Each tar sample is one *block* of T tokens (T = ``block_tokens`` except possibly the last block of a split) with
four members::

    {key}.acts.npy  (T, d_in) float16, or bfloat16 stored as its uint16 bit pattern
    {key}.tok.npy   (T,) int32 token ids
    {key}.ctx.npy   (T,) int64 global context ids
    {key}.pos.npy   (T,) int32 positions in the context

with ``key = f"{split}-{index:06d}-{block:05d}"``.
"""

from __future__ import annotations

import functools
import io
from typing import Any, Union

import numpy as np
import torch

FORMAT = "lit-sae-shards/1"
#: Format tag of the top manifest of a multi-hook harvest (:mod:`lit_sae.data.hook_sets`).
HOOK_SETS_FORMAT = "lit-sae-hook-sets/1"
MANIFEST_NAME = "manifest.json"
DTYPES = ("float16", "bfloat16")
# numpy dtype each storage dtype is written as (numpy has no bfloat16: its bits are stored as uint16).
_NP_STORAGE = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(np.uint16)}
_TORCH_DTYPE = {"float16": torch.float16, "bfloat16": torch.bfloat16}
MEMBERS = ("acts.npy", "tok.npy", "ctx.npy", "pos.npy")
# Harvest hint repeated in error messages: how a user gets a valid shard folder.
FIX_HINT = "re-run `lit-sae harvest` for this folder (it resumes after the last complete shard)"
_FIX_HINT = FIX_HINT


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


def is_url(path: str) -> bool:
    """True for anything webdataset opens by scheme (http://, pipe:, gs://, ...), False for local paths."""
    head = str(path).split("/", 1)[0]
    return ":" in head and not (len(head) == 2 and head[1] == ":")  # "C:" is a Windows drive, not a scheme


def layout_of(manifest: Any) -> tuple[int, str, int]:
    """(d_in, dtype, block_tokens) of a :class:`~lit_sae.data.manifest.Manifest` or of its JSON dict."""
    if isinstance(manifest, dict):
        return manifest["d_in"], manifest["dtype"], manifest["block_tokens"]
    return manifest.d_in, manifest.dtype, manifest.block_tokens


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


def npy_bytes(arr: np.ndarray) -> bytes:
    """Serialise an array as .npy (no pickle; deterministic bytes for identical arrays)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


@functools.lru_cache(maxsize=64)
def _npy_header(head: bytes) -> tuple[tuple, np.dtype, int]:
    """(shape, dtype, count) from a .npy header (cached: the full blocks of a split share one header)."""
    f = io.BytesIO(head)
    major, _ = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(f)
    if dtype.hasobject or fortran:
        raise ValueError(f"unsupported array layout (dtype {dtype}, fortran_order={fortran})")
    return shape, dtype, int(np.prod(shape)) if shape else 1


def _load_npy(data: Any, source: str, member: str) -> np.ndarray:
    """Parse one .npy member without pickle and without copying (a read-only view on ``data``)."""
    if isinstance(data, np.ndarray):
        return data
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ShardError(f"{source}: member {member} is {type(data).__name__}, expected .npy bytes")
    try:
        # Parse a copy of the header bytes only (not the payload).
        view = memoryview(data)
        head = bytes(view[:12])
        hlen = int.from_bytes(head[8:10], "little") + 10 if head[6:7] == b"\x01" else \
            int.from_bytes(head[8:12], "little") + 12
        shape, dtype, count = _npy_header(bytes(view[:hlen]))
        return np.frombuffer(data, dtype=dtype, count=count, offset=hlen).reshape(shape)
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


def decode_block_arrays(sample: dict, manifest: Any, source_name: str) -> dict:
    """Validate one tar sample against the manifest and return zero-copy numpy views (no non-finite check).

    Returns ``{"key", "acts": (T, d_in) np.float16 or bf16 bits as np.uint16, "tok": (T,) int32,
    "ctx": (T,) int64, "pos": (T,) int32}``; arrays may be read-only views on the sample's bytes.
    Raises ShardError naming ``source_name`` and the block on a missing member, wrong shape or wrong dtype.
    """
    key = sample.get("__key__", "?")
    where = f"{source_name} (block {key})"
    d_in, dtype, block_tokens = layout_of(manifest)
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
            f"{where}: acts shape is {acts.shape}, expected (T, {d_in}) with 0 < T <= {block_tokens} "
            f"(manifest d_in={d_in}); the shard belongs to another harvest or is corrupt: {_FIX_HINT}"
        )
    t = acts.shape[0]
    if t > block_tokens:
        raise ShardError(f"{where}: block has {t} rows, more than manifest block_tokens={block_tokens}; "
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
    manifest: Any,
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
        bad = nonfinite_rows(arrays["acts"], layout_of(manifest)[1])
        n_bad = int(bad.sum())
        if n_bad and nonfinite == "raise":
            raise nonfinite_error(f"{source_name} (block {b['key']})", bad, arrays["ctx"], arrays["pos"])
        if n_bad:
            arrays = {k: v[~bad] for k, v in arrays.items()}
    arrays = {k: np.array(v) for k, v in arrays.items()}  # writable copies (the views share the tar bytes)
    return {
        "key": b["key"],
        "acts": from_storage(arrays["acts"], layout_of(manifest)[1]),
        "tok": torch.from_numpy(arrays["tok"]),
        "ctx": torch.from_numpy(arrays["ctx"]),
        "pos": torch.from_numpy(arrays["pos"]),
        "n_nonfinite": n_bad,
    }
