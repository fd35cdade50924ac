"""DDP through the CLI equals one process on the global batch, and resumes exactly.

``lit-sae fit --trainer.devices 2 --trainer.strategy ddp`` (gloo, CPU, float64) with ``data.batch_size_tokens`` 2B (the
global batch: B per process) must train exactly as ``lit-sae fit`` in one process with the same config, on the real
``ActivationDataModule`` (each rank holds its half of every one-process batch): per-step losses, final weights, EMA, Adam state, dead-latent counters and tokens_seen equal to 1e-5 after 24 steps,
with AuxK (latents die after 4 steps) and Multi-TopK on. A DDP run stopped at step 12 and resumed with
``--ckpt_path last`` ends in the same state as the uninterrupted DDP run. The export is written by rank 0 only.
"""

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.support.shards import write_shards

pytestmark = pytest.mark.slow  # spawned processes / CLI subprocesses: over ~10 s on 2 CPU cores

D_IN, CTX, B, STEPS = 16, 16, 32, 24
HERE = Path(__file__).resolve().parents[2]  # the repository root: subprocesses import tests.support


def _write_shards(out, nan_row=None):
    g = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(48, D_IN, generator=g), dim=1)
    acts = {}
    for split, n in {"train": 2 * 30 * B + 40, "val": 128}.items():
        codes = torch.rand(n, 48, generator=g) * (torch.rand(n, 48, generator=g) < 0.1)
        acts[split] = codes @ dirs * 3 + 1.0
    if nan_row is not None:
        acts["train"][nan_row] = float("nan")
    write_shards(out, acts, ctx_len=CTX, block_tokens=64, tokens_per_shard=256)


def _config(root: Path, shards: Path, data_class: str, extra_data=None) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "default_root_dir": str(root), "max_steps": STEPS, "precision": "64-true", "log_every_n_steps": 1,
            "limit_val_batches": 0, "num_sanity_val_steps": 0, "enable_progress_bar": False,
            "enable_model_summary": False, "deterministic": True,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(root), "name": "csv", "version": 0}},
            "callbacks": [{"class_path": "lit_sae.callbacks.checkpoint.Checkpoint",
                           "init_args": {"dirpath": str(root / "checkpoints"), "save_last": True,
                                         "every_n_train_steps": 12, "save_top_k": 0}}],
        },
        "model": {"n_latents": 64, "k": 4, "k_aux": 8, "multi_topk": True, "lr": 3e-3, "ema_decay": 0.9,
                  "dead_after_tokens": 4 * 2 * B, "init_tokens": 512, "warmup_steps": 3,
                  "export_dir": str(root / "sae")},
        "data": {"class_path": data_class,
                 "init_args": {"path": str(shards), "batch_size_tokens": 2 * B, "shuffle_buffer_tokens": 256,
                               "num_workers": 0, **(extra_data or {})}},
    }
    path = root / "config.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _lit_sae(config: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    cmd = [str(Path(sys.executable).parent / "lit-sae"), "fit", "--config", str(config), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if ok:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _losses(root: Path) -> dict[int, float]:
    rows = list(csv.DictReader(open(root / "csv" / "version_0" / "metrics.csv")))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def _state(root: Path) -> dict:
    ck = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ck["global_step"] == STEPS
    state = dict(ck["state_dict"])
    state["dead_counts"] = ck["state_dict"]["tokens_since_fired"]  # a module buffer (also compared as such)
    for pid, per_param in ck["optimizer_states"][0]["state"].items():
        for key, t in per_param.items():
            state[f"adam.{pid}.{key}"] = t
    return state


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key].double(), b[key].double(), rtol=1e-5, atol=1e-5, msg=key)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    shards = base / "shards"
    _write_shards(shards)
    plain = "lit_sae.data.datamodule.ActivationDataModule"
    ddp = ("--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    _lit_sae(_config(base / "ref", shards, plain))  # one process, the same config
    _lit_sae(_config(base / "ddp", shards, plain), *ddp)
    half = _config(base / "half", shards, plain)
    _lit_sae(half, *ddp, "--trainer.max_steps", "12")
    _lit_sae(half, *ddp, "--ckpt_path", "last")
    return base


def test_ddp_equals_one_process_on_the_global_batch(runs):
    ref, ddp = _state(runs / "ref"), _state(runs / "ddp")
    assert int(ddp["tokens_seen"]) == STEPS * 2 * B == int(ref["tokens_seen"])
    assert int(ddp["ema.steps"]) == STEPS
    assert bool((ddp["dead_counts"] == 0).any()) and int(ddp["dead_counts"].max()) >= 4 * 2 * B  # AuxK was on
    _assert_same(ref, ddp)
    ref_loss, ddp_loss = _losses(runs / "ref"), _losses(runs / "ddp")
    assert len(ddp_loss) == STEPS and ref_loss.keys() == ddp_loss.keys()
    for step in ref_loss:
        assert ddp_loss[step] == pytest.approx(ref_loss[step], rel=1e-5, abs=1e-8), step
    assert (runs / "ddp" / "sae" / "cfg.json").is_file()  # written by rank 0 at the end of fit


def test_ddp_resume_from_last_is_exact(runs):
    _assert_same(_state(runs / "ddp"), _state(runs / "half"))


def test_a_failing_rank_ends_every_rank(tmp_path):
    """Rank 1 meets a NaN row in its half of a global batch of the (unshuffled) train split mid-run; rank 0 waits in
    a collective. The command must end (not hang) with the shard named, and leave no process behind."""
    shards = tmp_path / "shards"
    # Row 434 is in rank 1's half (rows 416..447) of global batch 6 (rows 384..447); b_pre's sample does not touch it
    _write_shards(shards, nan_row=434)
    cfg = _config(tmp_path / "run", shards, "lit_sae.data.datamodule.ActivationDataModule", {"shuffle": False})
    proc = _lit_sae(cfg, "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                    ok=False)
    assert proc.returncode != 0
    assert "NaN" in proc.stderr and "train-" in proc.stderr, proc.stderr[-3000:]
    left = subprocess.run(["pgrep", "-f", str(cfg)], capture_output=True, text=True).stdout.split()
    assert not left, f"processes left running: {left}"


def test_two_torchrun_nodes_equal_two_local_processes(runs, tmp_path):
    """``torchrun --nnodes 2 --nproc-per-node 1`` on localhost (two "nodes", gloo, Lightning's TorchElastic cluster
    environment, ``trainer.num_nodes 2``) trains exactly as the 2-process single-node run."""
    cfg = _config(tmp_path / "nodes", runs / "shards", "lit_sae.data.datamodule.ActivationDataModule")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    bin_dir = Path(sys.executable).parent
    procs = [subprocess.Popen(
        [str(bin_dir / "torchrun"), "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
         "--master-addr", "127.0.0.1", "--master-port", str(port), str(bin_dir / "lit-sae"), "fit", "--config",
         str(cfg), "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "2",
         "--trainer.strategy", "ddp"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for node in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-4000:]
    _assert_same(_state(runs / "ddp"), _state(tmp_path / "nodes"))
    assert _losses(tmp_path / "nodes") == pytest.approx(_losses(runs / "ddp"), rel=1e-9)
