"""What the commands that read a trained SAE share: load it with facts about it, find its run folder and the harvest
manifest of the activations it was trained on, and check that the two agree (``lit-sae features``,
``lit-sae explain``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

__all__ = ["load_sae", "run_root", "recorded_data", "find_manifest"]


def load_sae(path: str | Path) -> tuple[nn.Module, dict]:
    """An SAE in eval mode and facts about it, from anything ``lit_sae.load_sae`` reads: a ``lit-sae fit``
    checkpoint (its EMA weights when EMA was on), a SAELens folder (lit-sae's export is one), a sparsify folder or an
    OpenAI ``.pt``.

    Returns (sae, info) with info keys: kind ("checkpoint", or the folder's format: "saelens", "sparsify",
    "openai"), path, hook_point, lm_name, tokens_seen (None except for checkpoints), data_path (the shard folder a
    checkpoint was trained on, or None), config (dict).
    Raises FileNotFoundError (missing path) or ValueError (unreadable file), naming the file.
    """
    from lit_sae.artifacts.load import detect_format, read_checkpoint
    from lit_sae.artifacts.load import load_sae as load_any

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such checkpoint or exported SAE folder")
    try:
        fmt = detect_format(p)
        if fmt == "litsae-checkpoint":
            sae, ckpt = read_checkpoint(p)
        else:
            sae, ckpt = load_any(p), None
    except FileNotFoundError:
        raise
    except Exception as exn:  # torch and safetensors raise several types for a truncated or foreign file
        raise ValueError(f"{p}: not a readable SAE ({type(exn).__name__}: {str(exn).splitlines()[0][:300]}); pass "
                         "a checkpoint written by `lit-sae fit`, an exported SAE folder, a SAELens or sparsify "
                         "folder or an OpenAI .pt") from exn
    config = {"d_in": sae.d_in, "n_latents": sae.n_latents, "k": sae.k, "normalize": sae.normalize,
              "activation": sae.activation}
    if ckpt is None:
        md = getattr(sae, "metadata", {}) or {}
        info = {"kind": fmt, "path": str(p), "hook_point": md.get("hook_name"), "lm_name": md.get("model_name"),
                "tokens_seen": None, "data_path": None, "config": config}
        return sae.eval(), info
    hp = ckpt["hparams"]
    config.update({k: hp[k] for k in ("multi_topk", "ema_decay") if k in hp})
    info = {"kind": "checkpoint", "path": str(p), "hook_point": hp.get("hook_point"), "lm_name": hp.get("lm_name"),
            "tokens_seen": ckpt["tokens_seen"], "data_path": ckpt["datamodule"].get("path"), "config": config}
    return sae.eval(), info


def run_root(sae_path: str | Path) -> Path:
    """The run's folder: the parent of a checkpoint's folder (runs/demo for runs/demo/checkpoints/last.ckpt), or
    the parent of an exported SAE folder (runs/demo for runs/demo/sae)."""
    p = Path(sae_path)
    return p.parent.parent if p.is_file() else p.parent


def recorded_data(data_path: Optional[str], ckpt_path: str) -> Optional[str]:
    """The shard folder a checkpoint recorded; a relative path was relative to where ``fit`` ran, so it is also
    looked for under the checkpoint's ancestors (runs/demo/shards from runs/demo/checkpoints/last.ckpt)."""
    if data_path is None or "://" in data_path or Path(data_path).is_absolute() or Path(data_path).exists():
        return data_path
    for parent in Path(ckpt_path).resolve().parents:
        if (parent / data_path).exists():
            return str(parent / data_path)
    return data_path


def find_manifest(sae, info: dict, ckpt_path: str, manifest: Optional[str] = None) -> tuple[dict, str]:
    """(manifest dict, the path of its manifest.json) of the harvest ``sae`` reads: ``manifest`` when given, else
    the shard folder the checkpoint recorded, else ``<run root>/shards``.

    Raises ValueError when none is found or when the SAE's d_in or hook point differs from the manifest's (naming
    both files and the fix); FileNotFoundError when the manifest is missing."""
    from lit_sae.data.shards import read_manifest

    source = manifest or recorded_data(info["data_path"], ckpt_path)
    if source is None and (run_root(ckpt_path) / "shards" / "manifest.json").is_file():
        source = str(run_root(ckpt_path) / "shards")  # an export inside a run folder: the run's own shards
        log.info("using the run's harvest manifest %s", source)
    if source is None:
        raise ValueError(f"{ckpt_path}: no harvest manifest given and none recorded in the SAE; pass --manifest "
                         "runs/<run>/shards (the folder holding manifest.json)")
    man = read_manifest(str(source))
    where = str(Path(source) / "manifest.json") if Path(source).is_dir() else str(source)
    if int(man["d_in"]) != sae.d_in:
        raise ValueError(f"{ckpt_path}: the SAE's d_in={sae.d_in} differs from d_in={man['d_in']} of the hook point "
                         f"{man['hook_point']} in {where}; pass the manifest of the activations this SAE was "
                         "trained on")
    if info["hook_point"] and info["hook_point"] != man["hook_point"]:
        raise ValueError(f"{ckpt_path}: the SAE was trained at {info['hook_point']} but {where} harvested "
                         f"{man['hook_point']}; pass the matching manifest")
    return man, where
