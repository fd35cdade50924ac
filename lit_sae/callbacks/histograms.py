"""TensorBoard histograms of feature density and of encoder/decoder row norms, every N steps."""

from __future__ import annotations

import math
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from lit_sae.train.dead_latents import FIRE_THRESHOLD


class FeatureHistograms(L.Callback):
    """Every ``every_n_steps``: log10 feature density over the window since the last log, and W_enc / W_dec row
    norms, summed over all ranks. Latents that never fired in the window are shown at
    log10(1 / tokens in window) - 1."""

    def __init__(self, every_n_steps: int = 500):
        if every_n_steps <= 0:
            raise ValueError(f"every_n_steps={every_n_steps} must be positive")
        self.every_n_steps = every_n_steps
        self._fires: Optional[Tensor] = None
        self._tokens = 0

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        values, indices = outputs["latent_values"], outputs["latent_indices"]
        if self._fires is None or self._fires.device != indices.device:
            self._fires = torch.zeros(pl_module.sae.n_latents, device=indices.device)
        self._fires.index_add_(0, indices.flatten(), (values > FIRE_THRESHOLD).flatten().float())
        self._tokens += indices.shape[0]
        if (trainer.global_step % self.every_n_steps) != 0:
            return
        # Every rank joins the reduction; only rank 0 writes.
        fires = trainer.strategy.reduce(self._fires.clone(), reduce_op="sum")
        tokens = self._tokens * trainer.world_size
        tb = next((lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if tb is not None and trainer.is_global_zero:
            floor = -math.log10(max(tokens, 1)) - 1
            density = (fires / max(tokens, 1)).clamp_min(10**floor).log10()
            step = trainer.global_step
            tb.add_histogram("features/log10_density", density.cpu(), step)
            tb.add_histogram("features/encoder_row_norm", pl_module.sae.W_enc.norm(dim=1).cpu(), step)
            tb.add_histogram("features/decoder_row_norm", pl_module.sae.W_dec.norm(dim=1).cpu(), step)
        self._fires.zero_()
        self._tokens = 0
