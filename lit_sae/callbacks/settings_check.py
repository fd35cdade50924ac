"""Settings that cannot take effect in the run as configured are said once, at the start of training.

A quickstart run of 48 steps x 4,096 tokens (196,608 tokens) under ``dead_after_tokens: 200000`` never counts a
latent as dead, so AuxK never switches on and ``train/dead_fraction`` stays 0, while the test report (which counts
firing on held-out tokens) says 15% dead. Nothing was wrong with either number; the setting simply could not act in
so short a run. This callback compares each window-like setting with the run's length once the data is set up
(``on_train_start``: Lightning then knows the steps per epoch) and logs one warning line per setting that cannot act,
naming the key, the numbers and what to change. It changes nothing.

Checked: ``model.dead_after_tokens`` against the run's tokens (``steps x global batch``), ``model.warmup_steps`` and
``model.sparsity_warmup_steps`` against its steps, the first validation (``trainer.val_check_interval`` /
``check_val_every_n_epoch``) and the first logged training point (``trainer.log_every_n_steps``) against its steps.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional

from lightning.pytorch.callbacks import Callback

log = logging.getLogger("lit_sae.callbacks.settings_check")

__all__ = ["IneffectiveSettings", "ineffective_settings"]


def _run_steps(trainer) -> Optional[int]:
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return int(trainer.max_steps)
    steps = trainer.estimated_stepping_batches
    return int(steps) if math.isfinite(steps) else None


def _tokens_per_step(trainer) -> Optional[int]:
    """The global batch in tokens: ``data.batch_size_tokens`` is the global batch (each data-parallel rank holds
    its 1/W of it)."""
    batch = getattr(trainer.datamodule, "batch_size_tokens", None) if trainer.datamodule is not None else None
    return int(batch) if batch else None


def _first_validation(trainer) -> Optional[int]:
    """The step of the first validation during fit, or None when validation is off or cannot be told."""
    if trainer.limit_val_batches == 0 or not hasattr(trainer.lightning_module, "validation_step"):
        return None
    per_epoch = trainer.num_training_batches
    val_batch = getattr(trainer, "val_check_batch", None)
    if not isinstance(val_batch, (int, float)) or not math.isfinite(val_batch) or not math.isfinite(per_epoch):
        return None
    every = trainer.check_val_every_n_epoch
    if isinstance(trainer.val_check_interval, float) and every:  # a fraction of an epoch, every n-th epoch
        return int(per_epoch * (every - 1) + val_batch)
    return int(val_batch)


def ineffective_settings(trainer, module: Any) -> list[str]:
    """One line per setting of ``module`` / ``trainer`` that cannot take effect in this fit (see module doc)."""
    steps = _run_steps(trainer)
    if not steps:
        return []
    hp = getattr(module, "hparams", {}) or {}
    out = []
    tokens = _tokens_per_step(trainer)
    window = hp.get("dead_after_tokens")
    if window and tokens and window >= steps * tokens:
        aux = " and AuxK never switches on" if (hp.get("k_aux") != 0 and hp.get("auxk_coef", 0) > 0
                                                 and hp.get("activation", "topk") not in ("relu", "jumprelu")) else ""
        out.append(f"model.dead_after_tokens={window:,} is not shorter than this run ({steps:,} steps x {tokens:,} "
                   f"tokens = {steps * tokens:,} tokens): no latent can count as dead during training{aux}, so "
                   "train/dead_fraction stays 0; set it to a fraction of the run (e.g. "
                   f"{max(1, steps * tokens // 10):,}) or train longer")
    for key in ("warmup_steps", "sparsity_warmup_steps"):
        value = hp.get(key)
        if value and value >= steps:
            what = "the learning rate never reaches model.lr" if key == "warmup_steps" else \
                "the sparsity penalty never reaches model.sparsity_coef"
            out.append(f"model.{key}={value:,} is not shorter than this run ({steps:,} steps): {what}; lower it or "
                       "train longer")
    first_val = _first_validation(trainer)
    if first_val is not None and first_val > steps:
        out.append(f"validation never runs during this fit: the first check would come at step {first_val:,}, after "
                   f"the run's {steps:,} steps; lower trainer.val_check_interval (steps) or "
                   "trainer.check_val_every_n_epoch")
    every = trainer.log_every_n_steps
    if every and every > steps and trainer.loggers:
        out.append(f"trainer.log_every_n_steps={every:,} is longer than this run ({steps:,} steps): no training "
                   "curve gets a point; lower it")
    return out


class IneffectiveSettings(Callback):
    """Logs once, before the first step of a fit, every setting that cannot take effect (:func:`ineffective_settings`).
    Warnings only; on the global rank 0."""

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            for line in ineffective_settings(trainer, pl_module):
                log.warning(line)
