"""Dead-latent bookkeeping: tokens since each latent last fired, the AuxK mask, and the dead fraction."""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch
from torch import Tensor

FIRE_THRESHOLD = 1e-3  # a latent "fires" when its kept value exceeds this (OpenAI's training code uses 1e-3)


class DeadLatentTracker(L.Callback):
    """Counts, per latent, the tokens (over all ranks) since it last fired, and gives the module its dead mask.

    A latent is dead when it has not fired within ``dead_after_tokens`` tokens (10M in the paper). Under DDP the
    fired masks of all ranks are summed each step, so a latent is alive if it fired on any rank and every rank holds
    the same counts. The counts are saved in checkpoints. ``SAEModule`` adds this callback itself.
    """

    def __init__(self, dead_after_tokens: int = 10_000_000, fire_threshold: float = FIRE_THRESHOLD):
        if dead_after_tokens <= 0:
            raise ValueError(f"dead_after_tokens={dead_after_tokens} must be positive")
        self.dead_after_tokens = dead_after_tokens
        self.fire_threshold = fire_threshold
        self.tokens_since_fired: Optional[Tensor] = None

    @property
    def state_key(self) -> str:
        return "DeadLatentTracker"

    def _counts(self, pl_module: L.LightningModule) -> Tensor:
        n = pl_module.sae.n_latents
        if self.tokens_since_fired is None or self.tokens_since_fired.numel() != n:
            self.tokens_since_fired = torch.zeros(n, dtype=torch.long)
        if self.tokens_since_fired.device != pl_module.device:
            self.tokens_since_fired = self.tokens_since_fired.to(pl_module.device)
        return self.tokens_since_fired

    def dead_mask(self, pl_module: L.LightningModule) -> Tensor:
        """(n_latents,) bool: True for latents that have not fired within ``dead_after_tokens`` tokens."""
        return self._counts(pl_module) >= self.dead_after_tokens

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int):
        pl_module.dead_mask = self.dead_mask(pl_module)

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        counts = self._counts(pl_module)
        values, indices = outputs["latent_values"], outputs["latent_indices"]
        fired = torch.zeros(counts.numel() + 1, device=counts.device)
        fired[indices[values > self.fire_threshold]] = 1.0
        fired[-1] = indices.shape[0]  # this rank's tokens, summed with the masks in one collective
        fired = trainer.strategy.reduce(fired, reduce_op="sum")
        counts += fired[-1].to(counts.dtype)  # stays on the device: no host sync per step
        counts[fired[:-1] > 0] = 0
        pl_module.log("train/dead_fraction", (counts >= self.dead_after_tokens).float().mean(), prog_bar=True)

    def state_dict(self) -> dict[str, Any]:
        return {"tokens_since_fired": None if self.tokens_since_fired is None else self.tokens_since_fired.cpu()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tokens_since_fired = state_dict.get("tokens_since_fired")
