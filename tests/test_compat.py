"""Every private API lit-sae touches (lit_sae/compat.py) still exists and still does what lit-sae relies on."""

import lightning as L
import torch

from lit_sae import compat
from lit_sae.callbacks.checkpoint import Checkpoint
from lit_sae.data.synthetic import SyntheticDataModule
from lit_sae.train.module import SAEModule


def tiny_fit(tmp_path, steps=3, callbacks=(), **kw):
    L.seed_everything(0)
    dm = SyntheticDataModule(d_in=8, n_features=16, active=2, batch_size_tokens=64, train_tokens=64 * 16)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path, callbacks=list(callbacks), **kw)
    module = SAEModule(d_in=8, n_latents=16, k=2, export_dir="none", init_tokens=64)
    trainer.fit(module, dm)
    return trainer, module


def test_every_private_name_is_listed_and_documented():
    names = list(compat.private_names())
    assert len(names) == len(set(names)) >= 8
    public = [f for f in vars(compat).values() if callable(f) and getattr(f, "__module__", "") == compat.__name__]
    assert all(f.__doc__ for f in public)


def test_modelcheckpoint_save_last_and_step(tmp_path):
    ck = Checkpoint(every_n_train_steps=1000, save_top_k=0)
    trainer, _ = tiny_fit(tmp_path, callbacks=[ck])  # on_train_end saved last.ckpt via save_last_now
    assert compat.last_global_step_saved(ck) == 3
    (tmp_path / "checkpoints" / "last.ckpt").unlink()
    compat.save_last_checkpoint(ck, trainer)
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 3 and ck.last_model_path.endswith("last.ckpt")


def test_checkpoint_io_none_until_configured():
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    assert compat.get_checkpoint_io(L.Trainer(logger=False).strategy) is None
    mine = TorchCheckpointIO()
    assert compat.get_checkpoint_io(L.Trainer(logger=False, plugins=[mine]).strategy) is mine


def test_train_dataloader_and_cluster_environment(tmp_path):
    from lightning.fabric.plugins.environments import ClusterEnvironment

    seen = {}

    class Peek(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            batch = next(iter(compat.train_dataloader_of(trainer)))
            seen["acts"] = tuple(batch["acts"].shape)
            seen["env"] = compat.cluster_environment(trainer)

    tiny_fit(tmp_path, steps=1, callbacks=[Peek()], enable_checkpointing=False)
    assert seen["acts"] == (64, 8) and isinstance(seen["env"], ClusterEnvironment)


def test_lightning_cli_parse_ckpt_path_and_subcommand_parsers(tmp_path):
    """Lightning's own _parse_ckpt_path loads a checkpoint file's hyperparameters into the test config."""
    from lit_sae.cli.trainer import SAECLI, run_lightning

    trainer, module = tiny_fit(tmp_path, steps=1, enable_checkpointing=False)
    trainer.save_checkpoint(tmp_path / "m.ckpt")

    class Parsed(Exception):
        pass

    class ParseOnly(SAECLI):
        def instantiate_classes(self):
            type(self).seen = self
            raise Parsed

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  n_latents: 99\n  k: 3\ndata:\n  class_path: lit_sae.data.synthetic.SyntheticDataModule"
                      "\n  init_args:\n    d_in: 8\n    n_features: 16\n    active: 2\n")
    try:
        run_lightning(["test", "--config", str(recipe), "--ckpt_path", str(tmp_path / "m.ckpt")], cli_class=ParseOnly)
    except Parsed:
        pass
    cli = ParseOnly.seen
    assert (cli.config.test.model.n_latents, cli.config.test.model.k) == (16, 2)  # the checkpoint's, not 99 / 3
    assert len(compat.subcommand_parsers(cli.parser)) == 3  # fit, validate, test


def test_embedding_bag_backward_is_a_gathered_dot_product():
    g = torch.Generator().manual_seed(0)
    B, m, n, d = 5, 3, 11, 4
    idx = torch.randint(0, n, (B, m), generator=g)
    W, G = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(B, d, generator=g, dtype=torch.float64)
    flat = idx.reshape(-1)
    out = compat.embedding_bag_per_sample_weights_backward(G, W, flat, torch.arange(0, B * m, m),
                                                           torch.arange(B).repeat_interleave(m))
    torch.testing.assert_close(out.view(B, m), (W[idx] * G[:, None, :]).sum(-1))


def test_ddp_find_unused_parameters_reaches_the_wrapper_kwargs():
    from lightning.pytorch.strategies import DDPStrategy

    strategy = DDPStrategy(accelerator="cpu")
    assert compat.ddp_find_unused_parameters(strategy) and strategy._ddp_kwargs["find_unused_parameters"] is True
    assert not compat.ddp_find_unused_parameters(L.Trainer(logger=False).strategy)
