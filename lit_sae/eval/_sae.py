"""Small adapters between eval code and an SAE (lit_sae.sae.TopKSAE or anything with encode/decode)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn


def sae_encode(sae: nn.Module, x: Tensor):
    """(values (N, k), indices (N, k), norm_state) of input-space ``x`` (N, d_in).

    ``norm_state`` is what the SAE's ``normalize_input`` returns (per-token statistics for ``layernorm``
    normalisation), needed to map a decoded code back to input space; None for SAEs without one."""
    state = sae.normalize_input(x)[1] if hasattr(sae, "normalize_input") else None
    values, indices = sae.encode(x)
    return values, indices, state


def sae_decode(sae: nn.Module, values: Tensor, indices: Tensor, state=None) -> Tensor:
    """Input-space reconstruction from a sparse code (passes ``state`` only to decoders that take it)."""
    if state is None:
        return sae.decode(values, indices)
    return sae.decode(values, indices, state)


def sae_param(sae: nn.Module) -> Tensor | None:
    """Any parameter of the SAE (for its dtype and device), or None."""
    return next(iter(sae.parameters()), None) if isinstance(sae, nn.Module) else None


def reconstructor(sae: nn.Module | Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """A function (N, d_in) -> (N, d_in) giving the SAE's input-space reconstruction.

    Accepts an SAE with encode/decode (the reconstruction is decode(encode(x))) or any callable (for
    baselines and tests, e.g. ``lambda x: x``). Inputs are cast to the SAE's dtype/device and back."""
    if not hasattr(sae, "encode"):
        return sae
    p = sae_param(sae)

    @torch.no_grad()
    def fn(x: Tensor) -> Tensor:
        xs = x.to(p.dtype if p is not None else torch.float32)
        if p is not None:
            xs = xs.to(p.device)
        v, i, state = sae_encode(sae, xs)
        return sae_decode(sae, v, i, state).to(device=x.device, dtype=x.dtype)

    return fn

