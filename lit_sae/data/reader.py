"""Reading row ranges out of shards: a fast tar walker and :func:`read_range` over a sequence of shards.

Local shards are memory-mapped; URLs are opened through webdataset's ``gopen`` (``file:``, ``http(s):``, ``pipe:``,
``gs:``, ...). Either way the tar is walked here, not by webdataset's pipeline: see :func:`iter_tar` for why, and
docs/shard-format.md for the measured A/B.
"""

from __future__ import annotations

import mmap
import os
import tarfile
from typing import Any, Callable, Iterator, NamedTuple, Optional

import numpy as np

from lit_sae.data.shard_format import FIX_HINT as _FIX_HINT
from lit_sae.data.shard_format import ShardError, ShardNotFoundError, decode_block_arrays, is_url, layout_of

_FIX = "re-run `lit-sae harvest` for this folder (it resumes after the last complete shard) or restore the file"


class ShardRef(NamedTuple):
    """One shard of a split: where to open it, its manifest name and token count."""

    url: str
    name: str
    tokens: int


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


class _Plain:
    type = tarfile.REGTYPE


_PLAIN = _Plain()


def _plain_file_header(header: bytes) -> Optional[tuple[str, int]]:
    """(name, size) of a POSIX ustar header of a regular file with a valid checksum (what ShardWriter writes), read
    without building a TarInfo (4x less time per block); None for anything else, which tarfile then parses."""
    if header[156:157] not in (b"0", b"\0") or header[257:265] != tarfile.POSIX_MAGIC:
        return None
    try:
        if tarfile.nti(header[148:156]) not in tarfile.calc_chksums(header):
            return None  # tarfile reports the bad checksum
        size = tarfile.nti(header[124:136])
    except ValueError:
        return None
    name, prefix = header[:100].split(b"\0", 1)[0], header[345:500].split(b"\0", 1)[0]
    name = (prefix + b"/" + name if prefix else name).decode("utf-8", "surrogateescape")
    return None if name.endswith("/") else (name, size)


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
        fast = _plain_file_header(header) if not pax and long_name is None else None
        if fast is not None:
            info = _PLAIN
            name, size = fast
        else:
            try:
                info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
            except tarfile.HeaderError as exn:
                raise ShardError(f"{source}: corrupt tar: invalid header at byte {pos} ({exn}); {_FIX_HINT}") from exn
            size = int(pax.get("size", info.size))
            name = pax.get("path", long_name or info.name)
        pos += 512
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
            if isinstance(stream, MappedFile):
                data = stream.view(size)  # zero-copy: the member's bytes where the file is mapped
            elif view is None:
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


class MappedFile:
    """A local file mapped into memory, read like a file; :meth:`view` hands out bytes without copying them.

    Why: reading a member copies it from the page cache into a buffer, and the stream then copies it again into its
    window; mapping the tar saves the first copy (about 2x the rows per CPU-second; docs/shard-format.md). Shards are
    only ever replaced by rename, so a mapped file's bytes do not change under the reader.
    """

    def __init__(self, path: str):
        with open(path, "rb") as f:
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.pos = 0

    def read(self, n: int) -> bytes:
        data = self.mm[self.pos:self.pos + n]
        self.pos += len(data)
        return data

    def view(self, n: int) -> memoryview:
        """The next n bytes (fewer at the end of the file) as a read-only view on the mapping."""
        data = memoryview(self.mm)[self.pos:self.pos + n]
        self.pos += len(data)
        return data

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self.pos = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: len(self.mm)}[whence] + offset
        return self.pos

    def close(self) -> None:
        try:
            self.mm.close()
        except BufferError:  # rows handed out still view the mapping; it is unmapped when the last one goes
            pass


def open_shard(url: str, mapped: bool = False):
    """Open a shard for reading: with ``mapped`` a local file is memory-mapped (:class:`MappedFile`); anything else
    goes through webdataset's gopen (local paths, file:, http(s):, pipe:, gs:, ...)."""
    import webdataset as wds

    local = url[len("file://"):] if url.startswith("file://") else url
    if mapped and not is_url(url) and os.path.isfile(local) and os.path.getsize(local) > 0:
        return MappedFile(local)
    try:
        return wds.gopen(url, "rb")
    except FileNotFoundError as exn:
        raise ShardNotFoundError(f"{url}: shard listed in manifest.json is missing; {_FIX}") from exn
    except Exception as exn:
        raise ShardError(f"{url}: cannot open shard ({type(exn).__name__}: {exn}); check the path or URL") from exn


def read_shard(
    ref: ShardRef, manifest: Any, start: int = 0, stop: Optional[int] = None, buffers: Optional[dict] = None,
    mapped: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield validated pieces of rows ``[start, stop)`` of one shard: dicts of numpy acts/tok/ctx/pos (views).

    A local shard is memory-mapped (``mapped=False`` streams it like a URL): pieces are read-only views on the
    mapping. Otherwise, with ``buffers`` (a dict, kept by the caller across calls) members are read into reused
    buffers, and each piece is only valid until the next one is requested. Either way: copy a piece out first.

    Blocks before ``start`` are skipped without being decoded (block b starts at row b * block_tokens, as
    ShardWriter writes them). Raises ShardError naming the shard for a truncated or corrupt tar, a block out of
    place, or a shard holding fewer rows than the manifest lists.
    """
    stop = ref.tokens if stop is None else stop
    if not 0 <= start <= stop <= ref.tokens:
        raise ValueError(f"bad row range [{start}, {stop}) for {ref.name} with {ref.tokens} rows")
    if start == stop:
        return
    bt = layout_of(manifest)[2]
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

    stream = open_shard(ref.url, mapped=mapped)
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


def read_range(shards: list[ShardRef], manifest: Any, start: int, stop: int, buffers: Optional[dict] = None,
               mapped: bool = True) -> Iterator[dict[str, np.ndarray]]:
    """Yield pieces of tokens ``[start, stop)`` of the sequence formed by concatenating ``shards`` in order.

    ``buffers``, ``mapped``: see :func:`read_shard` (pieces are valid only until the next one is requested)."""
    for _, piece in read_range_with_refs(shards, manifest, start, stop, buffers, mapped):
        yield piece


def read_range_with_refs(shards: list[ShardRef], manifest: Any, start: int, stop: int,
                         buffers: Optional[dict] = None,
                         mapped: bool = True) -> Iterator[tuple[ShardRef, dict[str, np.ndarray]]]:
    """Like :func:`read_range`, yielding (shard, piece) so that errors about a piece can name its file."""
    offset = 0
    for ref in shards:
        lo, hi = offset, offset + ref.tokens
        offset = hi
        if hi <= start:
            continue
        if lo >= stop:
            return
        for piece in read_shard(ref, manifest, max(start - lo, 0), min(stop, hi) - lo, buffers, mapped):
            yield ref, piece
