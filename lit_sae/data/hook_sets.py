"""The top manifest of a multi-hook harvest: which hook point each shard folder holds (:class:`HookSets`).

A harvest of several hook points (``hook_points: [a, b, ...]``) writes one ordinary shard folder per hook point,
``{out_dir}/{folder_name(hook)}/`` (each with its own ``manifest.json``, readable by every tool on its own), and
``{out_dir}/manifest.json`` with the format tag ``lit-sae-hook-sets/1`` naming them. All folders hold the same
tokens in the same rows (one forward pass, one keep mask: a token dropped at any hook is dropped at all), so their
shards have equal names and token counts. A harvest of one hook point keeps the single-folder layout.
docs/shard-format.md describes the layout.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from lit_sae.data.shard_format import HOOK_SETS_FORMAT, ShardError

__all__ = ["HOOK_SETS_FORMAT", "HookSets", "folder_name", "parse_hook_sets"]


def folder_name(hook_point: str) -> str:
    """The subfolder of a hook point: its name with ``:`` as ``@`` (``model.layers.3.mlp@input``) and any other
    character outside ``[A-Za-z0-9._-]`` as ``_``."""
    return re.sub(r"[^A-Za-z0-9._@-]", "_", hook_point.replace(":", "@"))


@dataclass
class HookSets:
    """``manifest.json`` of a multi-hook harvest folder."""

    hook_points: list[str]
    """The hook points, in the order the harvest was given them."""
    folders: dict[str, str]
    """Hook point -> its shard folder, relative to this manifest's folder."""
    complete: bool = False
    """True once every folder's harvest is complete."""
    config: dict = field(default_factory=dict)
    """The harvest's arguments (a resumed harvest must match them)."""
    format: str = HOOK_SETS_FORMAT
    """Format tag, ``lit-sae-hook-sets/1``."""

    @classmethod
    def new(cls, hook_points: list[str], config: dict) -> "HookSets":
        """A fresh, incomplete HookSets; raises ValueError when two hook points would share a folder."""
        folders = {h: folder_name(h) for h in hook_points}
        if len(set(folders.values())) != len(folders):
            raise ValueError(f"hook_points: {hook_points} repeat a hook point (or two map to one folder name); list "
                             "each once")
        return cls(list(hook_points), folders, False, dict(config))

    def to_json(self) -> dict:
        return {"format": self.format, "hook_points": self.hook_points, "folders": self.folders,
                "complete": self.complete, "config": self.config}


def parse_hook_sets(obj: Any, source: str) -> Optional[HookSets]:
    """The HookSets of a decoded manifest.json object, or None when it is an ordinary shard manifest.

    Raises ShardError naming ``source`` for a malformed multi-hook manifest.
    """
    if not isinstance(obj, dict) or obj.get("format") != HOOK_SETS_FORMAT:
        return None
    hooks, folders = obj.get("hook_points"), obj.get("folders")
    if not isinstance(hooks, list) or not isinstance(folders, dict) or set(hooks) != set(folders):
        raise ShardError(f"{source}: hook_points and folders must name the same hook points; the file is corrupt: "
                         "re-run `lit-sae harvest` for this folder")
    for h, f in folders.items():
        if not isinstance(f, str) or "/" in f or f in ("", ".", ".."):
            raise ShardError(f"{source}: folders[{h!r}] = {f!r} is not a subfolder name")
    return HookSets(list(hooks), dict(folders), bool(obj.get("complete", False)), dict(obj.get("config") or {}))


def read_hook_sets_file(path: str) -> Optional[HookSets]:
    """:func:`parse_hook_sets` of a local ``manifest.json`` (None if it is missing or an ordinary manifest)."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    return parse_hook_sets(obj, path)
