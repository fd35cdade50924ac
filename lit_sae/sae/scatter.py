"""Gather and scatter products over selected (token, latent) pairs: the backward passes of the sparse encoder and
decoder (``lit_sae.sae.kernels``, ``lit_sae.sae.decode_kernels``) are built from these three.

Shapes: idx, g: (B, m) with idx int64 latent rows; X: (B, d); W: (n, d). Nothing here builds a (B, n) tensor.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_sae import compat
from lit_sae.sae.triton_kernels import dispatch as _triton
from lit_sae.sae.workspace import _workspace


def _scatter_rows(idx: Tensor, g: Tensor, X: Tensor, n: int) -> Tensor:
    """(n, d) with out[i] = sum over (b, j) with idx[b, j] == i of g[b, j] * X[b]; a weight gradient of a gather.

    idx, g: (B, m); X: (B, d). Done as an ``embedding_bag`` over the transposed structure (one bag per latent,
    holding the rows b that selected it), so each output row is written once and no (B * m, d) product exists.
    Why not ``embedding_bag``'s own backward: it sorts with a parallel radix sort that, measured on a 2-core machine
    shared with other work (or with a DataLoader worker), took 150-350 ms instead of 2 ms; a descending sort
    takes the comparison-sort path, which degrades gracefully.
    """
    m = idx.shape[1]
    return _scatter_pairs(idx.reshape(-1), g.reshape(-1), lambda pos: torch.div(pos, m, rounding_mode="floor"), X, n)


def _scatter_pairs(flat: Tensor, g: Tensor, row_of, X: Tensor, n: int) -> Tensor:
    """(n, d): out[i] = sum over positions p with flat[p] == i of g[p] * X[row_of(p)] (``row_of`` maps positions,
    an int64 tensor, to rows of X). The shared body of ``_scatter_rows`` and the multi-set decoder's backward."""
    order, offsets = _latent_order(flat, n)
    if _triton.use_triton(X):
        return _triton.scatter_sorted(row_of(order), g[order], offsets, X, n)
    return F.embedding_bag(row_of(order), X, offsets, per_sample_weights=g[order], mode="sum")


def _latent_order(flat: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Positions of ``flat`` (int64 latent indices) grouped by ascending latent, and each latent's first slot (n,).

    The decoder's backward and then the encoder's scatter the same (token, latent) pairs: the decoded sets,
    concatenated per row, are the encoder's selection (k-code, Multi-TopK's extra, AuxK's code, in that order). So
    the second call reuses the first one's sort (a 1.7M-pair sort is ~8% of an AuxK step on 2 CPU cores): a
    one-entry memo per thread, matched by content (``torch.equal``, ~1 ms) and dropped once used or replaced.
    """
    memo = getattr(_workspace, "order", None)
    _workspace.order = None
    if memo is not None:
        key, version, order, offsets = memo
        if (key.shape == flat.shape and key.device == flat.device and key._version == version
                and offsets.numel() == n and torch.equal(key, flat)):
            return order, offsets
    # Ascending latent, and within a latent ascending position: the keys latent * P + position are unique, so any
    # sort gives this one order. A fixed order within a latent makes each weight-gradient row one fixed sum, the
    # same whether the pairs come from one process or from a latent shard (lit_sae.parallel.tensor).
    P = flat.numel()
    keys = torch.arange(P, device=flat.device).add_(flat, alpha=P)
    order = keys.sort(descending=True).indices.flip(0)
    offsets = torch.zeros(n, dtype=torch.long, device=flat.device)
    torch.cumsum(torch.bincount(flat, minlength=n)[:-1], 0, out=offsets[1:])
    _workspace.order = (flat, flat._version, order, offsets)
    return order, offsets


def _gather_dot(idx: Tensor, W: Tensor, G: Tensor) -> Tensor:
    """(B, m) with out[b, j] = W[idx[b, j]] . G[b]: the gradient of the weights of a gather-and-sum."""
    if _triton.use_triton(W):
        return _triton.gather_dot(idx, W, G)
    B, m = idx.shape
    flat = idx.reshape(-1)
    offsets = torch.arange(0, B * m, m, device=idx.device)
    bag = torch.arange(B, device=idx.device).repeat_interleave(m)
    out = compat.embedding_bag_per_sample_weights_backward(G, W, flat, offsets, bag)
    return out.view(B, m)


def _gather_sum(indices: Tensor, W: Tensor, values: Tensor, init: Optional[Tensor] = None) -> Tensor:
    """(B, d) = init + values[:, 0, None] * W[indices[:, 0]] + values[:, 1, None] * W[indices[:, 1]] + ..., added
    one after another from the left (``embedding_bag`` or its Triton kernel), so that a sum continued from a
    partial one (``init`` (B, d), in W's dtype, default 0) has the bits of the whole sum done at once. A pair whose
    value is 0 adds nothing."""
    if _triton.use_triton(W):
        return _triton.gather_sum(values, indices, W, init)
    if init is None:
        return F.embedding_bag(indices, W, per_sample_weights=values, mode="sum")
    # the partial sum rides along as the first row of each bag (weight 1: 0 + 1 * init is init exactly)
    B, n = indices.shape[0], W.shape[0]
    first = torch.arange(n, n + B, device=indices.device).unsqueeze(1)
    return F.embedding_bag(torch.cat([first, indices], dim=1), torch.cat([W, init.to(W.dtype)]),
                           per_sample_weights=torch.cat([values.new_ones(B, 1), values], dim=1), mode="sum")
