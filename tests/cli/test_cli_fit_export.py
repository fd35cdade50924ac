"""One export path: the SAELens export ``lit-sae fit`` writes into ``<run>/sae`` is the one ``lit-sae export`` writes
from the same checkpoint: the same files, byte for byte, and the same cfg.json, provenance included (checkpoint and
manifest sha256, context_size, prepend_bos). Through the real entry point on shards with a manifest."""

import json

import torch

from tests.support.faults import cli
from tests.support.shards import write_shards

RECIPE = """\
seed_everything: 0
trainer:
  max_steps: 3
  default_root_dir: runs/a
  enable_progress_bar: false
  enable_model_summary: false
  limit_val_batches: 0
model:
  n_latents: 32
  k: 4
  init_tokens: 128
  ema_decay: 0.9
data:
  class_path: lit_sae.data.datamodule.ActivationDataModule
  init_args:
    path: shards
    batch_size_tokens: 64
    shuffle_buffer_tokens: 128
    num_workers: 0
"""


def test_fit_export_equals_cli_export(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    write_shards(tmp_path / "shards", {"train": torch.randn(1024, 8, generator=g),
                                       "test": torch.randn(256, 8, generator=g)})
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    code, err = cli(["fit", "--config", "recipe.yaml"])
    assert code == 0, err
    run = tmp_path / "runs" / "a"
    code, err = cli(["export", str(run / "checkpoints" / "last.ckpt"), "--out", "exported"])
    assert code == 0, err
    at_fit, by_cli = run / "sae", tmp_path / "exported"
    assert sorted(p.name for p in at_fit.iterdir()) == sorted(p.name for p in by_cli.iterdir())
    cfg_fit, cfg_cli = (json.loads((d / "cfg.json").read_text()) for d in (at_fit, by_cli))
    # no field differs: both come from last.ckpt (same path, same sha256) through the same function
    assert cfg_fit == cfg_cli
    prov = cfg_fit["lit_sae"]
    assert prov["checkpoint"]["sha256"] and prov["checkpoint"]["step"] == 3 and prov["manifest"]["sha256"]
    assert cfg_fit["context_size"] == 16 and cfg_fit["prepend_bos"] is False
    for name in ("sae_weights.safetensors",):
        assert (at_fit / name).read_bytes() == (by_cli / name).read_bytes()
    # the same run tested from another folder: the saved config's relative data path is found under the run's
    # ancestors (the fit ran there)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, err = cli(["test", "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    assert code == 0, err
    assert str(tmp_path / "shards") in (run / "config_test.yaml").read_text()
