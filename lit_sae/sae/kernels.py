"""TopK encode and sparse decode: a fast path that costs about one dense matmul per step, and the dense reference.

Shapes (B = tokens, d = d_in, n = n_latents):
    x_c: (B, d) = x_n - b_pre;  W_enc, W_dec: (n, d);  b_enc: (n,)
    values: (B, k) ReLU applied;  indices: (B, k) int64.

The only dense work a TopK SAE needs in training is the encoder's product ``x_c @ W_enc.T``. The fast path
(``topk_encode``, ``sparse_decode``) therefore:

- computes the pre-activations in row chunks of at most ``preact_budget(device)`` bytes (so the step never holds
  more than one (B, n) buffer, and less for very wide dictionaries), selects top-k / top-k_multi / the AuxK
  top-k_aux among dead latents from that same buffer (``selection.topk_exact``), and writes the next chunk over it
  (on CPU the buffer is kept from one call to the next: ``lit_sae.sae.workspace``);
- computes the encoder's backward (grads of x_c, W_enc, b_enc) from the selected (index, grad) pairs only, with
  ``embedding_bag`` (a gather-and-sum forward whose weight-gradient is the scatter-add we need);
- decodes with ``embedding_bag`` (gather-and-sum), whose backward touches only the selected rows of W_dec and
  computes the values' gradient as row dot products; ``sparse_decode_sets`` decodes several codes (the k-code,
  Multi-TopK's extra code, AuxK's code) with one backward, so W_dec gets one gradient and one scatter.

Selection order is defined exactly (``lit_sae.sae.selection``), so that the fast and the reference path agree even
with ties: values in descending order, ties broken by the lower latent index first (what a stable descending sort
gives). Rows whose pre-activations contain NaN have no defined selection.

Under ``torch.autocast`` the encoder product runs in the autocast dtype (bf16: values come out in bf16, like the
reference path); the sparse backward and the decoder accumulate in the parameters' dtype.

Where each part lives: the encoder (``topk_encode``, its autograd function, the chunked selection) and the dense
references (``naive_*``) here; the decoder in ``lit_sae.sae.decode_kernels``; the gather/scatter products both
backward passes use in ``lit_sae.sae.scatter``; the buffers kept between calls in ``lit_sae.sae.workspace``. Every
public name is importable from this module.

On CUDA, when Triton is installed, the selection and the sparse products run as Triton kernels instead
(``lit_sae.sae.triton_kernels``; the same indices and order, ``LIT_SAE_KERNELS=torch`` turns them off); on CPU these
PyTorch operators run. ``scripts/gpu_check.sh`` runs the equivalence tests and the benchmark on a GPU machine.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_sae.sae.decode_kernels import in_latent_order, sparse_decode, sparse_decode_sets
from lit_sae.sae.scatter import _gather_sum, _scatter_rows
from lit_sae.sae.selection import stable_topk_reference as _stable_topk_reference
from lit_sae.sae.selection import topk_exact as _topk_exact
from lit_sae.sae.triton_kernels import dispatch as _triton
from lit_sae.sae.workspace import _chunk_buffer, release_workspace, workspace_bytes

__all__ = [
    "MAX_PREACT_BYTES", "MAX_PREACT_BYTES_CUDA", "EncodeOut", "naive_sparse_decode", "naive_topk_encode",
    "preact_budget", "release_workspace", "sparse_decode", "sparse_decode_sets", "topk_encode", "workspace_bytes",
]

MAX_PREACT_BYTES = 256 * 2**20
"""Largest pre-activation chunk (rows x n_latents x element size) the fast encoder materialises at once on CPU.
256 MiB holds a whole 4096 x 16384 fp32 batch (one chunk, no slicing overhead) and bounds a 2^20-latent
dictionary to 64-row chunks instead of a 16 GiB buffer."""

MAX_PREACT_BYTES_CUDA = 2 * 2**30
"""The same bound on CUDA devices. Larger, because each chunk's top-k is a few kernel launches whose fixed cost
matters there: on an H200 (batch 131,072, n_latents 65,536, bf16) 2-4 GiB chunks made the step ~18% faster than
256 MiB ones (``scripts/benchmark.py --preact-mib``)."""


def preact_budget(device: torch.device | str) -> int:
    """Bytes of pre-activations the encoder may hold at once on ``device`` (``MAX_PREACT_BYTES[_CUDA]``)."""
    return MAX_PREACT_BYTES_CUDA if torch.device(device).type == "cuda" else MAX_PREACT_BYTES


class EncodeOut(NamedTuple):
    """Output of ``topk_encode`` / ``naive_topk_encode``. All values have ReLU applied; indices are int64."""

    values: Tensor
    """(B, k) the k largest pre-activations per row, descending (ties: lower index first)."""
    indices: Tensor
    """(B, k) their latent indices."""
    multi_values: Optional[Tensor]
    """(B, k_multi) the k_multi largest (first k equal ``values``), or None when k_multi == 0."""
    multi_indices: Optional[Tensor]
    """(B, k_multi) their indices, or None."""
    aux_values: Optional[Tensor]
    """(B, min(k_aux, n_dead)) the largest pre-activations among dead latents, or None (no AuxK / nothing dead)."""
    aux_indices: Optional[Tensor]
    """(B, min(k_aux, n_dead)) their (global) latent indices, or None."""


# ---------------------------------------------------------------------------------------------- fast encoder
def _compute_dtype(x_c: Tensor, W_enc: Tensor) -> torch.dtype:
    """The dtype the dense product runs in: the autocast dtype when autocast is on for this device."""
    dev = x_c.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(x_c.dtype, W_enc.dtype)


def _select_chunks(x_c: Tensor, W_enc: Tensor, b_enc: Tensor, K: int, dead_idx: Optional[Tensor], k_aux: int):
    """Dense pre-activations in row chunks; top-K and the AuxK selection from each chunk, then the chunk is freed."""
    B, n = x_c.shape[0], W_enc.shape[0]
    dt = _compute_dtype(x_c, W_enc)
    xc, Wc, bc = x_c.to(dt), W_enc.to(dt), b_enc.to(dt)
    rows_per_chunk = max(1, preact_budget(x_c.device) // max(1, n * torch.finfo(dt).bits // 8))
    vals = torch.empty(B, min(K, n), dtype=dt, device=x_c.device)
    idx = torch.empty(B, min(K, n), dtype=torch.long, device=x_c.device)
    ka = 0 if dead_idx is None else min(k_aux, dead_idx.numel())
    aux_vals = torch.empty(B, ka, dtype=dt, device=x_c.device)
    aux_idx = torch.empty(B, ka, dtype=torch.long, device=x_c.device)
    tri = _triton.use_triton(x_c) and _triton.selects(dt)  # one sweep for both selections, dead columns by bitmap
    bits = _triton.dead_bits(dead_idx, n) if tri and ka else None
    with torch.autocast(x_c.device.type, enabled=False):
        for r0 in range(0, B, rows_per_chunk):
            r1 = min(B, r0 + rows_per_chunk)
            pre = torch.addmm(bc, xc[r0:r1], Wc.t(), out=_chunk_buffer("pre", r1 - r0, n, dt, x_c.device))
            if tri:
                vals[r0:r1], idx[r0:r1], av, ai = _triton.select(pre, min(K, n), bits, ka)
                if ka:
                    aux_vals[r0:r1], aux_idx[r0:r1] = av, ai
                continue
            vals[r0:r1], idx[r0:r1] = _topk_exact(pre, K)
            if ka:
                # dead_idx is ascending, so "lower local index" is "lower latent index": the tie order carries over.
                dead = _chunk_buffer("dead", r1 - r0, dead_idx.numel(), dt, x_c.device)
                av, ai = _topk_exact(torch.index_select(pre, 1, dead_idx, out=dead), ka)
                aux_vals[r0:r1], aux_idx[r0:r1] = av, dead_idx[ai]
            del pre
    return vals, idx, aux_vals, aux_idx


class _TopKEncode(torch.autograd.Function):
    """values = ReLU(top-K of x_c @ W_enc.T + b_enc) (and AuxK values), backward from the selected pairs only."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, K: int, k_aux: int, dead_idx: Optional[Tensor], b_pre: Optional[Tensor],
                k: int, gather):
        x_c = x if b_pre is None else x - b_pre
        ctx.k, ctx.gather = k, gather
        vals, idx, aux_vals, aux_idx = _select_chunks(x_c, W_enc, b_enc, K, dead_idx, k_aux)
        vals.relu_()
        aux_vals.relu_()
        if gather is not None:  # every rank's selection and centred rows: the backward is the global batch's
            vals, idx, aux_vals, aux_idx, x_c = (gather.gather(t) for t in (vals, idx, aux_vals, aux_idx, x_c))
        ctx.save_for_backward(x_c, W_enc, vals, idx, aux_vals, aux_idx)
        ctx.b_enc_meta = (b_enc.dtype, b_enc.shape)
        ctx.b_pre_dtype = None if b_pre is None else b_pre.dtype
        ctx.mark_non_differentiable(idx, aux_idx)
        return vals, idx, aux_vals, aux_idx

    @staticmethod
    def backward(ctx, g_vals, _g_idx, g_aux, _g_aux_idx):
        x_c, W_enc, vals, idx, aux_vals, aux_idx = ctx.saved_tensors
        need_x, need_W, need_b = ctx.needs_input_grad[:3]
        need_pre = ctx.needs_input_grad[6]
        pt = W_enc.dtype
        # d ReLU: the gradient passes where the kept value is > 0 (i.e. the pre-activation was > 0).
        pairs = []
        if g_vals is not None:
            pairs += code_sets((g_vals * (vals > 0)).to(pt), idx, ctx.k)
        if g_aux is not None and aux_idx.shape[1]:
            pairs.append(((g_aux * (aux_vals > 0)).to(pt), aux_idx))
        if not pairs:
            return (None,) * 9
        g, ii = in_decode_layout(pairs)
        # b_pre's gradient is minus the sum over rows of x_c's: sum_b sum_j g[b, j] W_enc[ii[b, j]] = db_enc @ W_enc,
        # one (n,) x (n, d) product instead of gathering B * m rows of W_enc (which only a per-row dx needs).
        b_meta = (pt, ctx.b_enc_meta[1]) if need_pre else ctx.b_enc_meta
        dx, dW, db = _encode_grads(x_c, W_enc, b_meta, g, ii, need_x, need_W, need_b or need_pre)
        if dx is not None and ctx.gather is not None:
            dx = ctx.gather.own_rows(dx)
        d_pre = None
        if need_pre:
            d_pre = center_grad(db, W_enc).neg().to(ctx.b_pre_dtype)
            db = db.to(ctx.b_enc_meta[0]) if need_b else None
        return dx, dW, db, None, None, None, d_pre, None, None


def code_sets(g: Tensor, idx: Tensor, k: int) -> list[tuple[Tensor, Tensor]]:
    """The (B, K) selection as the decoder's sets: the k-code, then Multi-TopK's extra K - k (if any)."""
    if idx.shape[1] <= k:
        return [(g, idx)]
    return [(g[:, :k], idx[:, :k]), (g[:, k:], idx[:, k:])]


def in_decode_layout(pairs: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """(g (B, m), ii (B, m)) of the encoder's backward laid out as the decoder's backward lays out the same pairs
    (each set in ascending latent, ``decode_kernels.in_latent_order``; the sets side by side), so the W_enc scatter
    reuses the W_dec scatter's sort (``scatter._latent_order``'s memo). The sums do not depend on it."""
    parts = [in_latent_order(g, i) for g, i in pairs]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)


CENTER_GRAD_CHUNK_BYTES = 64 * 2**20
"""Rows of W_enc converted to float64 at once by ``center_grad`` on CUDA (bounds its temporary)."""


def center_grad_dtype(W_enc: Tensor) -> torch.dtype:
    """The dtype ``center_grad`` accumulates and returns in: W_enc's on CPU, float64 on CUDA."""
    return torch.float64 if W_enc.is_cuda else W_enc.dtype


def center_grad(db: Tensor, W_enc: Tensor, init: Optional[Tensor] = None) -> Tensor:
    """(d,) = init + sum_i db[i] * W_enc[i], the centring bias's gradient before its sign (db: (n,) the
    pre-activations' gradient summed over tokens; W_enc: (n, d); init: (d,) a previous latent shard's sum, or None),
    in ``center_grad_dtype(W_enc)``.

    One order whatever the thread count and the layout: on CPU the latents are added one after another in ascending
    order (one ``embedding_bag`` bag; ~8 ms at n 16384, d 768 on 2 cores, where a float64 product took 45 ms), so a
    latent-sharded SAE continuing the previous shard's sum (``lit_sae.parallel.tensor``) gets one process's bits.
    On CUDA (a single bag would be one long serial loop) the products are summed in float64 by chunks, whose
    float32 rounding differs between layouts only where the float64 sum straddles a rounding boundary."""
    if W_enc.is_cuda:
        rows = max(1, CENTER_GRAD_CHUNK_BYTES // max(1, 8 * W_enc.shape[1]))
        out = torch.zeros(W_enc.shape[1], dtype=torch.float64, device=W_enc.device)
        if init is not None:
            out += init
        with torch.autocast(W_enc.device.type, enabled=False):
            for r0 in range(0, W_enc.shape[0], rows):
                out.addmv_(W_enc[r0:r0 + rows].t().double(), db[r0:r0 + rows].double())
        return out
    with torch.autocast(W_enc.device.type, enabled=False):
        latents = torch.arange(W_enc.shape[0], device=W_enc.device).unsqueeze(0)
        return _gather_sum(latents, W_enc, db.to(W_enc.dtype).unsqueeze(0),
                           None if init is None else init.unsqueeze(0))[0]


def _encode_grads(x_c: Tensor, W_enc: Tensor, b_enc_meta, g: Tensor, ii: Tensor, need_x: bool, need_W: bool,
                  need_b: bool, spill: bool = False) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients of x_c (B, d), W_enc (n, d) and b_enc (n,) from the selected pairs only (shared by the sharded
    encoder in ``lit_sae.parallel.tensor``): ii (B, m) int64 rows of W_enc, g (B, m) their pre-activation gradients
    in W_enc's dtype (ReLU's mask applied; 0 for pairs that carry none). b_enc_meta: (dtype, shape) of b_enc.
    ``spill``: ii == n marks pairs of another shard (g 0 there): they touch no row. Each row's sum runs over its
    pairs in ascending position (``scatter._latent_order``), so a shard's rows have the bits of one process's."""
    pt = W_enc.dtype
    n = W_enc.shape[0]
    rows = n + 1 if spill else n
    dx = dW = db = None
    with torch.autocast(x_c.device.type, enabled=False):
        if need_x:  # dx_c[b] = sum_j g[b, j] W_enc[ii[b, j]]
            dx = _gather_sum(ii.clamp_max(n - 1) if spill else ii, W_enc, g).to(x_c.dtype)
        if need_W:  # dW_enc[i] = sum over (b, j) selecting i of g[b, j] x_c[b]
            dW = _scatter_rows(ii, g, x_c.to(pt), rows)[:n]
        if need_b:
            b_dtype, b_shape = b_enc_meta
            db = torch.zeros(rows, dtype=pt, device=g.device).index_add_(0, ii.reshape(-1), g.reshape(-1))
            db = db[:n].reshape(b_shape).to(b_dtype)
    return dx, dW, db


def _dead_indices(dead_mask: Optional[Tensor], k_aux: int, device) -> Optional[Tensor]:
    """Ascending indices of dead latents, or None when AuxK is off or nothing is dead."""
    if not k_aux or dead_mask is None:
        return None
    dead_idx = dead_mask.to(device).nonzero().squeeze(1)
    return dead_idx if dead_idx.numel() else None


def _check_encode_args(x_c: Tensor, W_enc: Tensor, k: int, k_multi: int, b_pre: Optional[Tensor] = None) -> None:
    """Shape and k checks shared by both encoders (errors name the argument)."""
    if x_c.dim() != 2 or W_enc.dim() != 2 or x_c.shape[1] != W_enc.shape[1]:
        raise ValueError(f"x_c {tuple(x_c.shape)} and W_enc {tuple(W_enc.shape)} must be (B, d) and (n_latents, d)")
    if b_pre is not None and tuple(b_pre.shape) != (W_enc.shape[1],):
        raise ValueError(f"b_pre {tuple(b_pre.shape)} must be (d,) = ({W_enc.shape[1]},), the input's width")
    if not 0 < k <= W_enc.shape[0]:
        raise ValueError(f"k={k} must satisfy 0 < k <= n_latents={W_enc.shape[0]}")
    if k_multi and not k <= k_multi <= W_enc.shape[0]:
        raise ValueError(f"k_multi={k_multi} must satisfy k={k} <= k_multi <= n_latents={W_enc.shape[0]}")


def topk_encode(
    x_c: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    *,
    k_multi: int = 0,
    k_aux: int = 0,
    dead_mask: Optional[Tensor] = None,
    b_pre: Optional[Tensor] = None,
    gather=None,
) -> EncodeOut:
    """Fast TopK encoder: one dense product, exact top-k / top-k_multi / AuxK selection, sparse backward.

    ``gather`` (a ``lit_sae.sae.losses.BatchSum`` that gathers, e.g. ``lit_sae.parallel.data_parallel.TokenGather``):
    x_c holds this data-parallel rank's rows; the outputs are every rank's rows (the global batch, token order) and
    the weights' gradients are the global batch's, computed on every rank as one process computes them.

    x_c: (B, d) input, centred by the caller (x_n - b_pre) or, when ``b_pre`` (d,) is given, here: the product is
    then (x_c - b_pre) @ W_enc.T + b_enc, and b_pre's gradient is -(sum of the pre-activation gradients per latent)
    @ W_enc, a (n,) x (n, d) product, where centring outside needs x_c's per-row gradient (a gather of B * m rows
    of W_enc; x_c still gets it when it requires a gradient). W_enc: (n, d); b_enc: (n,); dead_mask: (n,) bool or
    None. See ``EncodeOut`` for the outputs. Gradients flow to x_c, W_enc, b_enc (and b_pre) from values,
    multi_values and aux_values, computed from the selected indices only.

    Raises:
        ValueError: shapes or k out of range (``_check_encode_args``), or ``b_pre`` not of shape (d,).
    """
    _check_encode_args(x_c, W_enc, k, k_multi, b_pre)
    K = max(k, k_multi)
    dead_idx = _dead_indices(dead_mask, k_aux, x_c.device)
    vals, idx, aux_vals, aux_idx = _TopKEncode.apply(x_c, W_enc, b_enc, K, k_aux, dead_idx, b_pre, k, gather)
    multi = (vals, idx) if k_multi else (None, None)
    aux = (aux_vals, aux_idx) if dead_idx is not None else (None, None)
    return EncodeOut(vals[:, :k], idx[:, :k], *multi, *aux)


# ---------------------------------------------------------------------------------------------- dense reference
def _topk_reference(pre: Tensor, K: int) -> tuple[Tensor, Tensor]:
    """Top-K with the exact order: plain ``torch.topk``, and a stable full sort for the rows where ties make
    topk's choice ambiguous (at the boundary or inside the selection)."""
    K = min(K, pre.shape[1])
    kk = min(K + 1, pre.shape[1])
    vals, idx = pre.topk(kk, dim=1)
    tied = (vals[:, 1:] == vals[:, :-1]).any(dim=1) if kk > 1 else torch.zeros_like(vals[:, 0], dtype=torch.bool)
    vals, idx = vals[:, :K], idx[:, :K]
    rows = tied.nonzero().squeeze(1)
    if rows.numel():
        _, sidx = _stable_topk_reference(pre[rows].detach(), K)
        idx = idx.clone()
        idx[rows] = sidx
        vals = pre.gather(1, idx)
    return vals, idx


def naive_topk_encode(
    x_c: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    *,
    k_multi: int = 0,
    k_aux: int = 0,
    dead_mask: Optional[Tensor] = None,
    b_pre: Optional[Tensor] = None,
) -> EncodeOut:
    """Dense reference of ``topk_encode`` (same signature and outputs); plain autograd through a dense product,
    so its backward builds dense (B, n) gradients. For tests and the benchmark's baseline."""
    _check_encode_args(x_c, W_enc, k, k_multi, b_pre)
    pre = F.linear(x_c if b_pre is None else x_c - b_pre, W_enc, b_enc)
    _, idx = _topk_reference(pre.detach(), max(k, k_multi))
    values = F.relu(pre.gather(1, idx))
    mv = mi = av = ai = None
    if k_multi:
        mv, mi = values, idx
    dead_idx = _dead_indices(dead_mask, k_aux, x_c.device)
    if dead_idx is not None:
        dead = torch.zeros(W_enc.shape[0], dtype=torch.bool, device=x_c.device)
        dead[dead_idx] = True
        masked = pre.masked_fill(~dead, float("-inf"))
        _, ai = _topk_reference(masked.detach(), min(k_aux, dead_idx.numel()))
        av = F.relu(pre.gather(1, ai))
    return EncodeOut(values[:, :k], idx[:, :k], mv, mi, av, ai)


def naive_sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """Dense reference of ``sparse_decode``: scatter-add the code into (B, n) and multiply by W_dec."""
    dense = torch.zeros(values.shape[0], W_dec.shape[0], dtype=values.dtype, device=values.device)
    return dense.scatter_add(1, indices, values) @ W_dec.to(values.dtype)
