"""``SAEModule``: the paper's optimisation recipe for a ``TopKSAE`` as a LightningModule, for every architecture
of ``lit_sae.sae.activations`` (topk, batchtopk, matryoshka BatchTopK, relu + L1, jumprelu).

Checkpoint hooks (resume checks, RNG states) live in ``lit_sae.train.resume_checks``, the LR schedule in
``lit_sae.train.schedule``, validation and test in ``lit_sae.train.eval_steps``, the export at the end of fit in
``lit_sae.train.fit_export``, ``init_from`` in ``lit_sae.train.init_from``, the batch readers in
``lit_sae.train.batches`` and the transcoder keys' checks in ``lit_sae.train.transcoder_keys``."""

from __future__ import annotations

import logging
import math
import time
from contextlib import ExitStack
from typing import Any, Literal, Optional, Union

import lightning as L
import torch
from torch import Tensor

from lit_sae import compat
from lit_sae.eval.metrics import L0, NormalizedMSE
from lit_sae.parallel.data_parallel import data_parallel_size, destroy_process_group_at_exit
from lit_sae.parallel.sharding import configure_sharded, is_sharded, owned_indices, sae_init_context
from lit_sae.sae import activations
from lit_sae.sae.checks import check_acts
from lit_sae.sae.config import MODULE_KEYS, SAEConfig
from lit_sae.sae.ema import EMA
from lit_sae.sae.model import ENCODER_INIT_NORM, TopKSAE
from lit_sae.sae.output import SAEOutput
from lit_sae.train.batches import batch_acts, batch_target
from lit_sae.train.dead_latents import DeadLatentTracker, count_fired_
from lit_sae.train.eval_steps import EvalSteps
from lit_sae.train.fit_export import export_trained
from lit_sae.train.init_from import load_init_from
from lit_sae.train.kl_finetune import KLFinetuneHooks, check_kl_keys
from lit_sae.train.lr_auto import LR_AUTO_FRACTION, LR_AUTO_MULTIPLIERS, LRAutoHooks, LRSearch, base_lr, check_lr
from lit_sae.train.resume_checks import RESUME_MUST_MATCH, ResumeChecks, _same  # noqa: F401 (re-exported)
from lit_sae.train.schedule import check_schedule, check_threshold_lr_scale, param_groups, step_scheduler
from lit_sae.train.schedule import lr_factor as _schedule  # noqa: F401 (the former name, kept for callers)
from lit_sae.train.transcoder_keys import check_transcoder_keys

_check_transcoder_keys = check_transcoder_keys  # the former name

log = logging.getLogger(__name__)

PAPER_LR = 2e-4  # Gao et al. 2024, section 2.3: lr = 2e-4 / sqrt(n_latents / 2^14)
PAPER_EPS = 6.25e-10  # Adam epsilon of OpenAI's training code


def default_lr(n_latents: int) -> float:
    """The paper's learning-rate scaling law: 2e-4 at 16k latents, proportional to 1/sqrt(n_latents)."""
    return PAPER_LR / math.sqrt(n_latents / 2**14)


class SAEModule(EvalSteps, LRAutoHooks, KLFinetuneHooks, ResumeChecks, L.LightningModule):
    """Trains an SAE as Gao et al. (2024) train TopK SAEs (Adam, unit-norm decoder rows, AuxK, EMA, schedules),
    with any architecture of ``lit_sae.sae.activations``.

    Args:
        d_in: width of the activations (linked from the data's manifest by the CLI).
        n_latents: dictionary size.
        k: active latents per token (topk); per token on average over the batch (batchtopk, matryoshka); unused by
            relu and jumprelu, whose L0 the penalty sets.
        k_aux: latents in the AuxK loss (default d_in // 2; topk, batchtopk, matryoshka).
        auxk_coef: AuxK weight (1/32).
        multi_topk: add L(4k)/8 to the loss (topk only).
        activation: ``topk`` | ``batchtopk`` | ``matryoshka`` (Matryoshka BatchTopK; also spelled
            ``matryoshka_batchtopk``) | ``relu`` (+ L1) | ``jumprelu``; objectives in ``lit_sae.sae.activations``.
        sparsity_coef: relu: weight of the normalised L1 ``||z||_1 / ||x||_2``; jumprelu: weight of the L0
            (required for both, >= 0; not allowed for the others).
        sparsity_warmup_steps: relu / jumprelu: the penalty ramps linearly from 0 over this many steps (default 0).
        jumprelu_bandwidth: jumprelu: the straight-through estimator's kernel width (default 0.001, the paper's).
        jumprelu_init_threshold: jumprelu: every latent's initial threshold (default 0.001, Gemma Scope's; the
            scale of both assumes ``normalize: scalar``).
        jumprelu_threshold_lr_scale: jumprelu: the thresholds' learning rate as a multiple of ``lr`` (default 30;
            the measured reason is beside ``lit_sae.sae.activations.JUMPRELU_THRESHOLD_LR_SCALE``).
        matryoshka_prefixes: matryoshka: increasing prefix sizes, each of which reconstructs the input (n_latents
            is added as the last; required).
        normalize: input normalisation, ``none`` / ``scalar`` / ``layernorm``.
        encoder_init_norm: row norm of W_enc at init (W_enc = this * W_dec^T; the paper's tied init is 1.0, 0.5
            measured better on short runs).
        fast: sparse kernels (False: dense reference path).
        lr: Adam learning rate; default (null) 2e-4 / sqrt(n_latents / 2^14); ``auto``: chosen by a short sweep on
            the run's first tokens, after which the run continues with the best candidate (``lit_sae.train.lr_auto``).
        lr_auto_multipliers: ``lr: auto``'s grid, multiples of the paper's law (default x0.5, 1, 2, 4, 8).
        lr_auto_fraction: ``lr: auto``: the share of the run's optimizer steps spent on the sweep (default 0.1; they
            count toward the run).
        betas: Adam betas.
        eps: Adam epsilon (6.25e-10, as OpenAI).
        warmup_steps: linear warm-up steps (0: none).
        decay_start: fraction of the run after which the LR decays linearly to 0 (null: constant).
        ema_decay: EMA of the weights used for validation, test and export (null: off; paper: 0.999).
        dead_after_tokens: a latent that has not fired for this many tokens is dead (10M, the paper's value).
        init_tokens: tokens sampled at the start of a fit for b_pre (geometric median) and the scale.
        hook_point: where the activations come from (recorded in exports; linked from the data).
        lm_name: the language model (recorded in exports; linked from the data).
        export_dir: where ``on_fit_end`` exports the SAE (default: ``<trainer.default_root_dir>/sae``, the run's
            folder; ``none`` disables).
        init_from: an SAE this module starts from, e.g. to ``lit-sae test`` it: a lit-sae export or checkpoint, a
            SAELens or sparsify folder, an OpenAI .pt (``lit_sae.load_sae``); d_in, n_latents and k must match it.
        transcoder: train a transcoder (``lit_sae.sae.transcoder``): the code of ``batch["acts"]`` reconstructs
            ``batch["target"]`` (``data.target_hook_point``); NMSE, AuxK and the metrics are the target's.
        skip: transcoder only: add the linear skip term W_skip x (Paulo et al. 2025).
        d_out: the target's width (linked from the data's target hook point by the CLI; default d_in).
        target_hook_point: where the target comes from (recorded in exports; linked from the data).
        kl_coef: null: the usual objective on activations. A number: end-to-end fine-tuning on token contexts
            (``data: ContextDataModule``): loss = kl_coef * KL(clean || spliced next-token distributions) +
            kl_mse_coef * the usual loss (``lit_sae.train.kl_finetune``; docs/finetune.md).
        kl_mse_coef: the weight of the usual loss (NMSE + AuxK) beside the KL term (default 1).
    """

    def __init__(
        self,
        d_in: int,
        n_latents: int = 16384,
        k: int = 32,
        k_aux: Optional[int] = None,
        auxk_coef: float = 1 / 32,
        multi_topk: bool = False,
        activation: str = "topk",
        sparsity_coef: Optional[float] = None,
        sparsity_warmup_steps: Optional[int] = None,
        jumprelu_bandwidth: Optional[float] = None,
        jumprelu_init_threshold: Optional[float] = None,
        jumprelu_threshold_lr_scale: Optional[float] = None,
        matryoshka_prefixes: Optional[list[int]] = None,
        normalize: Literal["none", "scalar", "layernorm"] = "none",
        encoder_init_norm: float = ENCODER_INIT_NORM,
        fast: bool = True,
        lr: Union[float, Literal["auto"], None] = None,
        lr_auto_multipliers: Optional[list[float]] = None,
        lr_auto_fraction: float = LR_AUTO_FRACTION,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = PAPER_EPS,
        warmup_steps: int = 0,
        decay_start: Optional[float] = None,
        ema_decay: Optional[float] = None,
        dead_after_tokens: int = 10_000_000,
        init_tokens: int = 32_768,
        hook_point: Optional[str] = None,
        lm_name: Optional[str] = None,
        export_dir: Optional[str] = None,
        init_from: Optional[str] = None,
        transcoder: bool = False,
        skip: bool = False,
        d_out: Optional[int] = None,
        target_hook_point: Optional[str] = None,
        kl_coef: Optional[float] = None,
        kl_mse_coef: float = 1.0,
    ):
        super().__init__()
        check_lr(lr, lr_auto_multipliers or LR_AUTO_MULTIPLIERS, lr_auto_fraction)
        if lr == "auto" and ema_decay is not None:
            raise ValueError("model.lr=auto with model.ema_decay: the learning-rate sweep keeps no EMA per candidate; "
                             "set ema_decay: null, or a number for lr")
        check_schedule(warmup_steps, decay_start)
        check_threshold_lr_scale(jumprelu_threshold_lr_scale)
        check_kl_keys(kl_coef, kl_mse_coef, lr)
        if kl_coef is not None and transcoder:
            raise ValueError("model.kl_coef with model.transcoder: the KL fine-tune replaces one activation by an "
                             "SAE's reconstruction; set model.kl_coef: null")
        self.save_hyperparameters()
        arch = {"sparsity_coef": sparsity_coef, "sparsity_warmup_steps": sparsity_warmup_steps,
                "jumprelu_bandwidth": jumprelu_bandwidth, "jumprelu_init_threshold": jumprelu_init_threshold,
                "matryoshka_prefixes": matryoshka_prefixes}
        activations.check_applicable(activation, {**arch, "multi_topk": multi_topk, "k_aux": k_aux,
                                                  "jumprelu_threshold_lr_scale": jumprelu_threshold_lr_scale}, "model.")
        check_transcoder_keys(transcoder, skip, d_out, target_hook_point, d_in)
        if transcoder and lr == "auto":
            raise ValueError("model.lr=auto is not supported for a transcoder (its sweep trains SAE candidates): give "
                             "model.lr as a number")
        sae_cls, extra = TopKSAE, {}
        if transcoder:
            from lit_sae.sae.transcoder import Transcoder

            sae_cls, extra = Transcoder, {"d_out": d_out, "skip": skip}
        try:  # on the meta device when lit-sae fit shards the SAE over latents (lit_sae.parallel.sharding)
            # the SAE's settings: SAEConfig's fields in MODULE_KEYS (tests/sae/test_config.py keeps them equal)
            self.sae_config = SAEConfig(**{key: self.hparams[key] for key in MODULE_KEYS})
            with sae_init_context():
                self.sae = sae_cls(**self.sae_config.sae_kwargs(), **extra)
        except ValueError as exn:  # the SAE names its argument; say it is a key of the config's model section
            raise ValueError(f"model.{exn}") from None
        if self.sae.activation == "jumprelu" and normalize != "scalar":
            log.warning("model.activation=jumprelu with normalize=%r: the bandwidth and initial threshold (0.001) "
                        "assume inputs scaled to E||x||^2 = d_in (normalize: scalar)", normalize)
        if init_from is not None:
            self._load_export(init_from)
        self.lr = base_lr(lr, n_latents, default_lr)
        self.lr_search: Optional[LRSearch] = None
        if lr == "auto":
            grid = lr_auto_multipliers or LR_AUTO_MULTIPLIERS
            self.lr_search = LRSearch(self.sae, [default_lr(n_latents) * m for m in grid])
        self.ema = EMA(self.sae, ema_decay) if ema_decay is not None else None
        if dead_after_tokens <= 0:
            raise ValueError(f"model.dead_after_tokens={dead_after_tokens} must be positive (the paper: 10M)")
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))
        # Tokens (over all ranks) since each latent last fired: the AuxK loss trains the latents that have not fired
        # for dead_after_tokens. Training state, so a buffer: saved and restored with the weights.
        self.register_buffer("tokens_since_fired", torch.zeros(n_latents, dtype=torch.long))
        self.dead_mask: Optional[Tensor] = None  # the mask of the latest step (n_latents,) bool
        self.val_nmse, self.val_l0 = NormalizedMSE(), L0()
        self.test_nmse, self.test_l0 = NormalizedMSE(), L0()
        self._eval_stack = ExitStack()
        self._last_time: Optional[float] = None
        self._resumed_rng: Optional[dict] = None  # RNG states of a loaded checkpoint, applied at the next step

    def _load_export(self, path: str) -> None:
        """Start from the SAE at ``path`` (anything ``lit_sae.load_sae`` reads); it replaces the configured SAE
        (``lit_sae.train.init_from``)."""
        load_init_from(self, path)

    # ------------------------------------------------------------------ set-up
    def configure_callbacks(self):
        """A ``DeadLatentTracker``: a read-only view of the module's dead-latent counters for other callbacks and
        scripts (the counters themselves are the ``tokens_since_fired`` buffer, updated in ``training_step``)."""
        return [DeadLatentTracker(dead_after_tokens=self.hparams.dead_after_tokens)]

    def dead_latent_mask(self) -> Tensor:
        """(n_latents,) bool: True for latents that have not fired within ``dead_after_tokens`` tokens."""
        return self.tokens_since_fired >= self.hparams.dead_after_tokens

    @torch.no_grad()
    def _count_fired_(self, latent_values: Tensor, latent_indices: Tensor, counts: Optional[Tensor] = None) -> None:
        """Advance every latent's counter (``counts``, default the module's) by this step's tokens (summed over
        ranks); reset the ones that fired."""
        counts = self.tokens_since_fired if counts is None else counts
        local, owned = owned_indices(self, latent_indices)  # a latent-sharded SAE counts its own latents only
        count_fired_(counts, latent_values, local, owned=owned,
                     strategy=self.trainer.strategy if self._trainer is not None else None)

    def configure_model(self) -> None:
        """Under ``lit_sae.parallel.strategy.SAEModelParallelStrategy``: shard the SAE over the device mesh's
        tensor-parallel ranks (``lit_sae.parallel.sharding.configure_sharded``); no-op otherwise."""
        configure_sharded(self)
        if self.lr_search is not None and is_sharded(self):
            raise ValueError("model.lr=auto is not supported with a latent-sharded SAE: choose the lr on one device "
                             "(or a DDP run) and give it as a number")

    def setup(self, stage: str) -> None:
        """Under data parallelism the losses are the global batch's (``lit_sae.parallel.data_parallel``): DDP on W
        ranks of ``data.batch_size_tokens / W`` each trains exactly as one process on ``data.batch_size_tokens``."""
        destroy_process_group_at_exit()
        if stage == "fit":
            from lit_sae.parallel.data_parallel import gathers_codes, use_data_parallel_losses

            use_data_parallel_losses(self.sae, gather=gathers_codes(
                self.trainer.strategy, self.sae, self.lr_search is None and self.hparams.get("kl_coef") is None))
            if self.hparams.get("kl_coef") is not None:
                self._kl_setup()  # the DataModule's LM, or one line saying which data the KL objective needs
            if self.lr_search is not None:  # the sweep's candidates, then the chosen SAE, each unused in turn
                for cand in self.lr_search.candidates:
                    use_data_parallel_losses(cand)
                compat.ddp_find_unused_parameters(self.trainer.strategy)

    def on_fit_start(self) -> None:
        """Turn off DDP's gradient average when every rank computes the global batch's gradient (``setup``); then
        initialise b_pre (geometric median) and the input scale from data, once: never on resume."""
        if self.sae.batch_sum.gathers:
            self.sae.batch_sum.keep_local_gradients(self.trainer.strategy.model)
        if bool(self.sae.data_initialized):
            return
        sample = self._init_sample(self.hparams.init_tokens)
        if self.hparams.transcoder:  # b_dec and the target's scale too, from the same tokens
            sample, target = sample
            self.sae.init_from_data_(sample.to(self.device), target.to(self.device))
            self.sae.b_dec.data.copy_(self.trainer.strategy.broadcast(self.sae.b_dec.data, src=0))
            self.sae.target_scale.copy_(self.trainer.strategy.broadcast(self.sae.target_scale, src=0))
        else:
            self.sae.init_from_data_(sample.to(self.device))
        # Every rank must start from the same b_pre and scale, whatever its own sample was.
        self.sae.b_pre.data.copy_(self.trainer.strategy.broadcast(self.sae.b_pre.data, src=0))
        self.sae.norm_scale.copy_(self.trainer.strategy.broadcast(self.sae.norm_scale, src=0))
        log.info("b_pre initialised at the geometric median of %d tokens", sample.shape[0])
        if self.lr_search is not None:  # every candidate starts from the same weights
            self.lr_search.start_(self.sae)

    def _init_sample(self, n_tokens: int):
        """A deterministic sample of training activations, from the DataModule's ``sample_activations`` if any;
        for a transcoder the pair (input, target) of the same tokens."""
        dm = self.trainer.datamodule
        target_hook = self.hparams.target_hook_point
        if dm is not None and hasattr(dm, "sample_activations"):
            if not self.hparams.transcoder:
                return dm.sample_activations(n_tokens).float()
            if target_hook is None:
                raise ValueError("model.transcoder=true: the data names no target hook point; set "
                                 "data.target_hook_point")
            return dm.sample_activations(n_tokens).float(), dm.sample_activations(n_tokens, target_hook).float()
        chunks, targets, have = [], [], 0
        for batch in compat.train_dataloader_of(self.trainer):
            chunks.append(batch_acts(batch).float())
            if self.hparams.transcoder:
                targets.append(batch_target(batch, target_hook).float())
            have += chunks[-1].shape[0]
            if have >= n_tokens:
                break
        if self.hparams.transcoder:
            return torch.cat(chunks)[:n_tokens], torch.cat(targets)[:n_tokens]
        return torch.cat(chunks)[:n_tokens]

    def _run(self, batch: Any, stage: str, dead_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor, SAEOutput]:
        """(input, what is reconstructed, output) of a batch: for an SAE the input twice, for a transcoder the input
        and the target (checked for width; HookZip has checked that its rows are the input's tokens)."""
        x = check_acts(batch_acts(batch), self.sae.d_in, f"{stage} batch acts")
        if not self.hparams.transcoder:
            x = x if stage == "training" else x.float()
            return x, x, self.sae(x, dead_mask)
        y = check_acts(batch_target(batch, self.hparams.target_hook_point), self.sae.d_out, f"{stage} batch target")
        if stage != "training":
            x, y = x.float(), y.float()
        return x, y, self.sae(x, dead_mask, target=y)

    def configure_optimizers(self):
        """Adam with the paper's betas and epsilon; optional linear warm-up and linear decay, per step."""
        fused = all(p.device.type in ("cpu", "cuda") for p in self.parameters())
        scale = self.hparams.get("jumprelu_threshold_lr_scale")
        groups = param_groups(self.sae, self.lr, scale)
        if self.lr_search is not None:  # after the SAE's own groups, those of each candidate (lr_auto.LRSearch)
            for cand, lr in zip(self.lr_search.candidates, self.lr_search.lrs):
                groups += param_groups(cand, lr, scale)
        opt = torch.optim.Adam(groups, betas=tuple(self.hparams.betas), eps=self.hparams.eps, fused=fused)
        schedule = (self.hparams.warmup_steps, self.hparams.decay_start, "model.")
        sched = step_scheduler(opt, self._trainer, [schedule] * len(groups))
        return opt if sched is None else {"optimizer": opt, "lr_scheduler": sched}

    @staticmethod
    def default_lr_of(hparams: dict[str, Any]) -> float:
        """The learning rate a run with these hyperparameters started its own parameter group at (its ``lr``, else
        the paper's default, which is also ``lr: auto``'s before its sweep chooses)."""
        return base_lr(hparams.get("lr"), int(hparams["n_latents"]), default_lr)

    # ------------------------------------------------------------------ training
    def forward(self, x: Tensor, dead_mask: Optional[Tensor] = None) -> SAEOutput:
        """Run the SAE on activations (B, d_in)."""
        return self.sae(x, dead_mask)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """One step of the paper's objective (or of the KL fine-tune's, ``model.kl_coef``); returns the sparse code
        for the callbacks."""
        if self.hparams.get("kl_coef") is not None:
            return self._kl_training_step(batch)
        if self.lr_search is not None and not self.lr_search.done:
            if self.global_step < self.lr_sweep_steps():
                return self._sweep_step(check_acts(batch_acts(batch), self.sae.d_in, "training batch acts"))
            self._choose_lr()
        self.dead_mask = self.dead_latent_mask()
        x, _, out = self._run(batch, "training", self.dead_mask)
        if not torch.isfinite(out.loss):
            raise FloatingPointError(
                f"non-finite training loss {out.loss.item()} at step {self.global_step}: stopping before the "
                "weights are updated; the last checkpoint is still good (try a lower model.lr)"
            )
        tokens = x.shape[0] * data_parallel_size(self.trainer)
        self.tokens_seen += tokens
        self._count_fired_(out.latent_values.detach(), out.latent_indices)
        metrics = {
            "train/loss": out.loss,
            "train/nmse": out.nmse,
            "train/auxk_loss": out.auxk_loss,
            "train/l0": (out.latent_values > 0).sum(dim=1).float().mean(),
        }
        if self.hparams.multi_topk:
            metrics["train/multik_loss"] = out.multik_loss
        if out.sparsity_loss is not None:  # relu: normalised L1; jumprelu: L0 (unweighted)
            metrics["train/sparsity_loss"] = out.sparsity_loss
        self.log_dict(metrics, prog_bar=False)
        self.log("train/tokens_seen", self.tokens_seen.float(), reduce_fx="max")
        self.log("train/dead_fraction", self.dead_latent_mask().float().mean())
        now = time.perf_counter()
        if self._last_time is not None:
            self.log("tokens_per_s", tokens / max(now - self._last_time, 1e-9), prog_bar=True)
        self._last_time = now
        return {"loss": out.loss, "latent_values": out.latent_values.detach(), "latent_indices": out.latent_indices}

    def on_before_optimizer_step(self, optimizer) -> None:
        """Keep decoder rows on the unit sphere: drop the gradient component along each row."""
        self.sae.remove_parallel_grads_()
        self._candidates_step_("remove_parallel_grads_")

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """Adam step, then renormalise the decoder rows and fold the weights into the EMA."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.sae.normalize_decoder_()
        self._candidates_step_("normalize_decoder_")
        if self.ema is not None:
            self.ema.update(self.sae)

    # ------------------------------------------------------------------ export
    def on_fit_end(self) -> None:
        """Export the trained SAE (EMA weights when on) in SAELens's layout (``lit_sae.train.fit_export``)."""
        if self.lr_search is not None and not self.lr_search.done:
            self._choose_lr()  # the run ended inside the sweep
        export_trained(self)
