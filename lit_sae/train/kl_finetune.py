"""``model.kl_coef``: end-to-end fine-tuning of an SAE on the language model's next-token distribution.

Each step runs the frozen LM twice on a batch of token contexts (``lit_sae.train.context_data.ContextDataModule``):

1. clean (no gradient): the next-token log-probabilities ``log p`` (and the activations at the hook point);
2. with the hook point's activation replaced by the SAE's reconstruction at the positions the evaluation replaces
   (``lit_sae.eval.downstream.splice_mask``: positions >= the harvest's first position, norms within its filter),
   gradients flowing from the logits back through the frozen upper layers into the SAE: ``log q``.

The loss is ``kl_coef * KL(p || q) + kl_mse_coef * (the SAE's usual loss on the replaced activations: NMSE +
auxk_coef * AuxK)``, with ``KL(p || q) = sum_v p_v (log p_v - log q_v)`` averaged over the positions the downstream
evaluation scores (logits at positions first_position .. T-2, each predicting the next token: the definition of
``kl_sae`` in ``lit_sae.eval.downstream``), in nats per token. What is optimised is therefore what ``lit-sae test``
reports as ``kl_sae``, and it lowers ``delta_ce`` with it.

Sources: Braun et al. 2024 ("Identifying functionally important features with end-to-end sparse dictionary
learning": the KL term through the downstream layers), Karvonen 2025 ("Revisiting end-to-end SAE training: a short
finetune is all you need": a short KL + MSE phase at the end of an MSE-trained run); Gao et al. 2024 section 4.1 for
delta CE as the downstream measure. sparsify's ``loss_fn: kl`` is the same objective without the MSE term.

The LM is the DataModule's (loaded from the harvest manifest's model); it is frozen (``requires_grad=False``, eval
mode) and never part of the module's ``state_dict`` or checkpoints. Under DDP every rank holds the same number of
scored positions, so DDP's gradient average of each rank's mean KL is the global batch's mean; the SAE's own loss
is the global batch's (``lit_sae.parallel.data_parallel``).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import Tensor

from lit_sae.data.lm import splice
from lit_sae.eval.downstream import kl_per_token, next_token_logprobs, splice_mask
from lit_sae.parallel.data_parallel import data_parallel_size

log = logging.getLogger(__name__)

__all__ = ["KLFinetuneHooks", "check_kl_keys"]


def check_kl_keys(kl_coef: Optional[float], kl_mse_coef: float, lr: Any) -> None:
    """ValueError naming the key: a negative coefficient, or ``lr: auto`` with the KL objective."""
    if kl_coef is None:
        return
    if not kl_coef >= 0 or not kl_mse_coef >= 0 or kl_coef + kl_mse_coef == 0:
        raise ValueError(f"model.kl_coef={kl_coef}, model.kl_mse_coef={kl_mse_coef}: both must be >= 0 and not both "
                         "0 (kl_coef null: the usual MSE objective)")
    if lr == "auto":
        raise ValueError("model.lr=auto with model.kl_coef: the learning-rate sweep trains on activations, not on the "
                         "LM's outputs; give model.lr as a number")


class KLFinetuneHooks:
    """The KL objective's pieces of ``SAEModule`` (a mixin: it uses the module's ``sae``, hyperparameters, dead-latent
    counters and logging)."""

    _kl_context: Optional[tuple] = None  # (lm, hook_point, first_position, norm_threshold): not a submodule

    def _kl_setup(self) -> None:
        """Take the LM and the splice settings from the DataModule (``ContextDataModule``); ValueError otherwise."""
        dm = self.trainer.datamodule
        if not all(hasattr(dm, key) for key in ("lm", "first_position", "norm_threshold")):
            raise ValueError(f"model.kl_coef={self.hparams.kl_coef} needs token contexts and the LM: use data: "
                             "class_path: lit_sae.train.context_data.ContextDataModule (configs/finetune-kl.yaml), or "
                             "set model.kl_coef: null")
        lm = dm.lm.eval()
        lm.requires_grad_(False)
        self._kl_context = (lm, dm.hook_point, int(dm.first_position), dm.norm_threshold)

    def kl_objective(self, input_ids: Tensor, dead_mask: Optional[Tensor] = None) -> dict[str, Any]:
        """Losses of one batch of contexts (B, T) int64: ``loss`` (the objective), ``kl`` (mean per scored position),
        ``delta_ce`` (no gradient), ``out`` (the SAE's output on the replaced activations ``x`` (N, d_in)), ``mask``
        (B, T) bool: the replaced positions."""
        lm, hook, first, threshold = self._kl_context
        ids = input_ids.to(next(lm.parameters()).device)
        if ids.shape[1] < first + 2:
            raise ValueError(f"contexts of {ids.shape[1]} tokens leave no position to score after {first}")
        with torch.no_grad():
            clean = next_token_logprobs(lm(input_ids=ids, use_cache=False).logits, first)
        held: dict[str, Any] = {}

        def replace(act: Tensor) -> Tensor:
            mask = splice_mask(act, first, threshold)
            out = self.sae(act[mask].to(self.sae.W_dec.dtype), dead_mask)  # the SAE runs in its own dtype
            held.update(out=out, mask=mask, x=act[mask])
            return act.index_put((mask,), out.x_hat.to(act.dtype))

        with splice(lm, hook, replace):
            spliced = next_token_logprobs(lm(input_ids=ids, use_cache=False).logits, first)
        kl = kl_per_token(clean, spliced).mean()
        out = held["out"]
        loss = self.hparams.kl_coef * kl + self.hparams.kl_mse_coef * out.loss
        with torch.no_grad():
            target = ids[:, first + 1:].flatten()
            ce = -(spliced.gather(1, target[:, None]) - clean.gather(1, target[:, None])).mean()
        return {"loss": loss, "kl": kl, "delta_ce": ce, "out": out, "mask": held["mask"], "x": held["x"]}

    def _kl_training_step(self, batch: Any) -> dict[str, Tensor]:
        """One step of the KL objective; returns the sparse code for the callbacks as ``training_step`` does."""
        if self._kl_context is None:
            self._kl_setup()
        self.dead_mask = self.dead_latent_mask()
        ids = batch["input_ids"]
        res = self.kl_objective(ids, self.dead_mask)
        out = res["out"]
        if not torch.isfinite(res["loss"]):
            raise FloatingPointError(
                f"non-finite training loss {res['loss'].item()} at step {self.global_step}: stopping before the "
                "weights are updated; the last checkpoint is still good (try a lower model.lr)")
        _, first, _ = self._kl_context[1:]
        tokens = ids.shape[0] * (ids.shape[1] - first) * data_parallel_size(self.trainer)
        self.tokens_seen += tokens
        self._count_fired_(out.latent_values.detach(), out.latent_indices)
        self.log_dict({"train/loss": res["loss"], "train/kl": res["kl"], "train/delta_ce": res["delta_ce"],
                       "train/nmse": out.nmse, "train/auxk_loss": out.auxk_loss,
                       "train/l0": (out.latent_values > 0).sum(dim=1).float().mean(),
                       "train/replaced_fraction": res["mask"][:, first:].float().mean()})
        self.log("train/tokens_seen", self.tokens_seen.float(), reduce_fx="max")
        self.log("train/dead_fraction", self.dead_latent_mask().float().mean())
        return {"loss": res["loss"], "latent_values": out.latent_values.detach(), "latent_indices": out.latent_indices}

    @torch.no_grad()
    def _kl_validation_step(self, batch: Any) -> None:
        """``val/kl`` and ``val/delta_ce`` (means per scored position over the val contexts and ranks), ``val/nmse``
        and ``val/l0`` of the replaced activations."""
        if self._kl_context is None:
            self._kl_setup()
        res = self.kl_objective(batch["input_ids"])
        ids, first = batch["input_ids"], self._kl_context[2]
        n = ids.shape[0] * (ids.shape[1] - 1 - first)
        self.val_nmse.update(res["x"].float(), res["out"].x_hat.float())
        self.val_l0.update(res["out"].latent_values)
        self.log("val/kl", res["kl"], batch_size=n, sync_dist=True, prog_bar=True)
        self.log("val/delta_ce", res["delta_ce"], batch_size=n, sync_dist=True)
        self.log("val/nmse", self.val_nmse)
        self.log("val/l0", self.val_l0)
