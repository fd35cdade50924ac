"""``SAEOutput``: what an SAE's (and a transcoder's) ``forward`` returns, the reconstruction, the sparse code and
every loss term."""

from __future__ import annotations

from typing import NamedTuple, Optional

from torch import Tensor


class SAEOutput(NamedTuple):
    """What ``TopKSAE.forward`` returns. Losses are computed in the SAE's (normalised) space."""

    x_hat: Tensor
    """(B, d_in) reconstruction, in the input's space (normalisation undone)."""
    latent_values: Tensor
    """(B, k) activations of the selected latents (ReLU applied; zero-padded rows for batchtopk)."""
    latent_indices: Tensor
    """(B, k) int64 indices of the selected latents."""
    loss: Tensor
    """Training objective: nmse + multik_loss / 8 (if Multi-TopK) + auxk_coef * auxk_loss."""
    mse_loss: Tensor
    """Mean squared error per element."""
    nmse: Tensor
    """MSE divided by the batch variance of x about its mean (fraction of variance unexplained)."""
    auxk_loss: Tensor
    """Normalised MSE of the dead latents' reconstruction of the residual; 0 when nothing is dead."""
    multik_loss: Tensor
    """Normalised MSE at k * multi_topk_factor latents; 0 when Multi-TopK is off."""
    sparsity_loss: Optional[Tensor] = None
    """relu: normalised L1; jumprelu: mean L0 (STE); unweighted, the loss holds it times sparsity_coef * warm-up."""
