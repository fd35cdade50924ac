"""Ablation sparsity (Gao et al. 2024, section 4.5): are a latent's downstream effects concentrated on few logits?

The paper's definition, followed here:

1. At one token position p of a context, the latent is ablated: its contribution z_i W_dec[i] (exactly, through the
   SAE's decode, so any input normalisation is undone) is subtracted from the residual stream at p only. The rest of
   the activation (the SAE's error term included) stays as it is, so the reference is the clean forward pass.
2. The change of the next-token logits at the window of positions p, p+1, ..., p+window-1 (the paper: T = 16 future
   tokens, the ablated one included), one vector of V numbers per position.
3. A constant shift of all logits changes no probability: at each position the *median* logit change over the
   vocabulary is subtracted.
4. The window's vectors are concatenated into one vector of V * window numbers and its sparsity is

       (||delta||_1 / ||delta||_2)^2 / (V * window)

   the "effective number of logits affected" as a fraction: 1/(V * window) when one logit moves, 2/pi for a
   Gaussian change. Lower is sparser.

Baselines (the paper compares with the first): ``basis``, the same computation for a residual-stream basis direction
(channel j, drawn at random, set to zero at p); ``random``, a random direction with the norm of the latent's own
contribution subtracted at p. The effect of a latent is measured at up to ``contexts_per_latent`` positions (one per
context) where it fires; a position whose window fits in the context is preferred.

Cost: one forward of (1 + 3 x jobs) contexts per evaluation context (the clean one and every ablation on it).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from typing import Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lit_sae.data.lm import splice, truncated_forward
from lit_sae.eval.downstream import splice_mask
from lit_sae.sae.checks import check_token_ids

log = logging.getLogger(__name__)

__all__ = ["effect_sparsity", "ablation_sparsity", "WINDOW"]

WINDOW = 16  # future tokens whose logits are concatenated, the ablated one included (the paper: T = 16)
KINDS = ("latent", "basis", "random")


def effect_sparsity(delta: Tensor) -> float:
    """(||d||_1 / ||d||_2)^2 / d.numel() of a logit change ``delta`` (P, V) after subtracting, at each position, the
    median change over the vocabulary (float64); nan when nothing changed."""
    d = delta.double()
    d = d - d.median(dim=-1, keepdim=True).values
    l2sq = float(d.pow(2).sum())
    if l2sq <= 0:
        return math.nan
    return float(d.abs().sum()) ** 2 / (l2sq * d.numel())


def _choose_jobs(indices: Tensor, firing: Tensor, pos: Tensor, latents: list[int], per_latent: int, T: int,
                 window: int, g: torch.Generator) -> list[tuple[int, int, int]]:
    """(latent, row, context) jobs: up to ``per_latent`` firing rows per latent, in distinct contexts, preferring
    positions whose window fits in the context."""
    jobs = []
    for latent in latents:
        rows = ((indices == latent) & firing).any(1).nonzero().squeeze(1)
        if len(rows) == 0:
            log.warning("latent %d never fires on the evaluation contexts; skipped", latent)
            continue
        rows = rows[torch.randperm(len(rows), generator=g)]
        fits = pos[rows, 1] + window <= T
        rows = torch.cat([rows[fits], rows[~fits]])
        seen = set()
        for r in rows.tolist():
            c = int(pos[r, 0])
            if c in seen:
                continue
            seen.add(c)
            jobs.append((int(latent), r, c))
            if len(seen) == per_latent:
                break
    return jobs


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
    window: int = WINDOW,
    first_position: int = 1,
    norm_threshold: float | None = None,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Ablation sparsity of ``n_latents`` random firing latents (or the given ``latents``) on contexts (n, T) int64,
    with the residual-stream basis and random-direction baselines (see the module docstring).

    Returns {"mean", "median" (over latents of each latent's mean score), "basis_mean", "basis_median",
    "random_mean", "random_median" (over the same positions), "n_latents", "n_firing_latents", "window",
    "definition", "latents": [{"latent", "score", "basis", "random", "n_contexts"}]}. ``batch_size`` is the most
    contexts in one forward.

    Raises:
        ValueError: ``input_ids`` is not an integer (n, T) tensor, or ``window`` < 1."""
    check_token_ids(input_ids)
    if window < 1:
        raise ValueError(f"window={window} must be >= 1 (the paper: 16 future tokens)")
    device = next(model.parameters()).device
    p = next(iter(sae.parameters()), None)
    sae_device, sae_dtype = (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)
    T, d_in = input_ids.shape[1], None
    acts = torch.cat([truncated_forward(model, input_ids[s: s + batch_size].to(device), hook_point).float().cpu()
                      for s in range(0, len(input_ids), batch_size)])
    d_in = acts.shape[-1]
    mask = splice_mask(acts, first_position, norm_threshold)
    pos = mask.nonzero()  # (R, 2): context, position of every encoded row
    values, indices, state = sae.encode(acts[mask].to(sae_device, sae_dtype), return_info=True)
    values, indices = values.float().cpu(), indices.cpu()
    firing = values > 0
    fired = indices[firing].unique()
    g = torch.Generator().manual_seed(seed)
    if latents is None:
        chosen = fired[torch.randperm(len(fired), generator=g)[:n_latents]].tolist()
    else:
        chosen = [int(i) for i in latents]
    jobs = _choose_jobs(indices, firing, pos, chosen, contexts_per_latent, T, window, g)

    # The ablated activation of every job and baseline: clean minus what is removed at one position.
    removed = {kind: [] for kind in KINDS}
    for latent, r, c in jobs:
        v = values[r: r + 1].clone()
        info = _state_rows(state, torch.tensor([r], device=sae_device))
        full = sae.decode(v.to(sae_device, sae_dtype), indices[r: r + 1].to(sae_device), info).float().cpu()
        v[indices[r: r + 1] == latent] = 0
        without = sae.decode(v.to(sae_device, sae_dtype), indices[r: r + 1].to(sae_device), info).float().cpu()
        contribution = (full - without)[0]
        removed["latent"].append(contribution)
        x = acts[c, int(pos[r, 1])]
        j = int(torch.randint(d_in, (1,), generator=g))
        removed["basis"].append(torch.zeros(d_in).index_fill_(0, torch.tensor([j]), float(x[j])))
        u = torch.randn(d_in, generator=g)
        removed["random"].append(u / u.norm() * contribution.norm())

    scores = {kind: [math.nan] * len(jobs) for kind in KINDS}
    by_context = defaultdict(list)
    for n, (_, r, c) in enumerate(jobs):
        by_context[c].append(n)
    per_forward = max(1, (batch_size - 1) // len(KINDS))
    for c, job_ids in tqdm(by_context.items(), desc="ablation sparsity", disable=not progress):
        for s in range(0, len(job_ids), per_forward):
            chunk = job_ids[s: s + per_forward]
            batch = acts[c].expand(1 + len(KINDS) * len(chunk), T, d_in).clone()
            for m, n in enumerate(chunk):
                t = int(pos[jobs[n][1], 1])
                for q, kind in enumerate(KINDS):
                    batch[1 + m * len(KINDS) + q, t] -= removed[kind][n]
            replacement = batch.to(device)

            def fn(a: Tensor, replacement=replacement) -> Tensor:
                return replacement.to(a.dtype)

            ids = input_ids[c: c + 1].expand(len(batch), T).to(device)
            with splice(model, hook_point, fn):
                logits = model(input_ids=ids, use_cache=False).logits.float().cpu()
            for m, n in enumerate(chunk):
                t = int(pos[jobs[n][1], 1])
                for q, kind in enumerate(KINDS):
                    delta = logits[1 + m * len(KINDS) + q, t: t + window] - logits[0, t: t + window]
                    scores[kind][n] = effect_sparsity(delta)

    results = []
    for latent in dict.fromkeys(j[0] for j in jobs):
        ns = [n for n, j in enumerate(jobs) if j[0] == latent]
        row = {"latent": int(latent), "n_contexts": len(ns)}
        row.update({("score" if kind == "latent" else kind): _nanmean([scores[kind][n] for n in ns]) for kind in KINDS})
        results.append(row)

    def stat(key: str, fn) -> float:
        vals = torch.tensor([r[key] for r in results if not math.isnan(r[key])], dtype=torch.float64)
        return float(fn(vals)) if len(vals) else math.nan

    return {"mean": stat("score", torch.mean), "median": stat("score", torch.median),
            "basis_mean": stat("basis", torch.mean), "basis_median": stat("basis", torch.median),
            "random_mean": stat("random", torch.mean), "random_median": stat("random", torch.median),
            "n_latents": len(results), "n_firing_latents": len(fired), "window": window,
            "definition": "Gao et al. 2024 s4.5: one position ablated; logits of `window` positions from it; "
                          "median over the vocabulary subtracted per position; (L1/L2)^2 / (V * window)",
            "latents": results}


def _nanmean(xs: list[float]) -> float:
    kept = [x for x in xs if not math.isnan(x)]
    return sum(kept) / len(kept) if kept else math.nan


def _state_rows(state, rows: Tensor):
    """Select rows of an SAE normalisation state (None, a tensor, or a tuple of per-row tensors)."""
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(_state_rows(s, rows) for s in state)
    if isinstance(state, Tensor) and state.dim() > 0 and state.shape[0] > 1:
        return state[rows]
    return state
