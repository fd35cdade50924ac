"""End to end: tiny LM + tokenizer saved locally -> harvest -> fit a few steps -> trainer.test with EvalReport."""

import json
import math
import re
from pathlib import Path

import lightning as L
import pytest

from lit_sae.callbacks.eval_report import EvalReport
from lit_sae.eval.report import render_markdown, write_report
from tests.support.tiny_lm import tiny_datamodule


def test_trainer_test_writes_report(harvested, tmp_path):
    from lit_sae.train.module import SAEModule

    dm = tiny_datamodule(harvested)
    module = SAEModule(d_in=32, n_latents=64, k=4, init_tokens=256, export_dir="none")
    cb = EvalReport(out_dir=str(tmp_path / "report"), n_contexts=8, probe_contexts=24, n_ablation_latents=4,
                    ablation_contexts_per_latent=2, progress=False)
    trainer = L.Trainer(max_steps=5, accelerator="cpu", devices=1, logger=L.pytorch.loggers.TensorBoardLogger(
        str(tmp_path / "logs")), callbacks=[cb], enable_checkpointing=False, enable_progress_bar=False,
        limit_val_batches=0, enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    trainer.test(module, datamodule=dm)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    m = report["metrics"]
    assert 0 < m["nmse"] < 2 and 0 < m["l0"] <= 4 and 0 <= m["dead_fraction"] <= 1
    assert m["n_tokens"] == dm.manifest["splits"]["test"]["tokens"]
    # The callback's NMSE is the module's own test/nmse (same definition, same data).
    assert m["nmse"] == pytest.approx(float(trainer.callback_metrics["test/nmse"]), rel=1e-5)
    d = report["downstream"]
    assert d["n_contexts"] == 8 and math.isfinite(d["delta_ce"]) and d["kl_sae"] >= 0
    assert d["clean_ce"] == pytest.approx(d["sae_ce"] - d["delta_ce"], abs=1e-9)
    assert report["ablation"]["n_latents"] == 4
    assert report["probes"]["n_tasks"] >= 6
    assert report["manifest"]["hook_point"] == "blocks.0.hook_resid_post"
    # SAEBench's core groups, on the same tokens; its explained variance is lit-sae's 1 - NMSE (test split mean)
    sb = report["saebench_core"]
    assert sb["reconstruction_quality"]["explained_variance"] == pytest.approx(1 - m["nmse"], rel=1e-5)
    assert sb["token_stats"]["total_tokens_eval_sparsity_variance"] == m["n_tokens"]
    assert sb["sparsity"]["l0"] == pytest.approx(m["l0"], rel=1e-6)
    assert sb["model_performance_preservation"]["ce_loss_with_sae"] == d["sae_ce"]
    assert sb["misc_metrics"]["frac_alive"] == pytest.approx(1 - m["dead_fraction"], abs=1e-9)
    assert "| reconstruction_quality | explained_variance |" in (tmp_path / "report" / "report.md").read_text()
    assert "Downstream loss" in (tmp_path / "report" / "report.md").read_text()
    assert list((tmp_path / "logs").rglob("events.out.tfevents*"))


def test_write_report_handles_nan(tmp_path):
    js, md = write_report(tmp_path, {"metrics": {"nmse": float("nan"), "l0": 3.0}})
    assert json.loads(js.read_text())["metrics"] == {"nmse": None, "l0": 3.0}
    assert "| l0 | 3 |" in render_markdown({"metrics": {"l0": 3.0}})


def test_downstream_during_fit_logs_delta_ce(harvested, tmp_path):
    import csv

    from lit_sae.callbacks.eval_report import DownstreamDuringFit
    from lit_sae.train.module import SAEModule

    dm = tiny_datamodule(harvested)
    module = SAEModule(d_in=32, n_latents=64, k=4, init_tokens=256, export_dir="none")
    logger = L.pytorch.loggers.CSVLogger(str(tmp_path))
    trainer = L.Trainer(max_steps=4, accelerator="cpu", devices=1, logger=logger,
                        callbacks=[DownstreamDuringFit(every_n_steps=2, n_contexts=4)], enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    rows = [r for r in csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")) if r.get("val/delta_ce")]
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert all(math.isfinite(float(r["val/delta_ce"])) and float(r["val/kl"]) >= 0 for r in rows)


def test_report_is_written_section_by_section_and_an_interruption_keeps_the_finished_ones(harvested, tmp_path,
                                                                                          monkeypatch):
    """Reconstruction first, then each section as it finishes, with its wall time; a stop in the middle
    leaves a report (marked incomplete) holding every finished section."""
    import lit_sae.eval.report as report_mod
    from lit_sae.train.module import SAEModule

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C during ablation sparsity

    monkeypatch.setattr(report_mod, "ablation_sparsity", stopped)
    dm = tiny_datamodule(harvested)
    module = SAEModule(d_in=32, n_latents=64, k=4, init_tokens=256, export_dir="none")
    cb = EvalReport(out_dir=str(tmp_path / "report"), n_contexts=8, probe_contexts=24, n_ablation_latents=4,
                    ablation_contexts_per_latent=2, progress=False)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, callbacks=[cb],
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                        enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    with pytest.raises(SystemExit):  # Lightning turns the KeyboardInterrupt into a graceful exit
        trainer.test(module, datamodule=dm)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["complete"] is False and report["pending"] == ["ablation", "probes", "explainability"]
    assert report["metrics"]["n_tokens"] == dm.manifest["splits"]["test"]["tokens"]
    assert report["metrics"]["seconds"] >= 0 and report["downstream"]["seconds"] > 0
    assert math.isfinite(report["downstream"]["delta_ce"]) and "ablation" not in report
    md = (tmp_path / "report" / "report.md").read_text()
    assert "Incomplete" in md and "ablation, probes" in md and re.search(r"Downstream loss .*\(\d+\.\d s\)", md)
