"""``model.lr: auto`` under DDP through ``lit-sae fit`` (2 gloo ranks on CPU, float64): every rank chooses the same
lr, and the run (sweep, choice, continuation) equals one process fed the global batches; a DDP run stopped inside
the sweep and resumed from last.ckpt ends in the same state."""

import pytest
import torch
import yaml

from tests.parallel.test_ddp import STEPS, _assert_same, _config, _lit_sae, _state, _write_shards

pytestmark = pytest.mark.slow  # CLI subprocesses with 2 ranks: about a minute on 2 CPU cores

DDP = ("--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp")


def _auto(config, fraction: float):
    cfg = yaml.safe_load(config.read_text())
    cfg["model"].update(lr="auto", lr_auto_multipliers=[0.25, 1.0, 8.0], lr_auto_fraction=fraction, ema_decay=None)
    config.write_text(yaml.safe_dump(cfg))
    return config


def test_lr_auto_under_ddp_equals_one_process_and_resumes(tmp_path):
    shards = tmp_path / "shards"
    _write_shards(shards)
    plain = "lit_sae.data.datamodule.ActivationDataModule"
    ref = _auto(_config(tmp_path / "ref", shards, plain), 0.5)  # batch_size_tokens is the global batch: one process reads it whole
    _lit_sae(ref)
    ddp = _lit_sae(_auto(_config(tmp_path / "ddp", shards, plain), 0.5), *DDP)
    chosen = [line for line in ddp.stderr.splitlines() if "chose lr" in line]
    assert chosen, ddp.stderr[-2000:]
    a, b = _state(tmp_path / "ref"), _state(tmp_path / "ddp")
    assert int(a["lr_search.chosen"]) == int(b["lr_search.chosen"])
    _assert_same(a, b)
    # stopped after step 6 of the 12-step sweep (max_steps stays 24, as for a killed run) and resumed
    half = _auto(_config(tmp_path / "half", shards, plain), 0.5)
    cfg = yaml.safe_load(half.read_text())
    cfg["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 6
    stopped = dict(cfg, trainer=dict(cfg["trainer"], callbacks=[*cfg["trainer"]["callbacks"], {
        "class_path": "tests.support.stop.StopAt", "init_args": {"step": 6}}]))
    (tmp_path / "stop.yaml").write_text(yaml.safe_dump(stopped))
    half.write_text(yaml.safe_dump(cfg))
    _lit_sae(tmp_path / "stop.yaml", *DDP)
    first = torch.load(tmp_path / "half" / "checkpoints" / "last.ckpt", weights_only=True)
    assert first["global_step"] == 6 and int(first["state_dict"]["lr_search.chosen"]) == -1  # inside the sweep
    _lit_sae(half, *DDP, "--ckpt_path", "last")
    _assert_same(b, _state(tmp_path / "half"))
    assert STEPS == 24
