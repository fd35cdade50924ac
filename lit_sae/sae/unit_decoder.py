"""The unit-norm decoder constraint of ``TopKSAE`` (a mixin): decoder rows renormalised after each optimizer step,
the gradient's component along each row removed before it, and a norm fold that keeps each latent's contribution."""

from __future__ import annotations

import torch


class UnitNormDecoder:
    """Mixed into ``TopKSAE`` (needs ``W_dec``, ``W_enc``, ``b_enc`` and ``threshold``)."""

    # ---------------------------------------------------------------- decoder constraints
    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every decoder row to unit norm (after each optimizer step)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def fold_decoder_norms_(self) -> float:
        """Make decoder rows unit norm without changing what each latent adds: row i is divided by its norm n_i,
        encoder row i, b_enc_i and a per-latent threshold multiplied by it (SAELens's ``fold_W_dec_norm``).

        Exact for ReLU / JumpReLU; TopK then ranks n_i * pre_i, so the selection can change where latents differ
        by less than |n_i - 1|. Used on EMA weights (an average of unit rows is slightly shorter), so that what
        lit-sae evaluates and exports keeps the unit-norm promise. Returns max |n_i - 1| before the fold."""
        n = self.W_dec.norm(dim=1).clamp_min(1e-12)
        self.W_dec.div_(n[:, None])
        self.W_enc.mul_(n[:, None])
        self.b_enc.mul_(n)
        if self.threshold.dim() == 1:
            self.threshold.mul_(n)
        return float((n - 1).abs().max())

    @torch.no_grad()
    def remove_parallel_grads_(self) -> None:
        """Remove from each decoder row's gradient its component along the row (before each optimizer step).

        Assumes unit-norm rows, which init and ``normalize_decoder_`` after every step guarantee."""
        if self.W_dec.grad is None:
            return
        W, g = self.W_dec.detach(), self.W_dec.grad
        # Row dot products as one batched product and an in-place update: no (n_latents, d_in) temporary.
        g.addcmul_(torch.einsum("nd,nd->n", g, W.to(g.dtype)).unsqueeze(1), W.to(g.dtype), value=-1)
