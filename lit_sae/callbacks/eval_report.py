"""The paper's evaluation suite as Lightning callbacks.

:class:`EvalReport` (``trainer.test``): accumulates NormalizedMSE, RelativeMSE, L0 and FeatureDensity from
``SAEModule.test_step``'s outputs over the whole test split (summed over DDP ranks), then on rank 0 runs downstream
loss, probe loss and ablation sparsity on the held-out text the data manifest describes, writes ``report.json`` and
``report.md`` into the log dir and logs every number (and the feature-density histogram) to the loggers.

:class:`DownstreamDuringFit` (``trainer.fit``): delta CE of the SAE spliced into the LM on a small fixed sample of
held-out contexts every ``every_n_steps`` steps.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any, Optional

import lightning as L
import torch

from lit_sae.callbacks.report_common import (
    checkpoint_info,
    flat_numbers,
    log_eval_numbers,
    manifest_of,
    report_config,
    tensorboard_of,
    write_partial,
)
from lit_sae.callbacks.sweep_report import SweepEvalReport
from lit_sae.eval.metrics import L0, FeatureDensity, NormalizedMSE, RelativeMSE
from lit_sae.eval.saebench import CoreMetrics, saebench_section

log = logging.getLogger(__name__)

__all__ = ["EvalReport", "DownstreamDuringFit", "log_eval_numbers"]


def _target_manifest(trainer, pl_module) -> Optional[dict]:
    """A transcoder's target hook manifest (the DataModule's ``target_manifest``), else None."""
    if not hasattr(pl_module.sae, "d_out"):
        return None
    m = getattr(getattr(trainer, "datamodule", None), "target_manifest", None)
    return m.to_json() if hasattr(m, "to_json") else m


class EvalReport(L.Callback):
    """Full evaluation report at the end of ``trainer.test``.

    Args:
        out_dir: where report.json / report.md go (default: the run folder, ``trainer.default_root_dir``).
        downstream: run the downstream loss (needs the LM named in the data manifest).
        n_contexts: held-out test-split contexts for downstream loss and ablation sparsity.
        probes: run the probe-loss tasks.
        probe_contexts: contexts of probe text (tokens = probe_contexts * context_length).
        ablation: run ablation sparsity.
        n_ablation_latents: latents sampled (among those firing on the contexts) for ablation sparsity.
        ablation_contexts_per_latent: contexts per sampled latent.
        explain: N2G explainability (precision/recall of token-pattern explanations, lit_sae.eval.explain).
        explain_contexts: held-out test-split contexts for explainability.
        batch_size: contexts per LM forward.
        lm_device: device for the LM (default: the module's device).
        density_bins: bins of the log10 feature-density histogram in the report.
        seed: seed for latent sampling and the probe train/test split.
        progress: tqdm bars on the long loops.
    """

    def __init__(
        self,
        out_dir: Optional[str] = None,
        downstream: bool = True,
        n_contexts: int = 64,
        probes: bool = True,
        probe_contexts: int = 256,
        ablation: bool = True,
        n_ablation_latents: int = 64,
        ablation_contexts_per_latent: int = 4,
        explain: bool = True,
        explain_contexts: int = 256,
        batch_size: int = 8,
        lm_device: Optional[str] = None,
        density_bins: int = 50,
        seed: int = 0,
        progress: bool = True,
    ):
        self.out_dir = out_dir
        self.downstream, self.n_contexts = downstream, n_contexts
        self.probes, self.probe_contexts = probes, probe_contexts
        self.ablation, self.n_ablation_latents = ablation, n_ablation_latents
        self.ablation_contexts_per_latent, self.batch_size = ablation_contexts_per_latent, batch_size
        self.explain, self.explain_contexts = explain, explain_contexts
        self.lm_device, self.density_bins, self.seed, self.progress = lm_device, density_bins, seed, progress
        self.report: dict[str, Any] = {}
        self._sae = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        """In ``trainer.test`` of a sweep (``lit_sae.train.sweep.SAESweepModule``, ``lit-sae sweep test``), every SAE
        gets its own report: this callback hands its place in ``trainer.callbacks`` to a ``SweepEvalReport`` with
        its settings (``lit_sae.callbacks.sweep_report``)."""
        from lit_sae.train.sweep import SAESweepModule

        if isinstance(pl_module, SAESweepModule):
            callbacks = trainer.callbacks
            callbacks[next(i for i, cb in enumerate(callbacks) if cb is self)] = SweepEvalReport.like(self)

    # ------------------------------------------------------------------ accumulation (every rank)
    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._started = time.perf_counter()
        dev = pl_module.device
        d_target = getattr(pl_module.sae, "d_out", pl_module.sae.d_in)  # what x_hat reconstructs
        self.nmse = NormalizedMSE(d_in=d_target).to(dev)
        self.rel = RelativeMSE().to(dev)
        self.l0 = L0().to(dev)
        self.density = FeatureDensity(pl_module.sae.n_latents).to(dev)
        self.saebench = CoreMetrics(pl_module.sae.n_latents, d_target).to(dev)

    @torch.no_grad()
    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not isinstance(outputs, dict) or "x_hat" not in outputs:
            raise RuntimeError("EvalReport needs SAEModule.test_step to return x, x_hat, latent_values and "
                               "latent_indices")
        self.nmse.update(outputs["x"], outputs["x_hat"])
        self.rel.update(outputs["x"], outputs["x_hat"])
        self.l0.update(outputs["latent_values"])
        self.density.update(outputs["latent_values"], outputs["latent_indices"])
        self.saebench.update(outputs["x"], outputs["x_hat"], outputs["latent_values"], outputs["latent_indices"])

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        # compute() all-reduces the states, so every rank must get here. The module swaps its EMA weights back
        # after this hook, so the SAE is snapshotted now for the LM evaluations in on_test_end.
        density = self.density.compute()
        counts, edges = self.density.log_density_histogram(bins=self.density_bins)
        with self.l0.sync_context():  # the token count over all ranks
            n_tokens = int(self.l0.count)
        self.report = {"metrics": {
            "seconds": round(time.perf_counter() - self._started, 3),
            "nmse": float(self.nmse.compute()), "relative_mse": float(self.rel.compute()),
            "l0": float(self.l0.compute()), "dead_fraction": float(self.density.dead_fraction()),
            "n_tokens": n_tokens,
            "density_histogram": {"log10_edges": edges.tolist(), "counts": counts.tolist()},
        }}
        self._density = density.cpu()
        self._log_dir = trainer.log_dir  # a collective under DDP: every rank asks here, not rank 0 alone later
        self._saebench = self.saebench.compute()
        if trainer.is_global_zero:
            self._sae = copy.deepcopy(pl_module.sae).eval()

    # ------------------------------------------------------------------ LM evaluations and report (rank 0)
    def on_test_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:  # trainer.log_dir (a collective) was read by every rank in on_test_epoch_end
            return
        manifest = manifest_of(trainer)
        report = self.report
        report["config"] = report_config(self, trainer, pl_module)
        report["checkpoint"] = checkpoint_info(trainer)
        report["manifest"] = manifest
        from lit_sae.eval.report import write_report

        out_dir = self.out_dir or trainer.default_root_dir or "."
        sections = (("downstream", self.downstream), ("ablation", self.ablation), ("probes", self.probes),
                    ("explainability", self.explain))
        pending = [name for name, on in sections if on and manifest is not None]
        write_partial(out_dir, report, pending)  # reconstruction first: kept if the rest is interrupted
        if manifest is None:
            log.warning("the datamodule has no `manifest`: downstream loss, probes and ablation are skipped")
        elif pending:
            from lit_sae.eval.report import run_eval_suite

            def section_done(name: str, result: dict) -> None:
                report[name] = result
                write_partial(out_dir, report, [p for p in pending if p not in report])

            device = self.lm_device or str(pl_module.device)
            report.update(run_eval_suite(
                self._sae, manifest, downstream=self.downstream, n_contexts=self.n_contexts, probes=self.probes,
                probe_contexts=self.probe_contexts, ablation=self.ablation,
                n_ablation_latents=self.n_ablation_latents,
                ablation_contexts_per_latent=self.ablation_contexts_per_latent, mean=None,
                explain=self.explain, explain_contexts=self.explain_contexts,
                target_manifest=_target_manifest(trainer, pl_module),
                batch_size=self.batch_size, device=device, seed=self.seed, progress=self.progress,
                on_section=section_done))
        report["saebench_core"] = saebench_section(self._saebench, self._sae, report.get("downstream"))
        report.pop("pending", None)
        report["complete"] = True
        write_report(out_dir, report)
        self._log(trainer, report)
        self._sae = None

    def _log(self, trainer, report: dict) -> None:
        numbers = {}
        for section in ("metrics", "downstream", "ablation", "explainability"):
            if section in report:
                numbers.update(flat_numbers({k: v for k, v in report[section].items() if k != "latents"},
                                             f"eval/{section}"))
        if "probes" in report:
            numbers.update(flat_numbers(report["probes"], "eval/probes"))
        log_eval_numbers(trainer, numbers)
        tb = tensorboard_of(trainer)
        if tb is not None:
            live = self._density[self._density > 0]
            if live.numel():
                tb.add_histogram("eval/log10_feature_density", live.log10(), trainer.global_step)
            from lit_sae.eval.report import render_markdown

            tb.add_text("eval/report", render_markdown(report), trainer.global_step)
            tb.flush()


class DownstreamDuringFit(L.Callback):
    """Delta CE of the SAE spliced into the LM on a fixed sample of held-out contexts, every ``every_n_steps``.

    Logs ``val/delta_ce``, ``val/kl`` and ``val/frac_recovered`` (rank 0 only; the LM is loaded on first use).

    Args:
        every_n_steps: steps between evaluations.
        n_contexts: held-out contexts evaluated each time (the same ones every time).
        batch_size: contexts per LM forward.
        lm_device: device for the LM (default: the module's device).
    """

    def __init__(self, every_n_steps: int = 1000, n_contexts: int = 8, batch_size: int = 8,
                 lm_device: Optional[str] = None):
        if every_n_steps <= 0:
            raise ValueError(f"every_n_steps={every_n_steps} must be positive")
        self.every_n_steps, self.n_contexts = every_n_steps, n_contexts
        self.batch_size, self.lm_device = batch_size, lm_device
        self._lm = None
        self._ids = None
        self._settings = None

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps != 0 or not trainer.is_global_zero:
            return
        manifest = manifest_of(trainer)
        if manifest is None:
            return
        from lit_sae.data.lm import load_lm
        from lit_sae.eval.downstream import downstream_loss
        from lit_sae.eval.report import held_out_contexts, settings_from_manifest

        if self._lm is None:
            self._settings = settings_from_manifest(manifest)
            s = self._settings
            self._lm = load_lm(s["model"], gguf_file=s["gguf_file"], device=self.lm_device or str(pl_module.device))
            self._ids = held_out_contexts(s, self._lm[1], self.n_contexts)
        s = self._settings
        sae = pl_module.sae
        was_training = sae.training
        sae.eval()
        try:
            out = downstream_loss(self._lm[0], s["hook_point"], sae, self._ids, first_position=s["first_position"],
                                  norm_threshold=s["norm_threshold"], batch_size=self.batch_size,
                                  ablations=("zero",), progress=False)
        finally:
            sae.train(was_training)
        metrics = {"val/delta_ce": out["delta_ce"], "val/kl": out["kl_sae"],
                   "val/frac_recovered": out["frac_recovered"]}
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=step)
