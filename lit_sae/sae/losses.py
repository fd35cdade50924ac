"""Loss functions of the TopK recipe (Gao et al., 2024, section 2 and appendix A.2).

Data parallelism enters only through a :class:`BatchSum` (the seam): it sums a per-batch statistic over every
data-parallel rank's batch. The default sums over this batch only; ``lit_sae.parallel.data_parallel.GroupSum``
all-reduces.
"""

from __future__ import annotations

import torch
from torch import Tensor


class BatchSum:
    """Sums of per-batch statistics over the global batch. This base class: one process, the global batch is this one.

    ``world_size`` is the number of data-parallel ranks whose gradients are averaged after backward (DDP): a loss
    that must equal the global batch's loss in its gradient is multiplied by it (see :func:`normalized_mse`).
    """

    world_size: int = 1

    def __call__(self, t: Tensor) -> Tensor:
        """Sum of ``t`` over the data-parallel ranks (no autograd: statistics of data only)."""
        return t


LOCAL = BatchSum()


def normalized_mse(x_hat: Tensor, x: Tensor, batch_sum: BatchSum = LOCAL) -> Tensor:
    """Mean squared error divided by the variance of ``x`` about its batch mean (fraction of variance unexplained).

    x_hat, x: (B, d). Returns a scalar. This is the quantity OpenAI's training code optimises for both the main and
    the auxiliary loss; for the main loss it is MSE times a per-batch constant, so the gradient direction is MSE's.

    With a data-parallel ``batch_sum`` (W ranks, each holding its part of the global batch), the mean and variance
    of ``x`` are the global batch's, the returned value is the global batch's NMSE on every rank, and its gradient is
    W times this rank's share of it, so that DDP's gradient average is exactly the global batch's gradient.
    """
    num = (x_hat - x).pow(2).sum()
    if batch_sum is LOCAL:
        den = (x - x.mean(dim=0, keepdim=True)).pow(2).sum()
        return num / den.clamp_min(torch.finfo(den.dtype).tiny)
    xd = x.detach()
    stats = batch_sum(torch.cat([xd.sum(dim=0), xd.new_tensor([xd.shape[0]])]))
    mean = stats[:-1] / stats[-1]
    den = batch_sum((xd - mean).pow(2).sum()).clamp_min(torch.finfo(xd.dtype).tiny)
    share = num / den
    total = batch_sum(share.detach())
    # value: the global NMSE; gradient: W x this rank's share (DDP divides the summed gradients by W).
    return batch_sum.world_size * share + (total - batch_sum.world_size * share).detach()


def auxk_loss(aux_recon: Tensor | None, residual: Tensor, batch_sum: BatchSum = LOCAL) -> Tensor:
    """AuxK loss: how well the dead latents' reconstruction explains the detached residual ``x - x_hat``.

    aux_recon: (B, d) decoded from the top-k_aux dead pre-activations WITHOUT b_pre, or None when nothing is dead.
    residual: (B, d), must already be detached. Returns 0 (not NaN) when ``aux_recon`` is None. ``batch_sum``: as in
    :func:`normalized_mse` (the dead set is the same on every rank, so every rank has ``aux_recon`` or none has).
    """
    if aux_recon is None:
        return residual.new_zeros(())
    return normalized_mse(aux_recon, residual, batch_sum)
