"""Dead latents: a latent is dead when it has not fired (kept value > ``FIRE_THRESHOLD``) within
``dead_after_tokens`` tokens (10M in Gao et al. 2024, section 2.4; the AuxK loss trains the dead ones).

The counters are training state: a ``tokens_since_fired`` (n_latents,) int64 buffer of the module (``SAEModule``,
each SAE of ``SAESweepModule``), advanced by :func:`count_fired_` every step and saved with the weights.
:class:`DeadLatentTracker` is a read-only view of them that ``SAEModule.configure_callbacks`` adds to every Trainer
(its public path is ``lit_sae.callbacks.dead_latents``).
"""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch
from torch import Tensor

__all__ = ["FIRE_THRESHOLD", "DeadLatentTracker", "count_fired_"]

FIRE_THRESHOLD = 1e-3  # a latent "fires" when its kept value exceeds this (OpenAI's training code uses 1e-3)


@torch.no_grad()
def count_fired_(counts: Tensor, values: Tensor, indices: Tensor, *, owned: Optional[Tensor] = None,
                 strategy: Any = None) -> None:
    """Advance every latent's counter by this step's tokens (summed over ranks); reset the ones that fired.

    counts: (n,) int64, updated in place (stays on its device: no host sync). values, indices: (B, k) the step's
    kept code (indices into ``counts``). owned: (B, k) bool, the entries whose latent ``counts`` holds (a
    latent-sharded SAE counts its own latents only), or None for all. strategy: the Lightning strategy whose
    ``reduce(..., "sum")`` adds the fired masks and token counts of every rank in one collective (None: this
    process only)."""
    fired = torch.zeros(counts.numel() + 1, device=counts.device)
    hit = values > FIRE_THRESHOLD
    fired[indices[hit if owned is None else owned & hit]] = 1.0
    fired[-1] = indices.shape[0]  # this rank's tokens, summed with the masks in one collective
    if strategy is not None:
        fired = strategy.reduce(fired, reduce_op="sum")
    counts += fired[-1].to(counts.dtype)
    counts[fired[:-1] > 0] = 0


class DeadLatentTracker(L.Callback):
    """Exposes ``tokens_since_fired``: per latent, the tokens (over all ranks) since it last fired.

    The counters are training state (the AuxK loss trains the latents that have not fired within
    ``dead_after_tokens`` tokens, 10M in the paper), so they live in the module as its ``tokens_since_fired``
    buffer, are updated in ``SAEModule.training_step`` and saved with the weights. ``SAEModule.configure_callbacks``
    adds this callback so that code written against it (``trainer.callbacks`` -> ``.tokens_since_fired``,
    ``.dead_mask(module)``) keeps working. Checkpoints written when this callback held the counters still load: the
    module takes them over (``SAEModule.on_load_checkpoint``).
    """

    def __init__(self, dead_after_tokens: int = 10_000_000, fire_threshold: float = FIRE_THRESHOLD):
        if dead_after_tokens <= 0:
            raise ValueError(f"dead_after_tokens={dead_after_tokens} must be positive")
        self.dead_after_tokens = dead_after_tokens
        self.fire_threshold = fire_threshold
        self._module: Optional[L.LightningModule] = None

    @property
    def state_key(self) -> str:
        return "DeadLatentTracker"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not hasattr(pl_module, "tokens_since_fired"):
            raise ValueError(f"DeadLatentTracker needs a module with a tokens_since_fired buffer (SAEModule), got "
                             f"{type(pl_module).__name__}")
        self._module = pl_module

    @property
    def tokens_since_fired(self) -> Optional[Tensor]:
        """(n_latents,) int64 counters: the module's buffer itself (None before the trainer's setup)."""
        return None if self._module is None else self._module.tokens_since_fired

    def dead_mask(self, pl_module: Optional[L.LightningModule] = None) -> Tensor:
        """(n_latents,) bool: True for latents that have not fired within ``dead_after_tokens`` tokens."""
        module = pl_module if pl_module is not None else self._module
        return module.tokens_since_fired >= self.dead_after_tokens

    def state_dict(self) -> dict[str, Any]:
        return {}  # the counters are saved with the module's weights

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass  # an old checkpoint's counters were already taken over by SAEModule.on_load_checkpoint
