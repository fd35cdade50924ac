"""How well the SAE recovers the known features of synthetic data: ``val/best_cosine``."""

from __future__ import annotations

import lightning as L
import torch


class FeatureRecovery(L.Callback):
    """At each validation: for every true feature direction of the data, the largest cosine with a decoder row,
    averaged over features (1.0: every feature has a latent pointing exactly along it). Logged as
    ``val/best_cosine`` (with the EMA weights when EMA is on, like the other validation metrics).

    Needs a DataModule with ``directions`` (n_features, d_in), e.g. ``SyntheticDataModule``.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if getattr(trainer.datamodule, "directions", None) is None:
            raise ValueError(f"FeatureRecovery needs data with known feature directions (SyntheticDataModule), got "
                             f"{type(trainer.datamodule).__name__}: remove the callback from this recipe")

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        true = trainer.datamodule.directions.to(pl_module.device, torch.float32)
        true = true / true.norm(dim=1, keepdim=True)
        dec = pl_module.sae.W_dec.float()
        dec = dec / dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        best = (true @ dec.T).max(dim=1).values.mean()
        pl_module.log("val/best_cosine", best, prog_bar=True, sync_dist=False)
