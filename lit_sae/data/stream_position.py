"""The stream position of ``ActivationDataModule`` (a mixin): which epoch and batch the next train pass starts at,
counted, saved in checkpoints and restored.

The stream's position is the DataModule's own state, never the Trainer's epoch counter (Lightning 2.6 advances
``current_epoch`` when it restores a checkpoint written on an epoch's last batch). The DataModule counts train batches
in ``on_before_batch_transfer`` (main process, once per step, so a checkpoint taken after batch i counts i + 1) and
saves ``{epoch, batches_consumed}``; a position at the end of an epoch is saved as the start of the next. Each pass over
the train loader continues from a loaded position, or starts the next epoch once the previous pass consumed a batch.
The train loader exposes the same position through ``state_dict``/``load_state_dict``, so Lightning treats it as
resumable.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Optional

from lit_sae.data.stream import ActivationStream
from lit_sae.safe_io import dumps_json

log = logging.getLogger(__name__)

STATE_VERSION = 2


class StreamPosition:
    """Mixed into ``ActivationDataModule`` (needs ``shards``, ``_trainer_or_none`` and the settings of ``_layout``;
    holds ``_epoch``, ``_consumed``, ``_pass_start``, ``_pending`` and ``nonfinite_skipped``)."""

    # ---- stream position --------------------------------------------------------------------------------------------
    def _begin_train_epoch(self, ds: ActivationStream) -> None:
        """Main process, before workers start: choose the pass's epoch and the batches to skip.

        A pending position (fresh start, loaded checkpoint) is continued, moved to the next epoch's start when its
        epoch was fully consumed. Otherwise a new pass is the next epoch, except under a Trainer when the current pass
        has not consumed a batch yet (Lightning may create the iterator twice around a restore).
        """
        if self._pending is not None:
            epoch, skip = self._pending
            self._pending = None
            if skip >= ds.num_batches:
                epoch, skip = epoch + 1, 0
            if skip or epoch:
                log.info("data stream continues at epoch %d, batch %d of %d", epoch, skip, ds.num_batches)
        elif self._trainer_or_none() is not None and self._consumed == self._pass_start:
            epoch, skip = self._epoch, self._consumed
        else:
            epoch, skip = self._epoch + 1, 0
        ds.set_position(epoch, skip)
        self._epoch, self._consumed, self._pass_start = epoch, skip, skip

    def advance(self, n_batches: int = 1) -> None:
        """Count train batches consumed. Lightning does this through ``on_before_batch_transfer``; call it yourself
        when iterating ``train_dataloader()`` without a Trainer and you want ``state_dict`` to track the position."""
        self._consumed += int(n_batches)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count a consumed train batch (main process, once per step) and collect the non-finite skip count."""
        if isinstance(batch, dict):
            skipped = batch.pop("nonfinite_skipped", None)
            if skipped is not None and int(skipped):
                self._note_nonfinite(int(skipped))
            trainer = self._trainer_or_none()
            if trainer is not None and trainer.training:
                self._consumed += 1
        return batch

    def _note_nonfinite(self, n: int) -> None:
        self.nonfinite_skipped += n
        log.warning("skip_nonfinite: skipped %d NaN/Inf rows (%d so far)", n, self.nonfinite_skipped)
        trainer = self._trainer_or_none()
        if trainer is not None and trainer.logger is not None:
            trainer.logger.log_metrics({"data/nonfinite_skipped": float(self.nonfinite_skipped)},
                                       step=trainer.global_step)

    def _layout(self) -> dict:
        """What the batch order depends on besides epoch: a resume with another layout cannot continue exactly. The
        world size is not part of it: the global batches are the same on any number of data-parallel ranks."""
        names = [(r.name, r.tokens) for r in self.shards("train")]
        return {
            "num_workers": max(self.num_workers, 1),
            "batch_size_tokens": self.batch_size_tokens,
            "shuffle_buffer_tokens": self.shuffle_buffer_tokens,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "train_shards": hashlib.sha256(dumps_json(names).encode()).hexdigest()[:16],
        }

    def _epoch_batches(self) -> Optional[int]:
        """Train batches Lightning runs per epoch (``limit_train_batches`` applied), when a Trainer knows it."""
        n = getattr(self._trainer_or_none(), "num_training_batches", None)
        return n if isinstance(n, int) and n > 0 else None

    def state_dict(self) -> dict:
        """Position in the training stream (saved by Lightning in checkpoints): the epoch and its consumed batches.

        A position at the end of an epoch is saved as the start of the next one, so a checkpoint written on an
        epoch's last batch resumes at the next epoch's first batch whatever Lightning's loops make of it.
        """
        epoch, consumed = self._epoch, self._consumed
        if self._pending is not None:
            epoch, consumed = self._pending
        n = self._epoch_batches()
        if n is not None and consumed >= n:
            epoch, consumed = epoch + 1, 0
        return {
            "version": STATE_VERSION,
            "epoch": epoch,
            "batches_consumed": consumed,
            "layout": self._layout(),
            "nonfinite_skipped": self.nonfinite_skipped,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the stream position; the next train pass continues from it (skipping the consumed batches).

        Accepts the states of earlier versions (same keys). Raises ValueError naming the settings that differ when
        the checkpoint's data layout does not match (the batch order depends on them, so the run could not continue
        exactly).
        """
        saved = state_dict.get("layout", {})
        now = self._layout()
        diff = {k: (saved[k], now[k]) for k in now if k in saved and saved[k] != now[k]}
        if diff:
            desc = ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"data: the checkpoint's stream position does not fit this data setup ({desc}); the batch order "
                "depends on these settings, so resuming would repeat or skip data. Set them back to the checkpoint's "
                "values (train_shards: use the same shard folder) or start a fresh run without --ckpt_path"
            )
        self._pending = (int(state_dict["epoch"]), int(state_dict["batches_consumed"]))
        self._epoch, self._consumed = self._pending
        self._pass_start = self._consumed
        self.nonfinite_skipped = int(state_dict.get("nonfinite_skipped", 0))
