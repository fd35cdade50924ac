"""The initial decoder, drawn so that a latent shard holds exactly the rows one process would draw.

A latent-sharded SAE (``lit_sae.parallel.tensor``) keeps only its rows of W_dec; for the same seed to train the same
SAE on any device count, each shard must start from the same values the one-process SAE starts from.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

DRAW_ROWS = 4096  # rows of W_dec drawn at a time by draw_decoder (bounds the memory a shard's draw needs)


def draw_decoder(n_latents: int, d_in: int, rows: Optional[slice] = None,
                 generator: Optional[torch.Generator] = None) -> Tensor:
    """Rows ``rows`` (default: all) of the initial decoder: standard normal rows scaled to unit norm.

    The matrix is drawn in blocks of ``DRAW_ROWS`` rows, always all of them and in order, from ``generator`` (default:
    torch's global CPU generator), keeping only the blocks' parts inside ``rows``: a shard of the latents draws the
    same values as one process holding the whole matrix, without ever holding it. Returns (len(rows), d_in) float32.
    """
    rows = rows if rows is not None else slice(0, n_latents)
    if torch.empty(0).is_meta:  # inside torch.device("meta"): shapes only, nothing drawn
        return torch.empty(rows.stop - rows.start, d_in)
    parts = []
    for start in range(0, n_latents, DRAW_ROWS):
        stop = min(start + DRAW_ROWS, n_latents)
        block = torch.randn(stop - start, d_in, generator=generator)
        lo, hi = max(rows.start, start), min(rows.stop, stop)
        if lo < hi:
            parts.append(block[lo - start:hi - start])
    W_dec = torch.cat(parts) if parts else torch.empty(0, d_in)
    return W_dec / W_dec.norm(dim=1, keepdim=True)
