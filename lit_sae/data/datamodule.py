"""Streaming activation shards into training: ``ActivationDataModule``.

The layers below it, one job per file: :mod:`~lit_sae.data.shard_format` (block bytes), :mod:`~lit_sae.data.manifest`
(the typed manifest), :mod:`~lit_sae.data.reader` (row ranges out of tars), :mod:`~lit_sae.data.plan` (which tokens
each rank and worker reads, and the drop rule of the train split), :mod:`~lit_sae.data.stream` (one rank's batches),
:mod:`~lit_sae.data.transport` (the DataLoader and its shared-memory ring) and
:mod:`~lit_sae.data.shard_set` (the shards a DataModule reads: resolved, checked present, hashed, sampled).

Resume: the stream's position is the DataModule's own state (``lit_sae.data.stream_position``).
"""

from __future__ import annotations

import logging
from typing import Optional

import lightning as L
import torch
from torch.utils.data import DataLoader

from lit_sae.data.manifest import Manifest, manifest_location, read_manifest
from lit_sae.data.multi_hook import HookZip, check_aligned, check_single, hook_folders
from lit_sae.data.reader import ShardRef, read_range, read_range_with_refs, read_shard
from lit_sae.data.shard_format import ShardError
from lit_sae.data.shard_set import resolve_shards, sample_activations, verify_shards
from lit_sae.data.stream import ActivationStream
from lit_sae.data.stream_position import STATE_VERSION, StreamPosition  # noqa: F401 (re-exported)
from lit_sae.data.transport import StreamLoader

__all__ = ["ActivationDataModule", "ActivationStream", "ShardRef", "read_range", "read_range_with_refs", "read_shard"]

log = logging.getLogger(__name__)


class ActivationDataModule(StreamPosition, L.LightningDataModule):
    """Streams activation shards written by ``lit-sae harvest`` into training, validation and test.

    Args:
        path: a shard folder, a ``manifest.json`` path, a brace pattern of shards (``dir/train-{000000..000009}.tar``:
            only the listed shards that the pattern names are used) or any URL webdataset opens
            (``https://host/shards``, ``file:``, ``gs://``, ...) whose folder holds manifest.json.
        batch_size_tokens: tokens (activation vectors) per training step, over all data-parallel processes (the
            global batch): with W data-parallel ranks each holds ``batch_size_tokens / W`` of them (it must divide
            evenly), and the W parts of a step are exactly the batch one process reads, so the same config and seed
            train the same SAE on any number of processes. Evaluation batches hold ``batch_size_tokens / W`` tokens
            per rank.
        shuffle_buffer_tokens: tokens mixed by the token shuffle (windows of several blocks, so tokens of many
            contexts share a batch). Memory per worker: about 2 * d_in * this many bytes. 0 disables token shuffle.
        num_workers: DataLoader worker processes (0: read in the main process). A worker overlaps reading with the
            step where cores are spare; on a 2-core machine it takes a core from the step, and 0 is faster (the
            quickstart recipe measured it).
        seed: fixes shard order and token permutations (with the epoch).
        skip_nonfinite: skip rows with NaN/Inf (warning, counted in ``nonfinite_skipped`` and logged as
            ``data/nonfinite_skipped``) instead of raising ShardError.
        val_tokens: validate on only the first this many tokens of the val split (None: all; 0: no validation).
        test_tokens: test on only the first this many tokens of the test split (None: all).
        shuffle: shuffle the training stream (False: manifest order, for debugging).
        manifest_path: read manifest.json from here instead of from ``path``'s folder (shards are still
            ``{path folder}/{name}``).
        pin_memory: pin batches (for GPU training).
        verify: hash every shard against manifest.json in ``setup`` (reads all data once; see verify_shards).
        hook_points: hook points to read from a multi-hook harvest folder (``lit-sae harvest`` with ``hook_points``),
            row-aligned; the first is ``batch["acts"]`` and every one is also ``batch["acts@{hook}"]``. Default:
            the folder's first hook point (a one-hook folder: its hook point; only it may be named).
        target_hook_point: a hook point of the same folder read as ``batch["target"]`` (e.g. a transcoder's
            ``blocks.L.hook_mlp_out`` beside ``blocks.L.ln2.hook_normalized``); its width is ``d_target``.

    Batches are dicts: ``acts`` (B, d_in) float16/bfloat16, ``tok``/``ctx``/``pos`` (B,) int64, and with several
    hook points ``target`` and ``acts@{hook}`` (:mod:`lit_sae.data.multi_hook` defines the format).
    """

    def __init__(
        self,
        path: str,
        batch_size_tokens: int = 4096,
        shuffle_buffer_tokens: int = 65536,
        num_workers: int = 1,
        seed: int = 0,
        skip_nonfinite: bool = False,
        val_tokens: Optional[int] = None,
        test_tokens: Optional[int] = None,
        shuffle: bool = True,
        manifest_path: Optional[str] = None,
        pin_memory: bool = False,
        verify: bool = False,
        hook_points: Optional[list[str]] = None,
        target_hook_point: Optional[str] = None,
    ):
        super().__init__()
        if batch_size_tokens <= 0:
            raise ValueError(f"data.batch_size_tokens must be positive, got {batch_size_tokens}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        self.save_hyperparameters()
        self.path = str(path)
        self.batch_size_tokens = int(batch_size_tokens)
        self.shuffle_buffer_tokens = int(shuffle_buffer_tokens)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.val_tokens, self.test_tokens = val_tokens, test_tokens
        self.shuffle = bool(shuffle)
        self.pin_memory = bool(pin_memory)
        self.verify, self._verified = bool(verify), False
        self._hook_folders = hook_folders(self.path, hook_points, target_hook_point) if manifest_path is None else None
        self.target_hook_point = target_hook_point
        if self._hook_folders is not None:  # a multi-hook harvest: the main hook's folder plays the one folder
            self.path = self._hook_folders[next(iter(self._hook_folders))]
        source = manifest_path or self.path
        self.manifest: Manifest = read_manifest(source)
        self.manifest_url = manifest_location(source)
        if self._hook_folders is None and (hook_points or target_hook_point):
            check_single(self.manifest, self.manifest_url, hook_points, target_hook_point)
        self.d_in: int = self.manifest.d_in
        self.dtype: str = self.manifest.dtype
        self.hook_point: Optional[str] = self.manifest.hook_point
        self.lm_name: Optional[str] = self.manifest.lm_name
        self.model_name: Optional[str] = self.lm_name  # the name the CLI links to model.lm_name
        if not self.manifest.complete:
            log.warning("%s: harvest is not complete; training on the %d shards finished so far",
                        self.manifest_url, sum(len(s.shards) for s in self.manifest.splits.values()))
        self._splits = self._resolve_shards()
        self._hooks: dict[str, tuple[Manifest, dict[str, list[ShardRef]]]] = {}
        if self._hook_folders is not None:
            for hook, folder in self._hook_folders.items():
                m = read_manifest(folder)
                self._hooks[hook] = (m, resolve_shards(folder, m, manifest_location(folder)))
            check_aligned(self.hook_point, {h: refs for h, (_, refs) in self._hooks.items()})
        #: Width of every hook point read (the main one is d_in); d_target: the target's width (None without one).
        self.d_ins: dict[str, int] = {h: m.d_in for h, (m, _) in self._hooks.items()} or {self.hook_point: self.d_in}
        self.d_target: Optional[int] = self.d_ins.get(target_hook_point) if target_hook_point else None
        # Evaluation reads every token once, so with more ranks than tokens a rank may hold none (see plan.py).
        self.allow_zero_length_dataloader_with_multiple_devices = True

        # Stream position (see the module docstring): the current pass's epoch and batches consumed in it; _pending
        # holds a position to continue from at the next pass (a fresh start or a loaded checkpoint).
        self._epoch = 0
        self._consumed = 0
        self._pass_start = 0
        self._pending: Optional[tuple[int, int]] = (0, 0)
        self.nonfinite_skipped = 0


    # ---- shards ---------------------------------------------------------------------------------------------------
    def _resolve_shards(self) -> dict[str, list[ShardRef]]:
        """Shard refs per split (``lit_sae.data.shard_set.resolve_shards``)."""
        return resolve_shards(self.path, self.manifest, self.manifest_url)

    def verify_shards(self, splits: Optional[list[str]] = None) -> int:
        """Hash every shard of ``splits`` (default: all) against manifest.json's sha256; return the bytes hashed.

        Catches corruption the format checks cannot see (flipped bits inside activation data). Reads everything
        once, so it is opt-in: ``data.verify_shards: true`` runs it in ``setup`` on each rank.
        """
        return verify_shards(self.manifest, self._splits, splits)

    def setup(self, stage: str) -> None:
        """Start a fresh fit at epoch 0 (a checkpoint's position is loaded after this hook); optionally verify shard
        hashes (``verify_shards=True``) before any batch is read."""
        trainer = self._trainer_or_none()
        if stage == "fit" and (trainer is None or trainer.global_step == 0):
            self._epoch, self._consumed, self._pass_start, self._pending = 0, 0, 0, (0, 0)
        if self.verify and not self._verified:
            n = self.verify_shards()
            log.info("verified %.1f MB of shards against manifest.json", n / 1e6)
            self._verified = True

    def shards(self, split: str) -> list[ShardRef]:
        """The shards of ``split`` (train/val/test) in manifest order."""
        return list(self._splits.get(split, []))

    def _split_or_raise(self, split: str) -> list[ShardRef]:
        refs = self.shards(split)
        if not refs or sum(r.tokens for r in refs) == 0:
            raise ShardError(f"{self.manifest_url}: split {split!r} has no shards (or no tokens); harvest it, e.g. "
                             f"set the harvest's {split} token count above 0, or point data.path at a complete folder")
        return refs

    # ---- distribution ----------------------------------------------------------------------------------------------
    def _world(self) -> tuple[int, int]:
        """(rank, world_size) from the trainer, else torch.distributed, else (0, 1)."""
        trainer = self._trainer_or_none()
        if trainer is not None:  # the data-parallel rank (under tensor parallelism, a group of ranks shares a batch)
            kwargs = trainer.distributed_sampler_kwargs
            return (int(kwargs["rank"]), int(kwargs["num_replicas"])) if kwargs else (0, 1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _trainer_or_none(self):
        return getattr(self, "trainer", None)

    # ---- datasets and loaders ------------------------------------------------------------------------------------
    def rank_batch_tokens(self, world_size: int) -> int:
        """Tokens per batch on each of ``world_size`` data-parallel ranks: the global ``batch_size_tokens`` split.

        Raises ValueError when it does not divide evenly (the ranks' parts would not add up to the global batch)."""
        if self.batch_size_tokens % world_size:
            raise ValueError(
                f"data.batch_size_tokens={self.batch_size_tokens} is the global batch and must divide evenly over the "
                f"{world_size} data-parallel processes: set it to a multiple of {world_size} (e.g. "
                f"{(self.batch_size_tokens // world_size + 1) * world_size})")
        return self.batch_size_tokens // world_size

    def train_dataset(self, rank: Optional[int] = None, world_size: Optional[int] = None) -> ActivationStream:
        """The training stream for one data-parallel rank (rank/world_size default to the trainer's or
        torch.distributed's): every rank follows the one-process plan of global batches and keeps its part of each
        (``ActivationStream``'s ``share``), so the global batch of a step is the same tokens on any world size."""
        r, w = self._world()
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
        self.rank_batch_tokens(world_size)
        self._split_or_raise("train")
        ds = self._zipped("train", lambda refs, manifest: ActivationStream(
            refs, manifest, batch_size_tokens=self.batch_size_tokens, rank=0, world_size=1, seed=self.seed,
            shuffle=self.shuffle, shuffle_buffer_tokens=self.shuffle_buffer_tokens, drop_last=True,
            skip_nonfinite=self.skip_nonfinite, share=(rank, world_size),
        ))
        if ds.num_batches == 0:
            raise ShardError(f"{self.manifest_url}: the train split has {ds.total_tokens} tokens, fewer than one "
                             f"global batch (data.batch_size_tokens {self.batch_size_tokens}); harvest more tokens or "
                             "lower data.batch_size_tokens")
        if ds.dropped_tokens:
            log.info("train: %d of %d tokens per epoch unused (drop rule: tail of the epoch's shard order)",
                     ds.dropped_tokens, ds.total_tokens)
        return ds

    def eval_dataset(self, split: str, rank: Optional[int] = None, world_size: Optional[int] = None,
                     max_tokens: Optional[int] = None) -> ActivationStream:
        """An unshuffled stream over ``split`` for one rank; over the ranks every token is read exactly once (rank r
        gets N // world_size + (r < N % world_size) tokens, see :mod:`lit_sae.data.plan`)."""
        r, w = self._world()
        w = w if world_size is None else world_size
        self._split_or_raise(split)
        return self._zipped(split, lambda refs, manifest: ActivationStream(
            refs, manifest, batch_size_tokens=max(1, self.batch_size_tokens // w),
            rank=r if rank is None else rank, world_size=w, seed=self.seed,
            shuffle=False, drop_last=False, max_tokens=max_tokens, skip_nonfinite=self.skip_nonfinite,
        ))

    def _zipped(self, split: str, make):
        """``make(refs, manifest)`` for the main hook, or a HookZip of one stream per hook point read."""
        if not self._hooks or len(self._hooks) == 1 and self.target_hook_point is None:
            return make(self.shards(split), self.manifest)
        streams = {h: make(list(refs.get(split, [])), m) for h, (m, refs) in self._hooks.items()}
        return HookZip(streams, self.hook_point, self.target_hook_point)

    def _loader(self, ds: ActivationStream, on_iter=None, state=None) -> DataLoader:
        return StreamLoader(
            ds, on_iter=on_iter, state=state, batch_size=None, num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            # Fresh workers each epoch: they must see the epoch and resume position set in the main process.
            persistent_workers=False,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches of this rank; the epoch and resume position are applied at each pass."""
        return self._loader(self.train_dataset(), on_iter=self._begin_train_epoch, state=self)

    def val_dataloader(self):
        """Validation batches (val split, manifest order, first ``val_tokens`` tokens); [] (no validation, with a
        warning) when the harvest has no val split or val_tokens is 0."""
        if not sum(r.tokens for r in self.shards("val")) or self.val_tokens == 0:
            log.warning("%s: no val tokens (split empty or data.val_tokens=0): validation is skipped",
                        self.manifest_url)
            return []
        return self._loader(self.eval_dataset("val", max_tokens=self.val_tokens))

    def test_dataloader(self) -> DataLoader:
        """Test batches (test split, manifest order, first ``test_tokens`` tokens)."""
        return self._loader(self.eval_dataset("test", max_tokens=self.test_tokens))

    @property
    def target_manifest(self) -> Optional[Manifest]:
        """The manifest of ``target_hook_point``'s folder (its norm filter and hook point; None without a target)."""
        return self._hooks[self.target_hook_point][0] if self.target_hook_point in self._hooks else None

    # ---- samples ----------------------------------------------------------------------------------------------------
    def sample_activations(self, n_tokens: int, hook_point: Optional[str] = None) -> torch.Tensor:
        """A deterministic float32 (n, d_in) sample of training activations (for b_pre / scale initialisation).

        Takes n_tokens / m tokens from each of m = min(8, shards) evenly spaced places of the seed's shard order, so
        the sample spans several parts of the corpus. Returns fewer rows if the split is smaller (or rows were
        NaN/Inf and skip_nonfinite is on). ``hook_point``: another hook point read (default: the main one); its
        sample holds the same tokens as the main one's.
        """
        if hook_point is not None and hook_point != self.hook_point:
            if hook_point not in self._hooks:
                raise ValueError(f"sample_activations: {hook_point!r} is not read (reading {list(self.d_ins)})")
            m, refs = self._hooks[hook_point]
            return sample_activations(refs["train"], m, n_tokens, self.seed, self.skip_nonfinite)
        return sample_activations(self._split_or_raise("train"), self.manifest, n_tokens, self.seed,
                                  self.skip_nonfinite)
