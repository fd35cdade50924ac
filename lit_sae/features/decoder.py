"""What a latent's decoder row does, read from the weights alone: logit effects and nearest decoder neighbours."""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

__all__ = ["final_norm_and_unembedding", "logit_effects", "decoder_neighbours"]

_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f")


def final_norm_and_unembedding(model: nn.Module) -> tuple[Tensor | None, Tensor]:
    """(g (d,) or None, W_U (V, d)): the final norm's weight and the LM head's weight of a transformers LM.

    Raises ValueError when the model has no output embedding."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__} has no output embedding (LM head): logit effects need one")
    base = getattr(model, "base_model", model)
    g = None
    for name in _NORM_NAMES:
        norm = getattr(base, name, None)
        if isinstance(norm, nn.Module) and isinstance(getattr(norm, "weight", None), Tensor):
            g = norm.weight.detach()
            break
    if g is None:
        log.warning("no final norm found on %s: logit effects use W_U W_dec[i] without its weight",
                    type(model).__name__)
    return g, head.weight.detach()


@torch.no_grad()
def logit_effects(W_dec: Tensor, W_U: Tensor, g: Tensor | None = None, n: int = 10, chunk: int = 256,
                  center: bool = False, scale: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top and bottom ``n`` tokens of each latent's direct effect on the logits, ``W_U (g * W_dec[i])``.

    ``center``: rank the effect relative to the mean over latents, ``W_U (g * (W_dec[i] - mean_j W_dec[j]))``
    (the map is linear, so this is the latent's effect minus the mean effect). With a tied unembedding every decoder
    direction promotes much the same tokens. ``scale``: divide each token's centred effect by its standard deviation
    over latents, sqrt(u_v^T Cov(W_dec) u_v) with u_v = g * W_U[v] (exact: the map is linear), i.e. a z-score per
    token. Centring alone does not change which tokens win (measured on the demo SAE: ' strugg' stays in the top 10
    of about 320 of 4,096 latents): they are tokens whose effect varies widely across every latent; the z-score
    ranks tokens by how unusual the effect is for this latent.

    W_dec (L, d) decoder rows (in the LM's activation space), W_U (V, d), g (d,) the final norm's weight.
    Returns (top_values (L, n), top_tokens (L, n), bottom_values (L, n), bottom_tokens (L, n)); float32 / int64.

    Approximation (as SAEDashboard's logit tables): the final norm is treated as the fixed linear map x -> g * x,
    i.e. its division by the token's RMS (or standard deviation) and its centring are ignored, so values are
    relative (useful to rank tokens, not calibrated logit changes); later layers between the hook point and the
    final norm are skipped. Done in chunks of ``chunk`` latents: memory chunk x V.
    """
    L = W_dec.shape[0]
    n = min(n, W_U.shape[0])
    out = [torch.empty(L, n), torch.empty(L, n, dtype=torch.long),
           torch.empty(L, n), torch.empty(L, n, dtype=torch.long)]
    W_U = W_U.float()
    mean = W_dec.float().mean(0) if center or scale else None
    inv_sd = None
    if scale:
        D = W_dec.float() - mean
        cov = D.T @ D / max(1, L - 1)
        U = W_U * g.float().to(W_U.device) if g is not None else W_U
        inv_sd = ((U @ cov.to(W_U.device)) * U).sum(1).clamp_min(1e-30).rsqrt()  # (V,)
    for s in range(0, L, chunk):
        rows = W_dec[s:s + chunk].float().to(W_U.device)
        if mean is not None:
            rows = rows - mean.to(W_U.device)
        if g is not None:
            rows = rows * g.float().to(W_U.device)
        logits = rows @ W_U.T
        if inv_sd is not None:
            logits = logits * inv_sd
        top, bot = logits.topk(n, dim=1), logits.topk(n, dim=1, largest=False)
        out[0][s:s + chunk], out[1][s:s + chunk] = top.values.cpu(), top.indices.cpu()
        out[2][s:s + chunk], out[3][s:s + chunk] = bot.values.cpu(), bot.indices.cpu()
    return tuple(out)


@torch.no_grad()
def decoder_neighbours(W_dec: Tensor, n: int = 5, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """The ``n`` latents whose decoder rows are nearest by cosine similarity to each latent's (itself excluded).

    W_dec (L, d). Returns (cosines (L, n) float32, latent ids (L, n) int64). Cost L^2 d flops in chunks of
    ``chunk`` rows (memory chunk x L): about 4 s for L = 16k, d = 768 on 2 CPU cores; at L = 1M it is
    hours on a CPU (run it on a GPU)."""
    W = W_dec.float()
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    L = W.shape[0]
    n = min(n, L - 1)
    cos, ids = torch.empty(L, n), torch.empty(L, n, dtype=torch.long)
    for s in range(0, L, chunk):
        sim = W[s:s + chunk] @ W.T
        sim[torch.arange(sim.shape[0]), torch.arange(s, s + sim.shape[0])] = -float("inf")
        top = sim.topk(n, dim=1)
        cos[s:s + chunk], ids[s:s + chunk] = top.values.cpu(), top.indices.cpu()
    return cos, ids
