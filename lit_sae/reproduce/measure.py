"""What the claims are judged on, per SAE: test-split NMSE / L0 / dead latents (also at a larger k for Multi-TopK),
the LM's delta CE with the SAE spliced in, probe loss and ablation sparsity.

The LM-side numbers reuse ``lit_sae.eval`` (probes, ablation sparsity, the held-out contexts of the manifest); delta CE
runs the clean forward of each batch once and the spliced forward once per SAE (``downstream_loss`` would repeat the
clean one for every SAE).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lit_sae.data.lm import splice
from lit_sae.eval.downstream import reconstructor, splice_mask, token_losses

log = logging.getLogger(__name__)

__all__ = ["read_test_split", "recon_metrics", "at_k", "delta_ce_many"]


def read_test_split(dm) -> Tensor:
    """Every activation of the harvest's test split, (N, d_in) float32 (manifest order)."""
    dm.setup("test")
    rows = [b["acts"].float() if isinstance(b, dict) else b.float() for b in dm.test_dataloader()]
    if not rows:
        raise ValueError("the harvest has no test split: harvest with test_fraction > 0")
    return torch.cat(rows)


@contextlib.contextmanager
def at_k(sae: nn.Module, k: int) -> Iterator[None]:
    """Evaluate a TopK ``sae`` with k latents per token instead of its own (Multi-TopK's test, the paper s2.4)."""
    old = sae.k
    if sae.activation != "topk" or not 0 < k <= sae.n_latents:
        raise ValueError(f"at_k: k={k} needs a topk SAE with n_latents >= k (got {sae.activation}, {sae.n_latents})")
    sae.k = k
    try:
        yield
    finally:
        sae.k = old


def _rows(x, start: int, stop: int) -> Tensor:
    """Rows start:stop of ``x`` (a Tensor or a numpy array, e.g. a memory-mapped split) as a float32 tensor."""
    chunk = x[start:stop]
    return (chunk if isinstance(chunk, Tensor) else torch.from_numpy(np.array(chunk))).float()


@torch.no_grad()
def recon_metrics(sae: nn.Module, x, batch_size: int = 4096, *, dead_at_4k: bool = False) -> dict:
    """Test metrics of ``sae`` on ``x`` (N, d_in), a Tensor or a numpy array read ``batch_size`` rows at a time:

    - "nmse": sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the whole of ``x`` (the paper's normalized MSE;
      the mean is taken in a first pass, so memory-mapped splits are never loaded whole);
    - "l0": mean active latents per token;
    - "dead_on_test": fraction of latents that never fire on ``x``;
    - "dead_on_test_4k" (``dead_at_4k``, TopK SAEs): fraction never among a token's top 4k positive
      pre-activations: alive there is alive for Multi-TopK's L(4k) term, as sparsify counts it.

    Sums in float64; inputs reach ``sae.encode`` as float32. ``sae``: anything with ``encode(x, return_info=True)``,
    ``decode(values, indices, info)``, ``n_latents`` (and ``k``, ``pre_acts`` for ``dead_at_4k``), as ``TopKSAE``.
    """
    n = len(x)
    if n == 0:
        raise ValueError("recon_metrics: x has no rows")
    total = sum(_rows(x, s, s + batch_size).double().sum(0) for s in range(0, n, batch_size))
    mean = total / n
    err = var = 0.0
    active = 0
    fired = torch.zeros(sae.n_latents, dtype=torch.bool)
    wide = torch.zeros(sae.n_latents, dtype=torch.bool) if dead_at_4k else None
    for s in range(0, n, batch_size):
        xb = _rows(x, s, s + batch_size)
        values, indices, info = sae.encode(xb, return_info=True)
        err += float((sae.decode(values, indices, info).double() - xb.double()).pow(2).sum())
        var += float((xb.double() - mean).pow(2).sum())
        on = values > 0
        active += int(on.sum())
        fired[indices[on]] = True
        if wide is not None:  # the top-4k of the pre-activations: Multi-TopK's second code
            top = sae.pre_acts(xb).topk(min(4 * sae.k, sae.n_latents), dim=1)
            wide[top.indices[top.values > 0]] = True
    out = {"nmse": err / var, "l0": active / n, "dead_on_test": 1.0 - float(fired.float().mean())}
    if wide is not None:
        out["dead_on_test_4k"] = 1.0 - float(wide.float().mean())
    return out


@torch.no_grad()
def delta_ce_many(model: nn.Module, hook_point: str, saes: dict[str, nn.Module], input_ids: Tensor, *,
                  first_position: int = 1, norm_threshold: float | None = None, batch_size: int = 8,
                  progress: bool = True) -> dict[str, dict]:
    """Per SAE: {"clean_ce", "sae_ce", "delta_ce"} (nats per token, means over the evaluated tokens) on contexts
    ``input_ids`` (n, T), the activation replaced at the positions ``splice_mask`` selects (as ``downstream_loss``)."""
    device = next(model.parameters()).device
    sums = {name: 0.0 for name in saes}
    clean_sum, n_tokens = 0.0, 0
    fns = {name: reconstructor(sae) for name, sae in saes.items()}
    for s in tqdm(range(0, len(input_ids), batch_size), desc="delta CE", disable=not progress):
        ids = input_ids[s: s + batch_size].to(device)
        ce, _, _ = token_losses(model(input_ids=ids, use_cache=False).logits, ids, None, first_position)
        clean_sum += float(ce.double().sum())
        n_tokens += ce.numel()
        for name, reconstruct in fns.items():
            def fn(act: Tensor, reconstruct=reconstruct) -> Tensor:
                mask = splice_mask(act, first_position, norm_threshold)
                out = act.clone()
                out[mask] = reconstruct(act[mask]).to(act.dtype)
                return out

            with splice(model, hook_point, fn):
                ce, _, _ = token_losses(model(input_ids=ids, use_cache=False).logits, ids, None, first_position)
            sums[name] += float(ce.double().sum())
    clean = clean_sum / n_tokens
    return {name: {"clean_ce": clean, "sae_ce": v / n_tokens, "delta_ce": v / n_tokens - clean, "n_tokens": n_tokens}
            for name, v in sums.items()}
