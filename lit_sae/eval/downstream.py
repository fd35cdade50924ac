"""Downstream loss: the language model's next-token loss with the hook point's activation replaced.

For each batch of token contexts the LM runs four times: clean, with the activation replaced by the SAE's
reconstruction, by zero, and by the mean activation. Reported (means over evaluated tokens):

    clean_ce, sae_ce, zero_ce, mean_ce       next-token cross-entropy (nats)
    delta_ce = sae_ce - clean_ce
    kl_sae, kl_zero, kl_mean                 KL(clean || spliced) of the next-token distributions, per token
    frac_recovered = (zero_ce - sae_ce) / (zero_ce - clean_ce)   (1: as good as clean, 0: as bad as zero ablation)
    frac_recovered_mean                     the same relative to mean ablation

A transcoder (``lit_sae.sae.transcoder``) replaces a computation, not an activation: with ``input_hook_point`` (its
input, e.g. ``blocks.L.ln2.hook_normalized``) the "sae" run reads the input at that hook and replaces the activation
at ``hook_point`` (its target, e.g. ``blocks.L.hook_mlp_out``) by the transcoder's prediction from it, in the same
forward: the MLP's output is the transcoder's (as circuit-tracer's replacement model computes it). Zero and mean
ablation replace the target activation as for an SAE.

Positions: the loss at position t is that of predicting token t+1 from the logits at t; positions t >= first_position
are evaluated (default 1: all but the first). The activation is replaced only at evaluated positions, and not at
tokens whose activation norm exceeds ``norm_threshold`` (the harvest's outlier filter): the SAE was never trained
on either, and position 0 (an attention sink in most LMs) would otherwise dominate every number. Both counts are
in the result.
"""

from __future__ import annotations

import logging
import math
from contextlib import ExitStack
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from lit_sae.data.lm import splice, truncated_forward
from lit_sae.sae.checks import check_token_ids

log = logging.getLogger(__name__)

__all__ = ["make_contexts", "splice_mask", "mean_activation", "downstream_loss", "token_losses"]


def reconstructor(sae: nn.Module | Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """A function (N, d_in) -> (N, d_in) giving the SAE's input-space reconstruction.

    ``sae``: an SAE with ``encode(x, return_info=True) -> (values, indices, info)`` and ``decode(values, indices,
    info)`` (``TopKSAE``'s interface, after OpenAI's ``encode -> (latents, info)``), or any callable (baselines and
    tests, e.g. ``lambda x: x``). Inputs are cast to the SAE's dtype/device and the result back to the input's."""
    if not hasattr(sae, "encode"):
        return sae
    p = next(iter(sae.parameters()), None)
    if hasattr(sae, "d_out"):  # a transcoder: (N, d_in) input -> (N, d_out) prediction of its target

        @torch.no_grad()
        def predict(x: Tensor) -> Tensor:
            return sae.reconstruct(x.to(p.device, p.dtype)).to(device=x.device, dtype=x.dtype)

        return predict

    @torch.no_grad()
    def fn(x: Tensor) -> Tensor:
        xs = x.to(p.device, p.dtype) if p is not None else x.float()
        return sae.decode(*sae.encode(xs, return_info=True)).to(device=x.device, dtype=x.dtype)

    return fn


def make_contexts(tokenizer, documents: Iterable[str], context_length: int, n_contexts: int | None = None) -> Tensor:
    """Token contexts (n, context_length) int64 cut from ``documents`` the way harvest cuts them.

    A thin wrapper over :func:`lit_sae.data.contexts.iter_contexts` (no special tokens added; windows never cross
    documents; a document's tail shorter than ``context_length`` is dropped). Raises ValueError if no document
    holds a full window."""
    from lit_sae.data.contexts import iter_contexts

    rows = [ids for _, ids in iter_contexts(tokenizer, documents, context_length, n_contexts)]
    if not rows:
        raise ValueError(f"no document has {context_length} tokens: cannot build evaluation contexts")
    if n_contexts is not None and len(rows) < n_contexts:
        log.warning("only %d contexts of %d tokens available (asked for %d)", len(rows), context_length, n_contexts)
    return torch.tensor(rows, dtype=torch.long)


def splice_mask(acts: Tensor, first_position: int = 1, norm_threshold: float | None = None) -> Tensor:
    """(B, T) bool: where an activation (B, T, d) is replaced (position >= first_position, norm <= threshold)."""
    B, T = acts.shape[:2]
    mask = torch.arange(T, device=acts.device).expand(B, T) >= first_position
    if norm_threshold is not None:
        mask = mask & (acts.float().norm(dim=-1) <= norm_threshold)
    return mask


@torch.no_grad()
def mean_activation(
    model: nn.Module,
    hook_point: str,
    input_ids: Tensor,
    *,
    first_position: int = 1,
    norm_threshold: float | None = None,
    batch_size: int = 8,
) -> Tensor:
    """Mean activation (d,) float64 over the positions ``splice_mask`` selects (runs layers up to the hook only).

    ``input_ids``: integer (n, T) token ids (ValueError otherwise)."""
    check_token_ids(input_ids)
    total, count = None, 0
    device = _device(model)
    for start in range(0, len(input_ids), batch_size):
        acts = truncated_forward(model, input_ids[start : start + batch_size].to(device), hook_point)
        mask = splice_mask(acts, first_position, norm_threshold)
        s = acts[mask].double().sum(0)
        total = s if total is None else total + s
        count += int(mask.sum())
    return total / max(count, 1)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _replacer(kind: str, reconstruct, mean: Tensor | None, first_position: int, norm_threshold: float | None):
    """fn(act (B, T, d)) -> act with the masked positions replaced as ``kind`` says."""

    def fn(act: Tensor) -> Tensor:
        mask = splice_mask(act, first_position, norm_threshold)
        out = act.clone()
        if kind == "sae":
            out[mask] = reconstruct(act[mask]).to(act.dtype)
        elif kind == "zero":
            out[mask] = 0
        elif kind == "mean":
            out[mask] = mean.to(act.dtype)
        else:  # pragma: no cover - internal
            raise ValueError(kind)
        return out

    return fn


def _transcoder_replacer(stack: ExitStack, model: nn.Module, input_hook_point: str, predict, first_position: int,
                         norm_threshold: float | None, input_norm_threshold: float | None):
    """fn(target act (B, T, d)) -> act with the masked positions replaced by ``predict`` of the input activation
    read at ``input_hook_point`` earlier in the same forward (a capture splice entered on ``stack``)."""
    held: dict[str, Tensor] = {}

    def grab(act: Tensor) -> Tensor:
        held["x"] = act
        return act

    stack.enter_context(splice(model, input_hook_point, grab))

    def fn(act: Tensor) -> Tensor:
        if "x" not in held:
            raise RuntimeError(f"{input_hook_point} was not reached before the target hook: it must come first")
        x = held.pop("x")
        mask = splice_mask(act, first_position, norm_threshold) & splice_mask(x, first_position, input_norm_threshold)
        out = act.clone()
        out[mask] = predict(x[mask]).to(act.dtype)
        return out

    return fn


def next_token_logprobs(logits: Tensor, first_position: int) -> Tensor:
    """(B * (T - 1 - first_position), V) log-probabilities of the logits (B, T, V) at positions first_position .. T-2
    (those that predict a token of the context), in float32 or wider (float64 logits stay float64)."""
    lp = logits[:, first_position:-1]
    if lp.dtype not in (torch.float32, torch.float64):
        lp = lp.float()
    return F.log_softmax(lp, dim=-1).flatten(0, 1)


def kl_per_token(clean_logprobs: Tensor, logprobs: Tensor) -> Tensor:
    """(N,) KL(clean || these) per position, nats: ``sum_v p_v (log p_v - log q_v)``."""
    return (clean_logprobs.exp() * (clean_logprobs - logprobs)).sum(-1)


def token_losses(logits: Tensor, input_ids: Tensor, clean_logprobs: Tensor | None, first_position: int):
    """Per evaluated token: (cross-entropy (n,), log-probs (n, V), KL(clean || these) (n,) or None), float32.

    logits (B, T, V) predict input_ids shifted by one; tokens at positions >= first_position (and < T - 1)."""
    lp = next_token_logprobs(logits.float(), first_position)
    target = input_ids[:, first_position + 1 :].flatten().to(lp.device)
    ce = -lp.gather(1, target[:, None]).squeeze(1)
    kl = kl_per_token(clean_logprobs, lp) if clean_logprobs is not None else None
    return ce, lp, kl


@torch.no_grad()
def downstream_loss(
    model: nn.Module,
    hook_point: str,
    sae: nn.Module | Callable[[Tensor], Tensor],
    input_ids: Tensor,
    *,
    first_position: int = 1,
    norm_threshold: float | None = None,
    mean: Tensor | None = None,
    batch_size: int = 8,
    ablations: Sequence[str] = ("zero", "mean"),
    progress: bool = True,
    input_hook_point: str | None = None,
    input_norm_threshold: float | None = None,
) -> dict:
    """Downstream loss of ``sae`` spliced into ``model`` at ``hook_point`` on contexts ``input_ids`` (n, T).

    ``sae``: an SAE with encode/decode, or any function (N, d) -> (N, d) of input-space activations.
    ``mean``: the mean-ablation vector (d,); computed over the same contexts when None.
    ``input_hook_point``: a transcoder's input (see the module docstring); ``sae`` then maps (N, d_in) activations at
    it to (N, d) at ``hook_point``, and tokens whose input norm exceeds ``input_norm_threshold`` are kept clean too.
    Returns a dict of floats (see the module docstring) plus token counts.

    Raises:
        ValueError: ``input_ids`` is not an integer (n, T) tensor, or T leaves no position after ``first_position``."""
    check_token_ids(input_ids)
    if input_ids.shape[1] < first_position + 2:
        raise ValueError(f"contexts of {input_ids.shape[1]} tokens leave nothing to evaluate after {first_position}")
    reconstruct = reconstructor(sae)
    device = _device(model)
    if "mean" in ablations and mean is None:
        mean = mean_activation(model, hook_point, input_ids, first_position=first_position,
                               norm_threshold=norm_threshold, batch_size=batch_size)
    kinds = ["sae", *ablations]
    sums = {f"{k}_ce": 0.0 for k in ["clean", *kinds]} | {f"kl_{k}": 0.0 for k in kinds}
    n_tokens = n_spliced = n_candidates = 0
    bar = tqdm(range(0, len(input_ids), batch_size), desc="downstream loss", unit="batch", disable=not progress)
    for start in bar:
        ids = input_ids[start : start + batch_size].to(device)
        captured = {}

        def capture(act: Tensor) -> Tensor:
            captured["mask"] = splice_mask(act, first_position, norm_threshold)
            return act

        with splice(model, hook_point, capture):
            clean_logits = model(input_ids=ids, use_cache=False).logits
        ce, clean_lp, _ = token_losses(clean_logits, ids, None, first_position)
        del clean_logits
        sums["clean_ce"] += ce.double().sum().item()
        n_tokens += ce.numel()
        n_spliced += int(captured["mask"].sum())
        n_candidates += captured["mask"].shape[0] * (captured["mask"].shape[1] - first_position)
        for kind in kinds:
            with ExitStack() as stack:
                if kind == "sae" and input_hook_point is not None:
                    fn = _transcoder_replacer(stack, model, input_hook_point, reconstruct, first_position,
                                              norm_threshold, input_norm_threshold)
                else:
                    fn = _replacer(kind, reconstruct, mean, first_position, norm_threshold)
                stack.enter_context(splice(model, hook_point, fn))
                logits = model(input_ids=ids, use_cache=False).logits
            ce, _, kl = token_losses(logits, ids, clean_lp, first_position)
            sums[f"{kind}_ce"] += ce.double().sum().item()
            sums[f"kl_{kind}"] += kl.double().sum().item()
        bar.set_postfix(delta_ce=(sums["sae_ce"] - sums["clean_ce"]) / n_tokens)
    out = {k: v / n_tokens for k, v in sums.items()}
    out["delta_ce"] = out["sae_ce"] - out["clean_ce"]
    for kind in ablations:
        gap = out[f"{kind}_ce"] - out["clean_ce"]
        key = "frac_recovered" if kind == "zero" else f"frac_recovered_{kind}"
        out[key] = (out[f"{kind}_ce"] - out["sae_ce"]) / gap if gap != 0 else math.nan
    out.update(n_contexts=len(input_ids), context_length=int(input_ids.shape[1]), n_tokens=n_tokens,
               n_spliced=n_spliced, n_kept_clean=n_candidates - n_spliced, first_position=first_position,
               norm_threshold=norm_threshold, hook_point=hook_point,
               **({"input_hook_point": input_hook_point} if input_hook_point is not None else {}))
    return out
