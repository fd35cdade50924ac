"""Reading several hook points of one harvest row-aligned: the folders of a multi-hook harvest, and
:class:`HookZip`, which reads their streams in lockstep into one batch.

Batch format (what :class:`~lit_sae.data.datamodule.ActivationDataModule` and the LM stream yield; a dict)::

    acts            (B, d_in) float16/bfloat16   the main hook point (data.hook_points[0], or the folder's only one)
    target          (B, d_target)                data.target_hook_point, when set (e.g. a transcoder's MLP output)
    acts@{hook}     (B, d_hook)                  every hook point read, under its own name (the same tensors)
    tok, ctx, pos   (B,) int64                   token id, context id, position: the same token in row i of all

Row alignment holds because a multi-hook harvest keeps or drops each token at every hook together
(:mod:`lit_sae.data.harvest`), so the folders' shards have equal token counts, the streams (same seed, same plan)
read the same rows, and :class:`HookZip` checks ``ctx``/``pos`` of every batch (ShardError if they ever differ).
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch.utils.data import IterableDataset

from lit_sae.data.hook_sets import HookSets, parse_hook_sets
from lit_sae.data.manifest import Manifest, read_manifest_object
from lit_sae.data.reader import ShardRef
from lit_sae.data.shard_format import ShardError
from lit_sae.data.stream import ActivationStream

__all__ = ["HookZip", "TARGET_KEY", "batch_key", "check_aligned", "check_single", "hook_folders", "read_hook_sets"]

#: Batch key of the target hook point.
TARGET_KEY = "target"


def batch_key(hook_point: str) -> str:
    """The batch key of a hook point: ``acts@{hook_point}``."""
    return f"acts@{hook_point}"


def read_hook_sets(path_or_url: str) -> Optional[HookSets]:
    """The HookSets of a multi-hook harvest folder, or None for an ordinary shard folder (or a pattern/.tar path)."""
    p = str(path_or_url)
    if p.endswith(".tar") or "{" in p:
        return None
    obj, loc = read_manifest_object(p)
    return parse_hook_sets(obj, loc)


def hook_folders(path: str, hook_points: Optional[list[str]], target: Optional[str]) -> Optional[dict[str, str]]:
    """Hook point -> shard folder to read from the multi-hook harvest folder ``path`` (main hook first, target
    last); None when ``path`` is an ordinary shard folder. Raises ValueError naming data.hook_points or
    data.target_hook_point for a hook point the folder does not hold."""
    sets = read_hook_sets(path)
    if sets is None:
        return None
    for key, hook in [("hook_points", h) for h in hook_points or []] + [("target_hook_point", target)]:
        if hook is not None and hook not in sets.folders:
            raise ValueError(f"data.{key}: {hook!r} is not in {path}'s harvest, which holds {sets.hook_points}; name "
                             "one of those or harvest that hook point")
    wanted = list(hook_points or sets.hook_points[:1])
    if target is not None and target not in wanted:
        wanted.append(target)
    base = path[:-len("/manifest.json")] if path.endswith("manifest.json") else path.rstrip("/")
    return {h: f"{base}/{sets.folders[h]}" for h in wanted}


def check_single(manifest: Manifest, url: str, hook_points: Optional[list[str]], target: Optional[str]) -> None:
    """A one-hook folder serves only its own hook point, and no target: ValueError naming the key otherwise."""
    own = manifest.hook_point
    if target is not None:
        raise ValueError(f"data.target_hook_point: {url} holds one hook point ({own!r}), so there is no {target!r} "
                         f"to pair with it; harvest both with `hook_points: [{own}, {target}]`")
    if hook_points is not None and list(hook_points) != [own]:
        raise ValueError(f"data.hook_points: {url} holds only {own!r}, not {hook_points}; harvest them together "
                         "with `lit-sae harvest` and hook_points")


def check_aligned(main: str, refs: dict[str, dict[str, list[ShardRef]]]) -> None:
    """Raise ShardError unless every hook's folder has the main hook's shard names and token counts in each split."""
    want = {s: [(r.name, r.tokens) for r in rs] for s, rs in refs[main].items()}
    for hook, by_split in refs.items():
        got = {s: [(r.name, r.tokens) for r in rs] for s, rs in by_split.items()}
        if got != want:
            raise ShardError(f"hook point {hook!r}: its shards differ from {main!r}'s in names or token counts, so "
                             "their rows are not the same tokens; read folders of one multi-hook harvest (rerun "
                             "`lit-sae harvest` with hook_points to complete it)")


class HookZip(IterableDataset):
    """The batches of several row-aligned :class:`ActivationStream` s (one per hook point), merged per batch.

    Args:
        streams: hook point -> its stream; all built with the same settings over folders of one multi-hook harvest.
        main: the hook point whose activations are ``batch["acts"]``.
        target: the hook point also given as ``batch["target"]`` (None: no target).
    """

    def __init__(self, streams: dict[str, ActivationStream], main: str, target: Optional[str] = None):
        super().__init__()
        self.streams, self.main, self.target = dict(streams), main, target
        first = self.streams[main]
        for hook, s in self.streams.items():
            if s.num_batches != first.num_batches or s.total_tokens != first.total_tokens:
                raise ShardError(f"hook point {hook!r}: {s.total_tokens} tokens against {first.total_tokens} at "
                                 f"{main!r}; the folders are not row-aligned")

    @property
    def num_batches(self) -> int:
        return self.streams[self.main].num_batches

    @property
    def total_tokens(self) -> int:
        return self.streams[self.main].total_tokens

    @property
    def dropped_tokens(self) -> int:
        return self.streams[self.main].dropped_tokens

    @property
    def batch_size_tokens(self) -> int:
        return self.streams[self.main].batch_size_tokens

    def __len__(self) -> int:
        return self.num_batches

    def set_position(self, epoch: int, skip_batches: int = 0) -> None:
        """Set every stream's epoch and resume position (:meth:`ActivationStream.set_position`)."""
        for s in self.streams.values():
            s.set_position(epoch, skip_batches)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        hooks = list(self.streams)
        for batches in zip(*(iter(self.streams[h]) for h in hooks)):
            by_hook = dict(zip(hooks, batches))
            main = by_hook[self.main]
            out = {k: v for k, v in main.items() if k != "acts"}
            for hook, b in by_hook.items():
                if not (torch.equal(b["ctx"], main["ctx"]) and torch.equal(b["pos"], main["pos"])):
                    raise ShardError(f"hook point {hook!r}: a batch holds other tokens than {self.main!r}'s (e.g. "
                                     "skip_nonfinite dropped a row at one hook only); the folders are not row-aligned")
                out[batch_key(hook)] = b["acts"]
                if "nonfinite_skipped" in b and hook != self.main:
                    out["nonfinite_skipped"] = out["nonfinite_skipped"] + b["nonfinite_skipped"]
            out["acts"] = main["acts"]
            if self.target is not None:
                out[TARGET_KEY] = by_hook[self.target]["acts"]
            yield out
