"""Several SAEs on one stream (lit_sae/sweep.py): each SAE trains exactly as it would alone, a kill -9 resumes every
SAE exactly, a sweep that does not fit is refused before training, the test table and per-SAE exports."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_sae.data.datamodule import ActivationDataModule
from lit_sae.sae.model import TopKSAE
from lit_sae.train.sweep import SAESweepModule, expand_specs
from tests.support import faults

pytestmark = pytest.mark.slow  # spawned processes / CLI subprocesses: over ~10 s on 2 CPU cores

ROOT = Path(__file__).resolve().parents[2]
SAES = [{"name": "a", "activation": "topk"},
        {"name": "b", "activation": "relu", "sparsity_coef": 0.1, "sparsity_warmup_steps": 4, "lr": 3e-3}]
DEFAULTS = {"n_latents": 32, "k": 4, "lr": 1e-3}


def trainer(root, steps, **kw):
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, default_root_dir=str(root), **kw)


def data(shards):
    return ActivationDataModule(str(shards), batch_size_tokens=128, shuffle_buffer_tokens=512, num_workers=0)


def test_grid_expands_every_entry_with_names_and_rejects_bad_keys():
    specs = expand_specs([{"name": "t"}, {"activation": "relu"}], {"k": [8, 16], "lr": [1e-3]},
                         {"n_latents": 64, "sparsity_coef": 0.1})
    assert [s["name"] for s in specs] == ["t-k8-lr0_001", "t-k16-lr0_001", "activationrelu-k8-lr0_001",
                                          "activationrelu-k16-lr0_001"]  # "." is not a module name
    assert all(s["n_latents"] == 64 for s in specs) and specs[3]["activation"] == "relu"
    with pytest.raises(ValueError, match=r"model.grid: unknown key\(s\) \['kk'\]"):
        expand_specs(None, {"kk": [1]}, {})
    with pytest.raises(ValueError, match="model.saes: duplicate"):
        expand_specs([{"name": "x"}, {"name": "x"}], None, {})
    with pytest.raises(ValueError, match=r"model.saes\[r\].sparsity_coef is required with activation='relu'"):
        expand_specs([{"name": "r", "activation": "relu"}], None, {})
    with pytest.raises(ValueError, match=r"model.saes\[b\].activation='gated' is unknown"):
        SAESweepModule(16, saes=[{"name": "b", "activation": "gated"}], defaults=DEFAULTS)


def test_each_sae_of_a_sweep_trains_exactly_as_alone(tmp_path):
    """One pass, two SAEs (TopK and ReLU + L1 with its own lr) == each SAE trained alone from the same init on the
    same batches: independent gradients, optimizer states, schedules and dead-latent counters."""
    shards = faults.make_shards(tmp_path / "shards")
    L.seed_everything(0)
    both = SAESweepModule(16, saes=SAES, defaults=DEFAULTS, dead_after_tokens=256, init_tokens=256)
    init = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in both.members.items()}
    trainer(tmp_path / "both", 6, enable_checkpointing=False).fit(both, data(shards))
    for i, name in enumerate(("a", "b")):
        alone = SAESweepModule(16, saes=[SAES[i]], defaults=DEFAULTS, dead_after_tokens=256, init_tokens=256)
        alone.members[name].load_state_dict(init[name])
        trainer(tmp_path / name, 6, enable_checkpointing=False).fit(alone, data(shards))
        got, want = both.members[name].state_dict(), alone.members[name].state_dict()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7, msg=f"{name}.{key}")
    assert int(both.members["b"].sae.sparsity_step) == 6
    assert {p.name for p in (tmp_path / "both" / "sae").iterdir()} == {"a", "b"}
    exported = TopKSAE.from_pretrained(tmp_path / "both" / "sae" / "b")
    assert exported.activation == "relu"


def test_per_sae_schedule_and_ema_train_as_sae_module_alone(tmp_path):
    """Each SAE of a sweep has its own LR warm-up, decay and EMA: a JumpReLU SAE with warm-up 2, decay from half the
    run and EMA 0.9 beside a TopK SAE with a constant lr and no EMA ends exactly where ``SAEModule`` with the same
    settings ends alone (weights, thresholds, EMA shadows, dead counters); its export holds the EMA weights."""
    from lit_sae.train.module import SAEModule
    from lit_sae.train.schedule import lr_factor

    shards = faults.make_shards(tmp_path / "shards")
    jump = {"name": "j", "activation": "jumprelu", "sparsity_coef": 0.01, "jumprelu_init_threshold": 0.05,
            "lr": 2e-3, "warmup_steps": 2, "decay_start": 0.5, "ema_decay": 0.9, "jumprelu_threshold_lr_scale": 5.0}
    L.seed_everything(0)
    sweep = SAESweepModule(16, saes=[SAES[0], jump], defaults=DEFAULTS, dead_after_tokens=256, init_tokens=256)
    init = {k: v.clone() for k, v in sweep.members["j"].state_dict().items()}
    t = trainer(tmp_path / "sweep", 6, enable_checkpointing=False)
    t.fit(sweep, data(shards))
    sched = t.lr_scheduler_configs[0].scheduler
    # constant / decayed by hand; j's thresholds (its second group) at 5x its lr, with the same schedule
    f = lr_factor(2, 0.5, 6)(6)
    assert sched.get_last_lr() == pytest.approx([1e-3, 2e-3 * f, 5 * 2e-3 * f])
    assert sweep.members["a"].ema is None and int(sweep.members["j"].ema.steps) == 6

    settings = {k: v for k, v in jump.items() if k != "name"}
    alone = SAEModule(d_in=16, n_latents=32, k=4, dead_after_tokens=256, init_tokens=256, export_dir="none",
                      **settings)
    alone.sae.load_state_dict({k[len("sae."):]: v for k, v in init.items() if k.startswith("sae.")})
    trainer(tmp_path / "alone", 6, enable_checkpointing=False).fit(alone, data(shards))
    got, want = sweep.members["j"].state_dict(), alone.state_dict()
    keys = [k for k in want if k.startswith(("sae.", "ema.")) or k == "tokens_since_fired"]
    assert "sae.threshold" in keys and "ema.shadow_threshold" in keys
    for key in keys:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7, msg=key)
    exported = TopKSAE.from_pretrained(tmp_path / "sweep" / "sae" / "j")
    with alone.ema.swapped_into(alone.sae):
        x = torch.randn(64, 16)
        torch.testing.assert_close(exported.reconstruct(x), alone.sae.eval().reconstruct(x), rtol=1e-5, atol=1e-5)


def test_bad_per_sae_settings_name_the_sae_and_key():
    for spec, match in [({"ema_decay": 1.5}, r"model.saes\[x\].ema_decay=1.5"),
                        ({"warmup_steps": -1}, r"model.saes\[x\].warmup_steps=-1"),
                        ({"decay_start": 2.0}, r"model.saes\[x\].decay_start=2.0"),
                        ({"activation": "topk", "sparsity_coef": 0.1},
                         r"model.saes\[x\].sparsity_coef=0.1 does not apply to activation='topk'"),
                        ({"activation": "relu", "sparsity_coef": -1.0}, r"model.saes\[x\].sparsity_coef=-1.0"),
                        ({"activation": "jumprelu", "sparsity_coef": 0.1, "jumprelu_threshold_lr_scale": -2.0},
                         r"model.saes\[x\].jumprelu_threshold_lr_scale=-2.0 must be > 0"),
                        ({"activation": "relu", "sparsity_coef": 0.1, "jumprelu_threshold_lr_scale": 2.0},
                         r"model.saes\[x\].jumprelu_threshold_lr_scale=2.0 does not apply")]:
        with pytest.raises(ValueError, match=match):
            SAESweepModule(16, saes=[{"name": "x", **spec}], defaults=DEFAULTS)
    # defaults may hold settings of several architectures: they apply where they mean something
    SAESweepModule(16, saes=[{"name": "t"}, {"name": "r", "activation": "relu"}],
                   defaults={**DEFAULTS, "sparsity_coef": 0.1})


def test_a_sweep_that_does_not_fit_is_refused_before_training(tmp_path):
    shards = faults.make_shards(tmp_path / "shards")
    model = SAESweepModule(16, saes=SAES, defaults=DEFAULTS, memory_budget_gib=1e-6)
    need = sum(model.memory_estimate(128).values())
    assert need == 2 * (16 * (2 * 32 * 16 + 32 + 16 + 32) + 3 * 4 * 128 * 32)  # by hand: params x 16 B + codes
    with pytest.raises(ValueError, match=r"model.saes: the 2 SAEs need about .* GiB .*memory_budget_gib"):
        trainer(tmp_path / "run", 2).fit(model, data(shards))
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "sae").exists()


# a third SAE for the kill -9 test: its own LR warm-up and decay, EMA, a learned per-latent threshold
RESUMED = {"name": "c", "activation": "jumprelu", "sparsity_coef": 0.01, "sparsity_warmup_steps": 4,
           "jumprelu_init_threshold": 0.05, "warmup_steps": 3, "decay_start": 0.5, "ema_decay": 0.9}

SCRIPT = """
import os, sys, torch, lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lit_sae.data.datamodule import ActivationDataModule
from lit_sae.train.sweep import SAESweepModule

shards, root, kill_at, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
class Kill(Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == kill_at:
            os.kill(os.getpid(), 9)
L.seed_everything(0)
model = SAESweepModule(16, saes=%r, defaults=%r, dead_after_tokens=256, init_tokens=256)
dm = ActivationDataModule(shards, batch_size_tokens=128, shuffle_buffer_tokens=512, num_workers=0)
ckpt = ModelCheckpoint(dirpath=root + "/checkpoints", every_n_train_steps=2, save_last=True, save_top_k=0)
trainer = L.Trainer(max_steps=10, accelerator="cpu", logger=False, enable_progress_bar=False, limit_val_batches=0,
                    enable_model_summary=False, default_root_dir=root, callbacks=[ckpt] + ([Kill()] if kill_at else []))
trainer.fit(model, dm, ckpt_path="last" if resume else None)
torch.save(model.state_dict(), root + "/final.pt")
""" % (SAES + [RESUMED], DEFAULTS)


def test_kill_9_resumes_every_sae_of_a_sweep_exactly(tmp_path):
    """TopK, ReLU + L1 and JumpReLU (with its own LR schedule and EMA) in one sweep, killed after step 5 with a
    checkpoint at step 4: the resumed run ends bit-exactly where the uninterrupted one does, every SAE's weights,
    thresholds, EMA, dead counters and penalty warm-up step included."""
    shards = faults.make_shards(tmp_path / "shards")
    (tmp_path / "run.py").write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(root, kill_at, resume):
        return subprocess.run([sys.executable, str(tmp_path / "run.py"), str(shards), str(root), str(kill_at),
                               "1" if resume else "0"], env=env, capture_output=True, text=True, timeout=600)

    killed = run(tmp_path / "k", 5, False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (tmp_path / "k" / "checkpoints" / "last.ckpt").exists() and not (tmp_path / "k" / "final.pt").exists()
    resumed = run(tmp_path / "k", 0, True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight = run(tmp_path / "s", 0, False)
    assert straight.returncode == 0, straight.stderr[-2000:]
    got, want = torch.load(tmp_path / "k" / "final.pt"), torch.load(tmp_path / "s" / "final.pt")
    assert any(k.startswith("members.b.") for k in want) and "members.c.ema.shadow_threshold" in want
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)


def test_sweep_test_writes_one_table(tmp_path):
    shards = faults.make_shards(tmp_path / "shards", n_test=256)
    L.seed_everything(0)
    model = SAESweepModule(16, saes=SAES, defaults=DEFAULTS, dead_after_tokens=256, init_tokens=256)
    t = trainer(tmp_path, 3, enable_checkpointing=False)
    dm = data(shards)
    t.fit(model, dm)
    results = t.test(model, dm, verbose=False)[0]
    rows = json.loads((tmp_path / "sweep_test.json").read_text())
    assert [r["name"] for r in rows] == ["a", "b"]
    for r in rows:
        assert r["nmse"] == pytest.approx(results[f"test/{r['name']}/nmse"], rel=1e-6)
        assert r["l0"] == pytest.approx(results[f"test/{r['name']}/l0"], rel=1e-6)
    assert rows[0]["l0"] == pytest.approx(4.0)  # TopK: exactly k on every token
    assert "| b | relu | 32 | 4 | 0.003 |" in (tmp_path / "sweep_test.md").read_text()


def test_memory_estimate_by_hand():
    """16 bytes a parameter (weight, gradient, two Adam moments), 4 more for an EMA shadow, plus three dense
    (B, n_latents) fp32 buffers: d_in 16, n 32, B 128 by hand."""
    from lit_sae.train.sweep import estimate_bytes

    params = 2 * 32 * 16 + 32 + 16 + 32  # W_enc, W_dec, b_enc, b_pre, threshold-sized vector
    assert estimate_bytes(16, {"n_latents": 32}, 128) == 16 * params + 3 * 4 * 128 * 32
    assert estimate_bytes(16, {"n_latents": 32, "ema_decay": 0.999}, 128) == 20 * params + 3 * 4 * 128 * 32
