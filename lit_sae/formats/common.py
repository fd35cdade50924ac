"""What every writer does first: fold the input scale into the weights and make the decoder rows unit norm."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

#: Decoder rows further than this from norm 1 are recorded as a deviation (float32 rounding stays far below it).
NORM_TOLERANCE = 1e-6


def fold_for_export(kwargs: dict[str, Any], state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """float64 weights (W_enc, b_enc, W_dec, b_pre, threshold) that take raw activations, with unit-norm W_dec rows.

    * ``normalize="scalar"`` (x_n = s x) folds exactly: W_enc(s x - b_pre) + b_enc = s (W_enc(x - b_pre/s) + b_enc/s),
      and TopK / ReLU / thresholds commute with a positive factor, so W_enc stays, b_enc, b_pre and the threshold
      are divided by s, W_dec stays, and every latent activation is divided by s (it is in input units).
    * Each decoder row i is divided by its norm n_i and encoder row i, b_enc_i and a per-latent threshold are
      multiplied by it (SAELens's ``fold_W_dec_norm``): exact for ReLU and JumpReLU. For TopK the selection then
      ranks n_i * pre_i; training keeps n_i = 1 up to float rounding, but an EMA average of unit rows is slightly
      shorter, so the returned ``info["decoder_renormalized"]`` records the largest |n_i - 1| when it exceeds
      ``NORM_TOLERANCE`` (the export's reconstruction can then differ from the checkpoint's by that order).

    Returns (tensors, info); ``tensors["threshold"]`` is a (n_latents,) vector (None for topk / relu SAEs).
    """
    s = float(state["norm_scale"]) if kwargs.get("normalize") == "scalar" else 1.0
    W_enc = state["W_enc"].detach().double().cpu().clone()
    b_enc = state["b_enc"].detach().double().cpu() / s
    W_dec = state["W_dec"].detach().double().cpu().clone()
    b_pre = state["b_pre"].detach().double().cpu() / s
    threshold: Optional[Tensor] = None
    if kwargs.get("activation") in ("batchtopk", "matryoshka_batchtopk", "jumprelu"):
        threshold = state["threshold"].detach().double().cpu().expand(W_dec.shape[0]).clone() / s
    norms = W_dec.norm(dim=1)
    if bool((norms == 0).any()):
        raise ValueError(f"{int((norms == 0).sum())} decoder rows are zero: such an SAE cannot be exported")
    W_dec /= norms[:, None]
    W_enc *= norms[:, None]
    b_enc = b_enc * norms
    if threshold is not None:
        threshold = threshold * norms
    info: dict[str, Any] = {"folded_scale": s}
    deviation = float((norms - 1).abs().max())
    if deviation > NORM_TOLERANCE:
        info["decoder_renormalized"] = {
            "max_abs_norm_deviation": deviation,
            "reason": "decoder rows were not unit norm (an EMA average of unit rows is slightly shorter); each "
                      "row was divided by its norm and its encoder row and bias multiplied by it, so the "
                      "promised unit-norm rows hold; TopK then ranks norm-weighted pre-activations, which can "
                      "change the selection where two latents differ by less than this relative amount",
        }
    return {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_pre": b_pre, "threshold": threshold}, info


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or a ValueError naming the file."""
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exn:
        raise ValueError(f"{path}: not valid JSON ({exn})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return cfg


def need(tensors: dict[str, Tensor], names: tuple[str, ...], where: Path) -> None:
    """Raise a ValueError naming ``where`` if a tensor is missing."""
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"{where}: missing tensor(s) {', '.join(missing)} (has {', '.join(sorted(tensors))})")


def as_float(t: Tensor) -> Tensor:
    """float32 unless the file holds float64 (half-precision files are widened)."""
    return t.detach().to(torch.float64 if t.dtype == torch.float64 else torch.float32).cpu()


def write_folder(out: str | Path, files: dict[str, bytes], *, overwrite: bool = False) -> Path:
    """Write ``files`` ({relative path: bytes}) as the folder ``out``, all or nothing, with the user's umask.

    The files go to a sibling temporary folder (created with ``os.mkdir``'s default mode, so permissions follow the
    umask like any file the user writes; ``tempfile.mkdtemp`` would give 0700), which is then renamed to ``out``:
    an interruption never leaves a half-written folder under the final name.

    Raises:
        ValueError: ``out`` exists and is not an empty folder, and ``overwrite`` is False; or ``out`` holds
            anything that is not a lit-sae export (checked even with ``overwrite``: unrelated files are never
            mixed with or deleted by an export).
    """
    import os
    import shutil
    import uuid

    from lit_sae.fsync import fsync_dir

    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"{out}: exists and is not a folder; choose another --out")
        entries = sorted(p.name for p in out.iterdir())
        if entries:
            foreign = _foreign_entries(out)
            if foreign:
                raise ValueError(f"{out}: holds files that are not part of a lit-sae export ({', '.join(foreign[:5])})"
                                 "; an export never mixes with other files: choose a new or empty --out folder")
            if not overwrite:
                raise ValueError(f"{out}: already holds an export ({', '.join(entries[:5])}); pass --overwrite to "
                                 "replace it, or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    os.mkdir(tmp)
    try:
        for rel, data in files.items():
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
        os.replace(tmp, out)
        fsync_dir(out.parent)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


#: Names a lit-sae export folder may hold (SAELens, sparsify per-hookpoint folders, OpenAI v5, README).
EXPORT_NAMES = {"cfg.json", "sae_weights.safetensors", "sae.safetensors", "sae.pt", "README.md", "config.yaml"}


def _foreign_entries(out: Path) -> list[str]:
    """Entries of ``out`` that a lit-sae export does not write (sparsify hookpoint folders are looked into)."""
    foreign = []
    for p in sorted(out.iterdir()):
        if p.is_dir() and (p / "cfg.json").is_file():
            foreign += [f"{p.name}/{q.name}" for q in sorted(p.iterdir()) if q.name not in EXPORT_NAMES]
            if "lit_sae" not in _json_or_empty(p / "cfg.json"):
                foreign.append(f"{p.name}/cfg.json (not written by lit-sae)")
        elif p.name not in EXPORT_NAMES and not _circuit_tracer_file(out, p.name):
            foreign.append(p.name)
        elif p.name == "cfg.json" and "lit_sae" not in _json_or_empty(p):
            foreign.append("cfg.json (not written by lit-sae)")
        elif p.name == "config.yaml" and not _circuit_tracer_file(out, "layer_0.safetensors"):
            foreign.append("config.yaml (not written by lit-sae)")
    return foreign


def _json_or_empty(path: Path) -> dict:
    try:
        out = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return out if isinstance(out, dict) else {}


def _circuit_tracer_file(out: Path, name: str) -> bool:
    """``name`` is a per-layer file of a circuit-tracer set lit-sae wrote into ``out`` (its config.yaml says so)."""
    import re

    config = out / "config.yaml"
    return (re.fullmatch(r"layer_\d+\.safetensors", name) is not None and config.is_file()
            and "written by lit-sae" in config.read_text(errors="replace").split("\n", 1)[0])
