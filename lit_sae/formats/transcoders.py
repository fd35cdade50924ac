"""Transcoder layouts: SAELens's transcoder folders and circuit-tracer's per-layer transcoder files (pure conversions).

Both libraries compute, for raw input-space x (d_in) and a prediction of the target (d_out):

    pre = x @ W_enc + b_enc                (no input centring: lit-sae's b_pre is folded into b_enc)
    z   = relu(pre)  |  relu(pre) * (pre > threshold)          (ReLU or JumpReLU; neither has TopK transcoders)
    y   = z @ W_dec + b_dec  [+ x @ W_skip.T]                   W_skip: (d_out, d_in)

- SAELens (``sae_lens/saes/transcoder.py``, >= 6.x): ``cfg.json`` + ``sae_weights.safetensors``; architectures
  ``transcoder`` / ``skip_transcoder`` (ReLU) and ``jumprelu_transcoder`` / ``jumprelu_skip_transcoder``;
  W_enc (d_in, d_sae), W_dec (d_sae, d_out), ``apply_b_dec_to_input`` false, ``d_out`` in the config.
- circuit-tracer (``circuit_tracer/transcoder/single_layer_transcoder.py``, ``load_relu_transcoder``): one
  safetensors file per layer with W_enc (d_sae, d_model), W_dec (d_sae, d_model), b_enc, b_dec, optional
  ``W_skip`` (d_model, d_model) and, for JumpReLU, ``activation_function.threshold`` (its JumpReLU is
  ``pre * (pre > threshold)``, equal to lit-sae's ``relu(pre) * (pre > threshold)`` once the threshold is clamped at
  0, which the export does). Input and target have one width (d_model). A set is a folder of ``layer_{L}.safetensors``
  files and a ``config.yaml`` (model_kind transcoder_set, feature_input_hook, feature_output_hook, transcoders).

lit-sae's ``batchtopk`` / ``matryoshka_batchtopk`` transcoders are exported as JumpReLU with their inference
threshold on every latent (as SAELens saves BatchTopK SAEs); ``topk`` ones have no layout in either library.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from lit_sae.formats.common import NORM_TOLERANCE, as_float, need

CT_CONFIG = "config.yaml"
THRESHOLD_CODES = ("batchtopk", "matryoshka_batchtopk", "jumprelu")
SAELENS_ARCH = {("relu", False): "transcoder", ("relu", True): "skip_transcoder",
                ("jumprelu", False): "jumprelu_transcoder", ("jumprelu", True): "jumprelu_skip_transcoder"}


def ct_file(layer: Optional[int]) -> str:
    """circuit-tracer's per-layer file name (``layer_{L}.safetensors``, as its cache writes them)."""
    return f"layer_{layer if layer is not None else 0}.safetensors"


def family(activation: str) -> Optional[str]:
    """``relu`` or ``jumprelu``: the code a transcoder of ``activation`` is exported as (None: no layout)."""
    return "relu" if activation == "relu" else "jumprelu" if activation in THRESHOLD_CODES else None


def check_exportable(kwargs: dict[str, Any], layout: str) -> None:
    """Raise ValueError (the key and the fix) unless ``layout`` (``saelens`` / ``circuit-tracer``) holds this
    transcoder."""
    activation = kwargs.get("activation", "topk")
    if family(activation) is None:
        raise ValueError(f"model.activation={activation!r}: {layout}'s transcoders are ReLU or JumpReLU only, so a "
                         f"{activation} transcoder has no {layout} layout; train with model.activation: batchtopk "
                         "(exported as JumpReLU with its threshold) or jumprelu, or export with --format saelens "
                         "to lit-sae's own reading of the layout")
    if layout == "circuit-tracer" and int(kwargs.get("d_out") or kwargs["d_in"]) != int(kwargs["d_in"]):
        raise ValueError(f"model.d_out={kwargs.get('d_out')} differs from d_in={kwargs['d_in']}: circuit-tracer's "
                         "transcoders map d_model to d_model; export with --format saelens instead")


def fold_transcoder(kwargs: dict[str, Any], state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """float64 weights taking raw x and giving raw y, without b_pre, with unit-norm W_dec rows.

    With x_n = s x and y_n = t y (``normalize='scalar'``; s = t = 1 otherwise):
    pre = W_enc (s x - b_pre) + b_enc = s (W_enc x + (b_enc - W_enc b_pre) / s), and every code commutes with a
    positive factor, so z = s z' with b_enc' = (b_enc - W_enc b_pre) / s and thresholds / s; then
    y = (W_dec^T z + b_dec + W_skip s x) / t = (s / t) W_dec^T z' + b_dec / t + (s / t) W_skip x. Finally each decoder
    row i (norm n_i) is divided by n_i and encoder row i, b_enc_i and threshold_i multiplied by it (exact for ReLU
    and JumpReLU; for TopK a factor common to all rows does not change the selection). Returns (tensors, info).
    """
    scalar = kwargs.get("normalize") == "scalar"
    s = float(state["norm_scale"]) if scalar else 1.0
    t = float(state["target_scale"]) if scalar else 1.0
    g = {k: v.detach().double().cpu() for k, v in state.items() if isinstance(v, Tensor)}
    W_enc, W_dec = g["W_enc"].clone(), g["W_dec"] * (s / t)
    b_enc = (g["b_enc"] - W_enc @ g["b_pre"]) / s
    threshold = None
    if kwargs.get("activation") in THRESHOLD_CODES:
        threshold = g["threshold"].expand(W_dec.shape[0]).clone() / s
    norms = W_dec.norm(dim=1)
    if bool((norms == 0).any()):
        raise ValueError(f"{int((norms == 0).sum())} decoder rows are zero: such a transcoder cannot be exported")
    W_dec /= norms[:, None]
    W_enc *= norms[:, None]
    b_enc = b_enc * norms
    if threshold is not None:
        threshold = threshold * norms
    out = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": g["b_dec"] / t, "threshold": threshold,
           "W_skip": g["W_skip"] * (s / t) if "W_skip" in g else None}
    deviation = float((norms / norms.mean() - 1).abs().max())
    info: dict[str, Any] = {"folded_scale": s, "folded_target_scale": t}
    if deviation > NORM_TOLERANCE:
        info["decoder_renormalized"] = {"max_abs_norm_deviation": deviation}
    return out, info


def to_saelens_transcoder(kwargs: dict[str, Any], state: dict[str, Tensor], metadata: dict[str, Any],
                          lit_sae: Optional[dict[str, Any]] = None, *, strict: bool = True
                          ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, cfg) in SAELens's transcoder layout. ``metadata``: hook_name (the input's), hook_name_out (the
    target's), model_name, context_size, prepend_bos, dataset_path. ``strict=False`` writes a topk transcoder with
    architecture ``topk_transcoder`` (lit-sae reads it; SAELens has no such class). Raises ValueError otherwise."""
    activation = kwargs.get("activation", "topk")
    if strict or family(activation) is not None:
        check_exportable(kwargs, "saelens")
    w, info = fold_transcoder(kwargs, state)
    skip = bool(kwargs.get("skip"))
    fam = family(activation)
    arch = SAELENS_ARCH[(fam, skip)] if fam else ("topk_skip_transcoder" if skip else "topk_transcoder")
    tensors = {"W_enc": w["W_enc"].T, "b_enc": w["b_enc"], "W_dec": w["W_dec"], "b_dec": w["b_dec"]}
    if fam == "jumprelu":
        tensors["threshold"] = w["threshold"]
    if skip:
        tensors["W_skip"] = w["W_skip"]
    meta = {k: metadata.get(k) for k in ("model_name", "hook_name", "hook_name_out", "context_size", "prepend_bos",
                                         "dataset_path")}
    meta["model_from_pretrained_kwargs"] = {}
    cfg = {"architecture": arch, "d_in": int(kwargs["d_in"]), "d_sae": int(kwargs["n_latents"]),
           "d_out": int(kwargs.get("d_out") or kwargs["d_in"]), "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none",
           **({"k": int(kwargs["k"])} if fam is None else {}), **meta, "metadata": meta,
           "lit_sae": {"transcoder": True, "activation": activation, "skip": skip, "k": int(kwargs["k"]),
                       "normalize": kwargs.get("normalize", "none"), **info, **(lit_sae or {})}}
    return {k: v.float().contiguous() for k, v in tensors.items()}, cfg


def is_saelens_transcoder(cfg: dict[str, Any]) -> bool:
    return str(cfg.get("architecture", "")).endswith("transcoder")


def from_saelens_transcoder(cfg: dict[str, Any], tensors: dict[str, Tensor], where: str | Path
                            ) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Any]]:
    """(Transcoder kwargs, state, metadata) of a SAELens transcoder folder (any of the four architectures, or
    lit-sae's topk_transcoder); raises ValueError naming ``where`` and the field it cannot represent."""
    where = Path(where)
    arch = cfg.get("architecture")
    known = {**{v: k for k, v in SAELENS_ARCH.items()}, "topk_transcoder": ("topk", False),
             "topk_skip_transcoder": ("topk", True)}
    if arch not in known:
        raise ValueError(f"{where}: unsupported field architecture={arch!r}: lit-sae reads {', '.join(known)}")
    if (cfg.get("normalize_activations") or "none") != "none" or cfg.get("apply_b_dec_to_input"):
        raise ValueError(f"{where}: unsupported field normalize_activations / apply_b_dec_to_input (a transcoder "
                         "takes raw activations)")
    fam, skip = known[arch]
    need(tensors, ("W_enc", "b_enc", "W_dec", "b_dec", *(("W_skip",) if skip else ()),
                   *(("threshold",) if fam == "jumprelu" else ())), where)
    own = cfg.get("lit_sae") or {}
    W_enc = as_float(tensors["W_enc"]).T.contiguous()
    k = int(cfg.get("k") or own.get("k") or 1) if fam == "topk" else int(own.get("k") or 1)
    state = {"W_enc": W_enc, "b_enc": as_float(tensors["b_enc"]), "W_dec": as_float(tensors["W_dec"]),
             "b_dec": as_float(tensors["b_dec"]), "b_pre": torch.zeros(W_enc.shape[1], dtype=W_enc.dtype)}
    if skip:
        state["W_skip"] = as_float(tensors["W_skip"])
    if fam == "jumprelu":
        state["threshold"] = as_float(tensors["threshold"]).reshape(-1).expand(W_enc.shape[0]).clone()
    kwargs = {"d_in": W_enc.shape[1], "n_latents": W_enc.shape[0], "k": min(k, W_enc.shape[0]),
              "d_out": state["W_dec"].shape[1], "skip": skip, "activation": fam}
    meta = {**cfg, **(cfg.get("metadata") or {})}
    info = {key: meta.get(key) for key in ("model_name", "hook_name", "hook_name_out", "context_size",
                                           "prepend_bos", "dataset_path")}
    return kwargs, state, info


def to_circuit_tracer(kwargs: dict[str, Any], state: dict[str, Tensor]) -> dict[str, Tensor]:
    """circuit-tracer's per-layer tensors (``load_relu_transcoder``); raises ValueError (``check_exportable``)."""
    check_exportable(kwargs, "circuit-tracer")
    w, _ = fold_transcoder(kwargs, state)
    tensors = {"W_enc": w["W_enc"], "W_dec": w["W_dec"], "b_enc": w["b_enc"], "b_dec": w["b_dec"]}
    if family(kwargs.get("activation", "topk")) == "jumprelu":
        tensors["activation_function.threshold"] = w["threshold"].clamp_min(0)
    if w["W_skip"] is not None:
        tensors["W_skip"] = w["W_skip"]
    return {k: v.float().contiguous() for k, v in tensors.items()}


def circuit_tracer_config(model_name: Optional[str], layer: Optional[int], input_hook: Optional[str],
                          output_hook: Optional[str]) -> str:
    """circuit-tracer's ``config.yaml`` of a transcoder set holding this one layer's file.

    Hook names are given as circuit-tracer's per-block suffixes (``blocks.20.ln2.hook_normalized`` ->
    ``ln2.hook_normalized``). A set circuit-tracer can trace needs a transcoder for every layer 0..L: export each
    layer's transcoder and list them all under ``transcoders`` (this file lists the one layer it was written with)."""
    import json

    def suffix(hook: Optional[str]) -> Optional[str]:
        parts = (hook or "").split(".")
        return ".".join(parts[2:]) if len(parts) > 2 and parts[0] == "blocks" else hook

    lines = ["# circuit-tracer transcoder set (written by lit-sae); one file per layer", "model_kind: transcoder_set",
             f"model_name: {json.dumps(model_name)}", f"feature_input_hook: {json.dumps(suffix(input_hook))}",
             f"feature_output_hook: {json.dumps(suffix(output_hook))}", f"layers: [{layer}]",
             "transcoders:", f"  - {json.dumps(ct_file(layer))}"]
    return "\n".join(lines) + "\n"


def from_circuit_tracer(tensors: dict[str, Tensor], where: str | Path
                        ) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(Transcoder kwargs, state) of a circuit-tracer per-layer file; ValueError naming ``where`` otherwise."""
    need(tensors, ("W_enc", "W_dec", "b_enc", "b_dec"), Path(where))
    W_enc = as_float(tensors["W_enc"])
    threshold = tensors.get("activation_function.threshold")
    state = {"W_enc": W_enc, "b_enc": as_float(tensors["b_enc"]), "W_dec": as_float(tensors["W_dec"]),
             "b_dec": as_float(tensors["b_dec"]), "b_pre": torch.zeros(W_enc.shape[1], dtype=W_enc.dtype)}
    if "W_skip" in tensors:
        state["W_skip"] = as_float(tensors["W_skip"])
    if threshold is not None:
        state["threshold"] = as_float(threshold).reshape(-1).expand(W_enc.shape[0]).clone().clamp_min(0)
    kwargs = {"d_in": W_enc.shape[1], "n_latents": W_enc.shape[0], "k": 1, "d_out": state["W_dec"].shape[1],
              "skip": "W_skip" in tensors, "activation": "jumprelu" if threshold is not None else "relu"}
    return kwargs, state
