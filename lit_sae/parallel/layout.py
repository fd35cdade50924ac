"""How a latent-sharded SAE is laid out, in memory and on disk: a leaf of ``lit_sae.parallel`` that the strategy,
the DCP checkpoints and ``SAEModule``'s sharding all read, so that each name is defined once.

- ``SHARDED_PARAMS``: the SAE's parameters split in row blocks over the tensor-parallel ranks (rank t of T holds
  latents ``[t * n/T, (t+1) * n/T)``); everything else (``b_pre``, the scale, ``tokens_seen``) is replicated.
- ``TP_DIM``, ``DP_DIM``: Lightning's names of the DeviceMesh dimensions.
- ``META_FILE``, ``MESH_FILE``, ``CONFIG_KEYS``: the files of a sharded checkpoint folder and the SAE settings it
  records; defined with the folder's reader, ``lit_sae.artifacts.sharded`` (a lower layer), and re-exported here.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from lit_sae.artifacts.sharded import CONFIG_KEYS, MESH_FILE, META_FILE

__all__ = ["CONFIG_KEYS", "DP_DIM", "MESH_FILE", "META_FILE", "SHARDED_PARAMS", "TP_DIM", "as_dtensor",
           "latent_sharded_keys"]

SHARDED_PARAMS = ("W_enc", "b_enc", "W_dec")
TP_DIM, DP_DIM = "tensor_parallel", "data_parallel"  # Lightning's mesh dimension names


def latent_sharded_keys(module) -> set[str]:
    """``SAEModule``'s state_dict keys that are split over the tensor-parallel ranks (row blocks of n_latents / T):
    the sharded parameters, their EMA copies when EMA is on, and the dead-latent counters."""
    keys = {f"sae.{n}" for n in SHARDED_PARAMS} | {"tokens_since_fired"}
    if getattr(module, "ema", None) is not None:
        keys |= {f"ema.shadow_{n}" for n in SHARDED_PARAMS}
    return keys


def as_dtensor(t: Tensor, mesh: DeviceMesh, sharded: bool) -> DTensor:
    """A local shard (sharded over the mesh's last dimension, 'tensor', replicated over 'data') or a replicated
    tensor, as a DTensor sharing ``t``'s storage (what ``torch.distributed.checkpoint`` saves and loads into)."""
    placements = [Replicate()] * (mesh.ndim - 1) + [Shard(0) if sharded else Replicate()]
    shape = None
    if sharded:
        T = mesh.size(mesh.ndim - 1)
        shape = torch.Size([t.shape[0] * T, *t.shape[1:]])
    stride = None if shape is None else torch.empty(shape, device="meta").stride()
    return DTensor.from_local(t, mesh, placements, run_check=False, shape=shape, stride=stride)
