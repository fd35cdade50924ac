"""The sparse k-path as Triton kernels: gather-and-sum (decode, the encoder's input gradient), row dot products (the
values' gradient) and the latent-major weight gradient over the shared sort, with no atomics.

Shapes (B = rows, m = pairs a row, n = latents, d = row width): ``W`` (n, d), ``values`` / ``indices`` (B, m), the
output gradient ``G`` (B, d). All accumulate in float32 (float64 when the weights are float64) and return the
dtype ``torch.nn.functional.embedding_bag`` would (the weights'), so they replace it one for one in
``lit_sae.sae.kernels``. Inputs are made contiguous here. Every loop bound that depends on the data is a ``while``
loop (the Triton interpreter, on numpy >= 2.4, cannot run ``range`` over a runtime value).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _gather_sum_kernel(val_ptr, idx_ptr, w_ptr, init_ptr, out_ptr, B, m, d,
                       BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, F64: tl.constexpr, INIT: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask, cmask = rows < B, cols < d
    acc = tl.zeros([BLOCK_B, BLOCK_D], tl.float64 if F64 else tl.float32)
    if INIT:  # continue a partial sum (a latent shard's chained decode): the pairs are added after it, in order
        acc += tl.load(init_ptr + rows[:, None] * d + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                       other=0.0).to(acc.dtype)
    j = 0
    while j < m:
        i = tl.load(idx_ptr + rows * m + j, mask=rmask, other=0)
        v = tl.load(val_ptr + rows * m + j, mask=rmask, other=0.0).to(acc.dtype)
        w = tl.load(w_ptr + i[:, None] * d + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        acc += v[:, None] * w.to(acc.dtype)
        j += 1
    tl.store(out_ptr + rows[:, None] * d + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _gather_dot_kernel(idx_ptr, w_ptr, g_ptr, out_ptr, B, m, d,
                       BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, F64: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    slots = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    pmask = (rows < B)[:, None] & (slots < m)[None, :]
    i = tl.load(idx_ptr + rows[:, None] * m + slots[None, :], mask=pmask, other=0)
    acc = tl.zeros([BLOCK_B, BLOCK_M], tl.float64 if F64 else tl.float32)
    c0 = 0
    while c0 < d:
        cols = c0 + tl.arange(0, BLOCK_D)
        cmask = cols < d
        g = tl.load(g_ptr + rows[:, None] * d + cols[None, :], mask=(rows < B)[:, None] & cmask[None, :], other=0.0)
        w = tl.load(w_ptr + i[:, :, None] * d + cols[None, None, :], mask=pmask[:, :, None] & cmask[None, None, :],
                    other=0.0)
        acc += tl.sum(w.to(acc.dtype) * g.to(acc.dtype)[:, None, :], axis=2)
        c0 += BLOCK_D
    tl.store(out_ptr + rows[:, None] * m + slots[None, :], acc.to(out_ptr.dtype.element_ty), mask=pmask)


@triton.jit
def _scatter_sorted_kernel(row_ptr, g_ptr, start_ptr, x_ptr, out_ptr, n, P, d,
                           BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, F64: tl.constexpr):
    lat = tl.program_id(0).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    lmask, cmask = lat < n, cols < d
    start = tl.load(start_ptr + lat, mask=lmask, other=0)
    end = tl.load(start_ptr + lat + 1, mask=lat + 1 < n, other=P)
    length = tl.where(lmask, end - start, 0)
    longest = tl.max(length, axis=0)
    acc = tl.zeros([BLOCK_L, BLOCK_D], tl.float64 if F64 else tl.float32)
    p0 = 0
    while p0 < longest:  # each latent's pairs in sorted order: a fixed summation order, no atomics
        p = p0 + tl.arange(0, BLOCK_P)
        pm = p[None, :] < length[:, None]
        pos = start[:, None] + p[None, :]
        r = tl.load(row_ptr + pos, mask=pm, other=0)
        g = tl.load(g_ptr + pos, mask=pm, other=0.0).to(acc.dtype)
        x = tl.load(x_ptr + r[:, :, None] * d + cols[None, None, :], mask=pm[:, :, None] & cmask[None, None, :],
                    other=0.0)
        acc += tl.sum(g[:, :, None] * x.to(acc.dtype), axis=1)
        p0 += BLOCK_P
    tl.store(out_ptr + lat[:, None] * d + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=lmask[:, None] & cmask[None, :])


BLOCKS = {
    # kernel: (blocks on CUDA, blocks under the interpreter, which runs one program at a time: few, large programs)
    "gather_sum": (dict(BLOCK_B=16, BLOCK_D=128), dict(BLOCK_B=64, BLOCK_D=128)),
    "gather_dot": (dict(BLOCK_B=4, BLOCK_M=16, BLOCK_D=32), dict(BLOCK_B=32, BLOCK_M=64, BLOCK_D=64)),
    "scatter_sorted": (dict(BLOCK_L=1, BLOCK_P=16, BLOCK_D=128), dict(BLOCK_L=16, BLOCK_P=32, BLOCK_D=128)),
}
"""Block sizes of each kernel (not tuned on a GPU: none was measured)."""


def launch_meta(kernel: str, cuda: bool, dtype: torch.dtype) -> dict:
    """The compile-time parameters of ``kernel`` (a key of ``BLOCKS``) for weights / rows of ``dtype``."""
    meta = {**BLOCKS[kernel][0 if cuda else 1], "F64": dtype == torch.float64}
    return {**meta, "INIT": False} if kernel == "gather_sum" else meta


def gather_sum(values: Tensor, indices: Tensor, W: Tensor, init: Optional[Tensor] = None) -> Tensor:
    """(B, d) = init + sum_j values[:, j, None] * W[indices[:, j]], the pairs added in order j = 0, 1, ...:
    ``embedding_bag(indices, W, per_sample_weights=values, mode="sum")`` (plus ``init``). values: (B, m) in W's
    dtype; indices: (B, m) int64, repeats allowed; init: (B, d) or None (0)."""
    B, m = indices.shape
    d = W.shape[1]
    out = torch.empty(B, d, dtype=W.dtype, device=W.device)
    if B == 0 or d == 0:  # a launch needs a non-empty grid
        return out.zero_()
    if m == 0:  # the sum of nothing is init
        return out.zero_() if init is None else out.copy_(init)
    meta = {**launch_meta("gather_sum", W.is_cuda, W.dtype), "INIT": init is not None}
    grid = (triton.cdiv(B, meta["BLOCK_B"]), triton.cdiv(d, meta["BLOCK_D"]))
    init_arg = out if init is None else init.to(W.dtype).contiguous()  # unread without INIT
    _gather_sum_kernel[grid](values.contiguous(), indices.contiguous(), W.contiguous(), init_arg, out, B, m, d,
                             **meta)
    return out


def gather_dot(indices: Tensor, W: Tensor, G: Tensor) -> Tensor:
    """(B, m) with out[b, j] = W[indices[b, j]] . G[b]: the values' gradient of a gather-and-sum, in W's dtype.
    indices: (B, m) int64; W: (n, d); G: (B, d)."""
    B, m = indices.shape
    d = W.shape[1]
    out = torch.empty(B, m, dtype=W.dtype, device=W.device)
    if B == 0 or m == 0 or d == 0:
        return out.zero_()
    meta = launch_meta("gather_dot", W.is_cuda, W.dtype)
    grid = (triton.cdiv(B, meta["BLOCK_B"]), triton.cdiv(m, meta["BLOCK_M"]))
    _gather_dot_kernel[grid](indices.contiguous(), W.contiguous(), G.contiguous(), out, B, m, d, **meta)
    return out


def scatter_sorted(rows: Tensor, g: Tensor, starts: Tensor, X: Tensor, n: int) -> Tensor:
    """(n, d) with out[i] = sum over positions p of latent i's segment of g[p] * X[rows[p]], in X's dtype.

    rows, g: (P,) the pairs grouped by ascending latent (int64 rows of X, their weights); starts: (n,) int64, the
    first position of each latent's segment (a latent's segment ends where the next one starts, the last at P), as
    ``lit_sae.sae.kernels._latent_order`` gives them. Each output row is written once, by one program, summing its
    pairs in segment order: no atomics, the same result on every run."""
    P = rows.numel()
    d = X.shape[1]
    out = torch.empty(n, d, dtype=X.dtype, device=X.device)
    if n == 0 or d == 0 or P == 0:
        return out.zero_()
    meta = launch_meta("scatter_sorted", X.is_cuda, X.dtype)
    grid = (triton.cdiv(n, meta["BLOCK_L"]), triton.cdiv(d, meta["BLOCK_D"]))
    _scatter_sorted_kernel[grid](rows.contiguous(), g.contiguous(), starts.contiguous(), X.contiguous(), out, n, P, d,
                                 **meta)
    return out
