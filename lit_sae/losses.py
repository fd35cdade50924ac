"""Loss functions of the TopK recipe (Gao et al., 2024, section 2 and appendix A.2)."""

from __future__ import annotations

import torch
from torch import Tensor


def normalized_mse(x_hat: Tensor, x: Tensor) -> Tensor:
    """Mean squared error divided by the variance of ``x`` about its batch mean (fraction of variance unexplained).

    x_hat, x: (B, d). Returns a scalar. This is the quantity OpenAI's training code optimises for both the main and
    the auxiliary loss; for the main loss it is MSE times a per-batch constant, so the gradient direction is MSE's.
    """
    num = (x_hat - x).pow(2).sum()
    den = (x - x.mean(dim=0, keepdim=True)).pow(2).sum()
    return num / den.clamp_min(torch.finfo(den.dtype).tiny)


def auxk_loss(aux_recon: Tensor | None, residual: Tensor) -> Tensor:
    """AuxK loss: how well the dead latents' reconstruction explains the detached residual ``x - x_hat``.

    aux_recon: (B, d) decoded from the top-k_aux dead pre-activations WITHOUT b_pre, or None when nothing is dead.
    residual: (B, d), must already be detached. Returns 0 (not NaN) when ``aux_recon`` is None.
    """
    if aux_recon is None:
        return residual.new_zeros(())
    return normalized_mse(aux_recon, residual)
