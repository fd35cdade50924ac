"""The evaluation report of every SAE of a sweep (``SAESweepModule``) at the end of ``trainer.test``.

:class:`SweepEvalReport` is :class:`~lit_sae.callbacks.eval_report.EvalReport` run once per SAE on the one test
stream: reconstruction and sparsity metrics accumulate for every SAE from the same batches, then on rank 0 the LM is
loaded once and each SAE gets the single-SAE suite (downstream loss, ablation, probes, explainability:
``lit_sae.eval.report.run_eval_suite``) and its own ``report.json`` / ``report.md`` in ``<out_dir>/reports/<name>/``.
One table of every SAE (``sweep_test.md`` / ``.json`` in ``out_dir``, ``lit_sae.train.sweep.write_test_table``) gets the
delta CE, probe loss and explainability columns. ``lit-sae sweep test --config ... --config callbacks/eval.yaml``
uses it: an ``EvalReport`` whose module is a sweep hands its place to this callback, with its settings.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lit_sae.callbacks.report_common import (
    checkpoint_info,
    flat_numbers,
    log_eval_numbers,
    manifest_of,
    report_config,
    write_partial,
)
from lit_sae.eval.metrics import L0, FeatureDensity, NormalizedMSE, RelativeMSE
from lit_sae.eval.saebench import CoreMetrics, saebench_section

log = logging.getLogger(__name__)

__all__ = ["SweepEvalReport"]


class SweepEvalReport(L.Callback):
    """``EvalReport``'s settings and report, for each SAE of a sweep (see the module docstring). Built by
    ``EvalReport.setup`` from its own settings (:meth:`like`), not named in a config.

    ``reports`` (after ``trainer.test``): {SAE name: its report dict}; ``rows``: the table's rows."""

    @classmethod
    def like(cls, report: L.Callback) -> "SweepEvalReport":
        """A ``SweepEvalReport`` with the settings (attributes) of ``report``, an ``EvalReport``."""
        new = cls.__new__(cls)
        new.__dict__.update(copy.copy(report.__dict__))
        return new

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._started = time.perf_counter()
        dev = pl_module.device
        self._acc = {}
        for name, member in pl_module.members.items():
            sae = member.sae
            self._acc[name] = torch.nn.ModuleDict({
                "nmse": NormalizedMSE(d_in=sae.d_in), "rel": RelativeMSE(), "l0": L0(),
                "density": FeatureDensity(sae.n_latents), "saebench": CoreMetrics(sae.n_latents, sae.d_in)}).to(dev)

    @torch.no_grad()
    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not isinstance(outputs, dict) or "saes" not in outputs:
            raise RuntimeError("SweepEvalReport needs SAESweepModule.test_step to return x and every SAE's output")
        x = outputs["x"]
        for name, out in outputs["saes"].items():
            acc = self._acc[name]
            acc["nmse"].update(x, out.x_hat)
            acc["rel"].update(x, out.x_hat)
            acc["l0"].update(out.latent_values)
            acc["density"].update(out.latent_values, out.latent_indices)
            acc["saebench"].update(x, out.x_hat, out.latent_values, out.latent_indices)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        # compute() all-reduces, so every rank gets here; the module swaps EMA weights back after this hook.
        self.reports, self._saes, self._saebench = {}, {}, {}
        seconds = round(time.perf_counter() - self._started, 3)
        for name, acc in self._acc.items():
            counts, edges = acc["density"].log_density_histogram(bins=self.density_bins)
            with acc["l0"].sync_context():
                n_tokens = int(acc["l0"].count)
            self.reports[name] = {"metrics": {
                "seconds": seconds, "nmse": float(acc["nmse"].compute()), "relative_mse": float(acc["rel"].compute()),
                "l0": float(acc["l0"].compute()), "dead_fraction": float(acc["density"].dead_fraction()),
                "n_tokens": n_tokens, "density_histogram": {"log10_edges": edges.tolist(), "counts": counts.tolist()},
            }}
            self._saebench[name] = acc["saebench"].compute()
            if trainer.is_global_zero:
                self._saes[name] = copy.deepcopy(pl_module.members[name].sae).eval()
        self._log_dir = trainer.log_dir

    def on_test_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        from lit_sae.eval.report import write_report
        from lit_sae.train.sweep_table import table_row, write_test_table

        manifest = manifest_of(trainer)
        out_dir = Path(self.out_dir or trainer.default_root_dir or ".")
        sections = (("downstream", self.downstream), ("ablation", self.ablation), ("probes", self.probes),
                    ("explainability", self.explain))
        wanted = [name for name, on in sections if on and manifest is not None]
        if manifest is None:
            log.warning("the datamodule has no `manifest`: downstream loss, probes and ablation are skipped")
        lm = mean = None
        if wanted:
            lm, mean = self._load_lm(manifest, str(self.lm_device or pl_module.device))
        config, checkpoint = report_config(self, trainer, pl_module), checkpoint_info(trainer)
        rows = []
        for spec in pl_module.specs:
            name = spec["name"]
            report = self.reports[name]
            report.update(config=config, checkpoint=checkpoint, manifest=manifest, sae=name)
            folder = out_dir / "reports" / name
            write_partial(folder, report, wanted)
            if wanted:
                self._run_suite(report, folder, wanted, manifest, lm, mean, str(self.lm_device or pl_module.device),
                                name)
            report["saebench_core"] = saebench_section(self._saebench[name], self._saes[name],
                                                       report.get("downstream"))
            report.pop("pending", None)
            report["complete"] = True
            write_report(folder, report)
            rows.append({**table_row(pl_module, spec, report), "report": str(Path("reports") / name / "report.md")})
            self._log_numbers(trainer, name, report)
        self.rows = rows
        write_test_table(out_dir, rows)
        self._saes = {}

    def _load_lm(self, manifest: dict, device: str):
        """The LM (model, tokenizer) once for every SAE, and the mean activation for mean ablation (None: not
        needed)."""
        from lit_sae.data.lm import load_lm
        from lit_sae.eval.downstream import mean_activation
        from lit_sae.eval.report import held_out_contexts, settings_from_manifest

        s = settings_from_manifest(manifest)
        lm = load_lm(s["model"], gguf_file=s["gguf_file"], device=device)
        mean = None
        if self.downstream:
            ids = held_out_contexts(s, lm[1], self.n_contexts)
            mean = mean_activation(lm[0], s["hook_point"], ids, first_position=s["first_position"],
                                   norm_threshold=s["norm_threshold"], batch_size=self.batch_size)
        return lm, mean

    def _run_suite(self, report: dict, folder: Path, wanted: list[str], manifest: dict, lm, mean, device: str,
                   name: str) -> None:
        from lit_sae.eval.report import run_eval_suite

        def section_done(section: str, result: dict) -> None:
            report[section] = result
            write_partial(folder, report, [p for p in wanted if p not in report])

        log.info("evaluating SAE %s", name)
        report.update(run_eval_suite(
            self._saes[name], manifest, lm=lm, downstream=self.downstream, n_contexts=self.n_contexts,
            probes=self.probes, probe_contexts=self.probe_contexts, ablation=self.ablation,
            n_ablation_latents=self.n_ablation_latents, ablation_contexts_per_latent=self.ablation_contexts_per_latent,
            mean=mean, explain=self.explain, explain_contexts=self.explain_contexts, batch_size=self.batch_size,
            device=device, seed=self.seed, progress=self.progress, on_section=section_done))

    @staticmethod
    def _log_numbers(trainer, name: str, report: dict[str, Any]) -> None:
        numbers = {}
        for section in ("metrics", "downstream", "ablation", "explainability", "probes"):
            if section in report:
                numbers.update(flat_numbers({k: v for k, v in report[section].items() if k != "latents"},
                                             f"eval/{name}/{section}"))
        log_eval_numbers(trainer, numbers, f"eval/{name}/numbers")
