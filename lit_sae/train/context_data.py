"""``ContextDataModule``: batches of token contexts (B, T) of a harvest's train split, for the end-to-end KL
fine-tune (``lit_sae.train.kl_finetune``), which runs the language model itself.

The contexts are rebuilt from the manifest's text source exactly as the harvest cut them
(:func:`lit_sae.data.contexts.split_contexts`), after the source and the tokenizer are checked to be what the harvest
read (:func:`lit_sae.data.identity.verify_text`, through ``lit_sae.eval.report``): the fine-tune trains on the
contexts whose activations the train shards hold, never on the held-out ones the evaluation uses.

Order: epoch ``e`` visits the train contexts in a permutation drawn from ``(seed, e)``; a global batch is
``batch_size_tokens / (context_length - first_position)`` consecutive contexts of it (each context's positions from
``first_position`` on are the tokens whose activation can be replaced), split evenly over the data-parallel ranks;
an epoch's tail shorter than a global batch is dropped. The position (epoch, batches consumed) is saved in
checkpoints (Lightning's stateful loader protocol), so ``--ckpt_path last`` continues with the next batch.

This module sits in ``lit_sae.train`` because it reads the evaluation's manifest settings (``lit_sae.eval``), a
layer above ``lit_sae.data``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

log = logging.getLogger(__name__)

__all__ = ["ContextDataModule", "ContextStream"]

STATE_VERSION = 1


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """(n,) int64: the order in which epoch ``epoch`` visits ``n`` contexts (the same on every rank and machine)."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g)


class ContextStream(IterableDataset):
    """One rank's training batches: ``{"input_ids": (b, T) int64, "stream_pos": (3,) int64}``, where ``stream_pos``
    is (epoch, batches consumed after this one, 1 if it ends the epoch) and is popped by the DataModule.

    Args:
        contexts: (n, T) int64, every train context.
        per_rank: contexts per batch on this rank; ``world_size`` ranks take consecutive slices of a global batch.
    """

    def __init__(self, contexts: torch.Tensor, per_rank: int, seed: int, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.contexts, self.per_rank, self.seed = contexts, int(per_rank), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch, self.start = 0, 0

    def batches_per_epoch(self) -> int:
        return len(self.contexts) // (self.per_rank * self.world_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = epoch_order(len(self.contexts), self.seed, self.epoch)
        n, g = self.batches_per_epoch(), self.per_rank * self.world_size
        for i in range(self.start, n):
            lo = i * g + self.rank * self.per_rank
            yield {"input_ids": self.contexts[order[lo:lo + self.per_rank]],
                   "stream_pos": torch.tensor([self.epoch, i + 1, int(i + 1 == n)], dtype=torch.int64)}


class _Loader(DataLoader):
    """Calls ``on_iter(dataset)`` before each pass (main process) and exposes the DataModule's position as the
    loader's ``state_dict`` / ``load_state_dict`` (Lightning saves it with the fit loop and restores it first)."""

    def __init__(self, dataset: ContextStream, on_iter: Callable[[ContextStream], None], state: Any):
        super().__init__(dataset, batch_size=None, num_workers=0)
        self.on_iter, self.state = on_iter, state

    def state_dict(self) -> dict:
        return self.state.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict:
            self.state.load_state_dict(state_dict)

    def __iter__(self):
        self.on_iter(self.dataset)
        return super().__iter__()


class ContextDataModule(L.LightningDataModule):
    """Token contexts of a harvest's train split, and the harvest's language model, for ``model.kl_coef``.

    Args:
        manifest: the harvest's shard folder or its ``manifest.json`` (local): its model, hook point, text source,
            context cutting, split assignment and filters are used as recorded.
        batch_size_tokens: replaceable token positions per step over all processes (the global batch; each of W
            data-parallel processes holds 1/W): a multiple of ``W * (context_length - first_position)``.
        seed: the order of contexts in each epoch.
        max_contexts: use only the first this many train contexts (None: all).
        val_contexts: validate on the first this many contexts of the harvest's val split (0: no validation):
            ``val/kl``, ``val/delta_ce``, ``val/nmse``, ``val/l0``.
        model_dtype: the LM's dtype (float32 on CPU).
        device: where the LM runs: ``auto`` (the trainer's device) or a device name.

    Attributes the CLI links into the model: ``d_in``, ``hook_point``, ``model_name``; the fine-tune reads ``lm``,
    ``first_position`` and ``norm_threshold`` (the evaluation's splice settings, from the manifest).

    Raises:
        ValueError: one line naming ``data.<key>`` or the manifest: a manifest without a recorded text source, a
            source or tokenizer that changed since the harvest, a batch size that does not divide into contexts,
            fewer train contexts than one global batch.
        FileNotFoundError: the manifest or the model cannot be found.
    """

    def __init__(self, manifest: str, batch_size_tokens: int = 2016, seed: int = 0,
                 max_contexts: Optional[int] = None, val_contexts: int = 32, model_dtype: str = "float32",
                 device: str = "auto"):
        super().__init__()
        self.save_hyperparameters()
        from lit_sae.data.contexts import split_contexts
        from lit_sae.data.lm import load_lm
        from lit_sae.data.manifest import read_manifest_object
        from lit_sae.eval.report import _text, settings_from_manifest

        obj, where = read_manifest_object(manifest)
        recorded = (obj.get("config") or {}).get("source") or (obj.get("source") or {}).get("name")
        if not recorded:
            raise ValueError(f"{where}: records no text source, so its contexts cannot be rebuilt for the KL "
                             "fine-tune; harvest again with lit-sae harvest (which records it)")
        self.settings = s = settings_from_manifest(obj, where)
        self.d_in = int(obj["d_in"])
        self.hook_point, self.model_name = s["hook_point"], s["model"]
        self.first_position, self.norm_threshold = int(s["first_position"]), s["norm_threshold"]
        self.context_length = int(s["context_length"])
        self.tokens_per_context = self.context_length - self.first_position
        if batch_size_tokens <= 0 or batch_size_tokens % self.tokens_per_context:
            b = max(batch_size_tokens // self.tokens_per_context, 1) * self.tokens_per_context
            raise ValueError(f"data.batch_size_tokens={batch_size_tokens} is not a positive multiple of the "
                             f"{self.tokens_per_context} replaceable positions of a context ({self.context_length} "
                             f"tokens from position {self.first_position}): use e.g. {b}")
        self.batch_size_tokens, self.seed, self.device = int(batch_size_tokens), int(seed), device
        try:
            self.lm, self.tokenizer = load_lm(s["model"], gguf_file=s["gguf_file"], dtype=model_dtype)
        except (OSError, ValueError) as exn:
            first = str(exn).strip().splitlines()[0] if str(exn).strip() else type(exn).__name__
            raise FileNotFoundError(f"{where}: the harvest's model {s['model']!r} cannot be loaded ({first}); make "
                                    "it available at that path or name (the KL fine-tune runs it)") from None
        text = _text(s, self.tokenizer)  # ValueError naming the manifest when the source or tokenizer changed
        cut = {"context_length": self.context_length, "n_contexts": s["n_contexts"], "seed": s["seed"],
               "max_contexts_per_document": s["max_contexts_per_document"], "val_fraction": s["val_fraction"],
               "test_fraction": s["test_fraction"]}
        rows = split_contexts(self.tokenizer, text.documents(), "train", max_contexts or 2**62, **cut)
        val = split_contexts(self.tokenizer, text.documents(), "val", val_contexts, **cut) if val_contexts else []
        self.val_ids = torch.tensor([ids for _, ids in val], dtype=torch.long).view(len(val), self.context_length)
        if not rows:
            raise ValueError(f"{where}: no train-split context could be rebuilt from text source {s['source']!r}")
        recorded = ((obj.get("splits") or {}).get("train") or {}).get("contexts")
        if max_contexts is None and recorded is not None and recorded != len(rows):
            raise ValueError(f"{where}: the harvest recorded {recorded} train contexts, {len(rows)} were rebuilt from "
                             f"text source {s['source']!r}: the contexts would not be the harvested ones; harvest "
                             "again")
        self.context_ids = [c for c, _ in rows]
        self.contexts = torch.tensor([ids for _, ids in rows], dtype=torch.long)
        self._epoch, self._batches = 0, 0  # the position: batches of epoch consumed
        self._pending: Optional[tuple[int, int]] = None
        self._consumed_in_pass, self._pass_start = False, (0, 0)
        log.info("KL fine-tune data: %d train contexts of %d tokens from %s", len(self.contexts), self.context_length,
                 where)

    # ---- distribution ----------------------------------------------------------------------------------------------
    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        kwargs = trainer.distributed_sampler_kwargs if trainer is not None else None
        return (int(kwargs["rank"]), int(kwargs["num_replicas"])) if kwargs else (0, 1)

    def per_rank_contexts(self) -> int:
        """Contexts per batch on each rank; ValueError when the global batch does not split evenly over ranks."""
        _, world = self._world()
        n = self.batch_size_tokens // self.tokens_per_context
        if n % world:
            raise ValueError(f"data.batch_size_tokens={self.batch_size_tokens} holds {n} contexts, which do not split "
                             f"evenly over {world} processes: use a multiple of {world * self.tokens_per_context}")
        if len(self.contexts) < n:
            raise ValueError(f"data.batch_size_tokens={self.batch_size_tokens} needs {n} contexts per step, the "
                             f"train split holds {len(self.contexts)}: lower it or harvest more text")
        return n // world

    def setup(self, stage: str) -> None:
        """Move the LM to the trainer's device (``device: auto``) or the named one; a fresh fit starts at epoch 0."""
        trainer = getattr(self, "trainer", None)
        device = trainer.strategy.root_device if self.device == "auto" and trainer is not None else \
            (self.device if self.device != "auto" else "cpu")
        self.lm.to(device)
        if stage == "fit" and (trainer is None or trainer.global_step == 0):
            self._epoch, self._batches, self._pending = 0, 0, None

    # ---- loaders ---------------------------------------------------------------------------------------------------
    def train_dataloader(self):
        """This rank's batches of token contexts."""
        rank, world = self._world()
        ds = ContextStream(self.contexts, self.per_rank_contexts(), self.seed, rank, world)
        return _Loader(ds, self._begin_pass, self)

    def val_dataloader(self):
        """This rank's share of the val contexts (equal shares: the tail that does not split evenly is left out), in
        batches of the training batch's contexts per rank; [] without val contexts."""
        rank, world = self._world()
        share = len(self.val_ids) // world
        if share == 0:
            return []
        mine = self.val_ids[rank * share:(rank + 1) * share]
        return DataLoader([{"input_ids": b} for b in mine.split(self.per_rank_contexts())], batch_size=None)

    def _begin_pass(self, ds: ContextStream) -> None:
        """Before a pass: continue a restored position, repeat a pass that consumed nothing (Lightning may create the
        iterator twice around a restore), else start the next epoch."""
        if self._pending is not None:
            pos, self._pending = self._pending, None
        elif not self._consumed_in_pass:
            pos = self._pass_start
        else:
            pos = (self._epoch + (self._batches > 0), 0)
        if pos[1] >= ds.batches_per_epoch():  # a restored position at an epoch's end
            pos = (pos[0] + 1, 0)
        ds.epoch, ds.start = pos
        self._epoch, self._batches = self._pass_start = pos
        self._consumed_in_pass = False

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Record the position after a consumed training batch (main process, once per step)."""
        if isinstance(batch, dict) and "stream_pos" in batch:
            epoch, after, ends = batch.pop("stream_pos").tolist()
            trainer = getattr(self, "trainer", None)
            if trainer is None or trainer.training:
                self._epoch, self._batches = (epoch + 1, 0) if ends else (epoch, after)
                self._consumed_in_pass = True
        return batch

    # ---- position --------------------------------------------------------------------------------------------------
    def _layout(self) -> dict:
        _, world = self._world()
        return {"world_size": world, "batch_size_tokens": self.batch_size_tokens, "seed": self.seed,
                "n_contexts": len(self.contexts), "context_length": self.context_length}

    def state_dict(self) -> dict:
        """The position (epoch, batches consumed) and the settings the order depends on (saved in checkpoints)."""
        return {"version": STATE_VERSION, "position": [self._epoch, self._batches], "layout": self._layout()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Continue from a saved position; ValueError naming the settings that differ from the checkpoint's."""
        saved, now = state_dict.get("layout", {}), self._layout()
        diff = [k for k in now if k in saved and saved[k] != now[k]]
        if diff:
            raise ValueError(f"data: the checkpoint's context position does not fit these settings ({', '.join(diff)}"
                             " differ); set them back to the checkpoint's values or start a fresh run without "
                             "--ckpt_path")
        self._epoch, self._batches = (int(v) for v in state_dict["position"])
        self._pending = (self._epoch, self._batches)
        self._consumed_in_pass = False

    # ---- samples ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_activations(self, n_tokens: int, hook_point: Optional[str] = None) -> torch.Tensor:
        """(n, d_in) float32: the first ``n_tokens`` replaceable activations of the train contexts in stored order
        (for b_pre when the fine-tune starts from a fresh SAE)."""
        from lit_sae.data.lm import truncated_forward
        from lit_sae.eval.downstream import splice_mask

        out, have = [], 0
        device = next(self.lm.parameters()).device
        for start in range(0, len(self.contexts), 16):
            acts = truncated_forward(self.lm, self.contexts[start:start + 16].to(device), hook_point or self.hook_point)
            out.append(acts[splice_mask(acts, self.first_position, self.norm_threshold)].float().cpu())
            have += len(out[-1])
            if have >= n_tokens:
                break
        return torch.cat(out)[:n_tokens]
