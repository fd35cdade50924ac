"""``SAEModule``'s validation and test: the evaluated weights (the EMA's, or mid-``lr: auto`` sweep the leading
candidate's) swapped in for each epoch, and the NMSE / L0 metrics of every step (a mixin: it uses the module's
``sae``, ``ema``, ``lr_search``, ``_run``, metrics and Lightning's ``log``)."""

from __future__ import annotations

from typing import Any

import torch


class EvalSteps:
    """Mixed into ``SAEModule`` (needs ``sae``, ``ema``, ``lr_search``, ``_eval_stack``, ``_run``, ``val_nmse``,
    ``val_l0``, ``test_nmse``, ``test_l0``)."""

    # ------------------------------------------------------------------ evaluation
    def _enter_ema(self) -> None:
        if self.ema is not None:
            self._eval_stack.enter_context(self.ema.swapped_into(self.sae))
        search = self.lr_search
        if search is not None and not search.done and int(search.scored_steps):  # mid-sweep: the current leader
            saved = {k: v.clone() for k, v in self.sae.state_dict().items()}
            self.sae.load_state_dict(search.candidates[int(torch.argmin(search.scores()))].state_dict())
            self._eval_stack.callback(self.sae.load_state_dict, saved)

    def _exit_ema(self) -> None:
        self._eval_stack.close()

    def on_validation_epoch_start(self) -> None:
        self._enter_ema()

    def on_validation_epoch_end(self) -> None:
        self._exit_ema()

    def on_test_epoch_start(self) -> None:
        self._enter_ema()

    def on_test_epoch_end(self) -> None:
        self._exit_ema()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Normalised MSE and L0 over the whole validation split (torchmetrics: exact across batches and ranks); token
        contexts (``model.kl_coef``): the KL fine-tune's validation (``lit_sae.train.kl_finetune``)."""
        if isinstance(batch, dict) and "input_ids" in batch:
            return self._kl_validation_step(batch)
        _, y, out = self._run(batch, "validation")
        self.val_nmse.update(y, out.x_hat)
        self.val_l0.update(out.latent_values)
        self.log("val/nmse", self.val_nmse, prog_bar=True)
        self.log("val/l0", self.val_l0)

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        """Like validation; returns what the evaluation callbacks need."""
        x, y, out = self._run(batch, "test")
        self.test_nmse.update(y, out.x_hat)
        self.test_l0.update(out.latent_values)
        self.log("test/nmse", self.test_nmse)
        self.log("test/l0", self.test_l0)
        return {
            "x": y,  # what x_hat reconstructs: the input for an SAE, the target for a transcoder
            "x_in": x,
            "x_hat": out.x_hat,
            "latent_values": out.latent_values,
            "latent_indices": out.latent_indices,
            "batch": batch,
        }
