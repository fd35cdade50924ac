"""Data parallelism: the global batch's loss statistics from every rank's part of it.

Under DDP each rank holds ``data.batch_size_tokens / world_size`` tokens (``data.batch_size_tokens`` is the global
batch) and the ranks' parts of a step are the batch one process reads (``lit_sae.data.datamodule``).
The NMSE-type losses divide by the batch's variance, so a rank's own batch would give another loss (and gradient) than
the global batch. :class:`GroupSum` makes ``TopKSAE``'s losses use the global batch's statistics, so that DDP training
equals one process on the global batch (``tests/parallel/test_ddp.py``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from lit_sae.sae.losses import BatchSum


class GroupSum(BatchSum):
    """Sums batch statistics over the ranks of a data-parallel process group with one ``all_reduce`` each.

    group: the data-parallel group (None: the default group, i.e. plain DDP). Tensors are summed in float64 and
    cast back, so the result does not depend on the reduction order more than float64 rounding.
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None):
        self.group = group
        self.world_size = dist.get_world_size(group)

    def __call__(self, t: Tensor) -> Tensor:
        out = t.detach().to(torch.float64).clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out.to(t.dtype)


def use_data_parallel_losses(sae, group: Optional[dist.ProcessGroup] = None) -> None:
    """Make ``sae``'s training losses those of the global batch of the data-parallel ``group`` (no-op for 1 rank)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        sae.batch_sum = GroupSum(group)


def data_parallel_size(trainer) -> int:
    """Data-parallel ranks of a trainer: DDP's world size, a model-parallel mesh's data dimension, else 1."""
    kwargs = getattr(trainer, "distributed_sampler_kwargs", None)
    return int(kwargs["num_replicas"]) if kwargs else 1
