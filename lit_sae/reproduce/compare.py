"""lit-sae's recipe against EleutherAI sparsify's, token for token: the shared data, lit-sae's side, the scoring.

Both sides train a TopK SAE (n_latents, k) on the same train-split tokens of a harvest, in the same batches and the
same order (``batch_order``), for the same number of tokens; both are scored by the same code on held-out splits:

- test NMSE: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the whole held-out set (its own mean);
- L0: mean active latents per token; dead: the fraction of latents that never fire on the held-out set;
- delta CE (``DeltaCE``): the LM's next-token loss with the SAE spliced in minus the clean loss on the first held-out
  contexts (``lit_sae.eval.downstream``).

lit-sae's side is ``SAEModule`` under a Lightning ``Trainer`` (the training step of ``lit-sae fit``) with the model
settings of ``configs/quickstart.yaml`` changed by overrides (``parse_overrides``). sparsify's side is in
``lit_sae.reproduce.compare_sparsify``. ``scripts/compare_recipes.py`` is the command over both.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

log = logging.getLogger(__name__)

#: Lever settings applied before the fit by ``apply_extra_levers`` (they are not ``SAEModule`` arguments).
EXTRA_LEVERS = ("b_pre_init", "encoder_scale")
QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"

__all__ = ["prepare_data", "batch_order", "OrderedBatches", "test_metrics", "DeltaCE", "quickstart_model_settings",
           "parse_overrides", "apply_extra_levers", "train_lit_sae", "EXTRA_LEVERS"]


# ------------------------------------------------------------------ data
def prepare_data(shards: str, work: Path, max_train_tokens: Optional[int] = None,
                 max_test_tokens: Optional[int] = None, held_out: tuple[str, ...] = ("test",)
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The harvest's train split and its held-out splits ``held_out`` (concatenated) as (N, d_in) float16 arrays
    ``work/train.npy`` and ``work/test.npy`` (manifest order), written once (temp file, then rename) and
    memory-mapped afterwards."""
    from lit_sae.data.datamodule import ActivationDataModule

    work.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, splits, cap in (("train", ["train"], max_train_tokens), ("test", held_out, max_test_tokens)):
        path = work / f"{name}.npy"
        if not path.exists():
            dm = ActivationDataModule(shards, batch_size_tokens=65536, shuffle_buffer_tokens=65536, num_workers=0)
            dm.setup("fit")
            rows = [b["acts"].to(torch.float16).numpy() for split in splits
                    for b in dm.eval_dataset(split, rank=0, world_size=1, max_tokens=cap)]
            tmp = work / f"{name}.tmp.npy"
            np.save(tmp, np.concatenate(rows))
            os.replace(tmp, path)
        out[name] = np.load(path, mmap_mode="r")
    return out["train"], out["test"]


def batch_order(n_rows: int, batch_size: int, total_tokens: int, seed: int) -> np.ndarray:
    """(steps, batch_size) int64 row indices: ``total_tokens // batch_size`` batches cut from successive random
    permutations of the ``n_rows`` training rows (a new permutation per epoch; a batch may straddle two epochs).

    Raises ValueError when ``total_tokens < batch_size`` or there are no rows."""
    if n_rows <= 0 or total_tokens < batch_size:
        raise ValueError(f"need rows ({n_rows}) and at least one batch of {batch_size} tokens ({total_tokens})")
    steps = total_tokens // batch_size
    rng = np.random.default_rng(seed)
    epochs = math.ceil(steps * batch_size / n_rows)
    flat = np.concatenate([rng.permutation(n_rows) for _ in range(epochs)])[: steps * batch_size]
    return flat.reshape(steps, batch_size).astype(np.int64)


class OrderedBatches(torch.utils.data.Dataset):
    """Batch ``i`` is ``{"acts": train[order[i]]}`` as float32 (rows read in ascending index order: the same set
    of rows, so the same losses, as sparsify's runner reads)."""

    def __init__(self, train: np.ndarray, order: np.ndarray):
        self.train, self.order = train, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"acts": torch.from_numpy(np.ascontiguousarray(self.train[np.sort(self.order[i])])).float()}


# ------------------------------------------------------------------ metrics
@torch.no_grad()
def test_metrics(sae, test: np.ndarray, chunk: int = 8192) -> dict[str, float]:
    """Test NMSE (whole-split variance as denominator), L0 and the fraction of latents never firing on ``test``;
    for a TopK SAE also the fraction never among a token's top 4k positive pre-activations (``dead_fraction_4k``:
    alive there is alive for Multi-TopK's L(4k) term, as sparsify counts it). ``lit_sae.reproduce.measure.
    recon_metrics`` under this table's column names.

    ``sae``: anything with ``encode(x, return_info=True)`` and ``decode(values, indices, info)`` (``TopKSAE``)."""
    from lit_sae.reproduce.measure import recon_metrics

    four_k = getattr(sae, "activation", "topk") == "topk"
    m = recon_metrics(sae, test, chunk, dead_at_4k=four_k)
    out = {"nmse": m["nmse"], "l0": m["l0"], "dead_fraction": m["dead_on_test"]}
    if four_k:
        out["dead_fraction_4k"] = m["dead_on_test_4k"]
    return out


class DeltaCE:
    """Delta CE (nats per token) of an SAE on the first ``n_contexts`` test-split contexts of the harvest at
    ``shards`` (the LM, hook point and position / norm filters of its manifest)."""

    def __init__(self, shards: str, n_contexts: int):
        from lit_sae.data.lm import load_lm
        from lit_sae.eval.report import held_out_contexts, settings_from_manifest

        manifest = json.loads(Path(shards, "manifest.json").read_text())
        self.s = settings_from_manifest(manifest)
        self.lm, tokenizer = load_lm(self.s["model"], gguf_file=self.s["gguf_file"])[:2]
        self.ids = held_out_contexts(self.s, tokenizer, n_contexts)

    def __call__(self, sae) -> float:
        from lit_sae.eval.downstream import downstream_loss

        out = downstream_loss(self.lm, self.s["hook_point"], sae.eval(), self.ids,
                              first_position=self.s["first_position"], norm_threshold=self.s["norm_threshold"],
                              ablations=(), progress=False)
        return float(out["delta_ce"])


# ------------------------------------------------------------------ lit-sae's side
def quickstart_model_settings(config: Path = QUICKSTART) -> dict[str, Any]:
    """The ``model:`` section of the quickstart recipe (lit-sae's default recipe on the embedded default)."""
    from omegaconf import OmegaConf

    return dict(OmegaConf.to_container(OmegaConf.load(config))["model"])


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["lr=8e-4", "betas=[0.9,0.99]"]`` -> ``{"lr": 8e-4, "betas": [0.9, 0.99]}`` (values parsed as YAML).

    Raises ValueError for an item without ``=``."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--lit {item!r}: expected KEY=VALUE, e.g. --lit lr=8e-4")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads "8e-4" (no dot) as a string
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        out[key] = parsed
    return out


@torch.no_grad()
def apply_extra_levers(module, sample: torch.Tensor, b_pre_init: str, encoder_scale: str) -> None:
    """Initialise ``module.sae`` from ``sample`` (N, d_in) as ``on_fit_start`` would, then apply the levers:
    ``b_pre_init`` ``median`` (as ``on_fit_start``) or ``mean``; ``encoder_scale`` ``fixed`` or ``data`` (W_enc
    rescaled so that alpha = <x - b_pre, d> / <d, d> is 1, d the decoded code). ValueError for another value."""
    sae = module.sae
    sae.init_from_data_(sample)
    if b_pre_init == "mean":
        sae.b_pre.copy_(sae.normalize_input(sample)[0].mean(0))
    elif b_pre_init != "median":
        raise ValueError(f"b_pre_init={b_pre_init!r}: expected median or mean")
    if encoder_scale == "data":
        x_n = sae.normalize_input(sample)[0]
        values, indices = sae.encode(sample)
        d = sae._decode_n(values, indices)
        alpha = float(((x_n - sae.b_pre) * d).sum() / d.pow(2).sum())
        sae.W_enc.mul_(alpha)
        log.info("encoder_scale=data: W_enc x %.3f (row norm %.3f)", alpha, float(sae.W_enc.norm(dim=1).mean()))
    elif encoder_scale != "fixed":
        raise ValueError(f"encoder_scale={encoder_scale!r}: expected fixed or data")


def train_lit_sae(train: np.ndarray, order: np.ndarray, settings: dict[str, Any], seed: int):
    """Train ``SAEModule(**settings)`` on ``OrderedBatches(train, order)`` for ``len(order)`` steps; returns the
    module's SAE (the EMA weights when ``ema_decay`` is set), in eval mode on the CPU. ``settings`` may hold the
    ``EXTRA_LEVERS`` too."""
    import lightning as L

    from lit_sae.train.module import SAEModule

    settings = dict(settings)
    extra = {key: settings.pop(key) for key in EXTRA_LEVERS if key in settings}
    L.seed_everything(seed, verbose=False)
    module = SAEModule(d_in=train.shape[1], export_dir="none", **settings)
    if extra:
        n = min(module.hparams.init_tokens, len(order) * order.shape[1])
        rows = np.sort(order.reshape(-1)[:n])
        apply_extra_levers(module, torch.from_numpy(np.asarray(train[rows])).float(),
                           extra.get("b_pre_init", "median"), extra.get("encoder_scale", "fixed"))
    loader = torch.utils.data.DataLoader(OrderedBatches(train, order), batch_size=None, shuffle=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=len(order), max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=loader)
    sae = module.sae
    if module.ema is not None:
        with module.ema.swapped_into(sae):  # the averaged weights, decoder norms folded, as an export holds them
            sae = copy.deepcopy(sae)
    return sae.eval()
