"""Exact resume after kill -9, atomic last.ckpt, divergence guard, incompatible checkpoints.

The scenarios live in tests/support/faults.py (which prints them as a table); here each one must pass.
"""

import pytest
import torch

from tests.support import faults

pytestmark = pytest.mark.slow  # spawned processes / CLI subprocesses: over ~10 s on 2 CPU cores


def check(result):
    assert result.ok, result.observed


def test_kill_9_then_resume_gives_the_same_batches_and_losses(tmp_path):
    """Subprocess fit killed after an arbitrary step (here >= 14, checkpoints every 4 steps, 40 steps over 2
    epochs, EMA, warm-up + decay schedule, AuxK with dead latents, scalar normalisation, a DataLoader worker):
    the resumed run's steps see the same batches and give the same losses, to 1e-6, and end in the same state."""
    check(faults.resume_after_kill(tmp_path))


def test_kill_9_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    check(faults.kill_during_checkpoint_write(tmp_path))


def test_failed_write_leaves_the_old_checkpoint(tmp_path):
    check(faults.atomic_write_failure(tmp_path))


@pytest.mark.parametrize("how", ["nan", "lr"])
def test_divergence_stops_without_writing_nan_weights(tmp_path, how):
    check(faults._divergence(tmp_path, how))


def test_incompatible_checkpoint_names_the_keys_before_loading_weights(tmp_path):
    check(faults.incompatible_checkpoint(tmp_path))


def test_changed_lr_on_resume_is_applied(tmp_path):
    check(faults.changed_lr_on_resume(tmp_path))


def test_checkpoint_holds_the_whole_training_state(tmp_path):
    """What a resume needs is in last.ckpt: optimizer, schedule, EMA, dead counters, init flag, RNG, data position."""
    shards = faults.make_shards(tmp_path / "shards")
    # 8: a multiple of CKPT_EVERY (ModelCheckpoint does not refresh last.ckpt at the end of a fit that saved before)
    cfg = faults.write_config(tmp_path / "cfg.yaml", shards, tmp_path / "run", trainer="max_steps: 8")
    code, err = faults.cli(["fit", "--config", str(cfg)])
    assert code == 0, err
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)  # weights_only-safe
    assert state["optimizer_states"][0]["state"] and state["lr_schedulers"][0]["last_epoch"] == 8
    sd = state["state_dict"]
    assert int(sd["ema.steps"]) == 8 and bool(sd["sae.data_initialized"]) and float(sd["sae.norm_scale"]) != 1.0
    assert state["state_dict"]["tokens_since_fired"].shape == (faults.N_LATENTS,)
    assert set(state["rng_states"]) >= {"torch", "numpy", "python"}
    assert state["ActivationDataModule"]["batches_consumed"] == 8


def test_atomic_checkpoint_io_is_the_cli_default(tmp_path):
    import lightning as L
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from lit_sae.train.atomic_io import AtomicCheckpointIO, use_atomic_checkpoints

    trainer = L.Trainer(logger=False, enable_checkpointing=False)
    assert use_atomic_checkpoints(trainer) and isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)

    class Mine(TorchCheckpointIO):
        pass

    trainer = L.Trainer(logger=False, enable_checkpointing=False, plugins=[Mine()])
    assert not use_atomic_checkpoints(trainer) and type(trainer.strategy.checkpoint_io) is Mine
