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
    gathers: bool = False
    """True when the ranks' rows are gathered (``lit_sae.parallel.data_parallel.TokenGather``): each rank encodes
    its own rows, then every rank computes the rest of the step on the whole global batch, as one process would."""

    def __call__(self, t: Tensor) -> Tensor:
        """Sum of ``t`` over the data-parallel ranks (no autograd: statistics of data only)."""
        return t

    def gather(self, t: Tensor) -> Tensor:
        """Every rank's rows of ``t`` (B_rank, ...), in rank order, which is the global batch's token order (no
        autograd). One process: ``t``."""
        return t

    def own_rows(self, t: Tensor) -> Tensor:
        """This rank's rows of a gathered (B, ...) tensor. One process: ``t``."""
        return t


LOCAL = BatchSum()


def sum64(t: Tensor) -> Tensor:
    """Sum of a (B, d) tensor in one order whatever the thread count: each token's d values (a row sum, which one
    thread computes whatever the thread count), then the tokens' sums in float64 in token order (a sequential scan).
    Returns a float64 scalar; 0 for B = 0."""
    rows = t.sum(dim=1).to(torch.float64)
    return rows.cumsum(0)[-1] if rows.numel() else rows.new_zeros(())


def _column_sums64(x: Tensor) -> Tensor:
    """(d,) float64 sums over the tokens of x (B, d), in token order (a sequential scan)."""
    x64 = x.to(torch.float64)
    return x64.cumsum(0)[-1] if x.shape[0] else x64.new_zeros(x.shape[1])


def normalized_mse(x_hat: Tensor, x: Tensor, batch_sum: BatchSum = LOCAL) -> Tensor:
    """Mean squared error divided by the variance of ``x`` about its batch mean (fraction of variance unexplained).

    x_hat, x: (B, d). Returns a scalar in x's dtype. This is the quantity OpenAI's training code optimises for both the
    main and the auxiliary loss; for the main loss it is MSE times a per-batch constant, so the gradient direction is
    MSE's.

    Both sums run in one order (``sum64``: row sums, then the tokens in float64): the loss and its gradient
    (2 (x_hat - x) / den) have the same bits whatever the thread count, where a whole-tensor ``sum`` splits its terms
    over the threads (measured: the gradient differed between 1 and 2 threads, which then grew over a fit's steps).

    With a data-parallel ``batch_sum`` (W ranks, each holding its part of the global batch), the mean and variance
    of ``x`` are the global batch's, the returned value is the global batch's NMSE on every rank, and its gradient is
    W times this rank's share of it, so that DDP's gradient average is exactly the global batch's gradient.
    """
    num = sum64((x_hat - x).pow(2))
    tiny = torch.finfo(x.dtype).tiny
    if batch_sum is LOCAL:
        mean = _column_sums64(x) / max(1, x.shape[0])
        den = sum64((x - mean.to(x.dtype)).pow(2))
        return (num / den.clamp_min(tiny)).to(x.dtype)
    xd = x.detach()
    stats = batch_sum(torch.cat([_column_sums64(xd), num.new_tensor([xd.shape[0]])]))
    mean = stats[:-1] / stats[-1]
    den = batch_sum(sum64((xd - mean.to(xd.dtype)).pow(2)))
    share = num / den.clamp_min(tiny)
    total = batch_sum(share.detach())
    # value: the global NMSE; gradient: W x this rank's share (DDP divides the summed gradients by W).
    return (batch_sum.world_size * share + (total - batch_sum.world_size * share).detach()).to(x.dtype)


def auxk_loss(aux_recon: Tensor | None, residual: Tensor, batch_sum: BatchSum = LOCAL) -> Tensor:
    """AuxK loss: how well the dead latents' reconstruction explains the detached residual ``x - x_hat``.

    aux_recon: (B, d) decoded from the top-k_aux dead pre-activations WITHOUT b_pre, or None when nothing is dead.
    residual: (B, d), must already be detached. Returns 0 (not NaN) when ``aux_recon`` is None. ``batch_sum``: as in
    :func:`normalized_mse` (the dead set is the same on every rank, so every rank has ``aux_recon`` or none has).
    """
    if aux_recon is None:
        return residual.new_zeros(())
    return normalized_mse(aux_recon, residual, batch_sum)
