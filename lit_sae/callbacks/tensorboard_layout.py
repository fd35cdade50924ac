"""TensorBoard opens on the training curves: a custom-scalars layout (its "Custom Scalars" tab) that groups the
per-step curves a researcher looks at first, training and validation of the same quantity on one chart.

The Scalars tab sorts cards by tag; the one-point numbers of an evaluation are written as one text card instead of
scalars (``lit_sae.callbacks.eval_report.log_eval_numbers``), so they no longer fill it either.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

__all__ = ["TrainingCurvesFirst", "LAYOUT"]

#: category -> chart -> ["Multiline", tags]: what SAEModule and its callbacks log per step (val/* per validation).
LAYOUT = {
    "1. training curves": {
        "loss": ["Multiline", [r"^train/\w*loss$"]],  # loss, auxk_loss, multik_loss, sparsity_loss (a regex)
        "NMSE (train, val)": ["Multiline", ["train/nmse", "val/nmse"]],
        "L0 (train, val)": ["Multiline", ["train/l0", "val/l0"]],
        "dead fraction": ["Multiline", ["train/dead_fraction"]],
        "downstream during fit (val)": ["Multiline", ["val/delta_ce", "val/kl", "val/frac_recovered"]],
    },
    "2. throughput": {
        "tokens seen": ["Multiline", ["train/tokens_seen"]],
        "tokens per second": ["Multiline", ["tokens_per_s"]],
        "learning rate": ["Multiline", [r"^lr-"]],  # LearningRateMonitor's tags (a regex)
    },
}


class TrainingCurvesFirst(Callback):
    """Writes :data:`LAYOUT` into every TensorBoard logger's run at the start of fit (global rank 0)."""

    def on_fit_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        for lg in trainer.loggers:
            if isinstance(lg, TensorBoardLogger):
                lg.experiment.add_custom_scalars(LAYOUT)
                lg.experiment.flush()
