"""The KL fine-tune as a user runs it: ``lit-sae fit --config configs/finetune-kl.yaml`` on a tiny LM's harvest
(``ContextDataModule`` rebuilding the train contexts from the manifest), exact resume, and bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support.faults import cli, error_line
from tests.support.tiny_lm import harvest_tiny

pytestmark = pytest.mark.slow  # CLI subprocesses running an LM: over ~10 s on 2 CPU cores

REPO = Path(__file__).resolve().parents[2]
LIT_SAE = str(Path(sys.executable).with_name("lit-sae"))
HOOK = "blocks.0.hook_resid_post"
# 20 contexts of 31 replaceable positions (32 tokens from position 1) per step: the tiny harvest's ~115 train
# contexts make 5 steps per epoch, so 8 steps cross an epoch and a stop at step 5 sits on the epoch's last batch.
BATCH = 20 * 31


@pytest.fixture(scope="module")
def harvest(tmp_path_factory):
    """The tiny LM's harvest and an SAE of its hook point (data-initialised, untrained) to fine-tune."""
    from lit_sae.artifacts.export import export_sae
    from lit_sae.sae.model import TopKSAE

    root = harvest_tiny(tmp_path_factory.mktemp("kl"))
    torch.manual_seed(0)
    sae = TopKSAE(d_in=32, n_latents=64, k=4)
    sae.init_from_data_(torch.randn(256, 32))
    export_sae(sae, root / "sae", hook_point=HOOK, lm_name=str(root / "lm"))
    return root


def args(root: Path, run: Path, steps: int, *extra: str) -> list[str]:
    return ["fit", "--config", str(REPO / "configs/finetune-kl.yaml"), "--model.init_from", str(root / "sae"),
            "--model.n_latents", "64", "--model.k", "4", "--data.init_args.manifest", str(root / "shards"),
            "--data.init_args.batch_size_tokens", str(BATCH), "--trainer.default_root_dir", str(run),
            "--trainer.max_steps", str(steps), "--trainer.enable_progress_bar", "false", *extra]


def fit(*argv: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
    proc = subprocess.run([LIT_SAE, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "sae" / "sae_weights.safetensors"))


def test_yaml_fit_then_exact_resume_across_an_epoch_end(harvest, tmp_path):
    """8 steps straight equal 5 steps, a stop, and ``--ckpt_path last`` for 3 more, bit for bit (same process
    layout, same kernels), though only the straight run validates (every 4 steps: val/kl, val/delta_ce on the val
    contexts); the export says it was KL-fine-tuned and differs from the SAE it started from."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    fit(*args(harvest, straight, 8), "--trainer.val_check_interval", "4", "--data.init_args.val_contexts", "8")
    fit(*args(harvest, split, 5))
    first_half = weights(split)
    out = fit(*args(harvest, split, 8), "--ckpt_path", "last")
    assert "starts from" in out
    a, b = weights(straight), weights(split)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    start = load_file(str(harvest / "sae" / "sae_weights.safetensors"))
    assert not torch.equal(start["W_dec"], a["W_dec"]) and not torch.equal(first_half["W_dec"], a["W_dec"])
    cfg = json.loads((straight / "sae" / "cfg.json").read_text())
    assert cfg["lit_sae"]["kl_finetune"]["kl_coef"] == 1.0
    assert cfg["hook_name"] == HOOK
    ckpt = torch.load(straight / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 8
    assert not any(".transformer." in k or k.startswith("lm.") for k in ckpt["state_dict"])  # the LM is not saved
    assert int(ckpt["state_dict"]["tokens_seen"]) == 8 * BATCH
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(straight))
    events.Reload()
    for tag in ("val/kl", "val/delta_ce", "val/nmse", "train/kl", "train/delta_ce"):
        assert tag in events.Tags()["scalars"], tag
    assert [e.step for e in events.Scalars("val/kl")] == [3, 7]
    assert all(0 < e.value < 10 for e in events.Scalars("val/kl"))


def _manifest_copy(harvest: Path, tmp: Path, edit) -> Path:
    m = json.loads((harvest / "shards" / "manifest.json").read_text())
    edit(m)
    folder = tmp / "shards"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps(m))
    return folder


def _error(harvest: Path, tmp: Path, manifest: Path, *extra: str) -> str:
    code, err = cli([a if a != str(harvest / "shards") else str(manifest)
                     for a in args(harvest, tmp / "run", 2, *extra)])
    assert code == 2, err
    line = error_line(err)
    assert "Traceback" not in err and "UNCAUGHT" not in err, err
    return line


def test_manifest_without_text_source_is_one_line(harvest, tmp_path):
    def drop(m):
        m["config"].pop("source")
        m["source"]["name"] = None

    folder = _manifest_copy(harvest, tmp_path, drop)
    line = _error(harvest, tmp_path, folder)
    assert "manifest.json" in line and "records no text source" in line and "harvest again" in line


def test_changed_text_source_is_refused(harvest, tmp_path):
    texts = tmp_path / "texts"
    shutil.copytree(harvest / "texts", texts)
    first = sorted(texts.iterdir())[0]
    first.write_text(first.read_text() + "\n# edited after the harvest\n")
    folder = _manifest_copy(harvest, tmp_path, lambda m: m["config"].update(source=str(texts)))
    line = _error(harvest, tmp_path, folder)
    assert "manifest.json" in line and "changed since the harvest" in line and "harvest again" in line


def test_train_contexts_that_differ_from_the_harvest_are_refused(harvest, tmp_path):
    folder = _manifest_copy(harvest, tmp_path, lambda m: m["splits"]["train"].update(
        contexts=m["splits"]["train"]["contexts"] + 1))
    line = _error(harvest, tmp_path, folder)
    assert "manifest.json" in line and "train contexts" in line and "harvest again" in line


def test_model_that_cannot_be_loaded_is_one_line(harvest, tmp_path):
    missing = str(tmp_path / "no-such-model")

    def move(m):
        m["config"]["model"] = missing
        m["lm"]["name"] = missing

    folder = _manifest_copy(harvest, tmp_path, move)
    line = _error(harvest, tmp_path, folder)
    assert "manifest.json" in line and "no-such-model" in line and "cannot be loaded" in line


def test_kl_coef_on_activation_shards_says_which_data_it_needs(harvest, tmp_path):
    code, err = cli(["fit", "--model.n_latents", "64", "--model.k", "4", "--model.kl_coef", "1.0",
                     "--data", "lit_sae.data.datamodule.ActivationDataModule", "--data.path",
                     str(harvest / "shards"), "--data.batch_size_tokens", "128", "--trainer.max_steps", "2",
                     "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.enable_progress_bar", "false"])
    assert code == 2, err
    line = error_line(err)
    assert "model.kl_coef" in line and "ContextDataModule" in line


def test_batch_size_that_does_not_divide_into_contexts_names_the_key(harvest, tmp_path):
    line = _error(harvest, tmp_path, harvest / "shards", "--data.init_args.batch_size_tokens", "100")
    assert "data.batch_size_tokens=100" in line and "93" in line


def test_ddp_two_processes_equal_one_on_the_global_batch(harvest, tmp_path):
    """``--trainer.devices 2 --trainer.strategy ddp`` (gloo, CPU, float64 LM and SAE): each rank runs the LM on its
    half of every global batch; the KL means and the SAE's global-batch loss make DDP's gradient average the one
    process's gradient, so after 4 steps the weights agree to float64 rounding carried through Adam."""
    f64 = ("--trainer.precision", "64-true", "--data.init_args.model_dtype", "float64")
    one, two = tmp_path / "one", tmp_path / "two"
    fit(*args(harvest, one, 4), *f64)
    fit(*args(harvest, two, 4), *f64, "--trainer.accelerator", "cpu", "--trainer.devices", "2",
        "--trainer.strategy", "ddp")
    a, b = (torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
            for run in (one, two))
    assert int(a["tokens_seen"]) == int(b["tokens_seen"]) == 4 * BATCH
    assert a["sae.W_dec"].dtype == torch.float64
    # Both runs sum the same float64 terms in another order (per-rank partial sums, then the all-reduce): relative
    # differences of a few eps64 (~1e-15) in each gradient, which Adam's m / sqrt(v) passes on as relative
    # differences of the same size in each update (<= lr = 8e-4 per step): ~1e-18 per step on weights of ~0.1-1 that
    # round at ~1e-17. 1e-12 leaves a factor 1e4 for growth over 4 steps and stays far below the ~1e-3 they move.
    for key in (k for k in a if a[k].is_floating_point()):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-12, msg=key)
    start = load_file(str(harvest / "sae" / "sae_weights.safetensors"))["W_dec"].double()
    assert (a["sae.W_dec"] - start).abs().max() > 1e-4
