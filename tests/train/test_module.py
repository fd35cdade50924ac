"""SAEModule end to end on synthetic data with known features: recovery, AuxK, schedule, EMA, checkpoints, CLI."""

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_sae.callbacks.dead_latents import DeadLatentTracker
from lit_sae.cli.main import main
from lit_sae.data.synthetic import SyntheticDataModule
from lit_sae.train.module import SAEModule, _schedule, default_lr

ROOT = Path(__file__).resolve().parents[2]


def fit(module, dm, steps, **trainer_kw):
    L.seed_everything(0)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, **trainer_kw)
    trainer.fit(module, dm)
    return trainer


def tracker_of(trainer) -> DeadLatentTracker:
    return next(c for c in trainer.callbacks if isinstance(c, DeadLatentTracker))


@pytest.mark.slow
def test_short_fit_recovers_known_features():
    """512 unit directions in 64 dimensions, 3 active per token: the SAE finds them."""
    L.seed_everything(0)
    dm = SyntheticDataModule(d_in=64, n_features=512, active=3, batch_size_tokens=1024, train_tokens=600 * 1024)
    module = SAEModule(d_in=64, n_latents=512, k=3, lr=3e-3, dead_after_tokens=100_000, export_dir="none")
    fit(module, dm, 600)
    x = dm.sample_activations(16384)
    with torch.no_grad():
        x_hat = module.sae(x).x_hat
    nmse = float((x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    best_cos = float((dm.directions @ module.sae.W_dec.T).max(dim=1).values.mean())
    print(f"recovery: nmse={nmse:.4f} mean best cosine={best_cos:.4f}")
    assert nmse < 0.1
    assert best_cos > 0.9


@pytest.mark.slow
def test_auxk_revives_dead_latents():
    """An aggressive learning rate (3e-2) kills latents early; AuxK (the paper's 1/32, k_aux = d_in/2) brings most
    of them back, and the reconstruction is better for it."""

    def run(auxk_coef):
        torch.manual_seed(0)
        dm = SyntheticDataModule(d_in=64, n_features=256, active=4, batch_size_tokens=512, train_tokens=600 * 512,
                                 seed=1)
        module = SAEModule(d_in=64, n_latents=256, k=4, lr=3e-2, auxk_coef=auxk_coef, dead_after_tokens=5000,
                           export_dir="none")
        trainer = fit(module, dm, 600)
        x = dm.sample_activations(8192)
        with torch.no_grad():
            nmse = float((module.sae(x).x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
        return float(tracker_of(trainer).dead_mask(module).float().mean()), nmse

    (dead_without, nmse_without), (dead_with, nmse_with) = run(0.0), run(1 / 32)
    print(f"dead fraction without AuxK {dead_without:.3f} (nmse {nmse_without:.3f}), "
          f"with AuxK {dead_with:.3f} (nmse {nmse_with:.3f})")
    assert dead_without > 0.2
    assert dead_with < 0.1
    assert nmse_with < nmse_without


def test_paper_lr_and_schedule():
    assert default_lr(2**14) == pytest.approx(2e-4)
    assert default_lr(2**16) == pytest.approx(1e-4)
    f = _schedule(warmup=10, decay_start=0.5, total=100)
    assert [f(0), f(4), f(9), f(30), f(50), f(75), f(99)] == pytest.approx([0.1, 0.5, 1, 1, 1, 0.5, 0.02])
    with pytest.raises(ValueError, match="lr"):
        SAEModule(d_in=8, n_latents=16, k=2, lr=-1.0)


def test_checkpoint_rebuilds_model_and_keeps_state(tmp_path):
    dm = SyntheticDataModule(d_in=16, n_features=64, active=3, batch_size_tokens=256, train_tokens=20 * 256)
    module = SAEModule(d_in=16, n_latents=64, k=4, ema_decay=0.9, dead_after_tokens=1000, export_dir=str(tmp_path / "sae"))
    trainer = fit(module, dm, 20)
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)
    # the dead-latent counters are module state (a buffer), not a callback's
    assert torch.equal(state["state_dict"]["tokens_since_fired"], module.tokens_since_fired.cpu())
    restored = SAEModule.load_from_checkpoint(ckpt, weights_only=False)  # hyperparameters alone rebuild it
    assert (restored.sae.n_latents, restored.sae.k, restored.hparams.ema_decay) == (64, 4, 0.9)
    for name, p in module.sae.state_dict().items():
        torch.testing.assert_close(restored.sae.state_dict()[name], p)
    assert bool(restored.sae.data_initialized) and int(restored.tokens_seen) == 20 * 256
    assert torch.equal(restored.tokens_since_fired, module.tokens_since_fired.cpu())
    assert int(restored.ema.steps) == 20
    # The EMA is bias-corrected: after 20 steps of decay 0.9 it is a proper average, close to the weights.
    avg = restored.ema.averaged()["W_dec"]
    assert float((avg - module.sae.W_dec).norm() / module.sae.W_dec.norm()) < 0.2
    # on_fit_end exported the EMA weights in SAELens's layout
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["d_sae"] == 64 and cfg["k"] == 4 and cfg["architecture"] == "topk"


def test_b_pre_is_the_geometric_median_at_fit_start_and_not_on_resume(tmp_path):
    dm = SyntheticDataModule(d_in=16, n_features=64, active=3, batch_size_tokens=256, train_tokens=5 * 256,
                             offset_norm=10.0)
    from lit_sae.sae.median import geometric_median

    module = SAEModule(d_in=16, n_latents=64, k=4, init_tokens=2048, lr=1e-12, export_dir="none")
    trainer = fit(module, dm, 1)
    expected = geometric_median(dm.sample_activations(2048))
    torch.testing.assert_close(module.sae.b_pre.data, expected, atol=1e-5, rtol=1e-5)
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    with torch.no_grad():
        module.sae.b_pre.fill_(3.0)
    trainer.save_checkpoint(tmp_path / "moved.ckpt")
    module2 = SAEModule(d_in=16, n_latents=64, k=4, init_tokens=2048, lr=1e-12, export_dir="none")
    L.seed_everything(0)
    t2 = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, limit_val_batches=0)
    t2.fit(module2, dm, ckpt_path=tmp_path / "moved.ckpt")
    assert float((module2.sae.b_pre - 3.0).abs().max()) < 1e-6  # resumed: not re-initialised


def test_cli_fit_twice_into_the_same_folder_and_export(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(ROOT / "configs" / "synthetic.yaml"), "--trainer.max_steps", "5",
            "--trainer.default_root_dir", "run", "--data.init_args.train_tokens", "10240",
            "--trainer.logger.class_path", "lightning.pytorch.loggers.TensorBoardLogger",
            "--trainer.logger.init_args.save_dir", "run", "--trainer.logger.init_args.version", "fixed",
            "--trainer.enable_progress_bar", "false"]
    main(args)
    with pytest.raises(SystemExit) as stop:  # a fresh fit into a used run folder is refused ...
        main(args)
    assert stop.value.code == 2
    main(args + ["--ckpt_path", "last", "--trainer.max_steps", "8"])  # ... a resume is not (existing config.yaml)
    log_dir = tmp_path / "run" / "lightning_logs" / "fixed"  # the configured logger's folder
    assert (log_dir / "config.yaml").is_file()
    assert list(log_dir.glob("events.out.tfevents*"))
    assert (tmp_path / "run" / "sae" / "sae_weights.safetensors").is_file()  # the export: in the run's root
    dm = SyntheticDataModule(d_in=16, n_features=64, active=3, batch_size_tokens=256, train_tokens=3 * 256)
    trainer = fit(SAEModule(d_in=16, n_latents=32, k=4, export_dir="none", hook_point="blocks.2.hook_resid_post"),
                  dm, 3)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    main(["export", str(tmp_path / "m.ckpt"), "--out", str(tmp_path / "exp")])
    cfg = json.loads((tmp_path / "exp" / "cfg.json").read_text())
    assert (cfg["d_sae"], cfg["d_in"], cfg["hook_name"], cfg["hook_layer"]) == (32, 16, "blocks.2.hook_resid_post", 2)


def test_tensorboard_gets_the_training_scalars(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    dm = SyntheticDataModule(d_in=16, n_features=64, active=3, batch_size_tokens=256, train_tokens=12 * 256)
    module = SAEModule(d_in=16, n_latents=64, k=4, export_dir="none")
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    L.Trainer(max_steps=12, logger=logger, log_every_n_steps=2, enable_checkpointing=False,
              enable_progress_bar=False, limit_val_batches=0,
              callbacks=[__import__("lit_sae").FeatureHistograms(every_n_steps=5)]).fit(module, dm)
    acc = EventAccumulator(str(tmp_path / "tb" / "version_0"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/nmse", "train/auxk_loss", "train/l0", "train/dead_fraction", "tokens_per_s",
            "train/tokens_seen"} <= tags
    l0 = [e.value for e in acc.Scalars("train/l0")]
    assert all(v <= 4 for v in l0) and max(v for v in l0) > 3
    assert {"features/log10_density", "features/decoder_row_norm"} <= set(acc.Tags()["histograms"])
    assert math.isfinite(acc.Scalars("train/loss")[-1].value)


def test_init_from_an_export_reproduces_the_sae_and_rejects_a_mismatch(tmp_path):
    from lit_sae.artifacts.export import export_sae

    module = SAEModule(d_in=16, n_latents=64, k=4, normalize="scalar")
    module.sae.init_from_data_(torch.randn(512, 16) * 5 + 1)
    export_sae(module.sae, tmp_path / "sae")
    loaded = SAEModule(d_in=16, n_latents=64, k=4, init_from=str(tmp_path / "sae"))
    x = torch.randn(100, 16) * 5 + 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.sae(x).x_hat, module.sae(x).x_hat, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="n_latents"):
        SAEModule(d_in=16, n_latents=128, k=4, init_from=str(tmp_path / "sae"))


def test_last_checkpoint_is_refreshed_when_training_ends(tmp_path):
    from lit_sae.callbacks.checkpoint import Checkpoint

    dm = SyntheticDataModule(d_in=16, n_features=64, active=3, batch_size_tokens=256, train_tokens=7 * 256)
    ck = Checkpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=5, save_top_k=0)
    L.Trainer(max_steps=7, logger=False, callbacks=[ck], enable_progress_bar=False, limit_val_batches=0).fit(
        SAEModule(d_in=16, n_latents=64, k=4, export_dir="none"), dm)
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 7  # not 5
