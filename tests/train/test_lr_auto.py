"""``model.lr: auto`` (lit_sae.train.lr_auto): the sweep's candidates train exactly as separate runs at their lrs,
the choice is the lowest progressive NMSE over the sweep's last half, the run then continues exactly as a run at the
chosen lr from the start; bad settings name their key; exact resume during and after the sweep through
``lit-sae fit``."""

import csv

import lightning as L
import pytest
import torch

from lit_sae.train.lr_auto import LRSearch
from lit_sae.train.module import SAEModule, default_lr
from tests.support import faults

D_IN, N, K, B, STEPS = 8, 32, 4, 64, 16
MULTIPLIERS = [0.25, 8.0, 300.0]  # 300x the law diverges into a poor SAE here, 0.25x is slow: 8x wins


def _batches(steps=STEPS):
    g = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(48, D_IN, generator=g, dtype=torch.float64), dim=1)
    out = []
    for _ in range(steps):
        codes = torch.rand(B, 48, generator=g, dtype=torch.float64) * (torch.rand(B, 48, generator=g) < 0.1)
        out.append({"acts": codes @ dirs * 3 + 1.0})
    return out


class Recorder(L.Callback):
    def __init__(self):
        self.nmse = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.nmse.append(float(trainer.callback_metrics.get("train/nmse", float("nan"))))


def _fit(lr, tmp_path=None, steps=STEPS, callbacks=(), **kw):
    L.seed_everything(0, verbose=False)
    module = SAEModule(d_in=D_IN, n_latents=N, k=K, lr=lr, init_tokens=4 * B, dead_after_tokens=4 * B,
                       export_dir="none", **kw)
    rec = Recorder()
    logger = L.pytorch.loggers.CSVLogger(str(tmp_path), name="csv", version=0) if tmp_path else False
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, precision="64-true", logger=logger,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=1, callbacks=[rec, *callbacks])
    batches = _batches(steps)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return module, rec.nmse


def test_auto_chooses_by_progressive_nmse_and_continues_as_a_run_at_that_lr(tmp_path):
    module, _ = _fit("auto", tmp_path, lr_auto_multipliers=MULTIPLIERS, lr_auto_fraction=0.25)
    search = module.lr_search
    assert search.done and int(search.scored_steps) == 2  # 16 steps x 0.25 = 4 sweep steps, the last 2 scored
    law = default_lr(N)
    runs = {m: _fit(law * m) for m in MULTIPLIERS}
    # each candidate's score is its own run's training NMSE at steps 2 and 3 (each measured before its update)
    for i, m in enumerate(MULTIPLIERS):
        want = sum(runs[m][1][2:4]) / 2
        assert float(search.scores()[i]) == pytest.approx(want, rel=1e-9)
    best = min(MULTIPLIERS, key=lambda m: sum(runs[m][1][2:4]))
    assert search.lrs[int(search.chosen)] == pytest.approx(law * best) and module.lr == pytest.approx(law * best)
    assert best == 8.0
    # the run went on from the winner's weights and Adam state: the same as the plain run at that lr (float64)
    ref = runs[best][0]
    for name, p in ref.sae.state_dict().items():
        torch.testing.assert_close(module.sae.state_dict()[name], p, rtol=1e-10, atol=1e-12, msg=name)
    assert torch.equal(module.tokens_since_fired, ref.tokens_since_fired)
    assert int(module.tokens_seen) == STEPS * B
    rows = list(csv.DictReader(open(tmp_path / "csv" / "version_0" / "metrics.csv")))
    chosen = [float(r["lr_auto/chosen_lr"]) for r in rows if r.get("lr_auto/chosen_lr")]
    assert chosen == [pytest.approx(law * best)]
    assert any(r.get(f"lr_auto/train_nmse/lr_{law * 8:.3g}") for r in rows)  # the sweep's curves


def test_a_run_shorter_than_the_sweep_exports_the_best_candidate():
    module, _ = _fit("auto", steps=2, lr_auto_multipliers=[1.0, 8.0])
    assert module.lr_search.done and int(module.lr_search.scored_steps) == 1


def test_validation_inside_the_sweep_scores_the_current_leader():
    seen = {}

    class Peek(L.Callback):  # the validation hooks, called after step 6 of an 8-step sweep
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            search = module.lr_search
            if trainer.global_step != 6:
                return
            seen["scored"], seen["done"] = int(search.scored_steps), search.done
            own = {k: v.clone() for k, v in module.sae.state_dict().items()}
            leader = search.candidates[int(torch.argmin(search.scores()))]
            module.on_validation_epoch_start()
            seen["leader"] = torch.equal(module.sae.W_dec, leader.W_dec)
            module.on_validation_epoch_end()
            seen["restored"] = all(torch.equal(module.sae.state_dict()[k], v) for k, v in own.items())

    _fit("auto", callbacks=[Peek()], lr_auto_multipliers=MULTIPLIERS, lr_auto_fraction=0.5)
    assert seen == {"scored": 2, "done": False, "leader": True, "restored": True}


def test_a_fit_stopped_inside_the_sweep_exports_its_best_candidate():
    from tests.support.stop import StopAt

    module, _ = _fit("auto", callbacks=[StopAt(6)], lr_auto_multipliers=MULTIPLIERS, lr_auto_fraction=0.5)
    assert module.lr_search.done and int(module.lr_search.scored_steps) == 2  # steps 4 and 5 of 8 were scored


@pytest.mark.parametrize("kw, match", [
    ({"lr": "fast"}, "model.lr='fast'"),
    ({"lr": -1.0}, "model.lr=-1.0 must be positive"),
    ({"lr": "auto", "lr_auto_multipliers": [1.0, 1.0]}, "model.lr_auto_multipliers"),
    ({"lr": "auto", "lr_auto_fraction": 1.0}, "model.lr_auto_fraction"),
    ({"lr": "auto", "ema_decay": 0.9}, "ema_decay"),
])
def test_bad_settings_name_the_key(kw, match):
    with pytest.raises(ValueError, match=match.replace("[", r"\[").replace("(", r"\(")):
        SAEModule(d_in=D_IN, n_latents=N, k=K, **kw)


def test_sweep_steps():
    assert LRSearch.sweep_steps(1000, 0.1) == 100 and LRSearch.sweep_steps(5, 0.1) == 2
    assert LRSearch.sweep_steps(1, 0.1) == 1


AUTO = "lr: auto\nlr_auto_multipliers: [0.25, 1.0, 4.0]\nema_decay: null\nwarmup_steps: 0\ndecay_start: null\n"


@pytest.mark.slow
@pytest.mark.parametrize("fraction", [0.5, 0.1], ids=["during-sweep", "after-sweep"])
def test_lit_sae_fit_resumes_exactly(tmp_path, fraction):
    """kill -9 after step 14 of 40 and resume from last.ckpt (every 4 steps): with 20 sweep steps the checkpoint
    is inside the sweep, with 4 after it; same batches, losses and final state as the uninterrupted run."""
    result = faults.resume_after_kill(tmp_path, model=AUTO + f"lr_auto_fraction: {fraction}\n")
    assert result.ok, result.observed
    state = torch.load(tmp_path / "part" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert int(state["lr_search.chosen"]) >= 0 and not any(k.startswith("lr_search.candidates.") for k in state)
