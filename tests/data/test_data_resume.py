"""A resumed fit sees exactly the batches, learning rates and losses of the uninterrupted one, from any step.

Train split: 2048 tokens in batches of 256 -> 8 steps per epoch, 16 steps in all (max_steps=16 or max_epochs=2).
A checkpoint is written after every step; resuming from step s (mid-epoch 5, last batch of an epoch 8, first batch
of an epoch 9, the final step 16) must reproduce steps s+1..16 bit for bit on CPU and end in the same state, with no
validation, validation every 3 steps, or validation at each epoch's end. Lightning 2.6 advances ``current_epoch``
when it restores a checkpoint saved on an epoch's last batch; the stream's position comes from the DataModule's own
saved state, so that cannot shift the data.
"""

import hashlib
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_sae.data.datamodule import ActivationDataModule
from lit_sae.data.transport import StreamLoader
from lit_sae.train.module import SAEModule
from tests.support.shards import write_shards

CTX = 16
D_IN = 16


def _write_shards(out, sizes):
    """Sparse codes over 64 directions plus an offset (tests/support/shards.py writes them)."""
    g = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(64, D_IN, generator=g), dim=1)
    acts = {}
    for split, n in sizes.items():
        codes = torch.rand(n, 64, generator=g) * (torch.rand(n, 64, generator=g) < 0.08)
        acts[split] = codes @ dirs * 3 + 2.0
    write_shards(out, acts, ctx_len=CTX, block_tokens=64, tokens_per_shard=256)


class _Recorder(L.Callback):
    """Per optimizer step: (global_step, lr, loss, hash of the batch's token ids)."""

    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        ids = (batch["ctx"] * CTX + batch["pos"]).sort().values.numpy().tobytes()
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        self.rows.append((trainer.global_step, lr, float(outputs["loss"]), hashlib.sha1(ids).hexdigest()[:12]))


VAL = {"none": dict(limit_val_batches=0), "steps": dict(val_check_interval=3, check_val_every_n_epoch=None),
       "epoch": dict(check_val_every_n_epoch=1)}


def _fit(shards, root, stop, val, ckpt_path=None, every_step=False):
    L.seed_everything(0, verbose=False)
    dm = ActivationDataModule(str(shards), batch_size_tokens=256, shuffle_buffer_tokens=1024, num_workers=0)
    kw = dict(warmup_steps=3, ema_decay=0.9) | (dict(decay_start=0.5) if stop == "max_steps" else {})
    model = SAEModule(d_in=dm.d_in, hook_point=dm.hook_point, lm_name=dm.model_name, n_latents=64, k=4, lr=3e-3,
                      dead_after_tokens=1024, k_aux=8, init_tokens=1024, export_dir="none", **kw)
    rec = _Recorder()
    callbacks = [rec]
    if every_step:
        callbacks.append(ModelCheckpoint(dirpath=str(root / "ck"), filename="{step}", every_n_train_steps=1,
                                         save_top_k=-1))
    limits = dict(max_steps=16) if stop == "max_steps" else dict(max_epochs=2)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, deterministic=True, default_root_dir=str(root),
                        num_sanity_val_steps=0, enable_checkpointing=every_step, callbacks=callbacks,
                        **limits, **VAL[val])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model, trainer, rec, [str(w.message) for w in caught]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    _write_shards(out, {"train": 2048, "val": 300})
    return out


_REFERENCE = {}


def _reference(shards, tmp_path_factory, stop, val):
    if (stop, val) not in _REFERENCE:
        root = tmp_path_factory.mktemp(f"ref-{stop}-{val}")
        _REFERENCE[stop, val] = (root, *_fit(shards, root, stop, val, every_step=True))
    return _REFERENCE[stop, val]


@pytest.mark.parametrize("val", ["none", "steps", "epoch"])
@pytest.mark.parametrize("stop", ["max_steps", "max_epochs"])
@pytest.mark.parametrize("step", [5, 8, 9, 16], ids=["mid-epoch", "last-batch", "first-batch", "final"])
def test_resume_from_any_step_is_exact(shards, tmp_path, tmp_path_factory, stop, val, step):
    root, ref_model, ref_trainer, ref, _ = _reference(shards, tmp_path_factory, stop, val)
    assert [r[0] for r in ref.rows] == list(range(1, 17)) and ref_trainer.global_step == 16
    assert len({r[3] for r in ref.rows}) == 16  # every step saw a different batch: the comparison below has teeth
    ckpt = root / "ck" / f"step={step}.ckpt"
    model, trainer, rec, messages = _fit(shards, tmp_path, stop, val, ckpt_path=str(ckpt))
    assert rec.rows == ref.rows[step:]  # same steps, learning rates, losses (bit-exact on CPU) and batches
    assert trainer.global_step == 16
    if step < 16:  # (a resume that has nothing left to do stops before Lightning's loops update current_epoch)
        assert trainer.current_epoch == ref_trainer.current_epoch
    ref_state, state = ref_model.state_dict(), model.state_dict()
    assert ref_state.keys() == state.keys()
    assert all(torch.equal(ref_state[k], state[k]) for k in state)
    assert int(model.tokens_seen) == int(ref_model.tokens_seen) == 16 * 256
    assert not [m for m in messages if "not resumable" in m]


def test_checkpoint_holds_the_loader_position_and_it_is_the_datamodules(shards, tmp_path_factory):
    """Lightning saves the train loader's state (its _Stateful protocol) beside the DataModule's: the same position;
    on the last batch of an epoch both say 'next epoch, nothing consumed'."""
    root = _reference(shards, tmp_path_factory, "max_steps", "none")[0]
    for step, want in ((5, (0, 5)), (8, (1, 0)), (9, (1, 1))):
        ck = torch.load(root / "ck" / f"step={step}.ckpt", weights_only=False)
        (loader_state,) = ck["loops"]["fit_loop"]["state_dict"]["combined_loader"]
        assert loader_state == ck["ActivationDataModule"]
        assert (loader_state["epoch"], loader_state["batches_consumed"]) == want


def test_warning_appears_without_the_loader_state(shards, tmp_path, tmp_path_factory, monkeypatch):
    """Control for the warning check above: with a loader lacking state_dict/load_state_dict (and a checkpoint
    without loader state, as earlier versions wrote), Lightning warns 'not resumable' on a mid-epoch resume."""
    import lit_sae.data.datamodule as datamodule

    class Stateless(StreamLoader):
        state_dict = load_state_dict = None  # not an implementation of Lightning's _Stateful protocol

    root = _reference(shards, tmp_path_factory, "max_steps", "none")[0]
    ck = torch.load(root / "ck" / "step=5.ckpt", weights_only=False)
    del ck["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    torch.save(ck, tmp_path / "old.ckpt")
    monkeypatch.setattr(datamodule, "StreamLoader", Stateless)
    model, trainer, rec, messages = _fit(shards, tmp_path, "max_steps", "none", ckpt_path=str(tmp_path / "old.ckpt"))
    assert [m for m in messages if "not resumable" in m]
    # The DataModule's own saved state still resumes the stream exactly.
    assert rec.rows == _reference(shards, tmp_path_factory, "max_steps", "none")[3].rows[5:]
