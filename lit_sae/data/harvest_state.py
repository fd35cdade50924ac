"""What a harvest resumes from: its settings checked, the output folder's manifest compared with them, stale files
cleaned, and the per-split progress a resume continues (used by :mod:`lit_sae.data.harvest`)."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Optional

from lit_sae.data.contexts import SPLITS
from lit_sae.data.hook_sets import HookSets, read_hook_sets_file
from lit_sae.data.manifest import Manifest
from lit_sae.data.shard_format import MANIFEST_NAME, ShardError

__all__ = ["HarvestConfigError", "SplitProgress", "clean_output", "config_diff", "existing_hook_sets",
           "existing_manifest", "hook_list", "refresh_totals", "set_aside", "start_over_if_inputs_changed",
           "validate_settings"]

log = logging.getLogger("lit_sae.data.harvest")

SHARD_RE = re.compile(r"^(train|val|test)-\d{6}\.tar(\.tmp)?$")


class HarvestConfigError(ValueError):
    """The output folder holds a harvest made with another configuration."""


class SplitProgress:
    """Counters of one split up to the last row handed to the writer (snapshotted into the manifest per shard)."""

    def __init__(self, state: Optional[dict] = None):
        state = state or {}
        self.last_key = int(state.get("last_key", -1))  # key = context id * context_length + position
        self.contexts = int(state.get("contexts", 0))
        self.dropped_norm = int(state.get("dropped_norm", 0))
        self.dropped_nonfinite = int(state.get("dropped_nonfinite", 0))
        self.done = bool(state.get("done", False))

    def as_dict(self) -> dict:
        return {"last_key": self.last_key, "contexts": self.contexts, "dropped_norm": self.dropped_norm,
                "dropped_nonfinite": self.dropped_nonfinite, "done": self.done}


def clean_output(out_dir: Path) -> None:
    """Remove a previous harvest's files (manifest and shards, nothing else)."""
    for p in out_dir.iterdir():
        if p.name in (MANIFEST_NAME, MANIFEST_NAME + ".tmp") or SHARD_RE.match(p.name):
            p.unlink()


def config_diff(old: dict, new: dict) -> list[str]:
    """One line per setting that differs between an existing harvest and this one."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k, '<unset>')!r} (existing) vs {new.get(k, '<unset>')!r} (now)"
            for k in keys if old.get(k) != new.get(k)]


def validate_settings(c: dict) -> None:
    """Reject harvest settings that cannot work (ValueError naming the key)."""
    if c["dtype"] not in ("float16", "bfloat16"):
        raise ValueError(f"dtype must be 'float16' or 'bfloat16', got {c['dtype']!r}")
    for k in ("total_tokens", "context_length", "batch_size", "block_tokens", "tokens_per_shard"):
        if not isinstance(c[k], int) or c[k] <= 0:
            raise ValueError(f"{k} must be a positive integer, got {c[k]!r}")
    if c["context_length"] < 2 and c["drop_first_position"]:
        raise ValueError("context_length must be >= 2 when drop_first_position is true")
    if c["tokens_per_shard"] % c["block_tokens"]:
        raise ValueError(f"tokens_per_shard ({c['tokens_per_shard']}) must be a multiple of block_tokens "
                         f"({c['block_tokens']})")
    if not (0 <= c["val_fraction"] and 0 <= c["test_fraction"] and c["val_fraction"] + c["test_fraction"] < 1):
        raise ValueError(f"val_fraction and test_fraction must be >= 0 with a sum < 1, got {c['val_fraction']} and "
                         f"{c['test_fraction']}")
    if c["norm_filter_multiple"] is not None and c["norm_filter_multiple"] <= 0:
        raise ValueError(f"norm_filter_multiple must be positive or null, got {c['norm_filter_multiple']}")
    if c["max_contexts_per_document"] is not None and c["max_contexts_per_document"] <= 0:
        raise ValueError(f"max_contexts_per_document must be positive or null, got {c['max_contexts_per_document']}")


def existing_manifest(out: Path, config: dict, overwrite: bool) -> Optional[Manifest]:
    """The manifest of a harvest to resume, or None for a fresh start (after cleaning up when allowed)."""
    import json

    path = out / MANIFEST_NAME
    if not path.exists():
        stale = sorted(p.name for p in out.iterdir() if SHARD_RE.match(p.name) and not p.name.endswith(".tmp"))
        if stale and not overwrite:
            raise HarvestConfigError(f"{out}: holds shards ({stale[0]}, ...) but no {MANIFEST_NAME}; use another "
                                     "out_dir, or overwrite=true to delete them")
        clean_output(out)
        return None
    try:
        manifest = Manifest.from_json(json.loads(path.read_text(encoding="utf-8")), str(path))
        old = manifest.config
        if not old or manifest.resume is None or manifest.exclusions is None or manifest.source is None:
            raise ValueError("not written by `lit-sae harvest` (no config, resume state, exclusions or source)")
    except (ValueError, KeyError, TypeError, ShardError) as e:
        if not overwrite:
            raise HarvestConfigError(f"{path}: unreadable manifest ({e}); use another out_dir, or overwrite=true to "
                                     "start over") from None
        clean_output(out)
        return None
    diff = config_diff(old, config)
    if not diff:
        return manifest
    if not overwrite:
        raise HarvestConfigError(
            f"{path}: this folder holds a harvest with another configuration, so it cannot be resumed: "
            + "; ".join(diff) + ". Use another out_dir, restore those settings, or set overwrite=true to delete it")
    log.warning("%s: deleting a harvest with another configuration (%s)", out, "; ".join(diff))
    clean_output(out)
    return None


def start_over_if_inputs_changed(out: Path, folders: list[Path], manifests: list[Manifest], now,
                                 overwrite: bool) -> bool:
    """Whether the harvest in ``out`` must start over because its inputs changed since it started (``now``: the
    :class:`~lit_sae.data.manifest.InputsInfo` of the model, tokenizer and text source loaded for this run; compared
    with every hook folder's recorded ``inputs``). If so, its files are first moved out of the way: deleted with
    ``overwrite``, else moved, unchanged, to a sibling ``<out_dir>.superseded-<UTC time>`` (named in a warning), so
    the folder never mixes activations of two models or texts under one manifest and nothing written is lost.

    A manifest that records no content hashes (written before they were recorded) counts as changed. The caller
    recreates ``folders`` (and a multi-hook set's top manifest) afterwards.
    """
    from lit_sae.data.identity import changed_inputs

    changed = next((c for c in (changed_inputs(m.inputs, now) for m in manifests) if c), None)
    if not changed:
        return False
    what = "; ".join(changed)
    if overwrite:
        log.warning("%s: deleting a harvest made from other inputs (%s); starting over", out, what)
        for folder in {out, *folders}:  # a multi-hook set's top manifest is in out itself
            if folder.is_dir():
                clean_output(folder)
        return True
    dest = set_aside(out, folders)
    log.warning("%s: its inputs changed since this harvest started (%s), so it cannot be resumed without mixing two "
                "inputs' activations; its files were moved, unchanged, to %s and the harvest starts over. Delete "
                "that folder if you do not need it; to finish the old harvest instead, restore the original inputs "
                "and move its files back.", out, what, dest)
    return True


def set_aside(out: Path, folders: list[Path]) -> Path:
    """Move the harvest files of ``folders`` (``out`` itself, or a multi-hook set's subfolders) and ``out``'s
    manifest into a new sibling folder ``<out>.superseded-<UTC time>[-n]``, keeping the layout; returns it.

    The manifest goes first, so an interruption midway leaves ``out`` without a manifest (a later run refuses its
    leftover shards by name) and never a manifest listing shards that moved."""
    import time

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest, n = out.with_name(f"{out.name}.superseded-{stamp}"), 0
    while dest.exists():
        n += 1
        dest = out.with_name(f"{out.name}.superseded-{stamp}-{n}")
    dest.mkdir(parents=True)
    for folder in [out] + [f for f in folders if f != out]:
        if not folder.is_dir():
            continue
        target = dest / folder.relative_to(out)
        target.mkdir(parents=True, exist_ok=True)
        files = sorted((p for p in folder.iterdir() if p.name in (MANIFEST_NAME, MANIFEST_NAME + ".tmp")
                        or SHARD_RE.match(p.name)), key=lambda p: p.name != MANIFEST_NAME)
        for p in files:
            p.rename(target / p.name)
    return dest


DEFAULT_HOOK_POINT = "blocks.20.hook_resid_post"


def hook_list(hook_point: str, hook_points: Optional[list[str]]) -> list[str]:
    """The hook points a harvest reads: ``hook_points`` when given (``hook_point`` must then be left at its default
    or be the first of them), else ``[hook_point]``. Raises ValueError naming the key."""
    if hook_points is None:
        return [hook_point]
    if isinstance(hook_points, str) or not hook_points or not all(isinstance(h, str) and h for h in hook_points):
        raise ValueError(f"hook_points must be a non-empty list of hook point names, got {hook_points!r}")
    if hook_point not in (DEFAULT_HOOK_POINT, hook_points[0]):
        raise ValueError(f"hook_point {hook_point!r} and hook_points {hook_points} are both set; set only "
                         "hook_points (its first entry is the main one)")
    if len(set(hook_points)) != len(hook_points):
        raise ValueError(f"hook_points {hook_points} lists a hook point twice; list each once")
    return list(hook_points)


def existing_hook_sets(out: Path, sets: Optional[HookSets], folders: dict[str, Path], configs: dict[str, dict],
                       overwrite: bool) -> dict[str, Manifest]:
    """The manifests to resume from, per hook point ({} for a fresh start, after cleaning up when allowed).

    One hook (``sets`` None): :func:`existing_manifest` of ``out``. Several: the top manifest must be a HookSets
    of the same configuration; each hook folder's manifest is checked like a one-hook folder, and the folders are
    rolled back to the shards all of them completed (an interruption may fall between two folders' shard writes).
    """
    hooks = list(folders)
    if sets is None:
        m = existing_manifest(out, configs[hooks[0]], overwrite)
        return {} if m is None else {hooks[0]: m}
    top = out / MANIFEST_NAME
    if top.exists():
        old = read_hook_sets_file(str(top))
        diff = ["not a multi-hook harvest"] if old is None else config_diff(old.config, sets.config)
        if diff:
            if not overwrite:
                raise HarvestConfigError(f"{top}: this folder holds another harvest ({'; '.join(diff)}), so it "
                                         "cannot be resumed; use another out_dir, or set overwrite=true to delete it")
            log.warning("%s: deleting a harvest with another configuration (%s)", out, "; ".join(diff))
            clean_output(out)
            for f in (old.folders.values() if old is not None else ()):
                if (out / f).is_dir():
                    clean_output(out / f)
    found = {h: existing_manifest(folders[h], configs[h], overwrite) if folders[h].is_dir() else None
             for h in hooks}
    if any(m is None for m in found.values()):  # a folder missing: start all over (they must stay aligned)
        for h in hooks:
            if folders[h].is_dir():
                clean_output(folders[h])
        return {}
    for split in SPLITS:
        least = min(hooks, key=lambda h: len(found[h].splits[split].shards))
        n = len(found[least].splits[split].shards)
        for h in hooks:
            found[h].splits[split].shards = found[h].splits[split].shards[:n]
            found[h].resume[split] = dict(found[least].resume[split])
            refresh_totals(found[h])
    return found


def refresh_totals(manifest: Manifest) -> None:
    """Recompute the derived counts (split contexts, exclusions) from the resume state."""
    ex = manifest.exclusions
    ex.dropped_norm = sum(manifest.resume[s]["dropped_norm"] for s in SPLITS)
    ex.dropped_nonfinite = sum(manifest.resume[s]["dropped_nonfinite"] for s in SPLITS)
    for s in SPLITS:
        manifest.splits[s].contexts = manifest.resume[s]["contexts"]
