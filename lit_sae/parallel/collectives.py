"""The two autograd-aware collectives a latent-sharded SAE needs (the pair Megatron-LM calls f and g).

- :func:`copy_to_shards`: forward identity (every tensor-parallel rank holds the same input), backward all-reduce
  (each shard's encoder contributes a partial gradient of that input).
- :func:`sum_over_shards`: forward all-reduce (each shard decoded its own latents: partial sums), backward identity
  (every shard needs the whole output gradient).

Both act on one process group (the tensor-parallel group of a DeviceMesh). Plain ``all_gather`` of selection
candidates carries no gradient and is called directly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class _CopyToShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class _SumOverShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def copy_to_shards(x: Tensor, group) -> Tensor:
    """Identity forward; the gradient is summed over ``group`` (x: any shape, replicated on the group)."""
    return _CopyToShards.apply(x, group)


def sum_over_shards(x: Tensor, group) -> Tensor:
    """Sum of ``x`` over ``group`` (x: same shape on every rank); the gradient passes unchanged to every rank."""
    return _SumOverShards.apply(x, group)


def all_gather_cat(t: Tensor, group, dim: int = 1) -> Tensor:
    """Concatenation along ``dim`` of ``t`` from every rank of ``group``, in rank order (no gradient)."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)
