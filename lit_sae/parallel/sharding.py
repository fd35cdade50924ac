"""``SAEModule`` on Lightning's ``ModelParallelStrategy``: its SAE sharded over latents in ``configure_model``.

Under :class:`lit_sae.parallel.strategy.SAEModelParallelStrategy` (a (data_parallel x tensor_parallel) DeviceMesh),
:func:`configure_sharded` replaces the module's ``TopKSAE`` by a :class:`~lit_sae.parallel.tensor.ShardedTopKSAE`
over the mesh's tensor-parallel group: ``W_enc``, ``b_enc``, ``W_dec`` (hence their Adam moments, created later by
``configure_optimizers``), their EMA copies and the dead-latent counters ``tokens_since_fired`` hold only this
rank's ``n_latents / T`` latents. ``b_pre``, the scale and ``tokens_seen`` are replicated. The losses use the global
batch of the data-parallel group (``GroupSum``), as under DDP.

Initialisation is shard-local and equal to one process's: the CLI builds the module's unsharded placeholder on the
meta device (no memory), which keeps the RNG state its decoder draw would have used; each rank then draws the decoder
block by block from that state and keeps its rows (``lit_sae.sae.init.draw_decoder``), so the sharded SAE starts
from the same weights as one process with the same seed, and no rank ever holds the full matrices. With
``model.init_from`` the SAE to start from is read whole on every rank and sliced (an SAE that fits one host).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from lit_sae.parallel.collectives import all_gather_cat
from lit_sae.parallel.layout import CONFIG_KEYS, DP_DIM, SHARDED_PARAMS, TP_DIM, latent_sharded_keys
from lit_sae.parallel.tensor import ShardedTopKSAE, check_shardable
from lit_sae.sae.model import TopKSAE

log = logging.getLogger(__name__)

__all__ = ["configure_sharded", "deferred_sae_init", "export_at_fit_end", "gather_full", "is_sharded",
           "latent_sharded_keys", "owned_indices", "sae_init_context"]


_DEFER = ContextVar("lit_sae_defer_sae_init", default=False)


@contextmanager
def deferred_sae_init() -> Iterator[None]:
    """Within this context ``SAEModule`` builds its unsharded SAE on the meta device (no memory): the CLI enters it
    when the strategy shards the SAE, so that the full matrices are never allocated; ``configure_sharded`` then
    builds each rank's shard."""
    token = _DEFER.set(True)
    try:
        yield
    finally:
        _DEFER.reset(token)


def sae_init_context():
    """The device context ``SAEModule.__init__`` builds its SAE in: meta inside :func:`deferred_sae_init`."""
    return torch.device("meta") if _DEFER.get() else nullcontext()


def is_sharded(module) -> bool:
    """Whether ``module.sae`` is a latent-sharded SAE."""
    return isinstance(getattr(module, "sae", None), ShardedTopKSAE)


def configure_sharded(module) -> None:
    """``SAEModule.configure_model``: shard the SAE over the device mesh's tensor-parallel dimension.

    No-op without a device mesh (single process, DDP) and when the SAE is sharded already (a second ``fit`` / ``test``
    with the same module). Raises ValueError when n_latents is not divisible by the tensor-parallel size, or for an
    SAE setting the sharded SAE does not support (``activation``, ``fast``)."""
    mesh = getattr(module, "_device_mesh", None)
    if mesh is None and module.sae.W_dec.is_meta:
        raise ValueError("the SAE was built for sharding (meta device) but trainer.strategy has no device mesh: use "
                         "lit_sae.parallel.strategy.SAEModelParallelStrategy")
    if mesh is None or is_sharded(module):
        return
    from lit_sae.parallel.strategy import SAEModelParallelStrategy

    if not isinstance(module.trainer.strategy, SAEModelParallelStrategy):
        raise ValueError(f"trainer.strategy={type(module.trainer.strategy).__name__}: shard the SAE with "
                         "lit_sae.parallel.strategy.SAEModelParallelStrategy (Lightning's ModelParallelStrategy with "
                         "the data-parallel gradients and sharded checkpoints a latent-sharded SAE needs)")
    from lit_sae.parallel.data_parallel import TokenGather
    from lit_sae.sae.ema import EMA

    tp_mesh, dp_mesh = mesh[TP_DIM], mesh[DP_DIM]
    hp, full = module.hparams, module.sae
    check_shardable(int(hp.n_latents), tp_mesh.size())
    if not hp.fast:
        raise ValueError("model.fast=false (dense reference path) cannot be sharded over latents: set model.fast true")
    try:
        if full.W_dec.is_meta:  # shard-local init: each rank keeps its rows of the draw one process would make
            state = full.init_rng_state if full.init_rng_state is not None else torch.get_rng_state()
            state = module.trainer.strategy.broadcast(state, src=0)  # every replica draws the same (unseeded runs too)
            generator = torch.Generator()
            generator.set_state(state)
            sae = ShardedTopKSAE(full.d_in, full.n_latents, full.k, tp_group=tp_mesh.get_group(), generator=generator,
                                 encoder_init_norm=hp.encoder_init_norm, k_aux=hp.k_aux, auxk_coef=hp.auxk_coef,
                                 multi_topk=hp.multi_topk, activation=hp.activation, normalize=hp.normalize)
        else:  # model.init_from (or a module built without the CLI): slice the whole SAE
            sae = ShardedTopKSAE.from_full(full.float(), tp_mesh.get_group())
    except ValueError as exn:
        raise ValueError(f"model.{exn}") from None
    if dp_mesh.size() > 1:  # the data-parallel ranks gather their codes: each computes the global batch's step
        sae.batch_sum = TokenGather(dp_mesh.get_group())
    sae.train(module.training)
    module.sae = sae
    if module.ema is not None:
        module.ema = EMA(sae, module.ema.decay)
    module.tokens_since_fired = torch.zeros(sae.n_local, dtype=torch.long)
    log.info("SAE sharded over %d tensor-parallel ranks (latents %d..%d here), %d data-parallel ranks",
             tp_mesh.size(), sae.offset, sae.offset + sae.n_local, dp_mesh.size())


def owned_indices(module, latent_indices: Tensor) -> tuple[Tensor, Tensor]:
    """(local indices, mask of the entries this rank's counters hold) for global ``latent_indices`` (B, k)."""
    offset = getattr(module.sae, "offset", 0)
    local = latent_indices - offset
    return local, (local >= 0) & (local < module.tokens_since_fired.numel())


@torch.no_grad()
def gather_full(sae: ShardedTopKSAE, *, everywhere: bool) -> Optional[TopKSAE]:
    """Collective over the SAE's tensor-parallel group: the unsharded ``TopKSAE`` (its own dtype, buffers included).

    ``everywhere=False``: on the group's first rank only, None on the others (a ``gather``: only that rank ever
    holds the full matrices; the export at the end of a fit). ``everywhere=True``: on every rank of the group (an
    ``all_gather``)."""
    group, T = sae.tp_group, sae.tp_size
    first = dist.get_global_rank(group, 0)
    full: Optional[TopKSAE] = None
    if everywhere or sae.tp_rank == 0:
        cfg = {key: getattr(sae, key) for key in CONFIG_KEYS if key not in ("d_in", "n_latents", "k")}
        full = TopKSAE(sae.d_in, sae.n_latents, sae.k, **cfg).to(sae.W_dec.dtype)
    for name in SHARDED_PARAMS:
        local = getattr(sae, name).detach().contiguous()
        if everywhere:
            getattr(full, name).copy_(all_gather_cat(local, group, dim=0))
            continue
        parts = [torch.empty_like(local) for _ in range(T)] if full is not None else None
        dist.gather(local, parts, dst=first, group=group)
        if full is not None:
            getattr(full, name).copy_(torch.cat(parts, dim=0))
    if full is not None:
        full.b_pre.copy_(sae.b_pre)
        for name, buf in sae.named_buffers():
            getattr(full, name).copy_(buf)
    return full


def export_at_fit_end(module, out) -> None:
    """``SAEModule.on_fit_end`` for a sharded SAE: every rank joins the gather (EMA weights when EMA is on); the
    global rank 0 writes one SAELens-layout export."""
    from contextlib import ExitStack

    from lit_sae.artifacts.export import export_sae

    with ExitStack() as stack:
        if module.ema is not None:
            stack.enter_context(module.ema.swapped_into(module.sae))
        full = gather_full(module.sae, everywhere=False)
    if module.trainer.is_global_zero and full is not None:
        export_sae(full, out, hook_point=module.hparams.hook_point, lm_name=module.hparams.lm_name)
        log.info("exported the SAE to %s", out)
    module.trainer.strategy.barrier()
