"""Evaluation under DDP through the CLI (2 gloo processes): the LM-based evaluations run on rank 0 only and do not
hang the other rank; the report is written once and its streaming metrics cover the whole test split. (Reading
``trainer.log_dir`` is a broadcast under DDP: reading it on rank 0 only, for the default export folder or the report,
crashed or hung the run before.)

fit: 4 steps with ``DownstreamDuringFit`` every 2 steps (rank 0 loads the tiny LM mid-fit while rank 1 waits in the
next step's collectives). test: ``EvalReport`` with downstream loss, probes and ablation.
"""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # spawned processes / CLI subprocesses: over ~10 s on 2 CPU cores

DDP = ("--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp")


def _run(*args: str) -> None:
    cmd = [str(Path(sys.executable).parent / "lit-sae"), *args]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]


def test_eval_under_ddp_runs_on_rank_0_without_hanging(harvested, tmp_path):
    root = tmp_path / "run"
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "default_root_dir": str(root), "max_steps": 4, "limit_val_batches": 0, "num_sanity_val_steps": 0,
            "enable_progress_bar": False, "enable_model_summary": False, "log_every_n_steps": 1,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(root), "name": "csv", "version": 0}},
            "callbacks": [
                {"class_path": "lit_sae.callbacks.checkpoint.Checkpoint",
                 "init_args": {"dirpath": str(root / "checkpoints"), "save_last": True, "save_top_k": 0}},
                {"class_path": "lit_sae.callbacks.eval_report.DownstreamDuringFit",
                 "init_args": {"every_n_steps": 2, "n_contexts": 4}},
            ],
        },
        "model": {"n_latents": 64, "k": 4, "init_tokens": 256},  # export_dir: default <root>/sae
        "data": {"class_path": "lit_sae.data.datamodule.ActivationDataModule",
                 "init_args": {"path": str(harvested / "shards"), "batch_size_tokens": 64,
                               "shuffle_buffer_tokens": 256, "num_workers": 0}},
    }
    (root).mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    _run("fit", "--config", str(root / "config.yaml"), *DDP)
    rows = [r for r in csv.DictReader(open(root / "csv" / "version_0" / "metrics.csv")) if r.get("val/delta_ce")]
    assert [int(r["step"]) for r in rows] == [2, 4] and all(math.isfinite(float(r["val/delta_ce"])) for r in rows)
    assert (root / "sae" / "cfg.json").is_file()  # by rank 0, into the run folder

    eval_cfg = {"trainer": {"callbacks+": [{"class_path": "lit_sae.callbacks.eval_report.EvalReport", "init_args": {
        "out_dir": str(tmp_path / "report"), "n_contexts": 8, "probe_contexts": 24, "n_ablation_latents": 4,
        "ablation_contexts_per_latent": 2, "progress": False}}]}}
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(eval_cfg))
    _run("test", "--config", str(root / "config.yaml"), "--config", str(tmp_path / "eval.yaml"), "--ckpt_path",
         "last", *DDP)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    manifest = json.loads((harvested / "shards" / "manifest.json").read_text())
    test_tokens = manifest["splits"]["test"]["tokens"]
    assert report["metrics"]["n_tokens"] == test_tokens  # both ranks' halves, every token once
    assert math.isfinite(report["downstream"]["delta_ce"]) and report["probes"]["n_tasks"] >= 6
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["report.json", "report.md"]
