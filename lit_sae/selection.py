"""Exact top-k selection: ``torch.topk``'s values and indices in one defined order, whatever the ties.

The order is: values descending, ties broken by the lower column (latent) index first, which is what a stable
descending sort gives (``stable_topk_reference``, the definition, slow). ``topk_exact`` gets the same result from one
``torch.topk`` of k + 1 and repairs only the rows that need it. Used by the fast encoder (``lit_sae.kernels``) and
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


def topk_exact(pre: Tensor, K: int) -> tuple[Tensor, Tensor]:
    """Top-K of each row of ``pre`` (R, m) in the exact order (value descending, ties by lower index first).

    One ``torch.topk`` of K+1 does the work; the extra element tells which rows have a tie across the selection
    boundary. Only those rows are repaired: the places held by the boundary value T go to the lowest indices
    whose value equals T (an index search over that row only). Returns (values (R, K'), indices (R, K') int64)
    with K' = min(K, m).
    """
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
