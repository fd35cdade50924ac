"""Test helper (imported by CLI subprocesses): ``StopAt`` ends a fit after a given step, as an interruption would,
without changing ``trainer.max_steps`` (whose value the run's schedules depend on)."""

import lightning as L


class StopAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True
