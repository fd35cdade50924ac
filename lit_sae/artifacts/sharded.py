"""A latent-sharded checkpoint folder read in one process, with no process group: its files, its SAE as one
``TopKSAE``, its Lightning checkpoint with full tensors (its SAELens export: ``lit_sae.artifacts.export``).

Two folders are written by ``lit_sae.parallel`` (``torch.distributed.checkpoint`` (DCP) files, each rank its row
blocks of ``W_enc``, ``b_enc``, ``W_dec`` and their Adam moments, plus):

- ``SAEModelParallelStrategy``'s checkpoint (``lit-sae fit`` with that strategy): ``META_FILE`` (Lightning's
  non-tensor state: loops, callbacks, hyperparameters, optimizer settings) and ``MESH_FILE`` (the mesh sizes);
  read by :func:`read_strategy_checkpoint` (``lit_sae.artifacts.load.read_checkpoint`` on a folder);
- ``lit_sae.parallel.dcp.save_sharded``'s: ``MESH_FILE`` with the mesh sizes and the SAE's config
  (``CONFIG_KEYS``); read by :func:`load_full` (and ``export_sharded``).

The file names are defined here, the lowest layer that reads them; ``lit_sae.parallel.layout`` hands them to the
writers.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from lit_sae.sae.config import SHARDED_KEYS
from lit_sae.sae.model import TopKSAE
from lit_sae.safe_io import SafeFileSystemReader, torch_load

META_FILE = "meta.pt"
"""Lightning's name for the non-tensor part of a distributed checkpoint (``SAEModelParallelStrategy``)."""
MESH_FILE = "mesh.json"
"""The mesh a sharded checkpoint was written on (data_parallel_size, tensor_parallel_size), and, for
``save_sharded``'s folders, the SAE's config and ``extra``."""
CONFIG_KEYS = SHARDED_KEYS
"""The SAE settings ``save_sharded`` records in ``MESH_FILE`` (and a resume must match): those a latent-sharded SAE
takes (``lit_sae.sae.config.SHARDED_KEYS``). Folders written before activation and threshold_momentum were recorded
hold a subset; the missing ones had their defaults (a topk SAE, 0.99)."""


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


def read_strategy_checkpoint(path: str | Path) -> dict[str, Any]:
    """One process, no process group: a checkpoint folder of ``SAEModelParallelStrategy`` as one Lightning checkpoint
    dict with full tensors (DCP reassembles the row blocks): ``state_dict`` (``sae.W_enc`` (n_latents, d_in), ...,
    ``tokens_since_fired`` (n_latents,)), ``optimizer_states`` ([{"state": {param name: {exp_avg, exp_avg_sq,
    step}}, "param_groups": ...}]) and Lightning's own entries (``global_step``, ``hyper_parameters``, ...).

    Raises:
        FileNotFoundError: ``path`` is not such a folder (names the file that is missing)."""
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
