"""``lit-sae fit`` with the SAE sharded over its latents (``SAEModelParallelStrategy``, Lightning's ModelParallelStrategy
and ``configure_model``) trains exactly as one process, resumes exactly, exports one SAE, and refuses bad layouts.

CPU/gloo, spawned by the CLI, 32-bit (ModelParallelStrategy has no 64-true), 20 steps with AuxK (latents die after
4 steps) and Multi-TopK on, all runs starting from the same SAE (``model.init_from``):
- tensor-parallel 2 (1 x 2 mesh) and a 2 x 2 mesh (4 processes, each data-parallel rank holding half of every
  global batch of ``data.batch_size_tokens``) equal ``lit-sae fit`` in one process with the same config: per-step
  losses, final weights, EMA, Adam moments, dead-latent counters and tokens_seen to 1e-5;
- the 2 x 2 run stopped at step 10 (a DCP checkpoint folder, one file per rank) and resumed with ``--ckpt_path last``
  ends in the uninterrupted run's state;
- ``lit-sae export`` of the sharded checkpoint folder equals the export of the unsharded run's checkpoint;
- bad layouts stop before training with the keys and values named; a failing rank ends every rank.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml

from lit_sae.artifacts.export import export_sae, load_exported
from lit_sae.artifacts.load import read_checkpoint
from lit_sae.artifacts.sharded import read_strategy_checkpoint
from lit_sae.sae.model import TopKSAE
from tests.parallel.test_ddp import HERE, _losses, _write_shards

pytestmark = pytest.mark.slow  # spawned processes / CLI subprocesses: over ~10 s on 2 CPU cores

STEPS, B, N = 20, 32, 64
PLAIN = "lit_sae.data.datamodule.ActivationDataModule"
STRATEGY = "lit_sae.parallel.strategy.SAEModelParallelStrategy"


def _mesh(dp: int, tp: int) -> tuple[str, ...]:
    return ("--trainer.accelerator", "cpu", "--trainer.devices", str(dp * tp), "--trainer.strategy", STRATEGY,
            "--trainer.strategy.data_parallel_size", str(dp), "--trainer.strategy.tensor_parallel_size", str(tp))


def _config(root: Path, shards: Path, init: Path, data_class: str = PLAIN, extra_data=None, **model) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "default_root_dir": str(root), "max_steps": STEPS, "precision": "32-true", "log_every_n_steps": 1,
            "limit_val_batches": 0, "num_sanity_val_steps": 0, "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(root), "name": "csv", "version": 0}},
            "callbacks": [{"class_path": "lit_sae.callbacks.checkpoint.Checkpoint",
                           "init_args": {"dirpath": str(root / "checkpoints"), "save_last": True,
                                         "every_n_train_steps": 10, "save_top_k": 0}}],
        },
        "model": {"n_latents": N, "k": 4, "k_aux": 8, "multi_topk": True, "lr": 3e-3, "ema_decay": 0.9,
                  "dead_after_tokens": 4 * 2 * B, "init_tokens": 512, "warmup_steps": 3,
                  "export_dir": str(root / "sae"), "init_from": str(init), **model},
        "data": {"class_path": data_class,
                 "init_args": {"path": str(shards), "batch_size_tokens": B, "shuffle_buffer_tokens": 256,
                               "num_workers": 0, **(extra_data or {})}},
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _fit(config: Path, *args: str, ok: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    cmd = [str(Path(sys.executable).parent / "lit-sae"), "fit", "--config", str(config), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _state(root: Path) -> dict:
    """Weights, EMA, counters and Adam moments by name, full size (a sharded folder is reassembled)."""
    path = root / "checkpoints" / "last.ckpt"
    if path.is_dir():
        ck = read_strategy_checkpoint(path)
        adam = ck["optimizer_states"][0]["state"]
    else:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        names = ["sae." + n for n, _ in _unsharded_names()]
        adam = {names[i]: s for i, s in ck["optimizer_states"][0]["state"].items()}
    assert ck["global_step"] == STEPS
    state = {k: v for k, v in ck["state_dict"].items()}
    for name, slots in adam.items():
        for key in ("exp_avg", "exp_avg_sq"):
            state[f"adam.{name}.{key}"] = slots[key]
    return state


def _unsharded_names():
    return list(TopKSAE(4, 8, 2).named_parameters())  # the order SAEModule gives Adam its parameters


def _assert_same(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert a.keys() == b.keys(), set(a) ^ set(b)
    for key in a:
        torch.testing.assert_close(a[key].double(), b[key].double(), rtol=tol, atol=tol, msg=key)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("mp")
    shards = base / "shards"
    _write_shards(shards)
    torch.manual_seed(3)
    init = export_sae(TopKSAE(16, N, 4, k_aux=8, multi_topk=True), base / "init", hook_point="blocks.0.hook_resid_post",
                      lm_name="synthetic-lm")
    _fit(_config(base / "ref1", shards, init))
    _fit(_config(base / "tp2", shards, init), *_mesh(1, 2))
    _fit(_config(base / "mesh22", shards, init), *_mesh(2, 2))
    half = _config(base / "half", shards, init)
    _fit(half, *_mesh(2, 2), "--trainer.max_steps", "10")
    _fit(half, *_mesh(2, 2), "--ckpt_path", "last")
    return base


@pytest.mark.parametrize("ref,run", [("ref1", "tp2"), ("ref1", "mesh22")])
def test_sharded_fit_equals_one_process(runs, ref, run):
    a, b = _state(runs / ref), _state(runs / run)
    assert int(b["tokens_seen"]) == int(a["tokens_seen"]) == STEPS * B
    assert int(b["ema.steps"]) == STEPS
    assert bool((b["tokens_since_fired"] == 0).any()) and int(b["tokens_since_fired"].max()) >= 4 * 2 * B  # AuxK on
    _assert_same(a, b)
    la, lb = _losses(runs / ref), _losses(runs / run)
    assert len(lb) == STEPS and la.keys() == lb.keys()
    for step in la:
        assert lb[step] == pytest.approx(la[step], rel=1e-5, abs=1e-8), step


def test_each_rank_writes_its_shard_and_resume_is_exact(runs):
    folder = runs / "mesh22" / "checkpoints" / "last.ckpt"
    assert folder.is_dir() and len(list(folder.glob("*.distcp"))) == 4
    # the latent-sharded tensors are stored as row blocks of n_latents / 2, one per tensor-parallel rank
    meta = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    for key in ("state_dict.sae.W_enc", "state_dict.sae.W_dec", "state_dict.sae.b_enc", "state_dict.ema.shadow_W_dec",
                "state_dict.tokens_since_fired", "optimizer_0.sae.W_enc.exp_avg", "optimizer_0.sae.W_dec.exp_avg_sq"):
        chunks = meta[key].chunks
        assert meta[key].size[0] == N and sorted(c.offsets[0] for c in chunks) == [0, N // 2], key
        assert all(c.sizes[0] == N // 2 for c in chunks), key
    assert len(meta["state_dict.sae.b_pre"].chunks) == 1  # replicated: stored once
    _assert_same(_state(runs / "mesh22"), _state(runs / "half"), tol=1e-6)


def test_export_of_a_sharded_checkpoint_equals_the_unsharded_export(runs, tmp_path):
    from lit_sae.artifacts.export import export

    sharded = export(str(runs / "tp2" / "checkpoints" / "last.ckpt"), str(tmp_path / "sharded"))
    plain = export(str(runs / "ref1" / "checkpoints" / "last.ckpt"), str(tmp_path / "plain"))
    a, cfg_a = load_exported(sharded)
    b, cfg_b = load_exported(plain)
    assert cfg_a["d_sae"] == N and cfg_a["hook_name"] == cfg_b["hook_name"] == "blocks.0.hook_resid_post"
    for name in ("W_enc", "b_enc", "W_dec", "b_pre"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-5, msg=name)
    fit_end, _ = load_exported(runs / "tp2" / "sae")  # the export written at the end of the sharded fit
    for name in ("W_enc", "W_dec"):
        assert torch.equal(getattr(fit_end, name), getattr(a, name))
    sae, info = read_checkpoint(runs / "tp2" / "checkpoints" / "last.ckpt")
    assert info["global_step"] == STEPS and sae.n_latents == N


def _error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert lines, proc.stderr[-3000:]
    return lines[0]


def test_bad_layouts_stop_before_training(runs, tmp_path):
    shards, init = runs / "shards", runs / "init"
    cfg = _config(tmp_path / "a", shards, init)
    msg = _error(_fit(cfg, *_mesh(2, 2), "--trainer.devices", "2", ok=False))
    assert "data_parallel_size=2 x tensor_parallel_size=2" in msg and "(2 = trainer.devices" in msg
    cfg = _config(tmp_path / "b", shards, init, init_from=None, n_latents=63)
    msg = _error(_fit(cfg, *_mesh(1, 2), ok=False))
    assert "model.n_latents=63 is not divisible by tensor_parallel_size=2" in msg
    # resume on another mesh: the 2 x 2 run's checkpoint under 1 x 2
    msg = _error(_fit(runs / "half" / "config.yaml", *_mesh(1, 2), "--ckpt_path", "last", ok=False))
    assert "data_parallel_size: checkpoint 2, now 1" in msg and "tensor_parallel_size" not in msg
    # a DataModule that splits over every process: the tensor-parallel ranks read different batches
    cfg = _config(tmp_path / "c", shards, init, "tests.support.global_batch.EveryProcessItsOwnBatch")
    msg = _error(_fit(cfg, *_mesh(1, 2), ok=False))
    assert "tensor-parallel ranks [0, 1] of data-parallel rank 0 read different training batches" in msg
    for run in ("a", "b", "c"):
        assert not (tmp_path / run / "checkpoints").exists()


def test_a_failing_rank_ends_every_rank(tmp_path):
    """Data-parallel rank 1 meets a NaN row mid-run while rank 0 waits in a collective: the command ends (no hang)
    with the shard named, and no process is left behind."""
    shards = tmp_path / "shards"
    _write_shards(shards, nan_row=434)  # in data-parallel rank 1's half (rows 432..447) of global batch 13
    torch.manual_seed(3)
    init = export_sae(TopKSAE(16, N, 4, k_aux=8, multi_topk=True), tmp_path / "init",
                      hook_point="blocks.0.hook_resid_post")
    cfg = _config(tmp_path / "run", shards, init, extra_data={"shuffle": False})
    proc = _fit(cfg, *_mesh(2, 1), ok=False, timeout=300)
    assert proc.returncode != 0
    assert "NaN" in proc.stderr and "train-" in proc.stderr, proc.stderr[-3000:]
    left = subprocess.run(["pgrep", "-f", str(cfg)], capture_output=True, text=True).stdout.split()
    assert not left, f"processes left running: {left}"
