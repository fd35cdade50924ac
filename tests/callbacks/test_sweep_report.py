"""`lit-sae sweep test` with the evaluation preset: every SAE of a sweep gets the single-SAE report (reconstruction,
downstream loss, probes, ablation, explainability) and one table gathers them (tiny LM harvest, end to end)."""

import json
import math

import lightning as L
import pytest

from lit_sae.callbacks.eval_report import EvalReport
from lit_sae.callbacks.sweep_report import SweepEvalReport
from lit_sae.eval.report import run_eval_suite
from tests.support.tiny_lm import tiny_datamodule


def test_sweep_test_writes_each_saes_report_and_one_table(harvested, tmp_path):
    from lit_sae.train.sweep import SAESweepModule

    dm = tiny_datamodule(harvested)
    saes = [{"name": "topk", "activation": "topk"},
            {"name": "relu", "activation": "relu", "sparsity_coef": 0.05, "ema_decay": 0.9}]
    module = SAESweepModule(32, saes=saes, defaults={"n_latents": 64, "k": 4, "lr": 1e-3}, init_tokens=256,
                            export_dir="none")
    # the single-SAE preset (callbacks/eval.yaml's EvalReport) is turned into the sweep's report by the module
    settings = dict(n_contexts=8, probe_contexts=24, n_ablation_latents=4, ablation_contexts_per_latent=2,
                    explain_contexts=16, progress=False)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, callbacks=[EvalReport(**settings)],
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                        enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=dm)
    results = trainer.test(module, datamodule=dm, verbose=False)[0]
    cb = next(c for c in trainer.callbacks if isinstance(c, SweepEvalReport))
    rows = json.loads((tmp_path / "sweep_test.json").read_text())
    assert [r["name"] for r in rows] == ["topk", "relu"]
    table = (tmp_path / "sweep_test.md").read_text()
    assert "| SAE | activation | n_latents | k | lr | NMSE | L0 | dead | delta CE |" in table
    for row in rows:
        name = row["name"]
        report = json.loads((tmp_path / "reports" / name / "report.json").read_text())
        assert report["complete"] is True and report["sae"] == name
        assert (tmp_path / "reports" / name / "report.md").read_text().startswith("# lit-sae evaluation report")
        m = report["metrics"]
        # the report's reconstruction numbers are the module's own test metrics of this SAE (same data)
        assert m["nmse"] == pytest.approx(results[f"test/{name}/nmse"], rel=1e-5) == row["nmse"]
        assert m["l0"] == pytest.approx(results[f"test/{name}/l0"], rel=1e-5) == row["l0"]
        assert m["n_tokens"] == dm.manifest["splits"]["test"]["tokens"]
        d = report["downstream"]
        assert math.isfinite(d["delta_ce"]) and row["delta_ce"] == d["delta_ce"]
        assert row["probe_ce"] == report["probes"]["mean_sae_ce"] and report["probes"]["n_tasks"] >= 6
        assert report["ablation"]["n_latents"] == 4
        assert row["explain_precision"] == report["explainability"]["mean_precision"]
        assert row["report"] == f"reports/{name}/report.md"
        assert cb.reports[name] is not None
    assert rows[0]["l0"] == pytest.approx(4.0)  # TopK: exactly k
    # the same suite run on that SAE alone gives the same downstream numbers: it is the single-SAE report
    relu = module.members["relu"]
    with relu.eval_weights():
        alone = run_eval_suite(relu.sae, dm.manifest.to_json() if hasattr(dm.manifest, "to_json") else dm.manifest,
                               probes=False, ablation=False, explain=False, n_contexts=8, progress=False)
    report = json.loads((tmp_path / "reports" / "relu" / "report.json").read_text())
    assert alone["downstream"]["delta_ce"] == pytest.approx(report["downstream"]["delta_ce"], rel=1e-6)
