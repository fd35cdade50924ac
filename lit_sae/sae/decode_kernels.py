"""The sparse decoder: gather-and-sum over the selected rows of W_dec, with a backward over those rows only.

Shapes (B = tokens, d = d_in, n = n_latents): values, indices: (B, k) (indices int64); W_dec: (n, d); out: (B, d).
``sparse_decode_sets`` decodes several codes (the k-code, Multi-TopK's extra code, AuxK's code) with one backward,
so W_dec gets one gradient and one scatter. Public through ``lit_sae.sae.kernels``; the dense reference is
``kernels.naive_sparse_decode``.

One summation order, whatever the layout: each token's rows are added one after another in ascending latent index,
and each row of W_dec's gradient sums its (token, set) pairs in ascending token order. A latent-sharded SAE
(``lit_sae.parallel.tensor``) decodes the same code as a chain, each shard continuing the previous shard's partial
sums (``inits``) with its own latents, so the sharded reconstruction and gradients have the bits of one process's.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from lit_sae.sae.scatter import _gather_dot, _gather_sum, _scatter_pairs, _scatter_rows
from lit_sae.sae.workspace import _workspace


class _SparseDecode(torch.autograd.Function):
    """Gather-and-sum decoder with a backward over the selected rows only."""

    @staticmethod
    def forward(ctx, values, indices, W_dec):
        ctx.save_for_backward(values, indices, W_dec)
        return _gather_sum(indices, W_dec, values)

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, W_dec = ctx.saved_tensors
        d_values = d_W = None
        if ctx.needs_input_grad[0]:
            d_values = _gather_dot(indices, W_dec, grad_out.contiguous())
        if ctx.needs_input_grad[2]:
            d_W = _scatter_rows(indices, values, grad_out, W_dec.shape[0])
        return d_values, None, d_W


ROW_ORDER_MEMO = 4
"""Per-row latent orders kept per thread (the k-code, Multi-TopK's extra code and AuxK's code of the last step)."""


def in_latent_order(values: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """The code (values (B, m), indices (B, m) int64) with each row's pairs in ascending latent index (repeats keep
    their order); ``values`` is gathered, so its gradient flows back to the original positions.

    The encoder's backward lays out the same codes the same way (``kernels.in_decode_layout``): the row sort the
    decoder's forward made is kept (a few per thread, matched by content) and reused there (a (4096, 384) stable
    row sort is ~25 ms on 2 CPU cores)."""
    if indices.shape[1] <= 1:
        return values, indices
    if indices.is_inference():  # no backward to share it with (and no version counter to check it by)
        ordered, perm = indices.sort(dim=1, stable=True)
        return values.gather(1, perm), ordered
    memo = getattr(_workspace, "row_orders", None)
    if memo is None:
        memo = _workspace.row_orders = []
    for key, version, ordered, perm in memo:
        if (key.shape == indices.shape and key.device == indices.device and key._version == version
                and torch.equal(key, indices)):
            return values.gather(1, perm), ordered
    ordered, perm = indices.sort(dim=1, stable=True)
    memo.append((indices, indices._version, ordered, perm))
    del memo[:-ROW_ORDER_MEMO]
    return values.gather(1, perm), ordered


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """(B, d) = sum_j values[:, j, None] * W_dec[indices[:, j]], a gather-and-sum over the selected rows only, each
    token's rows added in ascending latent order (the module docstring).

    values: (B, k) (cast to W_dec's dtype); indices: (B, k) int64, repeats allowed (they add up).
    Backward: d values = rows of W_dec dotted with the output gradient; d W_dec = scatter-add into the used rows.
    """
    if values.dtype != W_dec.dtype:
        values = values.to(W_dec.dtype)
    if indices.shape[1] == 0:  # embedding_bag rejects empty bags of width 0; the sum of nothing is 0
        return values.sum(dim=1, keepdim=True).expand(-1, W_dec.shape[1]).contiguous()
    values, indices = in_latent_order(values, indices)
    with torch.autocast(values.device.type, enabled=False):
        return _SparseDecode.apply(values, indices, W_dec)


class _SparseDecodeSets(torch.autograd.Function):
    """Several gather-and-sum decodes with one W_dec: one scatter (one sort, one (n, d) gradient) in the backward.
    ``spill``: index n marks a pair W_dec does not hold (value 0; no gradient)."""

    @staticmethod
    def forward(ctx, W_dec, inits, spill, *flat):
        vals, idxs = flat[0::2], flat[1::2]
        ctx.save_for_backward(W_dec, *flat)
        ctx.spill = spill
        n = W_dec.shape[0]
        if spill:
            idxs = [i.clamp_max(n - 1) for i in idxs]  # spilled pairs carry value 0: any row adds nothing
        return tuple(_gather_sum(i, W_dec, v, None if inits is None else inits[s])
                     for s, (v, i) in enumerate(zip(vals, idxs)))

    @staticmethod
    def backward(ctx, *grads):
        W_dec, *flat = ctx.saved_tensors
        vals, idxs = flat[0::2], flat[1::2]
        n = W_dec.shape[0]
        B, d = vals[0].shape[0], W_dec.shape[1]
        grads = [
            torch.zeros(B, d, dtype=W_dec.dtype, device=W_dec.device) if g is None else g.contiguous() for g in grads
        ]
        d_vals = []
        for s, (i, g) in enumerate(zip(idxs, grads)):
            if not ctx.needs_input_grad[3 + 2 * s]:
                d_vals.append(None)
            elif ctx.spill:
                d_vals.append(_gather_dot(i.clamp_max(n - 1), W_dec, g).masked_fill_(i == n, 0))
            else:
                d_vals.append(_gather_dot(i, W_dec, g))
        d_W = None
        if ctx.needs_input_grad[0]:
            # Position p of the concatenated (B, m_0 + m_1 + ...) pairs belongs to set s(p) and token b(p); its
            # gradient rows are rows B * s + b of the stacked output gradients.
            widths = [i.shape[1] for i in idxs]
            m = sum(widths)
            set_of_col = torch.repeat_interleave(
                torch.arange(len(widths), device=W_dec.device), torch.tensor(widths, device=W_dec.device)
            )
            cat_i = torch.cat(idxs, dim=1).reshape(-1)
            cat_v = torch.cat(vals, dim=1).reshape(-1)

            def row_of(pos):
                return set_of_col[pos % m] * B + torch.div(pos, m, rounding_mode="floor")

            rows = n + 1 if ctx.spill else n  # spilled pairs gather in one extra row, dropped
            d_W = _scatter_pairs(cat_i, cat_v, row_of, torch.cat(grads, dim=0), rows)[:n]
        out = [d_W, None, None]
        for dv in d_vals:
            out += [dv, None]
        return tuple(out)


def sparse_decode_sets(codes: list[tuple[Tensor, Tensor]], W_dec: Tensor, *,
                       inits: Optional[Sequence[Tensor]] = None, spill: bool = False) -> list[Tensor]:
    """``[sparse_decode(v, i, W_dec) for v, i in codes]`` with one backward for all: a single sort and a single
    (n, d) gradient of W_dec instead of one per set (the k-code, Multi-TopK's extra code and AuxK's code share it).

    codes: (values (B, m_s), indices (B, m_s) int64) per set, the same B; m_s may differ and be 0. Returns (B, d)
    per set, each token's rows added in ascending latent order (the module docstring).
    inits: (B, d) per set, partial sums to continue (no gradient flows to them): a latent shard's part of a chained
    decode. spill: indices equal to n (W_dec.shape[0]) mark pairs of other shards: they must carry value 0, add
    nothing and get no gradient (values' gradient 0 there).
    """
    if not codes:
        return []
    codes = [in_latent_order(v.to(W_dec.dtype) if v.dtype != W_dec.dtype else v, i) for v, i in codes]
    live = [s for s, (_, i) in enumerate(codes) if i.shape[1]]
    out: list[Optional[Tensor]] = [None] * len(codes)
    if live:
        with torch.autocast(W_dec.device.type, enabled=False):
            flat = [t for s in live for t in codes[s]]
            live_inits = None if inits is None else [inits[s].detach() for s in live]
            for s, y in zip(live, _SparseDecodeSets.apply(W_dec, live_inits, spill, *flat)):
                out[s] = y
    for s, (v, i) in enumerate(codes):
        if out[s] is None:  # an empty set: the sum of nothing (or the partial sum it continues)
            base = sparse_decode(v, i, W_dec)
            out[s] = base if inits is None else base + inits[s].detach().to(base.dtype)
    return out
