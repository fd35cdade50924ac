"""The run folder through the real ``lit-sae`` entry point: two roots never share a
file, a used root is not overwritten by a fresh fit, ``--ckpt_path last`` looks only in the run's root, and
evaluation never reports untrained weights unless asked to."""

from pathlib import Path

import pytest

from tests.support.faults import cli, error_line

RECIPE = """\
seed_everything: 0
trainer:
  max_steps: {steps}
  default_root_dir: {root}
  enable_progress_bar: false
  enable_model_summary: false
  log_every_n_steps: 1
  callbacks:
    - class_path: lit_sae.callbacks.checkpoint.Checkpoint
      init_args:
        every_n_train_steps: 2
        save_top_k: 0
model:
  n_latents: 32
  k: 4
  init_tokens: 256
data:
  class_path: lit_sae.data.synthetic.SyntheticDataModule
  init_args:
    d_in: 8
    n_features: 16
    active: 2
    batch_size_tokens: 64
    train_tokens: 4096
    val_tokens: 128
"""


def recipe(tmp: Path, root: str = "runs/a", steps: int = 4) -> Path:
    path = tmp / f"recipe-{steps}.yaml"
    path.write_text(RECIPE.format(root=root, steps=steps))
    return path


def files(base: Path) -> set[str]:
    return {str(p.relative_to(base)) for p in base.rglob("*") if p.is_file()}


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative roots land here
    return tmp_path


def test_two_roots_share_nothing_and_hold_everything(work):
    cfg = recipe(work)
    for root in ("runs/a", "runs/b"):
        code, err = cli(["fit", "--config", str(cfg), "--trainer.default_root_dir", root])
        assert code == 0, err
    a, b = files(work / "runs" / "a"), files(work / "runs" / "b")
    for run in (a, b):
        assert {"checkpoints/last.ckpt", "sae/cfg.json", "sae/sae_weights.safetensors", "config.yaml"} <= run
        assert any(f.startswith("events.out.tfevents") for f in run)  # TensorBoard in the root, not version_N/
        assert not any("version_" in f or "lightning_logs" in f for f in run)
    outside = {f for f in files(work) if not f.startswith(("runs/a/", "runs/b/")) and not f.startswith("recipe")}
    assert outside == set()


def test_fresh_fit_into_a_used_root_stops_and_resume_continues_in_place(work):
    cfg = recipe(work)
    assert cli(["fit", "--config", str(cfg)])[0] == 0
    ck = work / "runs" / "a" / "checkpoints"
    before = (ck / "last.ckpt").read_bytes()
    code, err = cli(["fit", "--config", str(cfg)])
    line = error_line(err)
    assert code == 2 and "--ckpt_path last" in line and "--trainer.default_root_dir" in line and "last.ckpt" in line
    assert (ck / "last.ckpt").read_bytes() == before and sorted(p.name for p in ck.iterdir()) == ["last.ckpt"]
    # resuming to 8 steps continues the same run: one checkpoint file, one TensorBoard folder
    code, err = cli(["fit", "--config", str(recipe(work, steps=8)), "--ckpt_path", "last"])
    assert code == 0, err
    import torch

    assert torch.load(ck / "last.ckpt", weights_only=False)["global_step"] == 8
    assert sorted(p.name for p in ck.iterdir()) == ["last.ckpt"]  # no last-v1.ckpt
    events = [f for f in files(work / "runs" / "a") if "tfevents" in f]
    assert len(events) == 2 and all("/" not in f for f in events)  # both runs' curves in the root folder


def test_ckpt_path_last_without_checkpoint_is_an_error_for_every_command(work):
    cfg = recipe(work)
    for command in ("fit", "validate", "test"):
        code, err = cli([command, "--config", str(cfg), "--ckpt_path", "last"])
        line = error_line(err)
        assert code == 2 and "no checkpoint in" in line and str(Path("runs/a/checkpoints")) in line, line
    assert not (work / "runs" / "a" / "checkpoints").exists()


def test_evaluation_needs_trained_weights_or_an_explicit_flag(work):
    cfg = recipe(work)
    for command in ("validate", "test"):
        code, err = cli([command, "--config", str(cfg)])
        line = error_line(err)
        assert code == 2 and "--ckpt_path last" in line and "--untrained true" in line, line
    code, err = cli(["test", "--config", str(cfg), "--untrained", "true"])
    assert code == 0, err
    assert cli(["fit", "--config", str(cfg)])[0] == 0
    code, err = cli(["test", "--config", str(cfg), "--ckpt_path", "last"])
    assert code == 0, err
    # the test's configuration is saved beside the fit's, not over it
    assert {"config.yaml", "config_test.yaml"} <= files(work / "runs" / "a")
    code, err = cli(["fit", "--config", str(cfg), "--untrained", "true", "--ckpt_path", "last"])
    assert code == 2 and "remove --untrained" in error_line(err)
