"""One owner per run folder (``lit_sae.train.run_lock``): a second command on a folder in use stops at once naming the
holder, and a holder killed with SIGKILL leaves nothing that blocks the next command."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lit_sae.train.run_lock import HOLDER, RunFolderBusy, RunLock, holder_of
from tests.support.faults import LIT_SAE, error_line, make_shards

HOLD = "import sys, time; from lit_sae.train.run_lock import RunLock; lock = RunLock(sys.argv[1], 'holder-cmd').acquire(); " \
       "print('held', flush=True); time.sleep(600)"


def _holder(root: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_holder_is_refused_naming_the_first_and_a_killed_holder_blocks_nothing(tmp_path):
    root = tmp_path / "run"
    p = _holder(root)
    try:
        with pytest.raises(RunFolderBusy) as e:
            RunLock(root, "second").acquire()
        msg = str(e.value)
        assert f"pid {p.pid}" in msg and "holder-cmd" in msg and str(root) in msg and "\n" not in msg
        assert holder_of(root)["pid"] == p.pid
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    # the OS released the lock with the process; the stale holder line is replaced by the new owner's
    with RunLock(root, "third") as lock:
        assert holder_of(root)["command"] == "third" and holder_of(root)["pid"] == os.getpid()
        lock.release()  # released twice (here and on exit): harmless
    assert not (root / HOLDER).exists()
    with RunLock(root, "fourth"):  # free again after a clean release
        pass


RECIPE = """\
seed_everything: 0
trainer:
  default_root_dir: {root}
  max_epochs: -1
  enable_progress_bar: false
  enable_model_summary: false
  limit_val_batches: 0
  callbacks:
    - class_path: lit_sae.callbacks.checkpoint.Checkpoint
      init_args:
        save_last: true
        every_n_train_steps: 100000
        save_top_k: 0
model:
  n_latents: 64
  k: 4
  init_tokens: 256
data:
  class_path: lit_sae.data.datamodule.ActivationDataModule
  init_args:
    path: {shards}
    batch_size_tokens: 256
    shuffle_buffer_tokens: 512
    num_workers: 0
"""


def _fit(cfg: Path, *extra: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([LIT_SAE, "fit", "--config", str(cfg), *extra], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=cfg.parent, **kw)


@pytest.mark.slow  # three `lit-sae fit` start-ups (about 15 s each on 2 busy cores)
def test_two_fits_on_one_run_folder_through_the_cli(tmp_path):
    """Issue 25's case: fit B started into fit A's folder while A runs is refused (exit 2, one line naming A);
    after A is killed with SIGKILL, a fresh fit C takes the folder and everything in it is C's."""
    root = tmp_path / "run"
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(RECIPE.format(root=root, shards=make_shards(tmp_path / "shards")))
    a = _fit(cfg, "--model.k", "8", "--trainer.max_steps", "100000")
    try:
        t0 = time.time()
        while not (root / "config.yaml").exists() and a.poll() is None and time.time() - t0 < 180:
            time.sleep(0.2)
        assert a.poll() is None, a.stderr.read()
        b = _fit(cfg, "--model.k", "4", "--trainer.max_steps", "3")
        _, err = b.communicate(timeout=180)
        line = error_line(err)
        assert b.returncode == 2 and f"pid {a.pid}" in line and "--model.k 8" in line, err
        assert "RunFolderBusy" in line and "--trainer.default_root_dir" in line
        assert yaml.safe_load((root / "config.yaml").read_text())["model"]["k"] == 8  # B wrote nothing
    finally:
        a.send_signal(signal.SIGKILL)
        a.wait()
    c = _fit(cfg, "--model.k", "4", "--trainer.max_steps", "3")
    _, err = c.communicate(timeout=300)
    assert c.returncode == 0, err
    assert yaml.safe_load((root / "config.yaml").read_text())["model"]["k"] == 4
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]["k"] == 4
    assert yaml.safe_load((root / "sae" / "cfg.json").read_text())["k"] == 4
    assert not (root / HOLDER).exists()  # C let go on exit
