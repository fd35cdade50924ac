"""Ablation sparsity: do a latent's downstream effects concentrate on a few logits?

For each sampled latent (default 64, among those that fire on the evaluation contexts) and a few contexts where it
fires, the LM runs with the SAE's reconstruction spliced in (the reference) and with that latent's contribution
removed from the reconstruction at the positions where it fires (decode with its value set to zero). The change of
the next-token logits, Delta (positions x V), is taken at the positions from the first firing one on; the per-position
mean over the vocabulary is removed (a uniform shift of all logits changes no probability). Its concentration

    (||Delta_p||_1 / ||Delta_p||_2)^2 / V     for one position p: 1 if every logit moves equally, 1/V if one moves,
                                               2/pi for a Gaussian change

is combined over the affected positions weighted by ||Delta_p||_2^2, i.e. score = sum_p ||Delta_p||_1^2 /
(V * sum_p ||Delta_p||_2^2). The weighting keeps positions the ablation barely reaches from diluting the number.
``concat`` is the same ratio taken literally on the whole concatenated vector, (||Delta||_1 / ||Delta||_2)^2 /
len(Delta), which is also lowered by how few positions are affected.

Baseline: the same with a random direction of the same norm at each position (one random unit vector per latent)
removed instead of the latent.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lit_sae.checks import check_token_ids
from lit_sae.data.lm import splice, truncated_forward
from lit_sae.eval.downstream import splice_mask

log = logging.getLogger(__name__)

__all__ = ["concentration", "ablation_sparsity"]


def concentration(delta: Tensor) -> tuple[float, float]:
    """(score, concat) of a logit change (P, V) as the module docstring defines; nan when it is all zero."""
    d = delta.double()
    d = d - d.mean(-1, keepdim=True)
    l1, l2sq = d.abs().sum(-1), d.pow(2).sum(-1)
    total = float(l2sq.sum())
    if total <= 0:
        return math.nan, math.nan
    V = d.shape[-1]
    return float(l1.pow(2).sum() / (V * total)), float(l1.sum() ** 2 / (total * d.numel()))


def _state_rows(state, rows: Tensor):
    """Select rows of an SAE normalisation state (None, a tensor, or a tuple of per-row tensors)."""
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(_state_rows(s, rows) for s in state)
    if isinstance(state, Tensor) and state.dim() > 0 and state.shape[0] > 1:
        return state[rows]
    return state


@torch.no_grad()
def ablation_sparsity(
    model: nn.Module,
    hook_point: str,
    sae: nn.Module,
    input_ids: Tensor,
    *,
    n_latents: int = 64,
    contexts_per_latent: int = 4,
    latents: Sequence[int] | None = None,
    first_position: int = 1,
    norm_threshold: float | None = None,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Ablation sparsity of ``n_latents`` random firing latents (or the given ``latents``) on contexts (n, T).

    Returns {"mean", "median", "random_mean", "random_median", "concat_mean", "random_concat_mean",
    "n_latents", "latents": [{"latent", "score", "random", "concat", "random_concat", "n_contexts",
    "n_positions"}]}.

    Raises:
        ValueError: ``input_ids`` is not an integer (n, T) tensor."""
    check_token_ids(input_ids)
    device = next(model.parameters()).device
    p = next(iter(sae.parameters()), None)
    sae_dtype = p.dtype if p is not None else torch.float32
    # 1. Clean activations and the SAE's code at every position that is spliced.
    acts = torch.cat([truncated_forward(model, input_ids[s : s + batch_size].to(device), hook_point).float().cpu()
                      for s in range(0, len(input_ids), batch_size)])
    mask = splice_mask(acts, first_position, norm_threshold)
    pos = mask.nonzero()  # (R, 2): context, position
    x = acts[mask].to(p.device if p is not None else "cpu", sae_dtype)
    values, indices, state = sae.encode(x, return_info=True)
    x_hat = sae.decode(values, indices, state).float().cpu()
    values, indices = values.cpu(), indices.cpu()
    firing = (values > 0)
    fired = indices[firing].unique()
    g = torch.Generator().manual_seed(seed)
    if latents is None:
        chosen = fired[torch.randperm(len(fired), generator=g)[:n_latents]].tolist()
    else:
        chosen = [int(i) for i in latents]
    ref_full = acts.clone()
    ref_full[mask] = x_hat
    results = []
    for latent in tqdm(chosen, desc="ablation sparsity", disable=not progress):
        hit = ((indices == latent) & firing)  # (R, k)
        rows = hit.any(1).nonzero().squeeze(1)
        if len(rows) == 0:
            log.warning("latent %d never fires on the evaluation contexts; skipped", latent)
            continue
        ctxs = pos[rows, 0].unique()
        ctxs = ctxs[torch.randperm(len(ctxs), generator=g)[:contexts_per_latent]]
        rows = rows[torch.isin(pos[rows, 0], ctxs)]
        # Reconstruction without the latent at its firing rows (exact for any input normalisation).
        v = values[rows].clone()
        v[hit[rows]] = 0
        x_abl = sae.decode(v.to(x.device), indices[rows].to(x.device), _state_rows(state, rows.to(x.device)))
        delta = x_abl.float().cpu() - x_hat[rows]
        u = torch.randn(acts.shape[-1], generator=g)
        x_rand = x_hat[rows] - delta.norm(dim=-1, keepdim=True) * (u / u.norm())
        C = len(ctxs)
        local = {int(c): j for j, c in enumerate(ctxs)}
        batch = torch.cat([ref_full[ctxs]] * 3)  # reference, latent removed, random direction removed
        ci = torch.tensor([local[int(c)] for c in pos[rows, 0]])
        batch[C + ci, pos[rows, 1]] = x_abl.float().cpu()
        batch[2 * C + ci, pos[rows, 1]] = x_rand
        bmask = torch.cat([mask[ctxs]] * 3).to(device)
        replacement = batch.to(device)

        def fn(a: Tensor, replacement=replacement, bmask=bmask) -> Tensor:
            out = a.clone()
            out[bmask] = replacement[bmask].to(a.dtype)
            return out

        with splice(model, hook_point, fn):
            logits = model(input_ids=torch.cat([input_ids[ctxs]] * 3).to(device), use_cache=False).logits.float()
        d_abl, d_rand = [], []
        for j, c in enumerate(ctxs):
            start = int(pos[rows[ci == j], 1].min())
            d_abl.append(logits[C + j, start:] - logits[j, start:])
            d_rand.append(logits[2 * C + j, start:] - logits[j, start:])
        s, sc = concentration(torch.cat(d_abl))
        r, rc = concentration(torch.cat(d_rand))
        results.append({"latent": int(latent), "score": s, "random": r, "concat": sc, "random_concat": rc,
                        "n_contexts": C, "n_positions": int(sum(len(d) for d in d_abl))})

    def stat(key, fn: Callable[[Tensor], Tensor]) -> float:
        vals = torch.tensor([r[key] for r in results if not math.isnan(r[key])], dtype=torch.float64)
        return float(fn(vals)) if len(vals) else math.nan

    return {"mean": stat("score", torch.mean), "median": stat("score", torch.median),
            "random_mean": stat("random", torch.mean), "random_median": stat("random", torch.median),
            "concat_mean": stat("concat", torch.mean), "random_concat_mean": stat("random_concat", torch.mean),
            "n_latents": len(results), "n_firing_latents": len(fired), "latents": results}
