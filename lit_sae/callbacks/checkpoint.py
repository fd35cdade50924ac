"""ModelCheckpoint that also refreshes ``last.ckpt`` when training ends."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint


class Checkpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, plus a final ``last.ckpt`` at the end of fit.

    With ``every_n_train_steps``, Lightning 2.6 skips the end-of-training save once any last.ckpt exists, so a
    ``--ckpt_path last`` test or resume could use weights up to N-1 steps old. Never called after an exception, so
    a diverged run keeps its last good checkpoint.
    """

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and not trainer.fast_dev_run and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
