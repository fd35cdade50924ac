"""The shard folder's ``manifest.json`` as one typed object: :class:`Manifest` (read, validated, written in one place).

Harvest builds it, the DataModule and the evaluation read it, scripts and tests write small ones. docs/shard-format.md
describes every field. Old manifests stay readable: the language model's entry was called ``model`` with its name
under ``name_or_path`` (written by lit-sae before the ``lm`` / ``name`` keys); :meth:`Manifest.from_json` reads both.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional, Union

from lit_sae.data.shard_format import (
    DTYPES,
    FIX_HINT,
    FORMAT,
    HOOK_SETS_FORMAT,
    MANIFEST_NAME,
    ShardError,
    ShardNotFoundError,
    is_url,
)
from lit_sae.fsync import fsync_dir


@dataclass
class ShardInfo:
    """One complete shard of a split."""

    name: str
    """File name inside the shard folder: ``{split}-{index:06d}.tar`` (no folder part)."""
    tokens: int
    """Rows (token activations) the shard holds."""
    blocks: Optional[int] = None
    """Blocks (tar samples) in the shard."""
    sha256: Optional[str] = None
    """sha256 of the tar's bytes (checked by ``data.verify``)."""


@dataclass
class SplitInfo:
    """The shards of one split (train, val or test), in reading order."""

    shards: list[ShardInfo] = field(default_factory=list)
    """Complete shards; a reader only ever opens names listed here."""
    contexts: Optional[int] = None
    """Contexts of the text stream whose tokens this split holds (after exclusions)."""

    @property
    def tokens(self) -> int:
        """Rows of the split: the sum over its shards."""
        return sum(s.tokens for s in self.shards)


@dataclass
class LMInfo:
    """The language model that produced the activations."""

    name: Optional[str] = None
    """What harvest's ``model`` argument named: a hub name, a local folder, or "smollm2-135m" (embedded default)."""
    gguf_file: Optional[str] = None
    """GGUF file inside that folder, for GGUF models."""
    sha256: Optional[str] = None
    """sha256 of the GGUF file, when the weights came from one."""
    architecture: Optional[str] = None
    """transformers class name, e.g. "LlamaForCausalLM"."""
    n_layers: Optional[int] = None
    """Decoder layers of the model."""


@dataclass
class SourceInfo:
    """The text the contexts were cut from."""

    kind: Optional[str] = None
    """"stdlib", "files" or "hf" (see :mod:`lit_sae.data.text`)."""
    name: Optional[str] = None
    """The source as the user wrote it (path, "hf:NAME", "stdlib")."""
    sha256: Optional[str] = None
    """Hash of the documents the harvest consumed (each length-prefixed)."""
    documents: Optional[int] = None
    """Documents consumed."""


@dataclass
class Exclusions:
    """Token positions the harvest did not store, and how many."""

    drop_first_position: bool = True
    """Position 0 of every context is dropped (an attention sink when no BOS is added)."""
    norm_filter_multiple: Optional[float] = None
    """Tokens with activation norm above this multiple of ``norm_median`` are dropped (None: no filter)."""
    norm_median: Optional[float] = None
    """Median activation norm measured on the first batch of contexts."""
    dropped_norm: int = 0
    """Tokens dropped by the norm filter."""
    dropped_nonfinite: int = 0
    """Tokens dropped because their activation was NaN/Inf in the storage dtype."""


_SECTIONS = {"lm": LMInfo, "source": SourceInfo, "exclusions": Exclusions}


@dataclass
class Manifest:
    """Everything a reader needs to know about a shard folder (``manifest.json``).

    Only ``d_in``, ``dtype``, ``block_tokens`` and ``splits`` are required; the rest describes how the activations
    were made (harvest fills all of it). Keys this version does not know are kept in ``extra`` and written back.
    """

    d_in: int
    """Activation width."""
    dtype: str
    """Storage dtype of the activations: "float16" or "bfloat16" (stored as its uint16 bit pattern)."""
    block_tokens: int
    """Rows per block (one tar sample); only the last block of a split may be shorter."""
    splits: dict[str, SplitInfo] = field(default_factory=dict)
    """Split name -> its shards."""
    format: str = FORMAT
    """Format tag, ``lit-sae-shards/1``."""
    tokens_per_shard: Optional[int] = None
    """Rows per shard (a multiple of block_tokens); only the last shard of a split may hold fewer."""
    context_length: Optional[int] = None
    """Tokens per context fed to the language model (before dropping position 0)."""
    hook_point: Optional[str] = None
    """Where activations were read, e.g. "blocks.20.hook_resid_post"."""
    lm: LMInfo = field(default_factory=LMInfo)
    """The language model."""
    tokenizer: Optional[str] = None
    """Tokenizer class and the model it came with (informative)."""
    source: Optional[SourceInfo] = None
    """The text source."""
    exclusions: Optional[Exclusions] = None
    """Positions not stored (position 0, norm filter, non-finite)."""
    complete: bool = True
    """False while a harvest is still writing shards (readers then use the shards finished so far)."""
    config: dict = field(default_factory=dict)
    """The harvest's arguments (a resumed harvest must match them)."""
    created_by: Optional[str] = None
    """``lit-sae <version>`` that wrote the folder."""
    resume: Optional[dict] = None
    """Per-split progress a resumed harvest starts from (harvest-internal)."""
    extra: dict = field(default_factory=dict)
    """Keys of the JSON object this version does not know (kept on rewrite)."""

    @property
    def lm_name(self) -> Optional[str]:
        """The language model's name (``lm.name``)."""
        return self.lm.name

    @property
    def tokens(self) -> int:
        """Rows over all splits."""
        return sum(s.tokens for s in self.splits.values())

    def split_tokens(self, split: str) -> int:
        """Rows of ``split`` (0 for a split the folder does not have)."""
        return self.splits[split].tokens if split in self.splits else 0

    # ---- JSON ---------------------------------------------------------------------------------------------------
    @classmethod
    def from_json(cls, obj: Any, source: str = MANIFEST_NAME) -> "Manifest":
        """Validate a decoded ``manifest.json`` object and build the Manifest.

        Raises ShardError naming ``source`` and the bad field (wrong format tag, missing key, bad dtype, a
        non-positive size, a malformed split or shard entry).
        """
        if isinstance(obj, Manifest):
            return obj
        if not isinstance(obj, dict):
            raise ShardError(f"{source}: expected a JSON object, got {type(obj).__name__}; {FIX_HINT}")
        fmt = obj.get("format")
        if fmt == HOOK_SETS_FORMAT:
            hooks = obj.get("hook_points") or []
            sub = next(iter((obj.get("folders") or {}).values()), "")
            raise ShardError(f"{source}: this folder holds {len(hooks)} hook points ({', '.join(hooks)}), one shard "
                             f"folder each: point at one of them (e.g. its subfolder {sub!r}) or read several with "
                             "ActivationDataModule's hook_points")
        if fmt != FORMAT:
            raise ShardError(f"{source}: format is {fmt!r}, expected {FORMAT!r}; {FIX_HINT}")
        missing = [k for k in ("d_in", "dtype", "block_tokens", "splits") if k not in obj]
        if missing:
            raise ShardError(f"{source}: missing keys {missing}; {FIX_HINT}")
        if obj["dtype"] not in DTYPES:
            raise ShardError(f"{source}: dtype {obj['dtype']!r} is not one of {DTYPES}")
        for k in ("d_in", "block_tokens"):
            if not isinstance(obj[k], int) or isinstance(obj[k], bool) or obj[k] <= 0:
                raise ShardError(f"{source}: {k} must be a positive integer, got {obj[k]!r}")
        if not isinstance(obj["splits"], dict):
            raise ShardError(f"{source}: 'splits' must be an object of split name -> {{shards: [...]}}")
        splits = {name: _split(name, entry, source) for name, entry in obj["splits"].items()}
        known = {f.name for f in fields(cls)} | {"model", "tokens"}
        kw: dict[str, Any] = {k: obj[k] for k in ("format", "d_in", "dtype", "block_tokens", "tokens_per_shard",
                                                  "context_length", "hook_point", "tokenizer", "created_by",
                                                  "resume") if k in obj}
        kw["complete"] = bool(obj.get("complete", True))
        kw["config"] = dict(obj.get("config") or {})
        lm = obj.get("lm")
        if lm is None and isinstance(obj.get("model"), dict):  # manifests written before the "lm" key
            lm = {("name" if k == "name_or_path" else k): v for k, v in obj["model"].items()}
        for key, cls_ in _SECTIONS.items():
            value = lm if key == "lm" else obj.get(key)
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ShardError(f"{source}: {key!r} must be an object, got {type(value).__name__}")
            names = {f.name for f in fields(cls_)}
            kw[key] = cls_(**{k: v for k, v in value.items() if k in names})
        return cls(splits=splits, extra={k: v for k, v in obj.items() if k not in known}, **kw)

    def to_json(self) -> dict:
        """The JSON object written to ``manifest.json`` (derived token counts included for readers of the file)."""
        out: dict[str, Any] = {"format": self.format, "d_in": self.d_in, "dtype": self.dtype,
                               "block_tokens": self.block_tokens}
        for k in ("tokens_per_shard", "context_length", "hook_point"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        out["lm"] = asdict(self.lm)
        for k in ("tokenizer", "source", "exclusions"):
            v = getattr(self, k)
            if v is not None:
                out[k] = v if isinstance(v, str) else asdict(v)
        out["splits"] = {name: {"shards": [_shard_json(s) for s in sp.shards], "tokens": sp.tokens,
                                **({"contexts": sp.contexts} if sp.contexts is not None else {})}
                         for name, sp in self.splits.items()}
        out["tokens"] = self.tokens
        out["complete"] = self.complete
        out["config"] = self.config
        if self.created_by is not None:
            out["created_by"] = self.created_by
        if self.resume is not None:
            out["resume"] = self.resume
        out.update(self.extra)
        return out

    # ---- read-only dict access, for code written against the plain-dict manifest of earlier versions ------------
    def __getitem__(self, key: str) -> Any:
        return self.to_json()[key]

    def get(self, key: str, default: Any = None) -> Any:
        """``to_json().get(key, default)``."""
        return self.to_json().get(key, default)


def _shard_json(s: ShardInfo) -> dict:
    return {k: v for k, v in asdict(s).items() if v is not None or k in ("name", "tokens")}


def _split(name: str, entry: Any, source: str) -> SplitInfo:
    shards = entry.get("shards") if isinstance(entry, dict) else None
    if not isinstance(shards, list):
        raise ShardError(f"{source}: splits.{name}.shards must be a list")
    out = []
    for i, s in enumerate(shards):
        if not isinstance(s, dict) or not isinstance(s.get("name"), str) or not isinstance(s.get("tokens"), int):
            raise ShardError(f"{source}: splits.{name}.shards[{i}] needs a 'name' (str) and 'tokens' (int)")
        if s["tokens"] < 0 or "/" in s["name"]:
            raise ShardError(f"{source}: splits.{name}.shards[{i}] has an invalid name or token count: {s}")
        out.append(ShardInfo(s["name"], s["tokens"], s.get("blocks"), s.get("sha256")))
    return SplitInfo(out, entry.get("contexts"))


def validate_manifest(manifest: Any, source: str = MANIFEST_NAME) -> Manifest:
    """:meth:`Manifest.from_json` (kept under its earlier name)."""
    return Manifest.from_json(manifest, source)


def write_manifest_atomic(out_dir: str, manifest: Union[Manifest, dict]) -> str:
    """Write ``out_dir/manifest.json`` atomically (tmp file, fsync, os.replace); return its path.

    ``manifest``: a :class:`Manifest`, or a plain dict written as given (readers validate it with
    :meth:`Manifest.from_json`; tests write deliberately inconsistent ones).
    """
    obj = manifest.to_json() if isinstance(manifest, Manifest) else manifest
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, MANIFEST_NAME)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(out_dir)
    return path


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
                "or " + FIX_HINT
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


def read_manifest_object(path_or_url: str) -> tuple[Any, str]:
    """The decoded JSON of the manifest of ``path_or_url`` and where it was read (see :func:`read_manifest`)."""
    loc = manifest_location(path_or_url)
    data = _read_bytes(loc)
    try:
        return json.loads(data.decode("utf-8")), loc
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise ShardError(f"{loc}: not valid JSON ({exn}); the file is corrupt: {FIX_HINT}") from exn


def read_manifest(path_or_url: str) -> Manifest:
    """Read and validate the manifest of a shard folder, a manifest.json path, a brace pattern or a URL.

    Raises ShardNotFoundError (missing folder/manifest) or ShardError (invalid JSON or fields), naming the file.
    """
    loc = manifest_location(path_or_url)
    data = _read_bytes(loc)
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise ShardError(f"{loc}: not valid JSON ({exn}); the file is corrupt: {FIX_HINT}") from exn
    return Manifest.from_json(obj, loc)
