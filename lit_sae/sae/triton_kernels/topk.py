"""Exact top-k selection as one Triton kernel: one read of the pre-activations, no tie repair, AuxK in the same sweep.

Each program owns ``BLOCK_R`` rows of a (R, m) pre-activation chunk and streams them in tiles of ``BLOCK_N`` columns.
Every element becomes one int64 key: the high 32 bits are the value's float32 bits mapped to a signed integer of the
same order (``-0.0`` first made ``+0.0``, as the two compare equal), the low 32 bits are ``2**32 - 1 - column``. Keys
are distinct, and ordering them descending gives exactly lit-sae's selection order (``lit_sae.sae.selection``):
larger value first, the lower latent index first among equal values. So a running top-``KP`` of keys is the exact
top-K, with no boundary-tie repair. The running list is updated by max-and-replace rounds (``_absorb``), not
``tl.topk``: after the first tiles only the few keys above the list's smallest enter it, so a tile costs about one
max over it; and each round is a plain reduction, where the interpreter runs ``tl.sort``'s xor-reductions element
by element in Python (seconds a tile). AuxK's candidates are a second running list over the same keys with every
live column masked out by a dead bitmap (one bit a latent), so the dead columns are never copied.

Float32, bfloat16 and float16 rows are exact (bf16/fp16 widen to fp32 without rounding). Float64 rows would need 64
bits for the value alone: ``supports`` says no, and the caller keeps ``torch.topk`` for them. Rows holding NaN have
no defined selection (as in ``lit_sae.sae.selection``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_LOW32 = tl.constexpr(4294967295)  # 2**32 - 1 (a constexpr: compiled kernels read no other globals)


@triton.jit
def _sortable_keys(v, cols):
    """int64 keys of float32 values ``v`` at int64 columns ``cols``: key order = (value, -column) order."""
    v = tl.where(v == 0.0, 0.0, v)  # -0.0 and +0.0 are equal values: one key order for both
    bits = v.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # monotone in the float value, as a signed int32
    return (ordered.to(tl.int64) << 32) | (_LOW32 - cols)


@triton.jit
def _absorb(best, keys, none, KP: tl.constexpr):
    """Fold the (BLOCK_R, BLOCK_N) tile ``keys`` into the running (BLOCK_R, KP) list ``best`` (unordered): each
    round, every row's largest remaining tile key replaces that row's smallest listed key if it is larger. A row
    stops taking once its largest remaining key is below its list; the loop ends when no row took anything. Rounds:
    one, plus the number of the tile's keys that enter the list (at most KP a row), so a tile with nothing above the
    running threshold costs one max over it."""
    slot = tl.arange(0, KP)
    took = 1
    while took > 0:
        top = tl.max(keys, axis=1)
        low = tl.min(best, axis=1)
        pos = tl.argmin(best, axis=1)
        take = top > low
        best = tl.where(take[:, None] & (slot[None, :] == pos[:, None]), top[:, None], best)
        keys = tl.where(keys == top[:, None], none, keys)  # keys are distinct: this removes exactly that one
        took = tl.sum(take.to(tl.int32))
    return best


@triton.jit
def _write_sorted(best, none, row_base, rows, rmask, val_ptr, idx_ptr, K: tl.constexpr):
    """Write the K largest keys of each row of ``best`` in descending order: indices and the values read back."""
    for j in range(K):
        top = tl.max(best, axis=1)
        idx = _LOW32 - (top & _LOW32)
        tl.store(idx_ptr + rows * K + j, idx, mask=rmask)
        tl.store(val_ptr + rows * K + j, tl.load(row_base + idx, mask=rmask, other=0.0), mask=rmask)
        best = tl.where(best == top[:, None], none, best)


@triton.jit
def _select_kernel(pre_ptr, stride_r, R, M, dead_ptr, val_ptr, idx_ptr, aux_val_ptr, aux_idx_ptr,
                   K: tl.constexpr, KP: tl.constexpr, KA: tl.constexpr, KAP: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, HAS_AUX: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    rmask = rows < R
    row_base = pre_ptr + rows * stride_r
    # Below every real element's key (whose low 32 bits are > 0 for m < 2**32): padding, consumed keys, empty slots.
    none = tl.full([BLOCK_R, 1], -2147483648, tl.int32).to(tl.int64) << 32
    best = tl.zeros([BLOCK_R, KP], tl.int64) + none
    best_aux = tl.zeros([BLOCK_R, KAP], tl.int64) + none
    c0 = 0
    while c0 < M:  # a while loop: the interpreter (numpy >= 2.4) cannot run `range` over a runtime bound
        cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
        inb = rmask[:, None] & (cols < M)[None, :]
        v = tl.load(row_base[:, None] + cols[None, :], mask=inb, other=0.0).to(tl.float32)
        keys = tl.where(inb, _sortable_keys(v, cols[None, :]), none)
        if HAS_AUX:
            word = tl.load(dead_ptr + (cols >> 5), mask=cols < M, other=0)
            dead = ((word >> (cols & 31).to(tl.int32)) & 1) != 0
            best_aux = _absorb(best_aux, tl.where(dead[None, :], keys, none), none, KAP)
        best = _absorb(best, keys, none, KP)
        c0 += BLOCK_N
    _write_sorted(best, none, row_base, rows, rmask, val_ptr, idx_ptr, K)
    if HAS_AUX:
        _write_sorted(best_aux, none, row_base, rows, rmask, aux_val_ptr, aux_idx_ptr, KA)


def supports(pre: Tensor) -> bool:
    """Whether ``select`` handles rows of this dtype exactly (float32, bfloat16, float16; not float64)."""
    return pre.dtype in (torch.float32, torch.bfloat16, torch.float16)


def dead_bitmap(dead_mask: Tensor) -> Tensor:
    """(ceil(n / 32),) int32 words of a (n,) bool mask: bit c % 32 of word c // 32 is column c's flag."""
    n = dead_mask.numel()
    padded = torch.zeros((n + 31) // 32 * 32, dtype=torch.int64, device=dead_mask.device)
    padded[:n] = dead_mask.to(torch.int64)
    words = (padded.view(-1, 32) << torch.arange(32, device=dead_mask.device)).sum(dim=1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the same 32 bits, as int32


def _pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def launch_meta(K: int, k_aux: int, cuda: bool, block_rows: int | None = None) -> dict:
    """The launch parameters of ``_select_kernel`` for K (and k_aux > 0 for AuxK): running lists of the next powers
    of two; on CUDA 4 rows a program, 1024-column tiles and 8 warps (4 warps needed 254 registers a thread with
    AuxK's 512-key list, ``compile_check``); 64 rows and 512 columns under the interpreter. Not tuned on a GPU."""
    meta = dict(K=K, KP=_pow2(K), KA=max(k_aux, 1), KAP=_pow2(max(k_aux, 1)),
                BLOCK_R=block_rows or (4 if cuda else 64), BLOCK_N=1024 if cuda else 512, HAS_AUX=k_aux > 0)
    return {**meta, "num_warps": 8} if cuda else meta


def select(pre: Tensor, K: int, dead_bits: Tensor | None = None, k_aux: int = 0,
           block_rows: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top-K of each row of ``pre`` (R, m) and, with ``dead_bits``, the top-``k_aux`` among dead columns, exactly.

    pre: (R, m) float32 / bfloat16 / float16, rows contiguous (``supports``), m < 2**31. K: 1 <= K <= m.
    dead_bits: ``dead_bitmap`` of the (m,) dead mask, or None; k_aux: at most the number of dead columns.
    Returns (values (R, K) in pre's dtype, indices (R, K) int64, aux_values (R, k_aux), aux_indices (R, k_aux)), each
    row ordered by value descending, ties by the lower column first: ``selection.topk_exact``'s result.
    ``block_rows``: rows per program (default 4 on CUDA; 64 elsewhere, i.e. under the Triton interpreter, which runs
    one program at a time).

    Raises:
        ValueError: a dtype ``supports`` rejects, non-contiguous rows, or K / k_aux out of range.
    """
    R, m = pre.shape
    if not supports(pre):
        raise ValueError(f"triton top-k: pre-activations of dtype {pre.dtype} (float32, bfloat16 or float16 only)")
    if pre.stride(1) != 1:
        raise ValueError("triton top-k: pre-activation rows must be contiguous")
    if not 1 <= K <= m or k_aux < 0 or (k_aux and dead_bits is None):
        raise ValueError(f"triton top-k: K={K}, k_aux={k_aux} out of range for rows of {m} (k_aux needs dead_bits)")
    has_aux = dead_bits is not None and k_aux > 0
    meta = launch_meta(K, k_aux if has_aux else 0, pre.is_cuda, block_rows)
    vals = torch.empty(R, K, dtype=pre.dtype, device=pre.device)
    idx = torch.empty(R, K, dtype=torch.int64, device=pre.device)
    aux_vals = torch.empty(R, k_aux if has_aux else 0, dtype=pre.dtype, device=pre.device)
    aux_idx = torch.empty(R, k_aux if has_aux else 0, dtype=torch.int64, device=pre.device)
    if R == 0:
        return vals, idx, aux_vals, aux_idx
    bits = dead_bits if has_aux else idx  # any pointer: never read without HAS_AUX
    _select_kernel[(triton.cdiv(R, meta["BLOCK_R"]),)](pre, pre.stride(0), R, m, bits, vals, idx, aux_vals, aux_idx,
                                                       **meta)
    return vals, idx, aux_vals, aux_idx
