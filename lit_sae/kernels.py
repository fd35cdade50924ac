"""TopK encode / sparse decode kernels. PLACEHOLDER by the lead (dense reference only); the kernels owner replaces
the fast path keeping these signatures (see docs/CONTRACT.md)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


class EncodeOut(NamedTuple):
    """values/indices (B, k); multi_* (B, k_multi) or None; aux_* (B, k_aux) or None."""

    values: Tensor
    indices: Tensor
    multi_values: Optional[Tensor]
    multi_indices: Optional[Tensor]
    aux_values: Optional[Tensor]
    aux_indices: Optional[Tensor]


def naive_topk_encode(x_c, W_enc, b_enc, k, *, k_multi=0, k_aux=0, dead_mask=None) -> EncodeOut:
    """Dense reference: pre = x_c @ W_enc.T + b_enc, then top-k (and top-k_multi, and top-k_aux among dead)."""
    pre = x_c @ W_enc.T + b_enc
    top = pre.topk(max(k, k_multi), dim=1)
    values, indices = F.relu(top.values), top.indices
    mv = mi = av = ai = None
    if k_multi:
        mv, mi = values, indices
    if k_aux and dead_mask is not None and bool(dead_mask.any()):
        ka = min(k_aux, int(dead_mask.sum()))
        aux = pre.masked_fill(~dead_mask, float("-inf")).topk(ka, dim=1)
        av, ai = F.relu(aux.values), aux.indices
    return EncodeOut(values[:, :k], indices[:, :k], mv, mi, av, ai)


def naive_sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """Dense reference: scatter the code into (B, n_latents) and multiply by W_dec."""
    dense = torch.zeros(values.shape[0], W_dec.shape[0], dtype=values.dtype, device=values.device)
    return dense.scatter(1, indices, values) @ W_dec.to(values.dtype)


topk_encode = naive_topk_encode


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """(B, d) = sum_j values[:, j] * W_dec[indices[:, j]], touching only the selected rows."""
    return F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")
