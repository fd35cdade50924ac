"""One TopK SAE sharded over its latents across a tensor-parallel process group (Gao et al. 2024, section 4.1 / OpenAI's
sharded training): exact TopK, Multi-TopK and AuxK with no dense (B, n_latents) tensor and no full weight on any rank.

Tensor-parallel rank t of T holds latents ``[t * n/T, (t+1) * n/T)``: its rows of ``W_enc``, ``b_enc``, ``W_dec``
(and so their Adam states) and its dead-latent counters; ``b_pre`` and the normalisation are replicated. Every rank of
the group sees the same batch (x: (B, d_in)).

Forward (communication per step, B tokens, K = max(k, k_multi)):
    1. local pre-activations of the shard, in row chunks (``kernels._select_chunks``); the shard's exact top-K
       (local candidates) and, for AuxK, its top-k_aux among its dead latents;
    2. ``all_gather`` of the candidates (values, global indices): (B, T*K); the global top-K of the candidates in the
       exact order of one device (value descending, ties by lower latent index): an element of the global top-K is
       in its shard's top-K, so nothing is lost;
    3. decode, as a chain: shard 0 sums its selected latents' rows of W_dec, each next shard continues those sums with
       its own (every token's rows in ascending latent order, as one process adds them), the last shard's (B, d_in)
       sums are broadcast: T - 1 sends and one broadcast of (B, d_in), and the reconstruction has the bits of one
       process's (``kernels.sparse_decode_sets``).
Backward: the output gradient is already on every rank (replicated loss); each shard back-propagates through its own
selected (row, latent) pairs only (sparse, as ``kernels``, each weight row summing its pairs in the one-process
order), and b_pre's gradient is chained over the shards as the decode is (a (d_in,) vector). So one process and any
number of shards compute the same gradients and, with the same global batch, train the same SAE
(``tests/parallel/test_device_count.py``).

The same module also runs data parallel. Under ``SAEModelParallelStrategy`` (``lit_sae.parallel.sharding``) each
data-parallel rank encodes its own rows, then the ranks' selections and rows are gathered
(``lit_sae.parallel.data_parallel.TokenGather``) and every rank computes the rest of the step on the global batch:
its shard's gradients are the global batch's, with the bits of one process's. With a summing ``batch_sum``
(``GroupSum``) instead, the losses' statistics are summed over the data-parallel group and the gradients averaged
by :func:`average_gradients_` (equal to one process to rounding).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lit_sae.parallel.collectives import all_gather_cat, chain_pass_on, chain_receive, take_chained
from lit_sae.sae import kernels
from lit_sae.sae.config import SHARDED_KEYS, defaults
from lit_sae.sae.init import draw_decoder
from lit_sae.sae.losses import LOCAL
from lit_sae.sae.model import ENCODER_INIT_NORM, TopKSAE, _check_config
from lit_sae.sae.selection import topk_exact

# The settings a sharded SAE takes besides its shape (d_in, n_latents, k): lit_sae.sae.config.SHARDED_KEYS.
_SETTINGS = tuple(key for key in SHARDED_KEYS if key not in ("d_in", "n_latents", "k"))


def check_shardable(n_latents: int, tensor_parallel_size: int) -> None:
    """Raise ValueError unless the latents split evenly over the tensor-parallel ranks."""
    if tensor_parallel_size <= 0 or n_latents % tensor_parallel_size:
        raise ValueError(f"model.n_latents={n_latents} is not divisible by tensor_parallel_size="
                         f"{tensor_parallel_size}: choose n_latents as a multiple of it (or another tensor size)")


def check_mesh(world_size: int, data_parallel_size: int, tensor_parallel_size: int) -> None:
    """Raise ValueError unless data_parallel_size x tensor_parallel_size equals the number of processes."""
    if data_parallel_size <= 0 or tensor_parallel_size <= 0 or data_parallel_size * tensor_parallel_size != world_size:
        raise ValueError(f"data_parallel_size={data_parallel_size} x tensor_parallel_size={tensor_parallel_size} must "
                         f"equal the number of processes ({world_size} = trainer.devices x trainer.num_nodes): "
                         "change one of them")


def _merge_candidates(vals: Tensor, gidx: Tensor, K: int, group) -> tuple[Tensor, Tensor]:
    """Global exact top-K from every shard's candidates: (values (B, K), global indices (B, K) int64).

    Candidate columns are put in ascending latent index, so ``selection.topk_exact``'s tie rule (lower column first)
    is the single-device rule (lower latent index first)."""
    cand_v, cand_i = all_gather_cat(vals, group), all_gather_cat(gidx, group)
    order = cand_i.argsort(dim=1)
    cand_v, cand_i = cand_v.gather(1, order), cand_i.gather(1, order)
    v, pos = topk_exact(cand_v, K)
    return v, cand_i.gather(1, pos)


class _ShardedTopKEncode(torch.autograd.Function):
    """Exact global top-K (and AuxK) of a latent-sharded encoder; backward through this shard's selections only.

    x_n - b_pre is formed here, as ``kernels.topk_encode`` does, so that b_pre's gradient is the pre-activations'
    gradient times W_enc summed over the latents in ascending order (``kernels.center_grad``), each shard continuing
    the previous shard's sum: the bits of one process's, where a per-token input gradient summed over the shards
    would not be."""

    @staticmethod
    def forward(ctx, x_n, W_enc, b_enc, b_pre, K, k_aux, dead_idx, offset, n_total, group, k, gather):
        x_c = x_n - b_pre
        ctx.k, ctx.gather = k, gather
        n_local = W_enc.shape[0]
        width_aux = min(k_aux, n_local) if dead_idx is not None else 0
        vals, idx, aux_v, aux_i = kernels._select_chunks(x_c, W_enc, b_enc, K, dead_idx, width_aux)
        gv, gi = _merge_candidates(vals, idx + offset, K, group)
        gv.relu_()
        ctx.offset, ctx.n_local, ctx.group = offset, n_local, group
        av = ai = None
        if dead_idx is not None:
            pad = width_aux - aux_v.shape[1]  # this shard may hold fewer dead latents than the others
            if pad:
                aux_v = torch.cat([aux_v, aux_v.new_full((aux_v.shape[0], pad), float("-inf"))], dim=1)
                aux_i = torch.cat([aux_i + offset, aux_i.new_full((aux_i.shape[0], pad), n_total)], dim=1)
            else:
                aux_i = aux_i + offset
            av, ai = _merge_candidates(aux_v, aux_i, k_aux, group)
            av.relu_()
        else:
            av = gv.new_empty(gv.shape[0], 0)
            ai = gi.new_empty(gi.shape[0], 0)
        if gather is not None:  # every data-parallel rank's selection and rows: the global batch's step from here on
            gv, gi, av, ai, x_c = (gather.gather(t) for t in (gv, gi, av, ai, x_c))
        ctx.save_for_backward(x_c, W_enc, gv, gi, av, ai)
        ctx.b_enc_meta = (b_enc.dtype, b_enc.shape)
        ctx.b_pre_dtype = b_pre.dtype
        ctx.mark_non_differentiable(gi, ai)
        return gv, gi, av, ai

    @staticmethod
    def backward(ctx, g_vals, _g_idx, g_aux, _g_aux_idx):
        x_c, W_enc, vals, idx, aux_vals, aux_idx = ctx.saved_tensors
        need_x, need_W, need_b, need_pre = ctx.needs_input_grad[:4]
        pt = W_enc.dtype
        pairs = []
        for g, v, i, sets in ((g_vals, vals, idx, True), (g_aux, aux_vals, aux_idx, False)):
            if g is None or i.shape[1] == 0:
                continue
            owned = (i >= ctx.offset) & (i < ctx.offset + ctx.n_local)
            g = (g * ((v > 0) & owned)).to(pt)  # ReLU's gradient, and only this shard's pairs
            i = torch.where(owned, i - ctx.offset, ctx.n_local)  # n_local: not this shard's (spilled)
            pairs += kernels.code_sets(g, i, ctx.k) if sets else [(g, i)]
        if not pairs:
            return (None,) * 12
        g, ii = kernels.in_decode_layout(pairs)
        b_meta = (pt, ctx.b_enc_meta[1]) if need_pre else ctx.b_enc_meta
        dx, dW, db = kernels._encode_grads(x_c, W_enc, b_meta, g, ii, need_x, need_W, need_b or need_pre, spill=True)
        if dx is not None:  # this shard's part of the input's gradient: the sum over the shards
            dist.all_reduce(dx, group=ctx.group)
            if ctx.gather is not None:
                dx = ctx.gather.own_rows(dx)
        d_pre = None
        if need_pre:  # continued shard after shard, as one process sums the latents (kernels.center_grad)
            prev = chain_receive((W_enc.shape[1],), kernels.center_grad_dtype(W_enc), W_enc.device, ctx.group)
            total = chain_pass_on(kernels.center_grad(db, W_enc, prev), ctx.group)
            d_pre = total.neg().to(ctx.b_pre_dtype)
            db = db.to(ctx.b_enc_meta[0]) if need_b else None
        return (dx, dW, db, d_pre, None, None, None, None, None, None, None, None)


class ShardedTopKSAE(TopKSAE):
    """A :class:`~lit_sae.sae.model.TopKSAE` whose latents are split over ``tp_group`` (see the module docstring).

    Same ``forward``/``encode``/``decode`` contract and outputs as the unsharded SAE (global latent indices, the
    global batch's losses), but ``W_enc``, ``b_enc``, ``W_dec`` are this rank's rows (n_latents / T, ...) and
    ``dead_mask`` is this rank's slice (n_latents / T,) bool. ``activation='topk'`` only; ``fast`` kernels only.

    Build it with :meth:`from_full` (slices an unsharded SAE: tests, small models) or directly: with ``generator``
    (in the state one process's ``TopKSAE`` would draw its decoder from) each rank keeps its rows of that very draw
    (:func:`lit_sae.sae.init.draw_decoder`), so the sharded SAE starts where one process starts; without it, from
    a generator seeded with ``seed`` and the shard. Either way no rank ever holds the full matrices.

    Raises:
        ValueError: n_latents not divisible by the group size, batchtopk, or any ``TopKSAE`` config error.
    """

    def __init__(self, d_in: int, n_latents: int, k: int, *, tp_group, seed: int = 0,
                 encoder_init_norm: float = ENCODER_INIT_NORM, _init: bool = True,
                 generator: Optional[torch.Generator] = None, **config):
        nn.Module.__init__(self)
        T, t = dist.get_world_size(tp_group), dist.get_rank(tp_group)
        check_shardable(n_latents, T)
        cfg = {**defaults(_SETTINGS), "fast": True, **config}
        _check_config(d_in, n_latents, k, cfg["k_aux"], cfg["activation"], cfg["normalize"], cfg["multi_topk"],
                      cfg["multi_topk_factor"])
        if cfg["activation"] != "topk":
            raise ValueError("model.activation='batchtopk' cannot be sharded over latents; use 'topk'")
        self.d_in, self.n_latents, self.k = d_in, n_latents, k
        self.k_aux = min(cfg["k_aux"] if cfg["k_aux"] is not None else d_in // 2, n_latents)
        for key in ("auxk_coef", "multi_topk", "multi_topk_factor", "activation", "normalize", "threshold_momentum"):
            setattr(self, key, cfg[key])
        self.fast = True
        self.batch_sum = LOCAL
        self.tp_group, self.tp_size, self.tp_rank = tp_group, T, t
        self.n_local, self.offset = n_latents // T, t * (n_latents // T)
        W_dec = torch.empty(self.n_local, d_in)
        if _init and generator is not None:  # this shard's rows of the one-process draw (TopKSAE's init)
            W_dec = draw_decoder(n_latents, d_in, self.local_rows(), generator)
        elif _init:
            W_dec.normal_(generator=torch.Generator().manual_seed(seed * 100_003 + t))
            W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.clone() * encoder_init_norm)
        self.b_enc = nn.Parameter(torch.zeros(self.n_local))
        self.b_pre = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("norm_scale", torch.ones(()))
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("data_initialized", torch.zeros((), dtype=torch.bool))

    @classmethod
    def from_full(cls, sae: TopKSAE, tp_group) -> "ShardedTopKSAE":
        """This rank's shard of an unsharded ``sae`` (same config, same values; parameters are copies)."""
        cfg = {key: getattr(sae, key) for key in _SETTINGS}
        out = cls(sae.d_in, sae.n_latents, sae.k, tp_group=tp_group, _init=False, **cfg)
        out.batch_sum = sae.batch_sum
        rows = slice(out.offset, out.offset + out.n_local)
        with torch.no_grad():
            out.to(sae.W_dec.dtype)
            for name in ("W_enc", "b_enc", "W_dec"):
                getattr(out, name).copy_(getattr(sae, name)[rows])
            out.b_pre.copy_(sae.b_pre)
            for name, buf in sae.named_buffers():
                getattr(out, name).copy_(buf)
        return out

    def local_rows(self) -> slice:
        """The latents this rank holds, as a slice of 0..n_latents."""
        return slice(self.offset, self.offset + self.n_local)

    # ---- the two seams TopKSAE.forward goes through ----------------------------------------------------------------
    def _encode_n(self, x_n: Tensor, dead_mask: Optional[Tensor], gather=None):
        k_multi = self.k * self.multi_topk_factor if self.multi_topk else 0
        K = max(self.k, k_multi)
        dead_idx, k_aux = None, 0
        if dead_mask is not None and self.auxk_coef > 0:
            if dead_mask.numel() != self.n_local:
                raise ValueError(f"dead_mask has {dead_mask.numel()} entries; a shard needs its {self.n_local}")
            local = dead_mask.to(x_n.device).nonzero().squeeze(1)
            total = local.new_tensor([local.numel()])
            dist.all_reduce(total, group=self.tp_group)
            if int(total):  # the same decision on every shard
                dead_idx, k_aux = local, min(self.k_aux, int(total))
        vals, idx, av, ai = _ShardedTopKEncode.apply(x_n, self.W_enc, self.b_enc, self.b_pre, K, k_aux, dead_idx,
                                                     self.offset, self.n_latents, self.tp_group, self.k, gather)
        multi = (vals, idx) if k_multi else (None, None)
        aux = (av, ai) if dead_idx is not None else (None, None)
        return vals[:, :self.k], idx[:, :self.k], *multi, *aux, None  # None: no sparsity penalty (TopK)

    def _decode_n(self, values: Tensor, indices: Tensor) -> Tensor:
        """sum_j values[:, j] W_dec[indices[:, j]] over all shards (``_decode_sets_n`` of one code)."""
        return self._decode_sets_n([(values, indices)])[0]

    def _decode_sets_n(self, codes: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
        """Each code decoded as a chain over the shards: shard t continues shard t-1's partial sums with its own
        latents (``kernels.sparse_decode_sets`` with ``inits``; every token's rows in ascending latent order, the
        other shards' pairs spilled), the last shard's sums go to every rank. The result has the bits of one
        process's decode, which an all-reduce of partial sums would not."""
        if not codes:
            return []
        B, d, n_local = codes[0][0].shape[0], self.d_in, self.n_local
        local = []
        for v, i in codes:
            owned = (i >= self.offset) & (i < self.offset + n_local)
            local.append((v * owned, torch.where(owned, i - self.offset, n_local)))
        S, dt = len(codes), self.W_dec.dtype
        prev = chain_receive((S * B, d), dt, self.W_dec.device, self.tp_group)
        inits = None if prev is None else list(prev.split(B))
        parts = kernels.sparse_decode_sets(local, self.W_dec, inits=inits, spill=True)
        totals = chain_pass_on(torch.cat(parts), self.tp_group).split(B)
        return [take_chained(p, tot) for p, tot in zip(parts, totals)]

    def pre_acts(self, x: Tensor) -> Tensor:
        """This shard's dense pre-activations (B, n_latents / T) (analysis only)."""
        return super().pre_acts(x)


def average_gradients_(module: nn.Module, dp_group) -> None:
    """Average every parameter's gradient over the data-parallel group (in place; no-op for one rank)."""
    if dp_group is None or dist.get_world_size(dp_group) == 1:
        return
    n = dist.get_world_size(dp_group)
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=dp_group)
            p.grad.div_(n)


@torch.no_grad()
def update_dead_counts_(counts: Tensor, values: Tensor, indices: Tensor, offset: int, tokens: int, dp_group,
                        fire_threshold: float) -> None:
    """Sharded dead-latent counters: ``counts`` (n_latents / T,) int64 of this shard's latents, tokens since each fired.

    values, indices: (B, k) this data-parallel rank's selection (global indices); ``tokens``: tokens of the global
    batch (all data-parallel ranks). A latent fired if it fired on any data-parallel rank (one all-reduce over
    ``dp_group``, of this shard's n_latents / T entries only).
    """
    n_local = counts.numel()
    owned = (indices >= offset) & (indices < offset + n_local) & (values > fire_threshold)
    fired = torch.zeros(n_local, device=counts.device)
    fired[indices[owned] - offset] = 1.0
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(fired, group=dp_group)
    counts += tokens
    counts[fired > 0] = 0
