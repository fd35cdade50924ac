"""Train every SAE of a reproduction in one sweep: each batch of the harvest is read once and fed to all of them."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from lit_sae.reproduce.grid import Setting

log = logging.getLogger(__name__)

__all__ = ["train_tokens_of", "train_sweep", "randomize_encoder_"]


def train_tokens_of(manifest) -> int:
    """Tokens in the harvest's train split (from its manifest). Raises ValueError when it has none."""
    n = manifest.split_tokens("train")
    if n <= 0:
        raise ValueError("the harvest's manifest lists no train tokens: harvest with a train split first")
    return n


@torch.no_grad()
def randomize_encoder_(sae, seed: int) -> None:
    """The paper's "random init" arm: W_enc drawn independently of W_dec (Gaussian rows), at the row norm the tied
    init would have given, so only the tying differs."""
    g = torch.Generator().manual_seed(seed)
    norm = sae.W_enc.norm(dim=1, keepdim=True)
    w = torch.randn(sae.W_enc.shape, generator=g)
    sae.W_enc.copy_((w / w.norm(dim=1, keepdim=True) * norm).to(sae.W_enc))


def train_sweep(harvest: str, out: Path, setting: Setting, specs: list[dict[str, Any]], random_init: set[str],
                steps: int, seed: int = 0, accelerator: str = "cpu", progress: bool = True) -> dict[str, Any]:
    """Fit the sweep of ``specs`` on the harvest for ``steps`` batches of ``setting.batch_size_tokens`` tokens.

    Returns {"module": the SAESweepModule (SAEs in eval mode), "seconds": wall time of the fit, "steps", "tokens"}.
    Nothing is exported or checkpointed (the numbers are the product); Lightning's files go to ``out/train``."""
    import lightning as L

    from lit_sae.data.datamodule import ActivationDataModule
    from lit_sae.train.sweep import SAESweepModule

    L.seed_everything(seed, verbose=False)
    dm = ActivationDataModule(harvest, batch_size_tokens=setting.batch_size_tokens,
                              shuffle_buffer_tokens=max(4 * setting.batch_size_tokens, 16384), num_workers=0,
                              seed=seed)
    module = SAESweepModule(d_in=dm.d_in, saes=specs, dead_after_tokens=setting.dead_after_tokens,
                            init_tokens=setting.init_tokens, hook_point=dm.hook_point, lm_name=dm.lm_name,
                            export_dir="none")
    for i, name in enumerate(sorted(random_init)):
        randomize_encoder_(module.members[name].sae, seed + 1 + i)
    trainer = L.Trainer(accelerator=accelerator, devices=1, max_steps=steps, max_epochs=-1,
                        default_root_dir=str(out / "train"), logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=progress, limit_val_batches=0,
                        num_sanity_val_steps=0)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - start
    if int(module.global_step) < steps:
        raise ValueError(f"{harvest}: training stopped after {module.global_step} of {steps} steps: the harvest's "
                         "train split yields fewer batches than planned")
    module.eval()
    log.info("trained %d SAEs for %d steps in %.0f s", len(specs), steps, seconds)
    return {"module": module, "seconds": seconds, "steps": steps, "tokens": steps * setting.batch_size_tokens,
            "datamodule": dm}


def steps_for(setting: Setting, train_tokens: int) -> int:
    """Training steps: ``setting.epochs`` passes over ``train_tokens`` (at most ``setting.max_train_tokens``) in
    batches of batch_size_tokens (>= 1)."""
    tokens = setting.epochs * train_tokens
    if setting.max_train_tokens is not None:
        tokens = min(tokens, setting.max_train_tokens)
    return max(1, math.ceil(tokens / setting.batch_size_tokens))
