"""OpenAI's released v5 TopK SAEs: a ``torch.save``d state dict of ``sparse_autoencoder.model.Autoencoder``.

openai/sparse_autoencoder ``sparse_autoencoder/model.py`` computes, for input-space x (d_in):

    x', (mu, std) = LN(x)     x - mean, divided by (std + 1e-5) (unbiased std); only when activation is TopK
    latents = TopK(encoder.weight @ (x' - pre_bias) + latent_bias), ReLU on the kept values
    x_hat = (decoder.weight @ latents + pre_bias) * std + mu

Keys: ``pre_bias`` (d_in,), ``latent_bias`` (n,), ``encoder.weight`` (n, d_in), ``decoder.weight`` (d_in, n),
``activation`` ("TopK" / "ReLU"), ``activation_state_dict`` ({"k": int, "postact_fn": "ReLU"}), and statistics
buffers (``stats_last_nonzero``, ...) that do not take part in the computation. ``Autoencoder.from_state_dict``
turns the input LayerNorm on exactly when the activation is TopK, so lit-sae writes this layout only for
``normalize="layernorm"`` topk SAEs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lit_sae.formats.common import as_float, fold_for_export, need

WEIGHTS = "sae.pt"


def is_openai_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and "pre_bias" in obj and "encoder.weight" in obj and "latent_bias" in obj


def from_openai(sd: dict[str, Any], where: str | Path) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Any]]:
    """(TopKSAE kwargs, state dict, metadata) of a v5 state dict; ValueError naming the unsupported field."""
    where = Path(where)
    need(sd, ("pre_bias", "latent_bias", "encoder.weight", "decoder.weight"), where)
    act = sd.get("activation", "ReLU")
    W_enc, b_enc = as_float(sd["encoder.weight"]), as_float(sd["latent_bias"])
    W_dec, b_pre = as_float(sd["decoder.weight"]).T.contiguous(), as_float(sd["pre_bias"])
    n, d = W_enc.shape
    if W_dec.shape != (n, d):
        raise ValueError(f"{where}: decoder.weight {tuple(sd['decoder.weight'].shape)} does not match "
                         f"encoder.weight {tuple(W_enc.shape)}")
    if act == "TopK":
        post = (sd.get("activation_state_dict") or {}).get("postact_fn", "ReLU")
        if post != "ReLU":
            raise ValueError(f"{where}: unsupported field activation_state_dict.postact_fn={post!r} (lit-sae: ReLU)")
        k = int((sd.get("activation_state_dict") or {}).get("k", 0))
        if not 0 < k <= n:
            raise ValueError(f"{where}: field activation_state_dict.k={k} must be in 1..{n}")
        kwargs = {"d_in": d, "n_latents": n, "k": k, "activation": "topk", "normalize": "layernorm"}
    elif act == "ReLU":
        kwargs = {"d_in": d, "n_latents": n, "k": n, "activation": "relu", "normalize": "none"}
    else:
        raise ValueError(f"{where}: unsupported field activation={act!r} (lit-sae reads TopK and ReLU)")
    return kwargs, {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_pre": b_pre}, {}


def to_openai(kwargs: dict[str, Any], state: dict[str, Tensor]) -> dict[str, Any]:
    """A v5 state dict (for ``torch.save``) of a topk SAE with ``normalize="layernorm"``; ValueError otherwise."""
    if kwargs.get("activation", "topk") != "topk" or kwargs.get("normalize") != "layernorm":
        raise ValueError("OpenAI's v5 layout implies TopK with a per-token LayerNorm on the input: only "
                         "activation='topk', normalize='layernorm' SAEs can be written in it; use --format saelens")
    w, _ = fold_for_export(kwargs, state)
    n = w["W_dec"].shape[0]
    return {"pre_bias": w["b_pre"].float(), "latent_bias": w["b_enc"].float(),
            "encoder.weight": w["W_enc"].float().contiguous(), "decoder.weight": w["W_dec"].T.float().contiguous(),
            "stats_last_nonzero": torch.zeros(n, dtype=torch.long),
            "latents_activation_frequency": torch.ones(n), "latents_mean_square": torch.zeros(n),
            "activation": "TopK", "activation_state_dict": {"k": int(kwargs["k"]), "postact_fn": "ReLU"}}
