"""Checkpoints of a latent-sharded SAE with ``torch.distributed.checkpoint`` (DCP): each rank writes its own shard.

Layout of a checkpoint folder (DCP's own files, plus ``mesh.json``)::

    .metadata, __0_0.distcp, ...   DCP: model/W_enc, model/b_enc, model/W_dec as DTensors sharded over the tensor
                                   dimension (row blocks of n_latents / T), model/b_pre and buffers replicated,
                                   optim/<name>/exp_avg|exp_avg_sq sharded like their parameter, optim/<name>/step,
                                   dead_counts sharded with the latents, and ``extra`` (plain values, e.g. steps)
    mesh.json                      data_parallel_size, tensor_parallel_size and the SAE's config

Written to ``<path>.tmp-*`` and renamed when every rank has finished, so a crash never leaves a folder that looks
complete. :func:`load_sharded` resumes on the same mesh only (another mesh is refused before anything is loaded);
:func:`export_sharded` (one process, no process group) assembles the full matrices and writes one SAELens export.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from lit_sae.fsync import fsync_dir, temp_dir_beside
from lit_sae.sae.model import TopKSAE
from lit_sae.safe_io import SafeFileSystemReader, dumps_json, torch_load

SHARDED = ("W_enc", "b_enc", "W_dec")
MESH_FILE = "mesh.json"
_CONFIG_KEYS = ("d_in", "n_latents", "k", "k_aux", "auxk_coef", "multi_topk", "multi_topk_factor", "normalize")


def _wrap(t: Tensor, mesh: DeviceMesh, sharded: bool) -> DTensor:
    """A local shard (sharded over mesh dim 'tensor', replicated over 'data') or a replicated tensor, as a DTensor."""
    placements = [Replicate()] * (mesh.ndim - 1) + [Shard(0) if sharded else Replicate()]
    shape = None
    if sharded:
        T = mesh.size(mesh.ndim - 1)
        shape = torch.Size([t.shape[0] * T, *t.shape[1:]])
    stride = None if shape is None else torch.empty(shape, device="meta").stride()
    return DTensor.from_local(t, mesh, placements, run_check=False, shape=shape, stride=stride)


def _state(sae, optimizer: torch.optim.Optimizer, dead_counts: Optional[Tensor], mesh: DeviceMesh) -> dict:
    """The DCP state: DTensors that share storage with the live parameters, Adam moments and counters."""
    model: dict[str, Any] = {}
    optim: dict[str, Any] = {}
    for name, p in sae.named_parameters():
        sharded = name in SHARDED
        model[name] = _wrap(p.data, mesh, sharded)
        st = optimizer.state.get(p)
        if not st:  # Adam creates its moments lazily: give a fresh optimizer the slots to load into
            st = optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32),
                                       "exp_avg": torch.zeros_like(p.data), "exp_avg_sq": torch.zeros_like(p.data)}
        optim[name] = {key: (_wrap(v, mesh, sharded) if key != "step" else v) for key, v in st.items()}
    for name, b in sae.named_buffers():
        model[name] = b
    state = {"model": model, "optim": optim}
    if dead_counts is not None:
        state["dead_counts"] = _wrap(dead_counts, mesh, True)
    return state


def _mesh_info(sae, mesh: DeviceMesh) -> dict:
    return {"data_parallel_size": mesh.size(0) if mesh.ndim > 1 else 1,
            "tensor_parallel_size": mesh.size(mesh.ndim - 1),
            "config": {key: getattr(sae, key) for key in _CONFIG_KEYS}}


def save_sharded(path: str | Path, sae, optimizer: torch.optim.Optimizer, mesh: DeviceMesh,
                 dead_counts: Optional[Tensor] = None, extra: Optional[dict] = None) -> Path:
    """Collective: every rank of ``mesh`` writes its shard of the SAE, Adam state and dead counters to ``path``.

    ``mesh``: the (data, tensor) DeviceMesh (or 1-D tensor mesh) the SAE is sharded on. ``extra``: small plain
    values saved by rank 0 in mesh.json (e.g. the step). An existing ``path`` is replaced only once the new one is
    complete."""
    path = Path(path)
    made = [str(temp_dir_beside(path, "tmp-")) if dist.get_rank() == 0 else None]  # exclusive, unpredictable
    dist.broadcast_object_list(made, src=0)
    tmp = Path(made[0])
    dcp.save(_state(sae, optimizer, dead_counts, mesh), checkpoint_id=str(tmp))
    if dist.get_rank() == 0:
        (tmp / MESH_FILE).write_text(dumps_json(_mesh_info(sae, mesh) | {"extra": extra or {}}, indent=2))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    dist.barrier()
    return path


def load_sharded(path: str | Path, sae, optimizer: torch.optim.Optimizer, mesh: DeviceMesh,
                 dead_counts: Optional[Tensor] = None) -> dict:
    """Collective: load a :func:`save_sharded` checkpoint into this rank's shard, in place; returns ``extra``.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ValueError: the checkpoint was written on another mesh or with another SAE config (names both values).
    """
    path = Path(path)
    if not (path / MESH_FILE).is_file():
        raise FileNotFoundError(f"{path}: not a sharded lit-sae checkpoint (no {MESH_FILE})")
    saved = json.loads((path / MESH_FILE).read_text())
    now = _mesh_info(sae, mesh)
    diff = [f"{key}: checkpoint {saved[key]}, now {now[key]}" for key in ("data_parallel_size", "tensor_parallel_size")
            if saved[key] != now[key]]
    diff += [f"model.{key}: checkpoint {saved['config'][key]!r}, now {now['config'][key]!r}"
             for key in _CONFIG_KEYS if saved["config"].get(key) != now["config"][key]]
    if diff:
        raise ValueError(f"{path} was written on another mesh or model ({'; '.join(diff)}): resume with the "
                         "strategy's data_parallel_size / tensor_parallel_size and model settings that wrote it")
    state = _state(sae, optimizer, dead_counts, mesh)
    dcp.load(state, storage_reader=SafeFileSystemReader(path))
    with torch.no_grad():  # DCP loads into the DTensors' local tensors; make sure the live tensors hold the values
        for name, p in sae.named_parameters():
            local = state["model"][name].to_local()
            if local.data_ptr() != p.data.data_ptr():
                p.data.copy_(local)
        if dead_counts is not None:
            local = state["dead_counts"].to_local()
            if local.data_ptr() != dead_counts.data_ptr():
                dead_counts.copy_(local)
    return saved.get("extra", {})


@torch.no_grad()
def gather_full(sae) -> TopKSAE:
    """Collective over the SAE's tensor-parallel group: the unsharded ``TopKSAE`` (on every rank of the group)."""
    from lit_sae.parallel.collectives import all_gather_cat

    cfg = {key: getattr(sae, key) for key in _CONFIG_KEYS if key not in ("d_in", "n_latents", "k")}
    full = TopKSAE(sae.d_in, sae.n_latents, sae.k, **cfg).to(sae.W_dec.dtype)
    for name in SHARDED:
        getattr(full, name).copy_(all_gather_cat(getattr(sae, name).detach(), sae.tp_group, dim=0))
    full.b_pre.copy_(sae.b_pre)
    for name, buf in sae.named_buffers():
        getattr(full, name).copy_(buf)
    return full


def load_full(path: str | Path) -> tuple[TopKSAE, dict]:
    """One process, no process group: the unsharded ``TopKSAE`` of a sharded checkpoint (DCP reassembles the row
    blocks), and the checkpoint's mesh.json."""
    path = Path(path)
    if not (path / MESH_FILE).is_file():
        raise FileNotFoundError(f"{path}: not a sharded lit-sae checkpoint (no {MESH_FILE})")
    info = json.loads((path / MESH_FILE).read_text())
    cfg = dict(info["config"])
    sae = TopKSAE(cfg.pop("d_in"), cfg.pop("n_latents"), cfg.pop("k"), **cfg)
    meta = SafeFileSystemReader(path).read_metadata()
    dtype = meta.state_dict_metadata["model.W_dec"].properties.dtype
    sae.to(dtype)
    state = {"model": {name: t.data for name, t in [*sae.named_parameters(), *sae.named_buffers()]}}
    with warnings.catch_warnings():  # "no process group: loading in a single process" is the intent here
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=SafeFileSystemReader(path), no_dist=True)
    return sae, info


def export_sharded(path: str | Path, out_dir: str | Path, hook_point: Optional[str] = None,
                   lm_name: Optional[str] = None) -> Path:
    """Assemble a sharded checkpoint into one SAELens-layout export (``lit_sae.artifacts.export.export_sae``)."""
    from lit_sae.artifacts.export import export_sae

    sae, info = load_full(path)
    extra = info.get("extra", {})
    return export_sae(sae, out_dir, hook_point=hook_point or extra.get("hook_point"),
                      lm_name=lm_name or extra.get("lm_name"))


def read_strategy_checkpoint(path: str | Path) -> dict[str, Any]:
    """One process, no process group: a checkpoint folder of ``SAEModelParallelStrategy`` as one Lightning checkpoint
    dict with full tensors (DCP reassembles the row blocks): ``state_dict`` (``sae.W_enc`` (n_latents, d_in), ...,
    ``tokens_since_fired`` (n_latents,)), ``optimizer_states`` ([{"state": {param name: {exp_avg, exp_avg_sq,
    step}}, "param_groups": ...}]) and Lightning's own entries (``global_step``, ``hyper_parameters``, ...).

    Raises:
        FileNotFoundError: ``path`` is not such a folder (names the file that is missing)."""
    from lit_sae.parallel.strategy import MESH_FILE, META_FILE

    path = Path(path)
    for name in (META_FILE, MESH_FILE, ".metadata"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path}: not a sharded lit-sae checkpoint folder (no {name})")
    ckpt = torch_load(path / META_FILE, "checkpoint metadata")
    meta = SafeFileSystemReader(path).read_metadata()
    flat = {fqn: torch.empty(md.size, dtype=md.properties.dtype) for fqn, md in meta.state_dict_metadata.items()
            if isinstance(md, dcp.metadata.TensorStorageMetadata)}
    with warnings.catch_warnings():  # "no process group: loading in a single process" is the intent here
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(flat, storage_reader=SafeFileSystemReader(path), no_dist=True)
    ckpt["state_dict"] = {k[len("state_dict."):]: v for k, v in flat.items() if k.startswith("state_dict.")}
    groups = [g["param_groups"] for g in ckpt.get("optimizer_states", [])]
    states: list[dict] = []
    for i in range(len(groups)):
        prefix, per_param = f"optimizer_{i}.", {}
        for k, v in flat.items():
            if k.startswith(prefix):
                name, slot = k[len(prefix):].rsplit(".", 1)
                per_param.setdefault(name, {})[slot] = v
        states.append({"state": per_param, "param_groups": groups[i]})
    ckpt["optimizer_states"] = states
    return ckpt
