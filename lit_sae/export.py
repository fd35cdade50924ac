"""Export a trained SAE as ``cfg.json`` + ``sae_weights.safetensors`` in SAELens's layout, and load it back."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from lit_sae.sae import TopKSAE

WEIGHTS, CONFIG = "sae_weights.safetensors", "cfg.json"


def _hook_layer(hook_point: Optional[str]) -> Optional[int]:
    parts = (hook_point or "").split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() else None


@torch.no_grad()
def export_sae(sae: TopKSAE, out_dir: str | Path, *, hook_point: Optional[str] = None, lm_name: Optional[str] = None):
    """Write ``sae`` to ``out_dir`` for SAELens: W_enc (d_in, d_sae), b_enc, W_dec (d_sae, d_in), b_dec.

    A ``scalar`` input scale s is folded into the weights (W_enc * s, W_dec / s, b_dec = b_pre / s), so the export
    takes raw activations. ``layernorm`` cannot be folded and is recorded as ``normalize_activations: layer_norm``.
    Files are written to a temporary folder and renamed, so a crash never leaves half an export.
    """
    s = float(sae.norm_scale) if sae.normalize == "scalar" else 1.0
    tensors = {
        "W_enc": (sae.W_enc * s).T.contiguous().float().cpu(),
        "b_enc": sae.b_enc.float().cpu(),
        "W_dec": (sae.W_dec / s).contiguous().float().cpu(),
        "b_dec": (sae.b_pre / s).float().cpu(),
    }
    if sae.activation == "batchtopk":
        tensors["threshold"] = sae.threshold.reshape(1).float().cpu()
    cfg = {
        "architecture": "topk" if sae.activation == "topk" else "batchtopk",
        "d_in": sae.d_in,
        "d_sae": sae.n_latents,
        "k": sae.k,
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": sae.k},
        "apply_b_dec_to_input": True,
        "normalize_activations": "layer_norm" if sae.normalize == "layernorm" else "none",
        "model_name": lm_name,
        "hook_name": hook_point,
        "hook_layer": _hook_layer(hook_point),
        "hook_head_index": None,
        "dtype": "float32",
        "device": "cpu",
        "lit_sae": {"normalize": sae.normalize, "folded_scale": s, "k_aux": sae.k_aux, "auxk_coef": sae.auxk_coef,
                    "multi_topk": sae.multi_topk, "threshold": float(sae.threshold)},
    }
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    save_file(tensors, str(tmp / WEIGHTS))
    (tmp / CONFIG).write_text(json.dumps(cfg, indent=2))
    if out.exists():
        for name in (WEIGHTS, CONFIG):
            os.replace(tmp / name, out / name)
        tmp.rmdir()
    else:
        os.replace(tmp, out)
    return out


def load_exported(path: str | Path) -> tuple[TopKSAE, dict]:
    """Rebuild a ``TopKSAE`` from an export folder (the scale stays folded: the SAE takes raw activations)."""
    path = Path(path)
    for name in (CONFIG, WEIGHTS):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name}: missing; an exported SAE folder holds {CONFIG} and {WEIGHTS}")
    cfg = json.loads((path / CONFIG).read_text())
    w = load_file(str(path / WEIGHTS))
    extra = cfg.get("lit_sae", {})
    sae = TopKSAE(
        cfg["d_in"],
        cfg["d_sae"],
        cfg["k"],
        k_aux=extra.get("k_aux"),
        multi_topk=False,
        activation="batchtopk" if cfg["architecture"] == "batchtopk" else "topk",
        normalize="layernorm" if cfg.get("normalize_activations") == "layer_norm" else "none",
    )
    sae.W_enc.data.copy_(w["W_enc"].T)
    sae.b_enc.data.copy_(w["b_enc"])
    sae.W_dec.data.copy_(w["W_dec"])
    sae.b_pre.data.copy_(w["b_dec"])
    if "threshold" in w:
        sae.threshold.copy_(w["threshold"][0])
    sae.data_initialized.fill_(True)
    return sae, cfg


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path) -> Path:
    """Export the SAE of a ``lit-sae fit`` checkpoint (its EMA weights when EMA was on) to ``out_dir``."""
    from contextlib import nullcontext

    from lit_sae.module import SAEModule

    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"{ckpt_path}: no such checkpoint")
    module = SAEModule.load_from_checkpoint(str(ckpt_path), map_location="cpu", weights_only=False)
    ctx = module.ema.swapped_into(module.sae) if module.ema is not None else nullcontext()
    with ctx:
        return export_sae(module.sae, out_dir, hook_point=module.hparams.hook_point, lm_name=module.hparams.lm_name)
