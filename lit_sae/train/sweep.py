"""``SAESweepModule``: several SAEs trained on one activation stream, each batch read once and fed to every SAE.

Design (Lightning's automatic optimisation, one optimizer with one parameter group per SAE):
the SAEs share no parameter, so the gradient of the summed loss with respect to one SAE's weights is exactly the
gradient of its own loss; one Adam holds a separate state (moments, step) for every parameter, i.e. for every SAE,
and each SAE's group carries its own learning rate. This keeps Lightning's precision plugins, checkpointing of the
optimizer and scheduler, and one fused multi-tensor Adam launch for all SAEs, where manual optimisation with N
optimizers would re-implement them. Consequences, stated: ``trainer.gradient_clip_val`` with the norm algorithm
would clip the SAEs jointly (refused); a non-finite loss in any SAE stops the whole sweep (named).

Each SAE keeps its own dead-latent counters (a buffer in its ``SweepMember``), its own validation / test metrics,
its own LR schedule and EMA (``TRAINING_KEYS``; the per-SAE keys and ``expand_specs`` live in
``lit_sae.train.sweep_specs``, the memory estimate in ``lit_sae.train.sweep_memory``), and is exported to
``<run root>/sae/<name>/`` at the end of fit.
``lit-sae sweep test`` writes one table (``<run root>/sweep_test.md`` and ``.json``) with every SAE's NMSE, L0 and
dead fraction; with ``--config callbacks/eval.yaml`` also every SAE's full evaluation report
(``<run root>/reports/<name>/report.{json,md}``, ``lit_sae.callbacks.sweep_report``) and the table gains delta CE,
probe loss, ablation sparsity and explainability.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from torch import Tensor, nn

from lit_sae.eval.metrics import L0, NormalizedMSE
from lit_sae.sae.checks import check_acts
from lit_sae.sae.ema import EMA
from lit_sae.sae.model import TopKSAE
from lit_sae.train.batches import batch_acts
from lit_sae.train.dead_latents import count_fired_
from lit_sae.train.module import PAPER_EPS, default_lr
from lit_sae.train.rng_state import rng_states, set_rng_states
from lit_sae.train.runs import export_dir
from lit_sae.train.schedule import check_schedule, check_threshold_lr_scale, param_groups, step_scheduler
from lit_sae.train.sweep_memory import (  # noqa: F401 (re-exported)
    BYTES_PER_PARAM,
    DENSE_BUFFERS,
    available_bytes,
    estimate_bytes,
)
from lit_sae.train.sweep_specs import DATA_KEYS, SAE_KEYS, TRAINING_KEYS, expand_specs  # noqa: F401 (re-exported)
from lit_sae.train.sweep_table import TABLE_COLUMNS, table_row, write_test_table  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)


class SweepMember(nn.Module):
    """One SAE of a sweep and the training state that is its own: the dead-latent counters and, with ``ema_decay``,
    the EMA of its weights (``lit_sae.sae.ema.EMA``; its buffers are saved with the checkpoint)."""

    def __init__(self, sae: TopKSAE, ema_decay: Optional[float] = None):
        super().__init__()
        self.sae = sae
        self.register_buffer("tokens_since_fired", torch.zeros(sae.n_latents, dtype=torch.long))
        self.ema = EMA(sae, ema_decay) if ema_decay is not None else None

    def eval_weights(self):
        """A context in which ``self.sae`` holds the weights to evaluate and export (the EMA's when on)."""
        return self.ema.swapped_into(self.sae) if self.ema is not None else nullcontext(self.sae)


class SAESweepModule(L.LightningModule):
    """Trains N SAEs on one stream of activations (see the module docstring for the design).

    Args:
        d_in: width of the activations (linked from the data by the CLI).
        saes: a list of SAEs, each a dict of TopKSAE settings (``SAE_KEYS``) plus optional ``name``, training
            settings (``TRAINING_KEYS``: ``lr``, ``warmup_steps``, ``decay_start``, ``ema_decay``,
            ``jumprelu_threshold_lr_scale``, with ``SAEModule``'s meaning, each SAE its own) and data settings
            (``DATA_KEYS``: its own ``hook_point`` among the data's ``hook_points``, and that hook's ``d_in``), so
            one LM pass (or one multi-hook harvest) trains SAEs on several layers.
        grid: lists of values whose Cartesian product is applied to every entry of ``saes`` (e.g.
            ``{k: [16, 32], activation: [topk, batchtopk]}``).
        defaults: settings every SAE starts from (entries of ``saes`` and ``grid`` override them).
        betas, eps: Adam's (the paper's eps 6.25e-10).
        dead_after_tokens: a latent that has not fired for this many tokens is dead (AuxK trains it).
        init_tokens: tokens sampled at the start of fit for every SAE's b_pre and input scale.
        memory_budget_gib: the memory the sweep may use (null: the device's free memory); a sweep whose estimate
            exceeds it is refused before training.
        hook_point, lm_name: recorded in the exports (linked from the data).
        export_dir: folder of the exports (default ``<run root>/sae``; one sub-folder per SAE; ``none``: off).
    """

    def __init__(self, d_in: int, saes: Optional[list[dict[str, Any]]] = None,
                 grid: Optional[dict[str, list]] = None, defaults: Optional[dict[str, Any]] = None,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = PAPER_EPS,
                 dead_after_tokens: int = 10_000_000, init_tokens: int = 32_768,
                 memory_budget_gib: Optional[float] = None, hook_point: Optional[str] = None,
                 lm_name: Optional[str] = None, export_dir: Optional[str] = None):
        super().__init__()
        self.save_hyperparameters()
        if dead_after_tokens <= 0:
            raise ValueError(f"model.dead_after_tokens={dead_after_tokens} must be positive (the paper: 10M)")
        self.specs = expand_specs(saes, grid, {"n_latents": 16384, "k": 32, **(defaults or {})})
        members = {}
        for spec in self.specs:
            kwargs = {k: spec[k] for k in SAE_KEYS if k in spec}
            key = f"model.saes[{spec['name']}]."
            if spec.get("lr") is not None and not spec["lr"] > 0:
                raise ValueError(f"{key}lr={spec['lr']} must be positive")
            check_schedule(spec.get("warmup_steps", 0), spec.get("decay_start"), key)
            check_threshold_lr_scale(spec.get("jumprelu_threshold_lr_scale"), key)
            try:
                sae = TopKSAE(int(spec.get("d_in") or d_in), kwargs.pop("n_latents"), kwargs.pop("k"), **kwargs)
                members[spec["name"]] = SweepMember(sae, spec.get("ema_decay"))
            except ValueError as exn:
                raise ValueError(f"{key}{exn}") from None
        self.members = nn.ModuleDict(members)
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))
        self.val_metrics = nn.ModuleDict({n: nn.ModuleList([NormalizedMSE(), L0()]) for n in members})
        self.test_metrics = nn.ModuleDict({n: nn.ModuleList([NormalizedMSE(), L0()]) for n in members})
        self._resumed_rng: Optional[dict] = None
        self._eval_stack = ExitStack()

    def lr_of(self, spec: dict[str, Any]) -> float:
        return spec["lr"] if spec.get("lr") is not None else default_lr(int(spec["n_latents"]))

    # ------------------------------------------------------------------ set-up
    def memory_estimate(self, batch_tokens: int) -> dict[str, int]:
        """Estimated training bytes per SAE (``estimate_bytes``)."""
        return {s["name"]: estimate_bytes(int(s.get("d_in") or self.hparams.d_in), s, batch_tokens) for s in self.specs}

    def check_memory(self, batch_tokens: int, device: torch.device) -> None:
        """Refuse a sweep whose estimate exceeds ``memory_budget_gib`` (or the device's free memory)."""
        need = sum(self.memory_estimate(batch_tokens).values())
        budget = self.hparams.memory_budget_gib
        have = int(budget * 2**30) if budget is not None else available_bytes(device)
        if have is not None and need > have:
            per = ", ".join(f"{n}: {b / 2**30:.2f}" for n, b in self.memory_estimate(batch_tokens).items())
            raise ValueError(
                f"model.saes: the {len(self.specs)} SAEs need about {need / 2**30:.2f} GiB to train at "
                f"{batch_tokens} tokens per batch (weights, gradients and Adam state x 16 bytes per parameter plus "
                f"dense codes; per SAE in GiB: {per}), more than the {have / 2**30:.2f} GiB "
                f"{'of model.memory_budget_gib' if budget is not None else 'free on ' + str(device)}: drop SAEs from "
                "the grid, split the sweep, or lower data.batch_size_tokens")

    def setup(self, stage: str) -> None:
        """Refuse what cannot work before training: joint norm clipping, a grid that does not fit in memory. (In
        test, an ``EvalReport`` callback gives every SAE its own report: it adapts itself to a sweep.)"""
        from lit_sae.parallel.data_parallel import destroy_process_group_at_exit

        destroy_process_group_at_exit()
        if stage != "fit":
            return
        clip = self.trainer.gradient_clip_val
        if clip and self.trainer.gradient_clip_algorithm in (None, "norm"):
            raise ValueError("trainer.gradient_clip_val with the norm algorithm would clip all SAEs of a sweep "
                             "jointly: use trainer.gradient_clip_algorithm=value or no clipping")
        dm = self.trainer.datamodule
        self.check_hooks(dm)
        batch_tokens = int(getattr(dm, "batch_size_tokens", 0) or 4096)
        self.check_memory(batch_tokens, self.device if self.device.type != "meta" else torch.device("cpu"))

    def hook_of(self, name: str) -> Optional[str]:
        """The hook point SAE ``name`` reads (None: the data's main one, ``batch["acts"]``)."""
        hook = next(s for s in self.specs if s["name"] == name).get("hook_point")
        return None if hook is None or hook == self.hparams.hook_point else hook

    def check_hooks(self, dm) -> None:
        """Every entry's hook point must be read by the data, with the entry's width (ValueError naming the key)."""
        widths = getattr(dm, "d_ins", None) or {self.hparams.hook_point: self.hparams.d_in}
        for spec in self.specs:
            hook = self.hook_of(spec["name"])
            if hook is None:
                continue
            key = f"model.saes[{spec['name']}]"
            if hook not in widths:
                raise ValueError(f"{key}.hook_point: {hook!r} is not read by the data (it reads {sorted(widths)}); add "
                                 "it to data.hook_points (one LM pass or one multi-hook harvest serves them all)")
            d = self.members[spec["name"]].sae.d_in
            if widths[hook] != d:
                raise ValueError(f"{key}.d_in: {hook!r} is {widths[hook]} wide in the data, the SAE {d}; set the "
                                 f"entry's d_in: {widths[hook]}")

    def acts_of(self, batch: Any, name: str) -> Tensor:
        """The batch's activations for SAE ``name``: ``batch["acts@{hook}"]`` for its own hook point."""
        from lit_sae.data.multi_hook import batch_key

        hook = self.hook_of(name)
        if hook is None:
            return batch_acts(batch)
        if batch_key(hook) not in batch:
            raise ValueError(f"model.saes[{name}].hook_point: the batch has no {batch_key(hook)!r}; add {hook!r} to "
                             "data.hook_points")
        return batch[batch_key(hook)]

    def on_fit_start(self) -> None:
        """b_pre (geometric median) and input scale of every SAE from one shared sample per hook point, once (never
        on resume)."""
        todo = [n for n, m in self.members.items() if not bool(m.sae.data_initialized)]
        if not todo:
            return
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "sample_activations"):
            raise ValueError("data: a sweep needs a DataModule with sample_activations (ActivationDataModule, "
                             "SyntheticDataModule)")
        samples: dict[Optional[str], Tensor] = {}
        for name in todo:
            hook = self.hook_of(name)
            if hook not in samples:
                sample = (dm.sample_activations(self.hparams.init_tokens) if hook is None else
                          dm.sample_activations(self.hparams.init_tokens, hook_point=hook))
                samples[hook] = sample.float().to(self.device)
            sae = self.members[name].sae
            sae.init_from_data_(samples[hook])
            sae.b_pre.data.copy_(self.trainer.strategy.broadcast(sae.b_pre.data, src=0))
            sae.norm_scale.copy_(self.trainer.strategy.broadcast(sae.norm_scale, src=0))

    def configure_optimizers(self):
        """One Adam, one parameter group per SAE (two for jumprelu: its thresholds have their own learning rate,
        ``lit_sae.train.schedule.param_groups``) with that SAE's learning rate and LR schedule (a per-step ``LambdaLR``
        with one factor per group: ``lit_sae.train.schedule``)."""
        groups, schedules = [], []
        for s in self.specs:
            key = f"model.saes[{s['name']}]."
            own = param_groups(self.members[s["name"]].sae, self.lr_of(s), s.get("jumprelu_threshold_lr_scale"))
            groups += own
            schedules += [(s.get("warmup_steps", 0), s.get("decay_start"), key)] * len(own)
        fused = all(p.device.type in ("cpu", "cuda") for p in self.parameters())
        opt = torch.optim.Adam(groups, betas=tuple(self.hparams.betas), eps=self.hparams.eps, fused=fused)
        sched = step_scheduler(opt, self._trainer, schedules)
        return opt if sched is None else {"optimizer": opt, "lr_scheduler": sched}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng_states"] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._resumed_rng = checkpoint.get("rng_states")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._resumed_rng is not None:
            set_rng_states(self._resumed_rng)
            self._resumed_rng = None

    # ------------------------------------------------------------------ training
    def dead_latent_mask(self, name: str) -> Tensor:
        return self.members[name].tokens_since_fired >= self.hparams.dead_after_tokens

    def _count_fired_(self, member: SweepMember, values: Tensor, indices: Tensor) -> None:
        count_fired_(member.tokens_since_fired, values, indices,
                     strategy=self.trainer.strategy if self._trainer is not None else None)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """The batch is read once; every SAE takes its own step on it. Returns the summed loss."""
        xs = {name: check_acts(self.acts_of(batch, name), m.sae.d_in, f"training batch acts of {name}")
              for name, m in self.members.items()}
        x = next(iter(xs.values()))
        total = x.new_zeros((), dtype=torch.float32)
        metrics = {}
        for name, member in self.members.items():
            out = member.sae(xs[name], self.dead_latent_mask(name))
            if not torch.isfinite(out.loss):
                raise FloatingPointError(f"SAE {name!r}: non-finite training loss {out.loss.item()} at step "
                                         f"{self.global_step}: lower its lr (model.saes) and resume")
            self._count_fired_(member, out.latent_values.detach(), out.latent_indices)
            total = total + out.loss
            metrics[f"train/{name}/nmse"] = out.nmse
            metrics[f"train/{name}/l0"] = (out.latent_values > 0).sum(dim=1).float().mean()
            metrics[f"train/{name}/dead_fraction"] = self.dead_latent_mask(name).float().mean()
        self.tokens_seen += x.shape[0] * self.trainer.world_size
        self.log_dict(metrics)
        return total

    def on_before_optimizer_step(self, optimizer) -> None:
        for member in self.members.values():
            member.sae.remove_parallel_grads_()

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        for member in self.members.values():
            member.sae.normalize_decoder_()
            if member.ema is not None:
                member.ema.update(member.sae)

    # ------------------------------------------------------------------ EMA weights for evaluation
    def _enter_eval_weights(self) -> None:
        for member in self.members.values():
            self._eval_stack.enter_context(member.eval_weights())

    def on_validation_epoch_start(self) -> None:
        self._enter_eval_weights()

    def on_validation_epoch_end(self) -> None:
        self._eval_stack.close()

    def on_test_epoch_start(self) -> None:
        self._enter_eval_weights()

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, batch: Any, metrics: nn.ModuleDict, prefix: str) -> dict[str, Any]:
        outs = {}
        x = None
        for name, member in self.members.items():
            xi = check_acts(self.acts_of(batch, name), member.sae.d_in, f"{prefix} batch acts of {name}").float()
            x = xi if x is None or self.hook_of(name) is None else x
            out = outs[name] = member.sae(xi)
            nmse, l0 = metrics[name]
            nmse.update(xi, out.x_hat)
            l0.update(out.latent_values)
            self.log(f"{prefix}/{name}/nmse", nmse)
            self.log(f"{prefix}/{name}/l0", l0)
        return {"x": x, "saes": outs, "batch": batch}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        """Every SAE's test metrics; returns {"x", "saes": {name: SAEOutput}, "batch"} for the report callback."""
        return self._eval_step(batch, self.test_metrics, "test")

    def on_test_epoch_end(self) -> None:
        """One table of every SAE's test NMSE, L0 and dead fraction: ``<run root>/sweep_test.{md,json}`` (the
        ``SweepEvalReport`` callback rewrites it with delta CE, probes and explainability at the end of the test)."""
        rows = [table_row(self, spec) for spec in self.specs]
        self._eval_stack.close()
        if self.trainer.is_global_zero:
            write_test_table(Path(self.trainer.default_root_dir), rows)

    # ------------------------------------------------------------------ export
    def on_fit_end(self) -> None:
        """Export every SAE to ``<export_dir>/<name>/`` in SAELens's layout."""
        if self.hparams.export_dir == "none" or not self.trainer.is_global_zero:
            return
        from lit_sae.artifacts.export import export_sae

        out = Path(self.hparams.export_dir or export_dir(self.trainer.default_root_dir))
        for name, member in self.members.items():
            with member.eval_weights():
                export_sae(member.sae, out / name, hook_point=self.hook_of(name) or self.hparams.hook_point,
                           lm_name=self.hparams.lm_name)
        log.info("exported %d SAEs under %s", len(self.members), out)
