"""Checkpoints of a latent-sharded SAE with ``torch.distributed.checkpoint`` (DCP): each rank writes its own shard.

Layout of a checkpoint folder (DCP's own files, plus ``mesh.json``)::

    .metadata, __0_0.distcp, ...   DCP: model/W_enc, model/b_enc, model/W_dec as DTensors sharded over the tensor
                                   dimension (row blocks of n_latents / T), model/b_pre and buffers replicated,
                                   optim/<name>/exp_avg|exp_avg_sq sharded like their parameter, optim/<name>/step,
                                   dead_counts sharded with the latents, and ``extra`` (plain values, e.g. steps)
    mesh.json                      data_parallel_size, tensor_parallel_size and the SAE's config

Written to ``<path>.tmp-*`` and renamed when every rank has finished, so a crash never leaves a folder that looks
complete. :func:`load_sharded` resumes on the same mesh only (another mesh is refused before anything is loaded);
``lit_sae.artifacts.export.export_sharded`` (one process, no process group) assembles the full matrices and writes
one SAELens export.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh

# Moved: the one-process readers live with the other readers (lit_sae.artifacts); importable here as before. The
# gather to one SAE is lit_sae.parallel.sharding.gather_full(sae, everywhere=True).
from lit_sae.artifacts.export import export_sharded as export_sharded
from lit_sae.artifacts.sharded import load_full as load_full
from lit_sae.artifacts.sharded import read_strategy_checkpoint as read_strategy_checkpoint
from lit_sae.fsync import fsync_dir, temp_dir_beside
from lit_sae.parallel.layout import CONFIG_KEYS, MESH_FILE, SHARDED_PARAMS, as_dtensor
from lit_sae.safe_io import SafeFileSystemReader, dumps_json


def _state(sae, optimizer: torch.optim.Optimizer, dead_counts: Optional[Tensor], mesh: DeviceMesh) -> dict:
    """The DCP state: DTensors that share storage with the live parameters, Adam moments and counters."""
    model: dict[str, Any] = {}
    optim: dict[str, Any] = {}
    for name, p in sae.named_parameters():
        sharded = name in SHARDED_PARAMS
        model[name] = as_dtensor(p.data, mesh, sharded)
        st = optimizer.state.get(p)
        if not st:  # Adam creates its moments lazily: give a fresh optimizer the slots to load into
            st = optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32),
                                       "exp_avg": torch.zeros_like(p.data), "exp_avg_sq": torch.zeros_like(p.data)}
        optim[name] = {key: (as_dtensor(v, mesh, sharded) if key != "step" else v) for key, v in st.items()}
    for name, b in sae.named_buffers():
        model[name] = b
    state = {"model": model, "optim": optim}
    if dead_counts is not None:
        state["dead_counts"] = as_dtensor(dead_counts, mesh, True)
    return state


def _mesh_info(sae, mesh: DeviceMesh) -> dict:
    return {"data_parallel_size": mesh.size(0) if mesh.ndim > 1 else 1,
            "tensor_parallel_size": mesh.size(mesh.ndim - 1),
            "config": {key: getattr(sae, key) for key in CONFIG_KEYS}}


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
             for key in CONFIG_KEYS if key in saved["config"] and saved["config"][key] != now["config"][key]]
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
