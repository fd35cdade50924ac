"""Data parallelism: the global batch's loss statistics from every rank's part of it.

Under DDP each rank holds ``data.batch_size_tokens / world_size`` tokens (``data.batch_size_tokens`` is the global
batch) and the ranks' parts of a step are the batch one process reads (``lit_sae.data.datamodule``).
The NMSE-type losses divide by the batch's variance, so a rank's own batch would give another loss (and gradient) than
the global batch. :class:`GroupSum` makes ``TopKSAE``'s losses use the global batch's statistics, so that DDP training
equals one process on the global batch (``tests/parallel/test_ddp.py``).
"""

from __future__ import annotations

import atexit
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from lit_sae.parallel.collectives import all_gather_cat
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


class TokenGather(BatchSum):
    """Data parallelism that trains exactly as one process (the bits of its weights, step after step).

    Each rank computes the dense encoder product and the top-k selection of its own rows only (the cost that grows
    with n_latents), then the ranks' selections and centred inputs are gathered (in rank order, which is the
    global batch's token order: ``lit_sae.data.datamodule``), and every rank computes the decode, the losses and
    the sparse backward on the whole global batch, as one process does with the same kernels on the same numbers.
    Every rank then holds the global batch's gradient itself, so DDP's gradient average is turned off
    (:meth:`keep_local_gradients`). Per step and rank this gathers B x (d_in + a few k) numbers instead of
    all-reducing the n_latents x d_in gradients; the sparse part of the step (about k / n_latents of the dense
    product, plus AuxK's k_aux) is done on every rank.

    Used by ``SAEModule`` under plain DDP for a TopK SAE (``lit_sae.train.module``); other objectives keep
    :class:`GroupSum`, whose gradients agree with one process to rounding.
    """

    gathers = True

    def __init__(self, group: Optional[dist.ProcessGroup] = None):
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def __call__(self, t: Tensor) -> Tensor:
        return t  # the statistics are taken over the gathered global batch already

    def gather(self, t: Tensor) -> Tensor:
        return all_gather_cat(t.detach(), self.group, dim=0)

    def own_rows(self, t: Tensor) -> Tensor:
        rows = t.shape[0] // self.world_size
        return t[self.rank * rows:(self.rank + 1) * rows]

    @staticmethod
    def keep_local_gradients(model) -> None:
        """Turn off the gradient all-reduce of ``model`` if it is a ``DistributedDataParallel`` (each rank's gradient
        is the global batch's already; ``SAEModelParallelStrategy`` skips its average itself). Call before the first
        backward."""
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(model, DistributedDataParallel):
            model.register_comm_hook(None, _no_reduction)


def _no_reduction(state, bucket):
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def gathers_codes(strategy, sae, plain_objective: bool) -> bool:
    """Whether a fit's DDP ranks gather their codes and each compute the global batch's step (:class:`TokenGather`):
    plain DDP (``strategy``) of a TopK SAE (``sae``, fast kernels) on the paper's objective (``plain_objective``: no
    ``lr: auto`` candidates, no KL fine-tune). A transcoder and the other activations keep the summed statistics and
    DDP's gradient average (equal to one process to rounding)."""
    from lightning.pytorch.strategies import DDPStrategy

    from lit_sae.sae.model import TopKSAE

    return (isinstance(strategy, DDPStrategy) and type(sae) is TopKSAE and sae.activation == "topk" and sae.fast
            and plain_objective)


def use_data_parallel_losses(sae, group: Optional[dist.ProcessGroup] = None, gather: bool = False) -> None:
    """Make ``sae``'s training losses those of the global batch of the data-parallel ``group`` (no-op for 1 rank):
    ``gather``: every rank computes the global batch's step (:class:`TokenGather`, TopK SAEs under DDP), else the
    losses' statistics are summed over the ranks (:class:`GroupSum`)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        sae.batch_sum = TokenGather(group) if gather else GroupSum(group)


def data_parallel_size(trainer) -> int:
    """Data-parallel ranks of a trainer: DDP's world size, a model-parallel mesh's data dimension, else 1."""
    kwargs = getattr(trainer, "distributed_sampler_kwargs", None)
    return int(kwargs["num_replicas"]) if kwargs else 1


_destroy_registered = False


def destroy_process_group_at_exit() -> None:
    """Destroy ``torch.distributed``'s process group at interpreter exit, while Python is still whole (idempotent;
    no-op without a process group, or for NCCL, which Lightning already destroys at exit).

    A gloo group left to the interpreter's finalisation can abort a process whose fit or test succeeded: exit -6,
    "terminate called without an active exception" (its worker threads still hold tensors: pytorch/pytorch#179291;
    seen once in lit-sae's CI on a 2-process ``trainer.test``)."""
    global _destroy_registered
    if _destroy_registered or not (dist.is_available() and dist.is_initialized()) or dist.get_backend() == "nccl":
        return
    atexit.register(_destroy_process_group)
    _destroy_registered = True


def _destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
