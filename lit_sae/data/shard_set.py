"""The shards a DataModule reads: resolved from the manifest, checked present, hashed on request, sampled.

``resolve_shards`` joins the manifest's names to the folder or URL (keeping only those a brace pattern names) and
refuses a listed shard that is missing; ``verify_shards`` hashes them against the manifest's sha256;
``sample_activations`` takes the deterministic initialisation sample (b_pre, input scale) from evenly spaced places.
Used by :class:`lit_sae.data.datamodule.ActivationDataModule`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Optional

import numpy as np
import torch

from lit_sae.data.manifest import Manifest, manifest_location
from lit_sae.data.plan import shard_order
from lit_sae.data.reader import ShardRef, open_shard, read_range_with_refs
from lit_sae.data.shard_format import (
    ShardError,
    ShardNotFoundError,
    from_storage,
    is_url,
    nonfinite_error,
    nonfinite_rows,
)

__all__ = ["FIX", "resolve_shards", "sample_activations", "shard_base", "verify_shards"]

log = logging.getLogger("lit_sae.data.datamodule")

FIX = "re-run `lit-sae harvest` for this folder (it resumes after the last complete shard) or restore the file"


def shard_base(path: str) -> str:
    """Folder or URL prefix that the manifest's shard names are relative to: the folder of ``path``'s manifest."""
    loc = manifest_location(path)
    return loc.rsplit("/", 1)[0] if "/" in loc else "."


def resolve_shards(path: str, manifest: Manifest, manifest_url: str) -> dict[str, list[ShardRef]]:
    """Shard refs per split: manifest names, joined to the folder/URL, filtered by a brace pattern if ``path`` is one.

    Raises ShardError for a pattern naming shards the manifest does not list, ShardNotFoundError (naming the first
    and the count) for listed local shards that are missing."""
    base = shard_base(path)
    selected = None
    if "{" in path:
        import braceexpand

        selected = {p.rsplit("/", 1)[-1] for p in braceexpand.braceexpand(path)}
        listed = {s.name for e in manifest.splits.values() for s in e.shards}
        unknown = sorted(selected - listed)
        if unknown:
            raise ShardError(f"{manifest_url}: the pattern {path!r} names shards the manifest does not "
                             f"list ({unknown[:5]}{' ...' if len(unknown) > 5 else ''}); they are incomplete or "
                             "from another harvest; use the folder path or a pattern of listed shards")
    splits: dict[str, list[ShardRef]] = {}
    missing = []
    for split, entry in manifest.splits.items():
        refs = []
        for s in entry.shards:
            if selected is not None and s.name not in selected:
                continue
            url = f"{base}/{s.name}"
            if not is_url(url) and not os.path.exists(url):
                missing.append(url)
            refs.append(ShardRef(url, s.name, int(s.tokens)))
        splits[split] = refs
    if missing:
        raise ShardNotFoundError(f"{missing[0]}: shard listed in {manifest_url} is missing "
                                 f"({len(missing)} missing in all); {FIX}")
    return splits


def verify_shards(manifest: Manifest, refs_by_split: dict[str, list[ShardRef]],
                  splits: Optional[list[str]] = None) -> int:
    """Hash every shard of ``splits`` (default: all) against the manifest's sha256; return the bytes hashed.

    Raises ShardError naming the file whose hash differs."""
    checked = 0
    for split in splits or list(refs_by_split):
        by_name = {s.name: s for s in manifest.splits[split].shards}
        for ref in refs_by_split.get(split, []):
            want = by_name[ref.name].sha256
            if not want:
                continue
            sha = hashlib.sha256()
            stream = open_shard(ref.url)
            try:
                while chunk := stream.read(1 << 22):
                    sha.update(chunk)
                    checked += len(chunk)
            finally:
                stream.close()
            if sha.hexdigest() != want:
                raise ShardError(f"{ref.url}: sha256 {sha.hexdigest()[:16]}... differs from manifest.json's "
                                 f"{want[:16]}...; the file is corrupt or was replaced: {FIX}")
    return checked


def sample_activations(refs: list[ShardRef], manifest: Manifest, n_tokens: int, seed: int,
                       skip_nonfinite: bool) -> torch.Tensor:
    """A deterministic float32 (n, d_in) sample of the activations of ``refs`` (for b_pre / scale initialisation).

    Takes n_tokens / m tokens from each of m = min(8, shards) evenly spaced places of the seed's shard order, so
    the sample spans several parts of the corpus. Returns fewer rows if the split is smaller (or rows were NaN/Inf
    and ``skip_nonfinite`` is on; otherwise a NaN/Inf row raises ShardError naming the shard, context and position).
    """
    order = [refs[i] for i in shard_order(len(refs), seed, 0, True)]
    total = sum(r.tokens for r in refs)
    if n_tokens > total:
        log.warning("sample_activations: asked for %d tokens, the train split has %d", n_tokens, total)
    n = min(int(n_tokens), total)
    m = max(1, min(8, len(refs), n))
    out = []
    for i in range(m):
        start = (i * total) // m
        take = n // m + (i < n % m)
        for ref, piece in read_range_with_refs(order, manifest, start, start + take):
            acts = piece["acts"]
            bad = nonfinite_rows(acts, manifest.dtype)
            if bad.any():
                if not skip_nonfinite:
                    raise nonfinite_error(ref.url, bad, piece["ctx"], piece["pos"])
                acts = acts[~bad]
            out.append(from_storage(np.array(acts), manifest.dtype).float())
    if not out:
        return torch.empty(0, manifest.d_in)
    return torch.cat(out)
