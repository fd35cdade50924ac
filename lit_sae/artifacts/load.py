"""``load_sae(path)``: any SAE lit-sae can read, as a ``TopKSAE`` whose reconstruction equals its source library's.

Detected by content, in this order:

- a lit-sae training checkpoint (``lit-sae fit``'s ``.ckpt``; its EMA weights when EMA was on);
- a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``; lit-sae's own export is one);
- a sparsify folder (``cfg.json`` + ``sae.safetensors``), or a sparsify run folder holding exactly one of them;
- an OpenAI v5 state dict (``.pt``, e.g. ``v5_32k/layer_8.pt``), or a folder holding ``sae.pt``;
- a transcoder: SAELens's transcoder folders (the same files, a ``*transcoder`` architecture) and circuit-tracer's
  per-layer file (``layer_{L}.safetensors``, or a folder holding one with its ``config.yaml``), as a ``Transcoder``.

Each loader names the file and the field it cannot represent (ValueError) or the file it misses (FileNotFoundError).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lit_sae.formats import openai, saelens, sparsify, transcoders
from lit_sae.formats.common import read_json
from lit_sae.sae.config import MODULE_KEYS
from lit_sae.sae.model import TopKSAE
from lit_sae.sae.transcoder import Transcoder
from lit_sae.safe_io import torch_load

log = logging.getLogger(__name__)

__all__ = ["load_sae", "read_checkpoint", "detect_format"]

#: TopKSAE arguments a lit-sae checkpoint's hyperparameters carry: SAEModule's SAE arguments, and a transcoder's.
_SAE_ARGS = (*MODULE_KEYS, "d_out", "skip")


def detect_format(path: str | Path) -> str:
    """``litsae-checkpoint``, ``saelens``, ``sparsify`` or ``openai`` for ``path``; FileNotFoundError / ValueError."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder (expected an SAE: a lit-sae checkpoint, a SAELens or "
                                "sparsify folder, or an OpenAI .pt state dict)")
    if p.is_file():
        if p.name in (saelens.WEIGHTS, saelens.CONFIG) and saelens.is_saelens_folder(p.parent):
            return "saelens"
        if p.name in (sparsify.WEIGHTS,) and sparsify.is_sparsify_folder(p.parent):
            return "sparsify"
        if p.suffix == ".safetensors":
            return "circuit-tracer"
        obj = _torch_load(p)
        if isinstance(obj, dict) and "state_dict" in obj and any(k.startswith("sae.") for k in obj["state_dict"]):
            return "litsae-checkpoint"
        if openai.is_openai_state_dict(obj):
            return "openai"
        raise ValueError(f"{p}: neither a lit-sae checkpoint nor an OpenAI SAE state dict (keys: "
                         f"{', '.join(sorted(map(str, obj))[:8]) if isinstance(obj, dict) else type(obj).__name__})")
    if saelens.is_saelens_folder(p):
        return "saelens"
    if sparsify.is_sparsify_folder(p) or sparsify.hookpoint_folders(p):
        return "sparsify"
    if (p / openai.WEIGHTS).is_file():
        return "openai"
    if (p / transcoders.CT_CONFIG).is_file() and len(list(p.glob("layer_*.safetensors"))) == 1:
        return "circuit-tracer"
    raise ValueError(f"{p}: no SAE found: expected cfg.json + {saelens.WEIGHTS} (SAELens), cfg.json + "
                     f"{sparsify.WEIGHTS} (sparsify, or one folder per hookpoint), or {openai.WEIGHTS} (OpenAI)")


def load_sae(path: str | Path) -> TopKSAE:
    """Load the SAE at ``path`` (see the module docstring for what is recognised) in eval mode, on the CPU.

    ``sae.metadata`` holds what the source says about where its activations come from (``hook_name``,
    ``model_name``, ``context_size``, ... where known) and ``sae.metadata["format"]`` the detected format.
    Raises FileNotFoundError (nothing at ``path``, a missing file) or ValueError (an unsupported field, named).
    """
    p = Path(path)
    fmt = detect_format(p)
    if fmt == "litsae-checkpoint":
        sae, _ = read_checkpoint(p)
    elif fmt == "saelens":
        folder = p if p.is_dir() else p.parent
        cfg = read_json(folder / saelens.CONFIG)
        if transcoders.is_saelens_transcoder(cfg):
            from safetensors.torch import load_file

            kwargs, state, meta = transcoders.from_saelens_transcoder(cfg, load_file(str(folder / saelens.WEIGHTS)),
                                                                      folder / saelens.WEIGHTS)
            sae = Transcoder.from_state(kwargs, state, meta)
        else:
            sae = TopKSAE.from_pretrained(folder)
    elif fmt == "circuit-tracer":
        from safetensors.torch import load_file

        file = p if p.is_file() else next(p.glob("layer_*.safetensors"))
        kwargs, state = transcoders.from_circuit_tracer(load_file(str(file)), file)
        sae = Transcoder.from_state(kwargs, state, {"hook_layer": _layer_of(file.name)})
    elif fmt == "sparsify":
        folder = p if p.is_dir() else p.parent
        if not sparsify.is_sparsify_folder(folder):
            found = sparsify.hookpoint_folders(folder)
            if len(found) != 1:
                raise ValueError(f"{folder}: a sparsify run with {len(found)} hookpoints "
                                 f"({', '.join(f.name for f in found[:6])}); pass one hookpoint's folder")
            folder = found[0]
        from safetensors.torch import load_file

        cfg = read_json(folder / sparsify.CONFIG)
        kwargs, state, meta = sparsify.from_sparsify(cfg, load_file(str(folder / sparsify.WEIGHTS)),
                                                     folder / sparsify.CONFIG)
        sae = TopKSAE.from_state(kwargs, state, meta)
    else:
        file = p if p.is_file() else p / openai.WEIGHTS
        kwargs, state, meta = openai.from_openai(_torch_load(file), file)
        sae = TopKSAE.from_state(kwargs, state, meta)
    sae.metadata["format"] = fmt
    return sae


def read_checkpoint(path: str | Path) -> tuple[TopKSAE, dict[str, Any]]:
    """The SAE of a ``lit-sae fit`` checkpoint (EMA weights when EMA was on) and what the checkpoint says about it:
    ``{"hparams", "global_step", "tokens_seen", "ema_steps", "datamodule"}`` (the DataModule's saved arguments).
    Needs no Lightning module: the SAE is rebuilt from the saved hyperparameters and ``sae.*`` weights."""
    p = Path(path)
    if p.is_dir():  # a sharded checkpoint folder (lit_sae.parallel.strategy), reassembled in this process
        from lit_sae.artifacts.sharded import read_strategy_checkpoint

        ckpt = read_strategy_checkpoint(p)
    elif not p.is_file():
        raise FileNotFoundError(f"{p}: no such checkpoint")
    else:
        ckpt = _torch_load(p)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{p}: not a Lightning checkpoint (no state_dict)")
    hp = dict(ckpt.get("hyper_parameters") or {})
    sd = ckpt["state_dict"]
    missing = [k for k in ("d_in", "n_latents", "k") if k not in hp]
    if missing or "sae.W_dec" not in sd:
        raise ValueError(f"{p}: not a lit-sae checkpoint (missing {', '.join(missing) or 'sae.W_dec'})")
    state = {k[len("sae."):]: v for k, v in sd.items() if k.startswith("sae.")}
    ema_steps = int(sd.get("ema.steps", 0))
    if ema_steps > 0 and hp.get("ema_decay") is not None:
        correction = 1.0 - float(hp["ema_decay"]) ** ema_steps
        for name in ("W_enc", "b_enc", "W_dec", "b_pre", "threshold", "b_dec", "W_skip"):  # threshold: jumprelu's
            if f"ema.shadow_{name}" in sd:
                state[name] = sd[f"ema.shadow_{name}"] / correction
    cls = Transcoder if hp.get("transcoder") else TopKSAE
    sae = cls.from_state({k: hp[k] for k in _SAE_ARGS if hp.get(k) is not None and (k not in ("d_out", "skip") or
                                                                                    cls is Transcoder)}, state,
                         {"hook_name": hp.get("hook_point"), "model_name": hp.get("lm_name"),
                          **({"hook_name_out": hp.get("target_hook_point")} if cls is Transcoder else {})})
    if ema_steps > 0:  # as EMA.swapped_into does for validation, test and the export at the end of a fit
        sae.fold_decoder_norms_()
    info = {"hparams": hp, "global_step": int(ckpt.get("global_step", 0)),
            "tokens_seen": int(sd["tokens_seen"]) if "tokens_seen" in sd else None, "ema_steps": ema_steps,
            "datamodule": dict(ckpt.get("datamodule_hyper_parameters") or {})}
    return sae, info


def _torch_load(path: Path) -> Any:
    """A ``torch.save`` file, tensors and plain data only (``lit_sae.safe_io.torch_load``: ``weights_only=True``;
    an UnsafeFileError names the file and the refused object, a ValueError a file that is not a torch file)."""
    return torch_load(path, "SAE file")


def _layer_of(name: str):
    digits = "".join(ch for ch in name if ch.isdigit())
    return int(digits) if digits else None
