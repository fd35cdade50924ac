"""The one place lit-sae reads torch-serialised files and writes JSON: nothing it reads can run code.

Every file lit-sae reads may come from someone else (a shared checkpoint, a downloaded export, a shard folder on
shared scratch). Python's pickle, which ``torch.save`` uses, can call any function while loading (a ``__reduce__``
payload; CVE-2025-32434 is the same class of bug in torch itself). So:

- ``.ckpt`` / ``.pt`` files (checkpoints, OpenAI state dicts, a sharded checkpoint's ``meta.pt``) are read by
  :func:`torch_load`: ``torch.load(weights_only=True)``, which rebuilds tensors and plain containers only and
  refuses every other global. A refusal is a :class:`UnsafeFileError` naming the file and the refused object.
- A sharded checkpoint's DCP ``.metadata`` (pickled by ``torch.distributed.checkpoint``) is read by
  :class:`SafeFileSystemReader`, whose unpickler allows only DCP's own metadata classes, torch dtypes, sizes and
  layouts, and paths (Python's "restricting globals" recipe).
- Safetensors, ``.npy`` parsed with no object dtype (``lit_sae.data.shard_format``), and JSON need no pickle.

JSON that lit-sae writes is strict (:func:`dumps_json`): ``NaN`` and ``Infinity`` are not JSON, and other
readers (browsers, ``jq``, most languages) reject them; a float that is not finite is either refused or written as
``null`` on purpose, never as a bare ``NaN``.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["UnsafeFileError", "torch_load", "refusal", "SafeFileSystemReader", "dumps_json", "finite_or_none"]

#: What every refusal adds: why, and what to do.
_NEVER = ("lit-sae never executes code stored in files it reads; load only files holding tensors and plain data "
          "(re-save it from its source with torch.save of a plain dict of tensors, or export it with safetensors)")


class UnsafeFileError(ValueError):
    """A file holds (or may hold) a Python object outside tensors and JSON-able data; it was not loaded."""


def torch_load(path: "str | os.PathLike", what: str = "file", map_location: Any = "cpu") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``: tensors, dicts, lists, strings, numbers.

    Args:
        path: a ``torch.save`` file (a ``.ckpt``, ``.pt``, a sharded checkpoint's ``meta.pt``).
        what: how the file is named in messages (e.g. ``"checkpoint"``).
        map_location: as ``torch.load``'s (default: every tensor on the CPU).

    Raises:
        UnsafeFileError: the file holds another Python object (names the file and the object's global).
        ValueError: not a torch file at all (names the file).
    """
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as exn:
        raise refusal(path, exn, what) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exn:
        raise ValueError(f"{path}: not a readable torch file (expected a {what}; "
                         f"{str(exn).splitlines()[0][:200]})") from None


def refusal(path: "str | os.PathLike", exn: pickle.UnpicklingError, what: str = "file") -> ValueError:
    """The one-line error for ``torch.load(path, weights_only=True)``'s UnpicklingError ``exn`` (e.g. raised inside
    Lightning): an UnsafeFileError naming the refused global, or a ValueError for a file that is not a torch file."""
    text = str(exn)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found is None:  # not a refused object: a corrupt file or not a pickle at all
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
        reason = detail.group(1) if detail else text.splitlines()[0][:200]
        return ValueError(f"{path}: not a readable torch file (expected a {what}; {reason})")
    return UnsafeFileError(f"{path}: {what} holds a Python object lit-sae refuses to load ({found.group(1)}); "
                           f"{_NEVER}")


# ------------------------------------------------------------------------------------ DCP metadata (a pickle file)
_DCP_MODULES = ("torch.distributed.checkpoint.metadata",)
_DCP_NAMES = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"), ("torch", "device"),
              ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
              ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``Metadata`` and nothing else: any other global is refused before it is looked up."""

    def __init__(self, file: BinaryIO, path: str) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        import torch

        allowed = (module, name) in _DCP_NAMES or (module in _DCP_MODULES and not name.startswith("__"))
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            allowed = True
        if not allowed:
            raise UnsafeFileError(f"{self._path}: checkpoint metadata holds a Python object lit-sae refuses to load "
                                  f"({module}.{name}); {_NEVER}")
        found = super().find_class(module, name)
        if module in _DCP_MODULES and not isinstance(found, type):
            raise UnsafeFileError(f"{self._path}: checkpoint metadata names {module}.{name}, which is not one of "
                                  f"DCP's metadata classes; {_NEVER}")
        return found


def _safe_reader_class() -> type:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        """``FileSystemReader`` whose ``.metadata`` is read by an allow-list unpickler (DCP's own uses pickle.load)."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            path = Path(self._get_metadata_path(kwargs.get("rank")))
            try:
                with open(path, "rb") as f:
                    metadata = _MetadataUnpickler(f, str(path)).load()
            except UnsafeFileError:
                raise
            except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as exn:
                raise ValueError(f"{path}: not a readable checkpoint metadata file ({exn})") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader


def SafeFileSystemReader(path: "str | os.PathLike") -> Any:  # noqa: N802 (a class, built lazily: torch is heavy)
    """A ``torch.distributed.checkpoint.FileSystemReader`` for ``path`` that never unpickles code (see module doc).

    Raises (on ``read_metadata``): UnsafeFileError naming the file and the refused global; ValueError for a file
    that is not DCP metadata."""
    return _safe_reader_class()(str(path))


# --------------------------------------------------------------------------------------------------- strict JSON
def finite_or_none(x: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-inf) replaced by None, recursively through dicts/lists/tuples."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_or_none(v) for v in x]
    return x


def dumps_json(obj: Any, *, nonfinite: str = "refuse", where: str = "JSON", **kwargs: Any) -> str:
    """``json.dumps(obj, allow_nan=False, **kwargs)``: strict JSON (RFC 8259), never a bare ``NaN``/``Infinity``.

    Args:
        obj: JSON-able data.
        nonfinite: ``"refuse"`` (a ValueError naming ``where`` and the path of the first non-finite value) or
            ``"null"`` (written as ``null``: for reports where a metric can honestly be undefined).
        where: the file or object named in the error.
    """
    if nonfinite == "null":
        obj = finite_or_none(obj)
    elif nonfinite != "refuse":
        raise ValueError(f"nonfinite must be 'refuse' or 'null', got {nonfinite!r}")
    try:
        return json.dumps(obj, allow_nan=False, **kwargs)
    except ValueError:
        bad = _first_nonfinite(obj, "")
        raise ValueError(f"{where}: refusing to write a non-finite number at {bad or '?'} (strict JSON has no "
                         "NaN/Infinity; a statistic that is not finite means the input had non-finite values)") \
            from None


def _first_nonfinite(x: Any, at: str) -> str | None:
    if isinstance(x, float) and not math.isfinite(x):
        return at or "(top level)"
    if isinstance(x, dict):
        items = x.items()
    elif isinstance(x, (list, tuple)):
        items = enumerate(x)
    else:
        return None
    for k, v in items:
        found = _first_nonfinite(v, f"{at}.{k}" if at else str(k))
        if found:
            return found
    return None
