"""ModelCheckpoint that lives in the run's folder and refreshes ``last.ckpt`` when training ends."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from lightning.pytorch.callbacks import ModelCheckpoint

from lit_sae import compat
from lit_sae.train.runs import checkpoint_dir


class Checkpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint with the run's defaults: ``<default_root_dir>/checkpoints``, ``save_last=True``,
    and a final ``last.ckpt`` at the end of fit.

    Args:
        dirpath: checkpoint folder; None (default) means ``<trainer.default_root_dir>/checkpoints``, whatever the
            logger, so that changing the run's root moves its checkpoints and ``--ckpt_path last`` finds them.
        save_last: write ``last.ckpt`` (resumable state for ``--ckpt_path last``).
        **kwargs: any other ``ModelCheckpoint`` argument (``every_n_train_steps``, ``save_top_k``, ...).

    With ``every_n_train_steps``, Lightning 2.6 skips the end-of-training save once any last.ckpt exists, so a
    ``--ckpt_path last`` test or resume could use weights up to N-1 steps old: this class saves it. Never called
    after an exception, so a diverged run keeps its last good checkpoint.
    """

    def __init__(self, dirpath: Optional[str] = None, save_last: Optional[Union[bool, Literal["link"]]] = True,
                 **kwargs: Any):
        super().__init__(dirpath=dirpath, save_last=save_last, **kwargs)
        self._in_run_root = dirpath is None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self._in_run_root:
            self.dirpath = str(checkpoint_dir(trainer.default_root_dir))
        super().setup(trainer, pl_module, stage)

    def save_last_now(self, trainer) -> str:
        """Write ``last.ckpt`` with the current training state (the same content a periodic save would have)."""
        compat.save_last_checkpoint(self, trainer)
        return self.last_model_path

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and not trainer.fast_dev_run and compat.last_global_step_saved(self) != trainer.global_step:
            self.save_last_now(trainer)
