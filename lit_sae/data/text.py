"""Text corpora for harvesting: each source yields documents (str) in a deterministic order.

Sources, chosen by one string (:func:`open_source`):

    "stdlib"        the embedded corpus: the Python standard library's .py files (sorted by path) followed by the
                    ``pydoc_data.topics`` help texts (sorted by topic); present in every Python install
    a local path    a text file (one document), a JSONL file (one document per line, field ``text_field``), or a
                    folder of such files (recursively, sorted by relative path)
    "hf:NAME"       a Hugging Face ``datasets`` dataset (optional dependency), e.g. "hf:Skylion007/openwebtext"

``shuffle_seed`` permutes the documents of the stdlib and local sources deterministically, so that a prefix of the
stream (a small harvest) draws from many files rather than the first few in alphabetical order.
:class:`ContentHash` hashes the documents a harvest actually consumed, for the manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

log = logging.getLogger(__name__)

EMBEDDED_SOURCE = "stdlib"
HF_PREFIX = "hf:"
#: Suffixes read from a folder; other files are skipped (and counted in the log).
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
# Not part of the standard library proper, or machine-specific build data.
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass
class TextSource:
    """A named, deterministic stream of documents."""

    kind: str  #: "stdlib" | "files" | "hf"
    name: str  #: what the user wrote (path, dataset name)
    _documents: Callable[[], Iterator[str]] = field(repr=False)
    _fingerprint: Callable[[], "str | None"] = field(repr=False, default=lambda: None)

    def documents(self) -> Iterator[str]:
        """Iterate over the documents from the start (every call gives the same sequence)."""
        return self._documents()

    def fingerprint(self) -> "str | None":
        """sha256 over the source's files in reading order (each file's name and bytes): a file edited, added,
        removed or reordered changes it. None for a Hugging Face dataset (see :mod:`lit_sae.data.identity`)."""
        return self._fingerprint()


def _files_sha256(files: list[Path], root: Path, extra: Iterator[str] = iter(())) -> str:
    """sha256 of ``files`` in order (path relative to ``root``, length, bytes), then of the ``extra`` texts."""
    h = hashlib.sha256()
    for p in files:
        data = p.read_bytes()
        h.update(f"{p.relative_to(root).as_posix()}|{len(data)}|".encode())
        h.update(data)
    for text in extra:
        data = text.encode("utf-8", errors="surrogatepass")
        h.update(f"|{len(data)}|".encode())
        h.update(data)
    return h.hexdigest()


class ContentHash:
    """sha256 over a sequence of documents (each length-prefixed so that boundaries count)."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self.documents = 0
        self.contexts = 0  # set by the consumer that cuts documents into contexts (lit_sae.data.contexts.iter_contexts)

    def update(self, doc: str) -> None:
        """Add one document."""
        data = doc.encode("utf-8", errors="surrogatepass")
        self._h.update(len(data).to_bytes(8, "little"))
        self._h.update(data)
        self.documents += 1

    def hexdigest(self) -> str:
        """The hash so far."""
        return self._h.hexdigest()


def _permute(items: list, shuffle_seed: int | None) -> list:
    if shuffle_seed is None:
        return items
    items = list(items)
    random.Random(shuffle_seed).shuffle(items)
    return items


def _read_text(path: Path) -> str:
    # errors="replace": a few stdlib test files hold deliberately invalid bytes; replacing keeps the stream
    # deterministic instead of failing.
    return path.read_text(encoding="utf-8", errors="replace")


def _stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return root, sorted(
        (p for p in root.rglob("*.py") if not _STDLIB_SKIP_DIRS.intersection(p.relative_to(root).parts)),
        key=lambda p: p.relative_to(root).as_posix(),
    )


def stdlib_fingerprint() -> str:
    """:meth:`TextSource.fingerprint` of the embedded corpus (its files and pydoc topics, in sorted order)."""
    from pydoc_data.topics import topics

    root, files = _stdlib_files()
    return _files_sha256(files, root, (topics[k] for k in sorted(topics)))


def stdlib_documents(shuffle_seed: int | None = None) -> list[Callable[[], str]]:
    """Loaders for the embedded corpus: stdlib .py files (sorted by relative path), then pydoc topics."""
    root, files = _stdlib_files()
    loaders: list[Callable[[], str]] = [lambda p=p: _read_text(p) for p in files]
    from pydoc_data.topics import topics

    loaders += [lambda key=key: topics[key] for key in sorted(topics)]
    return _permute(loaders, shuffle_seed)


def jsonl_records(path: Path, key: str = "", hint: str = "") -> Iterator[tuple[int, object]]:
    """(line number, parsed record) of each non-blank line of a JSONL file; a line that is not JSON raises a
    ValueError ``"{key}: {path}:{line}: invalid JSON (...); {hint}"`` (key and hint only when given)."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{key + ': ' if key else ''}{path}:{line_no}: invalid JSON ({e.msg})"
                                 f"{'; ' + hint if hint else ''}") from None


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    for line_no, record in jsonl_records(path):
        text = record if isinstance(record, str) else record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"{path}:{line_no}: no string field {text_field!r} (set text_field)")
        yield text


def file_documents(path: str | Path, text_field: str = "text",
                   shuffle_seed: int | None = None) -> Callable[[], Iterator[str]]:
    """A document iterator factory for a text/JSONL file or a folder of them."""
    return _file_source(path, text_field, shuffle_seed)[0]


def _file_source(path: str | Path, text_field: str = "text", shuffle_seed: int | None = None) \
        -> tuple[Callable[[], Iterator[str]], Callable[[], str]]:
    """The document iterator factory of a text/JSONL file or folder, and its fingerprint function."""
    path = Path(path)
    if path.is_dir():
        files = sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
        used = [p for p in files if p.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES]
        if len(used) < len(files):
            log.info("%s: skipping %d files without a suffix in %s", path, len(files) - len(used),
                     TEXT_SUFFIXES + JSONL_SUFFIXES)
        if not used:
            raise ValueError(f"{path}: no text files (suffixes {TEXT_SUFFIXES + JSONL_SUFFIXES})")
    elif path.is_file():
        used = [path]
    else:
        raise FileNotFoundError(f"text source not found: {path}")
    used = _permute(used, shuffle_seed)

    def documents() -> Iterator[str]:
        for p in used:
            if p.suffix.lower() in JSONL_SUFFIXES:
                yield from _jsonl_documents(p, text_field)
            else:
                yield _read_text(p)

    root = path if path.is_dir() else path.parent
    return documents, lambda: _files_sha256(used, root)


def hf_documents(name: str, split: str = "train", config: str | None = None, text_field: str = "text",
                 streaming: bool = True) -> Callable[[], Iterator[str]]:
    """A document iterator factory over a Hugging Face dataset (needs the optional ``datasets`` package).

    Raises FileNotFoundError at once (before any download attempt) when the dataset is neither local nor cached and
    the hub cannot be reached (``lit_sae.data.hub.check_dataset_available``)."""
    from lit_sae.data.hub import check_dataset_available

    check_dataset_available(name)
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"the text source 'hf:{name}' needs the optional package `datasets`: pip install 'lit-sae[datasets]' "
            f"(or use source: stdlib, or a local text/JSONL path)"
        ) from None

    def documents() -> Iterator[str]:
        ds = datasets.load_dataset(name, config, split=split, streaming=streaming)
        for i, record in enumerate(ds):
            text = record.get(text_field)
            if not isinstance(text, str):
                raise ValueError(f"hf:{name} record {i}: no string field {text_field!r} (set text_field)")
            yield text

    return documents


def open_source(source: str, *, text_field: str = "text", shuffle_seed: int | None = None,
                hf_split: str = "train", hf_config: str | None = None, hf_streaming: bool = True) -> TextSource:
    """A :class:`TextSource` from its string name: "stdlib", a local path, or "hf:NAME" (see module docstring)."""
    if source == EMBEDDED_SOURCE:
        loaders = stdlib_documents(shuffle_seed)
        return TextSource("stdlib", source, lambda: (load() for load in loaders), stdlib_fingerprint)
    if source.startswith(HF_PREFIX):
        if shuffle_seed is not None:
            log.info("%s: documents are read in the dataset's own order (shuffle_seed applies to local sources)",
                     source)
        name = source[len(HF_PREFIX):]
        return TextSource("hf", name, hf_documents(name, hf_split, hf_config, text_field, hf_streaming))
    if not Path(source).exists():
        raise FileNotFoundError(
            f"text source {source!r}: no such file or folder. Valid sources: 'stdlib' (embedded), a local text/JSONL "
            f"file or folder, or 'hf:NAME' for a Hugging Face dataset"
        )
    return TextSource("files", source, *_file_source(source, text_field, shuffle_seed))
