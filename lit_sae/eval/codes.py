"""Sparse SAE codes of token contexts: the LM runs up to the hook point only, the SAE encodes each batch sparsely.

Shared by the feature browser (``lit_sae.features``) and the explainability metric (``lit_sae.eval.explain``).
No dense (tokens, n_latents) matrix is built: a batch's code is (values, indices) of shape (B, T, k).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

from lit_sae.data.lm import truncated_forward
from lit_sae.eval.downstream import splice_mask

__all__ = ["CodeBatch", "context_codes", "stack_codes"]


@dataclass
class CodeBatch:
    """The SAE code of a batch of B contexts of T tokens (all tensors on the CPU).

    ``ctx``: (B,) int64 ids of the contexts (their rows in the caller's context tensor, ascending);
    ``tokens``: (B, T) int64 token ids; ``values``: (B, T, k) float32 latent activations (0 where a token is not
    encoded); ``indices``: (B, T, k) int64 latent ids; ``valid``: (B, T) bool, the tokens the SAE encoded
    (position >= first_position and activation norm <= the harvest's outlier threshold, as in training).
    """

    ctx: Tensor
    tokens: Tensor
    values: Tensor
    indices: Tensor
    valid: Tensor


@torch.no_grad()
def context_codes(model: nn.Module, hook_point: str, sae: nn.Module, input_ids: Tensor, *, first_position: int = 1,
                  norm_threshold: float | None = None, batch_size: int = 8, rows: Tensor | None = None,
                  on_batch=None) -> Iterator[CodeBatch]:
    """Yield the :class:`CodeBatch` of ``input_ids`` (n, T) in batches of ``batch_size`` contexts.

    ``rows``: only these rows of ``input_ids`` (ascending int64); default all. ``on_batch(n_tokens)`` is called
    after each batch (progress bars). Raises ValueError when the hook's width differs from ``sae.d_in``.
    """
    p = next(iter(sae.parameters()), None)
    dtype = p.dtype if p is not None else torch.float32
    sae_device = p.device if p is not None else torch.device("cpu")
    lm_device = next(model.parameters()).device
    rows = torch.arange(len(input_ids)) if rows is None else rows
    for start in range(0, len(rows), batch_size):
        ctx = rows[start:start + batch_size]
        ids = input_ids[ctx]
        acts = truncated_forward(model, ids.to(lm_device), hook_point)
        d_in = getattr(sae, "d_in", acts.shape[-1])
        if acts.shape[-1] != d_in:
            raise ValueError(f"the hook point {hook_point} has width {acts.shape[-1]} but the SAE's d_in is {d_in}")
        valid = splice_mask(acts, first_position, norm_threshold).cpu()
        values, indices = sae.encode(acts[valid.to(acts.device)].to(device=sae_device, dtype=dtype))
        B, T = ids.shape
        k = values.shape[1]
        v = torch.zeros(B, T, k, dtype=torch.float32)
        i = torch.zeros(B, T, k, dtype=torch.long)
        v[valid] = values.float().cpu()
        i[valid] = indices.long().cpu()
        yield CodeBatch(ctx=ctx.clone(), tokens=ids.cpu(), values=v, indices=i, valid=valid)
        if on_batch is not None:
            on_batch(int(B * T))


def stack_codes(batches) -> CodeBatch:
    """Concatenate CodeBatches along the context axis (for small sets: the explainability metric)."""
    batches = list(batches)
    if not batches:
        raise ValueError("no contexts to encode")
    # SAEs without a fixed k (relu, jumprelu, batchtopk at inference) give each batch its own code width: pad the
    # narrower ones with zero values (latent 0, not firing) to the widest.
    k = max(b.values.shape[-1] for b in batches)

    def padded(t: Tensor) -> Tensor:
        return torch.nn.functional.pad(t, (0, k - t.shape[-1]))

    return CodeBatch(torch.cat([b.ctx for b in batches]), torch.cat([b.tokens for b in batches]),
                     torch.cat([padded(b.values) for b in batches]), torch.cat([padded(b.indices) for b in batches]),
                     torch.cat([b.valid for b in batches]))
