"""``SAEModelParallelStrategy``: Lightning's ``ModelParallelStrategy`` for a latent-sharded SAE, CPU/gloo included.

Lightning's ``ModelParallelStrategy`` builds the (data_parallel x tensor_parallel) DeviceMesh, launches the processes
and calls ``LightningModule.configure_model``, where ``SAEModule`` shards its SAE (``lit_sae.parallel.sharding``). It
runs on CPU with gloo as it is; this thin subclass adds what a hand-sharded module (plain local tensors, not DTensors
or FSDP2) needs:

- the mesh is checked before any process starts (``data_parallel_size x tensor_parallel_size`` must equal
  ``trainer.devices x trainer.num_nodes``), with a message naming the keys;
- the data-parallel ranks gather their codes and each computes the global batch's gradient (``TokenGather``, set by
  ``lit_sae.parallel.sharding``; there is no DDP wrapper; a summing ``GroupSum`` has its gradients averaged after
  backward instead), and ``reduce`` sums replicated values over the data-parallel group, so that counters are not
  counted T times;
- checkpoints with ``torch.distributed.checkpoint`` (each rank writes its shard): the latent-sharded tensors
  (``sae.W_enc``, ``sae.b_enc``, ``sae.W_dec``, their EMA copies and Adam moments, ``tokens_since_fired``) as
  DTensors sharded over the tensor dimension, the rest replicated, Lightning's own state (loops, callbacks,
  schedulers, hyperparameters, optimizer settings) in ``meta.pt`` beside them, and the mesh in ``mesh.json``; the
  folder is written under a temporary name and renamed when complete. A resume checks the mesh first.

Use: ``lit-sae fit --config X --trainer.accelerator cpu --trainer.devices 4 --trainer.strategy
lit_sae.parallel.strategy.SAEModelParallelStrategy --trainer.strategy.data_parallel_size 2
--trainer.strategy.tensor_parallel_size 2``.
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
from lightning.pytorch.strategies import ModelParallelStrategy

from lit_sae.fsync import fsync_dir, temp_dir_beside
from lit_sae.parallel.layout import MESH_FILE, META_FILE, as_dtensor, latent_sharded_keys
from lit_sae.parallel.tensor import check_mesh
from lit_sae.safe_io import SafeFileSystemReader, dumps_json, torch_load


class SAEModelParallelStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy(data_parallel_size, tensor_parallel_size)`` for ``SAEModule`` (see the module doc).

    Args:
        data_parallel_size: data-parallel ranks (each holds ``data.batch_size_tokens / data_parallel_size`` of
            every global batch); ``auto``: the number of nodes.
        tensor_parallel_size: ranks the latents are split over (n_latents must be divisible by it); ``auto``: the
            processes of one node.
        process_group_backend, timeout: as ``ModelParallelStrategy`` (gloo on CPU, nccl on CUDA by default).
    """

    def __init__(self, data_parallel_size: int | str = "auto", tensor_parallel_size: int | str = "auto",
                 process_group_backend: Optional[str] = None, **kwargs: Any):
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size,
                         save_distributed_checkpoint=True, process_group_backend=process_group_backend, **kwargs)

    # ---- the mesh ---------------------------------------------------------------------------------------------------
    def _sizes(self) -> tuple[int, int]:
        world = self.num_nodes * self.num_processes
        dp = self.num_nodes if self._data_parallel_size == "auto" else int(self._data_parallel_size)
        tp = self.num_processes if self._tensor_parallel_size == "auto" else int(self._tensor_parallel_size)
        return dp, tp, world

    def _configure_launcher(self) -> None:
        dp, tp, world = self._sizes()
        try:
            check_mesh(world, dp, tp)
        except ValueError as exn:
            raise ValueError(f"trainer.strategy.{exn}") from None
        super()._configure_launcher()

    @property
    def data_parallel_group(self):
        return self.device_mesh["data_parallel"].get_group()

    def training_step(self, *args: Any, **kwargs: Any):
        if not getattr(self, "_batches_checked", False):
            self._batches_checked = True
            check_batch_layout(args[0], self.device_mesh)
        return super().training_step(*args, **kwargs)

    # ---- gradients and reductions ----------------------------------------------------------------------------------
    def post_backward(self, closure_loss: torch.Tensor) -> None:
        """Average every gradient over the data-parallel group when the losses sum their statistics over it
        (``GroupSum``); when the ranks gather their codes (``TokenGather``, what ``SAEModule`` sets) every rank's
        gradient is the global batch's already."""
        super().post_backward(closure_loss)
        from lit_sae.parallel.tensor import average_gradients_

        sae = getattr(self.lightning_module, "sae", None)
        if self.device_mesh["data_parallel"].size() > 1 and not getattr(getattr(sae, "batch_sum", None), "gathers",
                                                                          False):
            average_gradients_(self.lightning_module, self.data_parallel_group)

    def reduce(self, tensor, group: Optional[Any] = None, reduce_op: Optional[Any] = "mean"):
        """Reduce over the data-parallel group by default: values are replicated over the tensor-parallel ranks."""
        if group is None and self._device_mesh is not None and isinstance(tensor, torch.Tensor):
            group = self.data_parallel_group
        return super().reduce(tensor, group=group, reduce_op=reduce_op)

    # ---- checkpoints -------------------------------------------------------------------------------------------------
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """This rank's state (latent-sharded tensors hold this rank's rows); wrapped as DTensors when saved."""
        return dict(self.lightning_module.state_dict())

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        return getattr(optimizer, "_optimizer", optimizer).state_dict()

    @property
    def lightning_restore_optimizer(self) -> bool:
        return True  # load_optimizer_state_dict applies the saved optimizer settings after the module's hooks

    def _dcp_state(self, model_state: dict, optim_states: list[dict]) -> dict:
        """DCP's view: latent-sharded tensors as DTensors (Shard(0) over the tensor dim), the rest replicated."""
        module, mesh = self.lightning_module, self.device_mesh
        sharded = latent_sharded_keys(module)
        state: dict[str, Any] = {"state_dict": {k: (as_dtensor(v, mesh, True) if k in sharded else v)
                                                for k, v in model_state.items() if isinstance(v, torch.Tensor)}}
        names = {id(p): name for name, p in module.named_parameters()}
        for i, (opt, saved) in enumerate(zip(self.optimizers, optim_states)):
            params = [p for group in opt.param_groups for p in group["params"]]
            per_param = {}
            for idx, slots in saved["state"].items():
                name = names[id(params[idx])]
                per_param[name] = {key: (as_dtensor(v, mesh, name in sharded) if v.dim() else v)
                                   for key, v in slots.items()}
            state[f"optimizer_{i}"] = per_param
        return state

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Optional[Any] = None) -> None:
        """Collective: every rank writes its shard into ``filepath`` (a folder), via a temporary folder."""
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options")
        path = Path(self.broadcast(str(filepath)))
        tmp = Path(self.broadcast(str(temp_dir_beside(path, "tmp-")) if self.is_global_zero else None))
        optim_states = checkpoint.pop("optimizer_states", [])
        state = self._dcp_state(checkpoint.pop("state_dict"), optim_states)
        dcp.save(state, checkpoint_id=str(tmp))
        if self.is_global_zero:
            # the optimizer's settings (lr, betas, eps, ...) without its tensors; loops, callbacks, hyperparameters
            checkpoint["optimizer_states"] = [{"param_groups": s["param_groups"]} for s in optim_states]
            torch.save(checkpoint, tmp / META_FILE)
            dp, tp, _ = self._sizes()
            (tmp / MESH_FILE).write_text(dumps_json({"data_parallel_size": dp, "tensor_parallel_size": tp}))
            old = None
            if path.is_file():
                path.unlink()
            elif path.exists():
                old = temp_dir_beside(path, "old-")
                os.replace(path, old / path.name)
            os.replace(tmp, path)
            fsync_dir(path.parent)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        self.barrier()

    def remove_checkpoint(self, filepath) -> None:
        if self.is_global_zero:
            path = Path(filepath)
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Collective: load this rank's shard in place; returns Lightning's part of the checkpoint.

        Raises:
            ValueError: the folder is not a sharded checkpoint, or was written on another mesh (names both)."""
        path = Path(self.broadcast(str(checkpoint_path)))
        if not (path / MESH_FILE).is_file():
            raise ValueError(f"{path} is not a checkpoint of trainer.strategy={type(self).__name__} (no {MESH_FILE}): "
                             "resume with the strategy that wrote it")
        saved = json.loads((path / MESH_FILE).read_text())
        dp, tp, _ = self._sizes()
        now = {"data_parallel_size": dp, "tensor_parallel_size": tp}
        diff = [f"trainer.strategy.{k}: checkpoint {saved[k]}, now {now[k]}" for k in now if saved[k] != now[k]]
        if diff:
            raise ValueError(f"{path} was written on another mesh ({'; '.join(diff)}): resume on the mesh that "
                             "wrote it (or export it with `lit-sae export` and start a new run with --model.init_from)")
        meta = torch_load(path / META_FILE, "checkpoint metadata")
        _check_model(path, meta, self.lightning_module)
        module = self.lightning_module
        optim_states = []
        for opt in self.optimizers:
            for p in (p for group in opt.param_groups for p in group["params"]):
                if not opt.state.get(p):  # Adam creates its moments lazily: give it the slots to load into
                    opt.state[p] = {"step": torch.zeros((), dtype=torch.float32),
                                    "exp_avg": torch.zeros_like(p.data), "exp_avg_sq": torch.zeros_like(p.data)}
            optim_states.append({"state": {i: opt.state[p] for i, p in
                                           enumerate(p for group in opt.param_groups for p in group["params"])}})
        live = module.state_dict(keep_vars=True)
        state = self._dcp_state({k: v.data for k, v in live.items()}, optim_states)
        dcp.load(state, storage_reader=SafeFileSystemReader(path))
        with torch.no_grad():  # DCP writes into the DTensors' local tensors, which share storage with the live ones
            for key, value in state["state_dict"].items():
                local = value.to_local() if hasattr(value, "to_local") else value
                if local.data_ptr() != live[key].data_ptr():
                    live[key].data.copy_(local)
        return meta

    def load_optimizer_state_dict(self, checkpoint) -> None:
        """The saved optimizer settings (lr, betas, eps, initial_lr), after ``SAEModule.on_load_checkpoint`` applied
        a changed ``model.lr``; the moments were loaded with the weights."""
        for opt, saved in zip(self.optimizers, checkpoint.get("optimizer_states", [])):
            for group, old in zip(opt.param_groups, saved["param_groups"]):
                group.update({k: v for k, v in old.items() if k != "params"})


def check_batch_layout(batch: Any, mesh) -> None:
    """Collective, at the first training step: the tensor-parallel ranks of a data-parallel group must hold the same
    batch, and every data-parallel rank a batch of the same size.

    Raises:
        ValueError (on every rank, so that none waits for the others): names the ranks and the sizes."""
    acts = batch["acts"] if isinstance(batch, dict) else batch
    mine = torch.tensor([float(acts.shape[0]), float(acts.detach().double().sum())], dtype=torch.float64)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    ranks = mesh.mesh.tolist()  # (data_parallel_size, tensor_parallel_size) global ranks
    for d, row in enumerate(ranks):
        if any(not torch.equal(parts[r], parts[row[0]]) for r in row):
            raise ValueError(f"the tensor-parallel ranks {row} of data-parallel rank {d} read different training "
                             "batches: the DataModule must split the data over the data-parallel ranks only (rank and "
                             "num_replicas of trainer.distributed_sampler_kwargs), not over every process")
    rows = [int(parts[row[0]][0]) for row in ranks]
    if len(set(rows)) > 1:
        raise ValueError(f"the data-parallel ranks read batches of {rows} tokens: each must hold an equal part "
                         "(data.batch_size_tokens / data_parallel_size) of every global batch")


def _check_model(path: Path, meta: dict, module) -> None:
    """Refuse a checkpoint of another SAE shape before DCP reads tensors of the wrong size."""
    saved = meta.get("hyper_parameters") or {}
    now = getattr(module, "hparams", {})
    diff = [f"model.{k}: checkpoint {saved.get(k)}, config {now.get(k)}" for k in ("d_in", "n_latents")
            if k in saved and saved.get(k) != now.get(k)]
    if diff:
        raise ValueError(f"{path} was written by a run with another model config ({'; '.join(diff)}): resume with "
                         "the config that wrote it")


def is_distributed_checkpoint(path) -> bool:
    """Whether ``path`` is a folder written by :class:`SAEModelParallelStrategy`."""
    p = Path(path)
    return p.is_dir() and (p / META_FILE).is_file() and (p / MESH_FILE).is_file()
