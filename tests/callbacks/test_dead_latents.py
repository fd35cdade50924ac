"""The dead-latent counters are module state (a checkpointed buffer); ``DeadLatentTracker`` is a
view of them for scripts; checkpoints written when the callback held them still load. Also why ``ema.py`` stays
instead of Lightning's ``EMAWeightAveraging``."""

import lightning as L
import torch

from lit_sae.callbacks.dead_latents import DeadLatentTracker
from lit_sae.data.synthetic import SyntheticDataModule
from lit_sae.train.module import SAEModule


def test_counters_by_hand():
    module = SAEModule(d_in=4, n_latents=6, k=2, export_dir="none")
    values = torch.tensor([[0.5, 0.0], [2e-3, 1e-4]])  # 0.0 and 1e-4 are below the firing threshold 1e-3
    indices = torch.tensor([[0, 1], [2, 3]])
    module.tokens_since_fired += 10
    module._count_fired_(values, indices)
    assert module.tokens_since_fired.tolist() == [0, 12, 0, 12, 12, 12]
    module.hparams.dead_after_tokens = 12
    assert module.dead_latent_mask().tolist() == [False, True, False, True, True, True]


class Watch(L.Callback):
    """Records, at every step, whether the tracker in trainer.callbacks shows the module's own counters."""

    def __init__(self):
        self.same, self.sums = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        tracker = next(c for c in trainer.callbacks if type(c).__name__ == "DeadLatentTracker")
        self.same.append(tracker.tokens_since_fired is pl_module.tokens_since_fired)
        self.sums.append(int(tracker.tokens_since_fired.max()))


def fit(module, steps, tmp_path=None, ckpt_path=None, callbacks=()):
    L.seed_everything(0)
    dm = SyntheticDataModule(d_in=8, n_features=16, active=2, batch_size_tokens=64, train_tokens=64 * 64)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=list(callbacks),
                        default_root_dir=tmp_path)
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return trainer


def test_tracker_is_a_view_of_the_module_buffer_during_fit():
    module = SAEModule(d_in=8, n_latents=64, k=2, dead_after_tokens=256, export_dir="none")
    watch = Watch()
    fit(module, 6, callbacks=[watch])
    assert all(watch.same) and len(watch.same) == 6
    assert watch.sums[-1] > 0 and watch.sums == sorted(watch.sums)  # never-firing latents count up by 64 a step
    assert "tokens_since_fired" in module.state_dict()


def test_checkpoint_with_counters_in_the_callback_still_loads(tmp_path):
    module = SAEModule(d_in=8, n_latents=64, k=2, dead_after_tokens=256, export_dir="none")
    trainer = fit(module, 4, tmp_path)
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    state = torch.load(tmp_path / "new.ckpt", weights_only=False)
    counts = state["state_dict"].pop("tokens_since_fired")  # the layout of checkpoints before the move
    assert counts.max() > 0
    state["callbacks"]["DeadLatentTracker"] = {"tokens_since_fired": counts}
    torch.save(state, tmp_path / "old.ckpt")
    restored = SAEModule.load_from_checkpoint(tmp_path / "old.ckpt", weights_only=False)
    assert torch.equal(restored.tokens_since_fired, counts)
    resumed = SAEModule(d_in=8, n_latents=64, k=2, dead_after_tokens=256, export_dir="none")
    watch = Watch()
    fit(resumed, 5, tmp_path, ckpt_path=tmp_path / "old.ckpt", callbacks=[watch])
    assert len(watch.sums) == 1 and watch.sums[0] >= int(counts.max())  # continued from the old counters


def test_ema_is_not_lightnings_ema_weight_averaging():
    """ema.py starts its average at zero and divides by (1 - decay^t) (OpenAI's training code); torch's AveragedModel
    (behind Lightning's EMAWeightAveraging) starts at the first weights. After two steps p1, p2 with decay d:
    ema.py gives (d p1 + p2) / (1 + d), AveragedModel d p1 + (1 - d) p2. EMAWeightAveraging would also average
    the module's integer buffers (counters) and replace the checkpoint's state_dict by the average."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from lit_sae.sae.ema import EMA

    d = 0.9
    p1, p2 = torch.tensor([1.0], dtype=torch.float64), torch.tensor([3.0], dtype=torch.float64)
    net = torch.nn.Linear(1, 1, bias=False).double()
    ours = EMA(net, d)
    theirs = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(d))
    for p in (p1, p2):
        with torch.no_grad():
            net.weight.copy_(p.view(1, 1))
        ours.update(net)
        theirs.update_parameters(net)
    mine = float(ours.averaged()["weight"])
    assert abs(mine - (d * 1 + 3) / (1 + d)) < 1e-12  # 2.0526...
    assert abs(float(theirs.module.weight.detach()) - (d * 1 + (1 - d) * 3)) < 1e-12  # 1.2
    assert abs(mine - float(theirs.module.weight.detach())) > 0.8
    assert DeadLatentTracker(10).state_dict() == {}
