"""The collectives a latent-sharded SAE needs besides the candidates' ``all_gather`` (:func:`all_gather_cat`).

A sum whose bits must not depend on how it is split runs as a chain instead of an all-reduce (whose order of
addition is the backend's): :func:`chain_receive` gives a rank the previous rank's partial result to continue,
:func:`chain_pass_on` hands its own to the next and every rank gets the last one's, and :func:`take_chained` gives
the chained result a gradient that reaches each rank's own part. All act on one process group (the tensor-parallel
group of a DeviceMesh).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor


def all_gather_cat(t: Tensor, group, dim: int = 1) -> Tensor:
    """Concatenation along ``dim`` of ``t`` from every rank of ``group``, in rank order (no gradient)."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def chain_receive(shape: tuple[int, ...], dtype: torch.dtype, device, group) -> Optional[Tensor]:
    """The partial result of the previous rank of ``group`` (a tensor of ``shape``), or None on its first rank."""
    t = dist.get_rank(group)
    if t == 0:
        return None
    buf = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(buf, src=dist.get_global_rank(group, t - 1), group=group)
    return buf


def chain_pass_on(partial: Tensor, group) -> Tensor:
    """Send ``partial`` (this rank's continued result) to the next rank of ``group``; returns the last rank's result,
    the whole chain's, on every rank (no gradient: :func:`take_chained`)."""
    T, t = dist.get_world_size(group), dist.get_rank(group)
    out = partial.detach().contiguous().clone()
    if t < T - 1:
        dist.send(out, dst=dist.get_global_rank(group, t + 1), group=group)
    dist.broadcast(out, src=dist.get_global_rank(group, T - 1), group=group)
    return out


class _TakeChained(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: Tensor, total: Tensor) -> Tensor:
        return total.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def take_chained(local: Tensor, total: Tensor) -> Tensor:
    """``total`` (a chain's result, the same on every rank) whose gradient passes unchanged to ``local``, this rank's
    part of it: every rank needs the whole output gradient, and each back-propagates it through its own part."""
    return _TakeChained.apply(local, total)
