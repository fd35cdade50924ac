"""Exact top-k selection: ``torch.topk``'s values and indices in one defined order, whatever the ties.

The order is: values descending, ties broken by the lower column (latent) index first, which is what a stable
descending sort gives (``stable_topk_reference``, the definition, slow). ``topk_exact`` gets the same result from one
``torch.topk`` of k + 1 and repairs only the rows that need it. Used by the fast encoder (``lit_sae.sae.kernels``) and
the latent-sharded encoder (``lit_sae.parallel.tensor``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def stable_topk_reference(pre: Tensor, K: int) -> tuple[Tensor, Tensor]:
    """Top-K by a stable descending sort of whole rows: the definition of the selection order (slow)."""
    vals, idx = torch.sort(pre, dim=1, descending=True, stable=True)
    return vals[:, :K], idx[:, :K]


def order_ties_(vals: Tensor, idx: Tensor) -> None:
    """In place: within each row (already sorted by value, descending), order equal values by ascending index."""
    if vals.shape[1] < 2:
        return
    rows = (vals[:, 1:] == vals[:, :-1]).any(dim=1).nonzero().squeeze(1)
    if rows.numel() == 0:
        return
    v, i = vals[rows], idx[rows]
    o = i.argsort(dim=1)
    v, i = v.gather(1, o), i.gather(1, o)
    o = v.argsort(dim=1, descending=True, stable=True)
    vals[rows], idx[rows] = v.gather(1, o), i.gather(1, o)


PREFILTER_GROUPS_PER_K = 12
"""``topk_exact`` pre-filters a row through group maxima when the row holds at least this many groups (of 4 to 16
columns) per selected element, so that the candidates are at most a twelfth of the row."""


def prefilter_group_size(m: int, K: int, pre: Tensor) -> int:
    """Columns per group of ``topk_exact``'s pre-filter for rows of m columns, or 0 for none. The pre-filter runs on
    CPU for float32/float64 rows only: on CUDA ``torch.topk`` is a radix select that the extra passes would not beat
    (not measured), and in bf16/fp16 ties between group maxima (8 significant bits) would send most rows to the
    fallback. The group size is the largest power of two up to 16 that leaves ``PREFILTER_GROUPS_PER_K`` groups per
    selected element. ``scripts/bench_topk.py`` on a 2-core CPU: 16 was the fastest at K 32 (n 16384 to 262144), 8 at
    K 128 (n 16384); where fewer than 12 groups of 4 per element fit (AuxK's 384 among 8192 dead columns) every
    group size was slower than no pre-filter."""
    if K < 1 or pre.device.type != "cpu" or pre.dtype not in (torch.float32, torch.float64) or pre.shape[0] == 0:
        return 0
    g = 16
    while g >= 4 and m // g < PREFILTER_GROUPS_PER_K * (K + 1):
        g //= 2
    return g if g >= 4 else 0


def topk_exact(pre: Tensor, K: int) -> tuple[Tensor, Tensor]:
    """Top-K of each row of ``pre`` (R, m) in the exact order (value descending, ties by lower index first).

    One ``torch.topk`` of K+1 does the work; the extra element tells which rows have a tie across the selection
    boundary. Only those rows are repaired: the places held by the boundary value T go to the lowest indices
    whose value equals T (an index search over that row only). Returns (values (R, K'), indices (R, K') int64)
    with K' = min(K, m).

    Wide float32/float64 rows on CPU are first narrowed by ``topk_prefiltered`` (same result, fewer columns for the
    top-k to look at); ``prefilter_group_size`` says when.
    """
    m = pre.shape[1]
    g = prefilter_group_size(m, min(K, m), pre)
    if g:
        return topk_prefiltered(pre, K, g)
    return _topk_exact(pre, K)


def topk_prefiltered(pre: Tensor, K: int, group: int) -> tuple[Tensor, Tensor]:
    """``topk_exact`` through group maxima, for rows much wider than K (exact: the same values, indices and order).

    The m columns of a row form G = m // group strided groups, group j holding columns j, j + G, j + 2G, ... (a
    contiguous, vectorised max over ``group`` slices of the row); the last m - G * group columns are candidates in
    every row. The K groups with the largest maxima (a top-(K+1) over G values) give the candidates, in ascending
    column order, and the exact top-K runs over those. Why it is exact: a column outside the candidates lies in a
    group whose maximum is at most t, the (K+1)-th largest group maximum, so when the candidates' K-th value is
    above t no other column can enter the selection or tie at its boundary. Rows where it is not (ties between
    group maxima, rows of equal values) are selected again from the whole row. Rows holding NaN have no defined
    selection here either. Measured on a 2-core CPU (``scripts/bench_topk.py``), as a fraction of ``torch.topk``'s
    time: 0.53-0.67 at (4096, 16384) K 32, 0.72-0.78 at K 128, 0.35-0.40 at (1024, 65536) and 0.26-0.31 at
    (256, 262144), K 32.
    """
    R, m = pre.shape
    G = m // group
    gmax = pre[:, : G * group].view(R, group, G).amax(dim=1)
    top_groups = gmax.topk(K + 1, dim=1)
    t = top_groups.values[:, K]
    winners = top_groups.indices[:, :K].sort(dim=1).values
    cols = (winners[:, None, :] + G * torch.arange(group, device=pre.device)[None, :, None]).reshape(R, K * group)
    if m > G * group:
        tail = torch.arange(G * group, m, device=pre.device).expand(R, -1)
        cols = torch.cat([cols, tail], dim=1)
    vals, pos = _topk_exact(pre.gather(1, cols), K)
    idx = cols.gather(1, pos)
    redo = (vals[:, K - 1] <= t).nonzero().squeeze(1)
    if redo.numel():
        vals[redo], idx[redo] = _topk_exact(pre[redo], K)
    return vals, idx


def _topk_exact(pre: Tensor, K: int) -> tuple[Tensor, Tensor]:
    """``topk_exact`` without the pre-filter."""
    m = pre.shape[1]
    K = min(K, m)
    if K == 0:
        return pre.new_empty(pre.shape[0], 0), torch.empty(pre.shape[0], 0, dtype=torch.long, device=pre.device)
    kk = min(K + 1, m)
    vals, idx = pre.topk(kk, dim=1, largest=True, sorted=True)
    boundary = vals[:, K] == vals[:, K - 1] if kk > K else None
    vals, idx = vals[:, :K].contiguous(), idx[:, :K].contiguous()
    if boundary is not None:
        # Rows in groups whose int32 running counts take at most a quarter of ``pre``'s own bytes.
        group = max(1, pre.shape[0] * pre.element_size() // 16)
        rows = boundary.nonzero().squeeze(1)
        for part in rows.split(group) if rows.numel() else ():
            repair_boundary_ties_(pre, vals, idx, part, K)
    order_ties_(vals, idx)
    return vals, idx


def repair_boundary_ties_(pre: Tensor, vals: Tensor, idx: Tensor, rows: Tensor, K: int) -> None:
    """In place, for ``rows`` of ``pre`` whose top-K boundary value T also occurs beyond the boundary: give the
    places held by T to the lowest columns holding T."""
    T = vals[rows, K - 1]
    n_gt = (vals[rows] > T[:, None]).sum(dim=1)  # all elements > T are already selected
    need = K - n_gt
    # The j-th lowest column holding T is the first column where the running count of T's reaches j: a cumulative
    # sum and a binary search per row, instead of a second top-k over (rows, m) int64 positions (which, on CUDA in
    # bf16 where boundary ties are the rule, cost more than the first top-k).
    counts = (pre[rows] == T[:, None]).cumsum(dim=1, dtype=torch.int32)
    wanted = torch.arange(1, int(need.max()) + 1, device=pre.device, dtype=torch.int32)
    lowest = torch.searchsorted(counts, wanted.expand(rows.numel(), -1).contiguous())
    slot = torch.arange(K, device=pre.device)[None, :] - n_gt[:, None]  # place among the T's
    fill = slot >= 0
    from_T = lowest.gather(1, slot.clamp(0, lowest.shape[1] - 1))
    idx[rows] = torch.where(fill, from_T, idx[rows])
    vals[rows] = torch.where(fill, T[:, None].expand(-1, K), vals[rows])
