"""Export a trained SAE for other tools: SAELens (default), sparsify, or OpenAI's v5 state dict.

``export(ckpt, out)`` reads a ``lit-sae fit`` checkpoint (its EMA weights when EMA was on) and writes:

- ``saelens``: ``out/cfg.json`` + ``out/sae_weights.safetensors`` (SAELens, SAEBench, SAEDashboard, Neuronpedia);
- ``sparsify``: ``out/<hookpoint>/cfg.json`` + ``out/<hookpoint>/sae.safetensors`` (``SparseCoder.load_from_disk``,
  delphi);
- ``openai``: ``out/sae.pt`` (``Autoencoder.from_state_dict``; topk SAEs with ``normalize: layernorm`` only).

A transcoder (``lit_sae.sae.transcoder``) is written in SAELens's transcoder layout (``saelens``) or circuit-tracer's
(``circuit-tracer``: ``out/layer_{L}.safetensors`` + ``out/config.yaml``); see ``lit_sae.formats.transcoders``.

Every export takes raw activations and has unit-norm decoder rows (``lit_sae.formats.common.fold_for_export``), and
its ``cfg.json`` carries provenance in the ``lit_sae`` section: the checkpoint's sha256, step and tokens seen, the
shard manifest's sha256, context length and BOS handling, so an export that no longer matches its checkpoint or data
can be detected. An existing ``out`` is replaced only with ``overwrite=True``, and never if it holds files that are
not a lit-sae export.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from lit_sae.formats import openai, saelens, sparsify
from lit_sae.formats.common import write_folder
from lit_sae.sae.model import TopKSAE
from lit_sae.safe_io import dumps_json

log = logging.getLogger(__name__)

__all__ = ["export", "export_sae", "export_checkpoint", "export_sharded", "final_checkpoint", "load_exported",
           "provenance"]

Format = Literal["saelens", "sparsify", "openai", "circuit-tracer"]
FORMATS = ("saelens", "sparsify", "openai", "circuit-tracer")


def export(ckpt: str, out: str, format: Format = "saelens", overwrite: bool = False,
           manifest: Optional[str] = None, strict: bool = True) -> Path:
    """Export the SAE of a ``lit-sae fit`` checkpoint to the folder ``out``; returns ``out``.

    Args:
        ckpt: a checkpoint written by ``lit-sae fit`` (``.ckpt``).
        out: the export folder (created; it must be new or empty unless ``overwrite``).
        format: ``saelens`` (cfg.json + sae_weights.safetensors), ``sparsify`` (<hookpoint>/cfg.json +
            sae.safetensors) or ``openai`` (sae.pt; topk + layernorm SAEs only).
        overwrite: replace an existing export in ``out`` (a folder holding anything else is never touched).
        manifest: the shards' manifest.json, when it is no longer where the checkpoint's data path says.
        strict: refuse a variant the format's readers cannot load (a topk transcoder in SAELens's layout); the
            export at the end of fit passes False, writing it as lit-sae's own ``topk_transcoder`` architecture.

    Raises:
        FileNotFoundError: no checkpoint at ``ckpt``.
        ValueError: ``out`` exists (without ``overwrite``) or holds other files; the format cannot express the SAE.
    """
    from lit_sae.artifacts.load import read_checkpoint

    if format not in FORMATS:
        raise ValueError(f"format={format!r}: use one of {', '.join(FORMATS)}")
    sae, info = read_checkpoint(ckpt)
    hp = info["hparams"]
    prov = provenance(ckpt, info, manifest)
    extra = {"target_hook_point": hp.get("target_hook_point")} if hp.get("transcoder") else {}
    return export_sae(sae, out, hook_point=hp.get("hook_point"), lm_name=hp.get("lm_name"), format=format,
                      overwrite=overwrite, provenance=prov, strict=strict, **extra)


def export_sae(sae: TopKSAE, out_dir: str | Path, *, hook_point: Optional[str] = None, lm_name: Optional[str] = None,
               format: Format = "saelens", overwrite: bool = True, provenance: Optional[dict[str, Any]] = None,
               target_hook_point: Optional[str] = None, strict: bool = True) -> Path:
    """Write ``sae`` to ``out_dir`` in ``format``. ``provenance`` (see :func:`provenance`) fills SAELens's
    context_size / prepend_bos / dataset_path / model_name and lit-sae's own section. ``overwrite`` defaults to True
    here because a fit re-exports into its own run folder; the ``export`` command defaults to False.
    ``target_hook_point``: a transcoder's target (SAELens's hook_name_out). ``strict=False`` lets a topk transcoder
    (no SAELens class) be written in SAELens's layout for lit-sae to read (the export at the end of a fit).
    Raises ValueError, before anything is written, for a layout that cannot hold the SAE (named, with the fix)."""
    prov = dict(provenance or {})
    model = prov.pop("model_name_resolvable", None)
    own = {"hook_point": hook_point, "model_alias": lm_name, **prov}
    if hasattr(sae, "d_out"):
        return _export_transcoder(sae, out_dir, format, model or lm_name, hook_point, target_hook_point, prov, own,
                                  overwrite, strict)
    if format == "circuit-tracer":
        raise ValueError("--format circuit-tracer: circuit-tracer reads transcoders, and this is an SAE; export it "
                         "with --format saelens")
    if format == "saelens":
        metadata = {"hook_name": hook_point, "model_name": model or lm_name,
                    "context_size": prov.get("context_length"), "prepend_bos": prov.get("prepend_bos"),
                    "dataset_path": prov.get("dataset_path")}
        return sae.save_pretrained(out_dir, metadata, lit_sae=own, overwrite=overwrite)
    if format == "sparsify":
        tensors, cfg = sparsify.to_sparsify(sae.config(), sae.state_dict(), {**own, "hook_name": hook_point})
        from safetensors.torch import save

        folder = sparsify.hookpoint_of(hook_point)
        text = dumps_json(cfg, where=f"{out_dir}/{folder}/{sparsify.CONFIG}", indent=2)
        return write_folder(out_dir, {f"{folder}/{sparsify.CONFIG}": text.encode(),
                                      f"{folder}/{sparsify.WEIGHTS}": save(tensors)}, overwrite=overwrite)
    if format == "openai":
        buf = io.BytesIO()
        torch.save(openai.to_openai(sae.config(), sae.state_dict()), buf)
        _, cfg = saelens.to_saelens(sae.config(), sae.state_dict(), {"hook_name": hook_point}, own)
        text = dumps_json({"lit_sae": cfg["lit_sae"]}, where=f"{out_dir}/cfg.json", indent=2)
        return write_folder(out_dir, {openai.WEIGHTS: buf.getvalue(), "cfg.json": text.encode()},
                            overwrite=overwrite)
    raise ValueError(f"format={format!r}: use one of {', '.join(FORMATS)}")


def _export_transcoder(sae, out_dir, format, model, hook_point, target_hook_point, prov, own, overwrite, strict
                       ) -> Path:
    from safetensors.torch import save

    from lit_sae.formats import transcoders

    kwargs, state = sae.config(), sae.state_dict()
    own = {**own, "target_hook_point": target_hook_point}
    if format == "saelens":
        metadata = {"hook_name": hook_point, "hook_name_out": target_hook_point, "model_name": model,
                    "context_size": prov.get("context_length"), "prepend_bos": prov.get("prepend_bos"),
                    "dataset_path": prov.get("dataset_path")}
        tensors, cfg = transcoders.to_saelens_transcoder(kwargs, state, metadata, own, strict=strict)
        return write_folder(out_dir, {saelens.CONFIG: json.dumps(cfg, indent=2).encode(),
                                      saelens.WEIGHTS: save(tensors)}, overwrite=overwrite)
    if format == "circuit-tracer":
        tensors = transcoders.to_circuit_tracer(kwargs, state)
        layer = saelens.hook_layer_of(hook_point)
        config = transcoders.circuit_tracer_config(model, layer, hook_point, target_hook_point)
        return write_folder(out_dir, {transcoders.ct_file(layer): save(tensors),
                                      transcoders.CT_CONFIG: config.encode()}, overwrite=overwrite)
    raise ValueError(f"--format {format}: a transcoder is exported with --format saelens or circuit-tracer")


def provenance(ckpt: str | Path, info: dict[str, Any], manifest: Optional[str | Path] = None) -> dict[str, Any]:
    """What produced a checkpoint's SAE: ``checkpoint`` {path, sha256, step, tokens_seen, ema_steps}, ``kl_finetune``
    {kl_coef, kl_mse_coef, init_from} for an end-to-end KL fine-tune, ``manifest`` {path, sha256},
    ``context_length``, ``prepend_bos``, ``drop_first_position``, ``dataset_path`` and, for a GGUF
    model converted by lit-sae, the converted folder a transformers loader can open (``model_name_resolvable``).
    Fields the checkpoint or manifest do not say are None."""
    prov: dict[str, Any] = {"checkpoint": {"path": str(Path(ckpt).resolve()), "sha256": _sha256(Path(ckpt)),
                                           "step": info.get("global_step"), "tokens_seen": info.get("tokens_seen"),
                                           "ema_steps": info.get("ema_steps")}}
    hp = info.get("hparams") or {}
    if hp.get("kl_coef") is not None:  # fine-tuned end to end on the LM's KL (lit_sae.train.kl_finetune)
        prov["kl_finetune"] = {"kl_coef": hp["kl_coef"], "kl_mse_coef": hp.get("kl_mse_coef"),
                               "init_from": hp.get("init_from")}
    dm = info.get("datamodule") or {}
    where = manifest or dm.get("manifest_path") or dm.get("path") or dm.get("manifest")
    path = _find_manifest(where, Path(ckpt)) if where else None
    if path is None or not path.is_file():
        if where:
            log.warning("%s: shard manifest not found; the export records no data provenance (pass --manifest)", where)
        prov.update(manifest=None, context_length=None, prepend_bos=None, drop_first_position=None, dataset_path=None)
        return prov
    m = json.loads(path.read_text())
    cfg, exc = m.get("config") or {}, m.get("exclusions") or {}
    prov.update(
        manifest={"path": str(path.resolve()), "sha256": _sha256(path)},
        context_length=m.get("context_length"),
        # lit-sae's harvest tokenizes with add_special_tokens=False: no BOS is ever prepended
        prepend_bos=bool(m.get("prepend_bos", False)),
        drop_first_position=exc.get("drop_first_position"),
        dataset_path=cfg.get("source", (m.get("source") or {}).get("name")),
    )
    model = m.get("model") or {}
    if model.get("gguf_file") and model.get("sha256"):
        from lit_sae.data.lm import cache_dir

        # the folder lit_sae.data.lm converts a GGUF model into (a transformers / TransformerLens loader opens it)
        folder = cache_dir() / "models" / f"{Path(model['gguf_file']).stem}-{model['sha256'][:16]}"
        if (folder / "config.json").is_file():
            prov["model_name_resolvable"] = str(folder)
    return prov


def final_checkpoint(trainer: Any) -> Optional[Path]:
    """The checkpoint holding ``trainer``'s state at the end of fit: its checkpoint callback's ``last.ckpt`` when that
    was saved at the final step (``lit_sae.callbacks.checkpoint.Checkpoint`` saves it in ``on_train_end``, before
    ``on_fit_end``), else None (checkpointing off, or no save at the last step)."""
    from lit_sae import compat

    cb = getattr(trainer, "checkpoint_callback", None)
    path = getattr(cb, "last_model_path", "") if cb is not None else ""
    if not path or not Path(path).exists():
        return None
    if compat.last_global_step_saved(cb) != trainer.global_step:
        return None
    return Path(path)


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """``export(ckpt_path, out_dir)`` in SAELens's layout (kept for callers of the earlier API)."""
    return export(str(ckpt_path), str(out_dir), overwrite=overwrite)


def load_exported(path: str | Path) -> tuple[TopKSAE, dict]:
    """A SAELens-layout export as (``TopKSAE``, its cfg.json dict); see ``TopKSAE.from_pretrained``."""
    sae = TopKSAE.from_pretrained(path)
    return sae, json.loads((Path(path) / saelens.CONFIG).read_text())


def export_sharded(path: str | Path, out_dir: str | Path, hook_point: Optional[str] = None,
                   lm_name: Optional[str] = None) -> Path:
    """Assemble a ``lit_sae.parallel.dcp.save_sharded`` checkpoint folder into one SAELens-layout export (one process,
    no process group; ``lit_sae.artifacts.sharded.load_full``)."""
    from lit_sae.artifacts.sharded import load_full

    sae, info = load_full(path)
    extra = info.get("extra", {})
    return export_sae(sae, out_dir, hook_point=hook_point or extra.get("hook_point"),
                      lm_name=lm_name or extra.get("lm_name"))


def _find_manifest(where: str | Path, ckpt: Path) -> Optional[Path]:
    """manifest.json of a data path; a relative path (as a recipe gives it) is tried from the working directory,
    then from each folder above the checkpoint (the fit ran in one of them)."""
    p = Path(str(where))
    bases = [Path(".")] if p.is_absolute() else [Path("."), *ckpt.resolve().parents]
    for base in bases:
        q = base / p
        file = q / "manifest.json" if q.is_dir() else (q if q.suffix == ".json" else q.parent / "manifest.json")
        if file.is_file():
            return file
    return None


def _sha256(path: Path) -> str:
    """sha256 of a file; of a sharded checkpoint folder, of its files' names and contents in name order."""
    h = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]:
        if path.is_dir():
            h.update(file.name.encode())
        with open(file, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()
