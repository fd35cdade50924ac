"""EleutherAI sparsify's layout: one folder per hookpoint holding ``cfg.json`` + ``sae.safetensors``.

sparsify (``sparsify/sparse_coder.py``, ``SparseCoder``) computes, for input-space x (d_in):

    pre = relu(encoder.weight @ (x - b_dec) + encoder.bias)       encoder.weight: (num_latents, d_in)
    top_acts, top_indices = topk(pre, k);  x_hat = top_acts @ W_dec[top_indices] + b_dec      W_dec: (num_latents, d_in)

``cfg.json`` holds the ``SparseCoderConfig`` fields (activation, expansion_factor, normalize_decoder, num_latents, k,
multi_topk, skip_connection, transcode) plus ``d_in``; ``SparseCoder.load_from_disk`` drops fields it does not know,
so lit-sae adds its own ``lit_sae`` section there. Hookpoints are the language model's module names
(``layers.20`` for the output of decoder layer 20, i.e. lit-sae's ``blocks.20.hook_resid_post``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

from torch import Tensor

from lit_sae.formats.common import as_float, fold_for_export, need

CONFIG, WEIGHTS = "cfg.json", "sae.safetensors"
_TO_MODULE = {"hook_resid_post": "", "hook_mlp_out": ".mlp", "hook_attn_out": ".self_attn"}


def is_sparsify_folder(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


def hookpoint_folders(path: Path) -> list[Path]:
    """The per-hookpoint folders under a sparsify run folder (each with cfg.json + sae.safetensors)."""
    return sorted(p for p in path.iterdir() if is_sparsify_folder(p)) if path.is_dir() else []


def hookpoint_of(hook_name: Optional[str]) -> str:
    """sparsify's module name for a lit-sae hook point: ``blocks.L.hook_resid_post`` -> ``layers.L``."""
    m = re.fullmatch(r"blocks\.(\d+)\.(hook_resid_post|hook_mlp_out|hook_attn_out)", hook_name or "")
    if m is None:
        raise ValueError(f"hook point {hook_name!r} has no sparsify module name: sparsify folders are named by "
                         "hookpoint (layers.L[.mlp|.self_attn]); export a blocks.L.hook_* SAE")
    return f"layers.{m.group(1)}{_TO_MODULE[m.group(2)]}"


def hook_name_of(hookpoint: str) -> Optional[str]:
    """Inverse of ``hookpoint_of`` for ``layers.L`` / ``h.L`` / ``layers.L.mlp`` / ``layers.L.self_attn``."""
    m = re.fullmatch(r"(?:\w+\.)*?(?:layers|h|blocks|layer)\.(\d+)(\.mlp|\.self_attn|\.attn)?", hookpoint)
    if m is None:
        return None
    kind = {None: "hook_resid_post", ".mlp": "hook_mlp_out", ".self_attn": "hook_attn_out", ".attn": "hook_attn_out"}
    return f"blocks.{m.group(1)}.{kind[m.group(2)]}"


def to_sparsify(kwargs: dict[str, Any], state: dict[str, Tensor], lit_sae: Optional[dict[str, Any]] = None
                ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, cfg) for ``SparseCoder.load_from_disk``. Raises ValueError for what sparsify cannot compute:
    a ``layernorm`` input normalisation or a non-topk activation (a ``scalar`` scale is folded)."""
    if kwargs.get("activation", "topk") != "topk":
        raise ValueError(f"activation={kwargs.get('activation')!r}: sparsify's SparseCoder computes TopK only; "
                         "export this SAE with --format saelens")
    if kwargs.get("normalize") == "layernorm":
        raise ValueError("normalize='layernorm': sparsify's SparseCoder has no input normalisation; export this "
                         "SAE with --format saelens (or openai)")
    w, info = fold_for_export(kwargs, state)
    tensors = {"encoder.weight": w["W_enc"], "encoder.bias": w["b_enc"], "W_dec": w["W_dec"], "b_dec": w["b_pre"]}
    n, d = w["W_dec"].shape
    cfg = {"activation": "topk", "expansion_factor": max(n // d, 1), "normalize_decoder": True, "num_latents": n,
           "k": int(kwargs["k"]), "multi_topk": bool(kwargs.get("multi_topk", False)), "skip_connection": False,
           "transcode": False, "d_in": d,
           "lit_sae": {"normalize": kwargs.get("normalize", "none"), "k_aux": kwargs.get("k_aux"), **info,
                       **(lit_sae or {})}}
    return {k: v.float().contiguous() for k, v in tensors.items()}, cfg


def from_sparsify(cfg: dict[str, Any], tensors: dict[str, Tensor], where: str | Path = CONFIG
                  ) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Any]]:
    """(TopKSAE kwargs, state dict, metadata) of a sparsify (cfg, tensors) pair; ValueError naming the field
    sparsify computes and lit-sae cannot (groupmax activation, skip connection, transcoder)."""
    where = Path(where)
    if cfg.get("activation", "topk") != "topk":
        raise ValueError(f"{where}: unsupported field activation={cfg['activation']!r} (lit-sae reads topk)")
    for key in ("skip_connection", "transcode"):
        if cfg.get(key):
            raise ValueError(f"{where}: unsupported field {key}=true (lit-sae reads plain sparse autoencoders)")
    need(tensors, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), where.with_name(WEIGHTS))
    W_enc, b_enc = as_float(tensors["encoder.weight"]), as_float(tensors["encoder.bias"])
    W_dec, b_dec = as_float(tensors["W_dec"]), as_float(tensors["b_dec"])
    n, d = W_enc.shape
    if "d_in" in cfg and int(cfg["d_in"]) != d or W_dec.shape != (n, d) or b_dec.shape != (d,):
        raise ValueError(f"{where}: d_in={cfg.get('d_in')} and tensor shapes encoder.weight {tuple(W_enc.shape)}, "
                         f"W_dec {tuple(W_dec.shape)}, b_dec {tuple(b_dec.shape)} disagree")
    k = int(cfg.get("k", 0))
    if not 0 < k <= n:
        raise ValueError(f"{where}: field k={k} must be in 1..num_latents={n}")
    kwargs = {"d_in": d, "n_latents": n, "k": k, "activation": "topk", "normalize": "none"}
    if (cfg.get("lit_sae") or {}).get("k_aux") is not None:
        kwargs["k_aux"] = cfg["lit_sae"]["k_aux"]
    hookpoint = where.parent.name
    meta = {"hook_name": (cfg.get("lit_sae") or {}).get("hook_name") or hook_name_of(hookpoint),
            "hookpoint": hookpoint}
    return kwargs, {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_pre": b_dec}, meta
