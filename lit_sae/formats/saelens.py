"""SAELens's layout: ``cfg.json`` + ``sae_weights.safetensors`` (``SAE.save_model`` writes it, ``load_from_disk``
reads it).

SAELens (jbloomAus/SAELens, ``sae_lens/saes/*.py``) computes, for input-space x (d_in):

    x' = LN(x) if normalize_activations == "layer_norm" else x      (mu, std per token; /(std + 1e-5))
    pre = (x' - b_dec * apply_b_dec_to_input) @ W_enc + b_enc      W_enc: (d_in, d_sae); W_dec: (d_sae, d_in)
    standard: z = relu(pre);  jumprelu: z = relu(pre) * (pre > threshold);  topk: the k largest of pre, relu'd
    x_hat = z @ W_dec + b_dec, then * std + mu for layer_norm

(topk with ``rescale_acts_by_decoder_norm`` ranks pre * ||W_dec_i|| and divides by it again before decoding.)
Configs exist in two shapes: SAELens >= 6 nests the language-model fields under ``metadata`` and names the
architecture; older ones are flat, with ``activation_fn_str`` / ``activation_fn_kwargs``. Both are read; lit-sae
writes the flat shape (SAELens 6 converts it on load) with the 6.x fields and a ``metadata`` copy for readers that
look there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from lit_sae.formats.common import as_float, fold_for_export, need, read_json

CONFIG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
#: SAELens's metadata fields (sae_lens/loading/pretrained_sae_loaders.py, LLM_METADATA_KEYS) lit-sae fills in.
METADATA_KEYS = ("model_name", "hook_name", "hook_head_index", "prepend_bos", "context_size", "dataset_path",
                 "model_from_pretrained_kwargs", "neuronpedia_id", "sae_lens_training_version")


def is_saelens_folder(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


def read_folder(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(cfg, tensors) of a SAELens folder; FileNotFoundError naming the missing file."""
    from safetensors.torch import load_file

    path = Path(path)
    for name in (CONFIG, WEIGHTS):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name}: missing; a SAELens SAE folder holds {CONFIG} and {WEIGHTS}")
    return read_json(path / CONFIG), load_file(str(path / WEIGHTS))


def to_saelens(kwargs: dict[str, Any], state: dict[str, Tensor], metadata: Optional[dict[str, Any]] = None,
               lit_sae: Optional[dict[str, Any]] = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, cfg) in SAELens's layout for a lit-sae SAE given as constructor ``kwargs`` and ``state`` dict.

    The input scale is folded and decoder rows made unit norm (``common.fold_for_export``); ``batchtopk`` is written
    as ``jumprelu`` with its threshold on every latent, as SAELens itself saves BatchTopK SAEs for inference.
    ``metadata``: hook_name, model_name, context_size, ... (None values are written as null). ``lit_sae``: extra
    fields for lit-sae's own section (provenance). Raises ValueError for an activation SAELens cannot express.
    """
    w, info = fold_for_export(kwargs, state)
    activation = kwargs.get("activation", "topk")
    arch = {"topk": "topk", "batchtopk": "jumprelu", "matryoshka_batchtopk": "jumprelu", "jumprelu": "jumprelu",
            "relu": "standard"}.get(activation)
    if arch is None:
        raise ValueError(f"activation={activation!r} has no SAELens architecture")
    tensors = {"W_enc": w["W_enc"].T, "b_enc": w["b_enc"], "W_dec": w["W_dec"], "b_dec": w["b_pre"]}
    if arch == "jumprelu":
        tensors["threshold"] = w["threshold"]
    tensors = {k: v.float().contiguous() for k, v in tensors.items()}
    meta = {key: (metadata or {}).get(key) for key in METADATA_KEYS}
    meta["prepend_bos"] = bool(meta["prepend_bos"]) if meta["prepend_bos"] is not None else None
    meta["model_from_pretrained_kwargs"] = meta["model_from_pretrained_kwargs"] or {}
    hook_layer = (metadata or {}).get("hook_layer", hook_layer_of(meta["hook_name"]))
    cfg: dict[str, Any] = {
        "architecture": arch,
        "d_in": int(kwargs["d_in"]),
        "d_sae": int(kwargs["n_latents"]),
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "layer_norm" if kwargs.get("normalize") == "layernorm" else "none",
        "reshape_activations": "none",
        **({"k": int(kwargs["k"]), "rescale_acts_by_decoder_norm": False,
            "activation_fn_str": "topk", "activation_fn_kwargs": {"k": int(kwargs["k"])}} if arch == "topk"
           else {"activation_fn_str": "relu", "activation_fn_kwargs": {}}),
        **meta,
        "hook_layer": hook_layer,
        "metadata": {**meta, "hook_layer": hook_layer},
        # lit-sae's own section: every setting of the SAE (TopKSAE.config(): lit_sae.sae.config.REBUILD_KEYS) but
        # the two SAELens names itself, the folding ``info`` and the caller's provenance
        "lit_sae": {**{key: value for key, value in kwargs.items() if key not in ("d_in", "n_latents")},
                    "activation": activation, "normalize": kwargs.get("normalize", "none"), "k": int(kwargs["k"]),
                    "k_aux": kwargs.get("k_aux"), "auxk_coef": kwargs.get("auxk_coef"),
                    "multi_topk": kwargs.get("multi_topk", False), **info, **(lit_sae or {})},
    }
    return tensors, cfg


def hook_layer_of(hook_name: Optional[str]) -> Optional[int]:
    """L of a TransformerLens-style hook name ``blocks.L.<hook>`` (None otherwise)."""
    parts = (hook_name or "").split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() else None


def from_saelens(cfg: dict[str, Any], tensors: dict[str, Tensor], where: str | Path = CONFIG
                 ) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Any]]:
    """(TopKSAE kwargs, state dict, metadata) of a SAELens (cfg, tensors) pair; reconstructs as SAELens does.

    Supports architectures standard (relu), topk, jumprelu and batchtopk (a threshold tensor, scalar or per latent),
    ``apply_b_dec_to_input`` false (folded into b_enc), ``rescale_acts_by_decoder_norm`` (folded into the weights)
    and ``normalize_activations`` none / layer_norm / expected_average_only_in (a scale SAELens applies outside the
    SAE, so the SAE itself computes as none). Raises ValueError naming ``where`` and the field otherwise.
    """
    where = Path(where)
    meta = {**cfg, **(cfg.get("metadata") or {})}
    arch = cfg.get("architecture")
    act_fn = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
    if arch is None:  # SAELens < 6: the activation function names the architecture
        arch = "topk" if act_fn == "topk" else "standard"
    if arch == "standard" and act_fn not in ("relu", None):
        raise ValueError(f"{where}: unsupported field activation_fn={act_fn!r} (lit-sae reads relu, topk, jumprelu)")
    if arch not in ("standard", "topk", "jumprelu", "batchtopk"):
        raise ValueError(f"{where}: unsupported field architecture={arch!r}: lit-sae reads standard, topk, jumprelu "
                         "and batchtopk SAEs")
    if meta.get("hook_head_index") is not None:
        raise ValueError(f"{where}: unsupported field hook_head_index={meta['hook_head_index']!r} (one head's slice)")
    if meta.get("reshape_activations") not in (None, "none", "hook_z"):  # hook_z: heads flattened, as lit-sae reads
        raise ValueError(f"{where}: unsupported field reshape_activations={meta['reshape_activations']!r}")
    norm = cfg.get("normalize_activations") or "none"
    if isinstance(norm, bool):
        norm = "expected_average_only_in" if norm else "none"
    if norm not in ("none", "layer_norm", "expected_average_only_in"):
        raise ValueError(f"{where}: unsupported field normalize_activations={norm!r} (lit-sae reads none, "
                         "layer_norm and expected_average_only_in)")
    if "scaling_factor" in tensors and not torch.allclose(tensors["scaling_factor"], torch.ones(())):
        raise ValueError(f"{where}: unsupported tensor scaling_factor (a fine-tuned scale); not representable")
    need(tensors, ("W_enc", "b_enc", "W_dec", "b_dec"), where.with_name(WEIGHTS))
    W_enc = as_float(tensors["W_enc"]).T.contiguous()  # (d_sae, d_in)
    b_enc, W_dec, b_dec = as_float(tensors["b_enc"]), as_float(tensors["W_dec"]), as_float(tensors["b_dec"])
    d_sae, d_in = W_enc.shape
    if W_dec.shape != (d_sae, d_in) or b_dec.shape != (d_in,) or b_enc.shape != (d_sae,):
        raise ValueError(f"{where.with_name(WEIGHTS)}: shapes W_enc {tuple(tensors['W_enc'].shape)}, W_dec "
                         f"{tuple(W_dec.shape)}, b_enc {tuple(b_enc.shape)}, b_dec {tuple(b_dec.shape)} disagree")
    if not cfg.get("apply_b_dec_to_input", True):  # SAELens encodes x @ W_enc + b_enc: lit-sae subtracts b_pre
        b_enc = b_enc + W_enc @ b_dec
    threshold = None
    k = d_sae
    if arch == "topk":
        k = int(cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k", 0)))
        if not 0 < k <= d_sae:
            raise ValueError(f"{where}: field k={k} must be in 1..d_sae={d_sae}")
    elif arch in ("jumprelu", "batchtopk"):
        key = "threshold" if "threshold" in tensors else "topk_threshold"
        need(tensors, (key,), where.with_name(WEIGHTS))
        threshold = as_float(tensors[key]).reshape(-1).expand(d_sae).clone()
    if arch in ("topk", "batchtopk") and cfg.get("rescale_acts_by_decoder_norm"):
        n = W_dec.norm(dim=1)  # pre * ||W_dec_i|| is ranked / thresholded, then divided by it again: fold it in
        W_enc, b_enc, W_dec = W_enc * n[:, None], b_enc * n, W_dec / n[:, None]
    kwargs = {"d_in": d_in, "n_latents": d_sae, "k": k,
              "activation": {"standard": "relu", "topk": "topk"}.get(arch, "jumprelu"),
              "normalize": "layernorm" if norm == "layer_norm" else "none"}
    own = cfg.get("lit_sae") or {}
    for key in ("k_aux", "auxk_coef"):
        if own.get(key) is not None:
            kwargs[key] = own[key]
    state = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_pre": b_dec}
    if threshold is not None:
        state["threshold"] = threshold
    info = {key: meta.get(key) for key in (*METADATA_KEYS, "hook_layer")}
    if norm == "expected_average_only_in":
        info["note"] = ("normalize_activations=expected_average_only_in: SAELens scales activations outside the SAE "
                        "by a factor this folder does not hold; the SAE is loaded as SAELens computes it (unscaled)")
    return kwargs, state, info
