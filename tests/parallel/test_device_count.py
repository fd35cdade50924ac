"""The same config and seed train the same SAE on 1, 2 or 4 processes, data-parallel or latent-sharded, through
``lit-sae fit`` on the real ``ActivationDataModule``, from the SAE's own initialisation (no ``model.init_from``):
``data.batch_size_tokens`` is the global batch, which lit-sae splits over the data-parallel ranks, and a sharded SAE
starts from its rows of the one-process draw (``lit_sae.sae.init.draw_decoder``).

The weights are the same bits (every reduction of a step runs in one order whatever the layout: data-parallel
ranks gather their codes, ``lit_sae.parallel.data_parallel.TokenGather``; shards chain the decode, ``lit_sae.parallel.tensor``)
wherever this machine's BLAS gives a row's or a column's encoder products the same bits when the product is split,
which the test checks first; elsewhere to the rounding bound below."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.parallel.test_ddp import HERE, _write_shards

pytestmark = pytest.mark.slow  # three CLI fits, two of them with two spawned processes

B, STEPS, LR = 64, 8, 3e-3
STRATEGY = "lit_sae.parallel.strategy.SAEModelParallelStrategy"
LAYOUTS = {
    "one": (),
    "ddp2": ("--trainer.devices", "2", "--trainer.strategy", "ddp"),
    "tp2": ("--trainer.devices", "2", "--trainer.strategy", STRATEGY, "--trainer.strategy.data_parallel_size", "1",
            "--trainer.strategy.tensor_parallel_size", "2"),
    "ddp4": ("--trainer.devices", "4", "--trainer.strategy", "ddp"),
    "tp4": ("--trainer.devices", "4", "--trainer.strategy", STRATEGY, "--trainer.strategy.data_parallel_size", "1",
            "--trainer.strategy.tensor_parallel_size", "4"),
    "dp2tp2": ("--trainer.devices", "4", "--trainer.strategy", STRATEGY, "--trainer.strategy.data_parallel_size", "2",
               "--trainer.strategy.tensor_parallel_size", "2"),
}


def _split_products_keep_their_bits(d_in: int) -> bool:
    """Whether this machine's matmul (one thread, as the fits run) gives the encoder's products the same bits when
    the batch's rows or the latents' columns are split in 2 or 4, at this test's shapes."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x, W, b = torch.randn(B, d_in, generator=g), torch.randn(64, d_in, generator=g), torch.randn(64, generator=g)
    full = torch.addmm(b, x, W.t())
    return all(torch.equal(full, torch.cat([torch.addmm(b[c], x[r], W[c].t()) for r, c in parts], dim=dim))
               for T in (2, 4) for dim, parts in (
                   (0, [(slice(t * B // T, (t + 1) * B // T), slice(None)) for t in range(T)]),
                   (1, [(slice(None), slice(t * 64 // T, (t + 1) * 64 // T)) for t in range(T)])))


def _fit(base: Path, shards: Path, name: str) -> dict:
    root = base / name
    cfg = {"seed_everything": 3,
           "trainer": {"default_root_dir": str(root), "max_steps": STEPS, "accelerator": "cpu", "precision": "32-true",
                       "limit_val_batches": 0, "num_sanity_val_steps": 0, "enable_progress_bar": False,
                       "enable_model_summary": False, "logger": False,
                       "callbacks": [{"class_path": "lit_sae.callbacks.checkpoint.Checkpoint",
                                      "init_args": {"save_last": True, "every_n_train_steps": 1000, "save_top_k": 0}}]},
           "model": {"n_latents": 64, "k": 4, "k_aux": 8, "lr": LR, "dead_after_tokens": 2 * B, "init_tokens": 512,
                     "warmup_steps": 2},
           "data": {"class_path": "lit_sae.data.datamodule.ActivationDataModule",
                    "init_args": {"path": str(shards), "batch_size_tokens": B, "shuffle_buffer_tokens": 256,
                                  "num_workers": 0}}}
    root.mkdir(parents=True)
    (root / "fit.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([str(Path(sys.executable).parent / "lit-sae"), "fit", "--config", str(root / "fit.yaml"),
                           *LAYOUTS[name]], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    cfg = json.loads((root / "sae" / "cfg.json").read_text())
    assert cfg["d_sae"] == 64
    # one export path whatever the layout: from the final checkpoint (a folder of per-rank files when sharded), with
    # its provenance
    assert cfg["lit_sae"]["checkpoint"]["step"] == STEPS and len(cfg["lit_sae"]["checkpoint"]["sha256"]) == 64
    assert cfg["lit_sae"]["manifest"]["path"] == str((shards / "manifest.json").resolve())
    return load_file(str(root / "sae" / "sae_weights.safetensors"))


def test_one_process_ddp_and_latent_sharding_train_the_same_sae(tmp_path):
    shards = tmp_path / "shards"
    _write_shards(shards)
    sae = {name: _fit(tmp_path, shards, name) for name in LAYOUTS}
    # What may differ is float32 rounding only, and each step adds at most two kinds of it. (1) The update: a layout
    # changes the summation order of the batch reductions (the gradient sum over B rows is split in two and
    # all-reduced; matmuls change shape), each within about sqrt(B) * eps32 of the other relative to the sum of
    # magnitudes; Adam turns that into about the same relative error of a step of size lr (x8 margin for the biases,
    # the decoder renormalisation and the data-derived b_pre). (2) The weight itself is rounded again to float32 after
    # every step: up to one ulp, eps32 * |w|. Over STEPS steps the differences add up to at most
    # STEPS * eps32 * (1 + 8 * lr * sqrt(B)) * max|w|. Measured on a 2-core x86-64 machine: about 0.1 of it (9e-8 on
    # W_dec); a token or latent chosen differently would move weights by about lr = 3e-3, and the initialisations of
    # the sharded SAE before this was fixed differed by about 0.3.
    before = torch.get_num_threads()
    try:
        exact = _split_products_keep_their_bits(sae["one"]["W_enc"].shape[0])
    finally:
        torch.set_num_threads(before)
    if exact:  # the same kernels on the same numbers in the same order: the same bits
        for name in LAYOUTS:
            for key, ref in sae["one"].items():
                assert torch.equal(sae[name][key], ref), (name, key, float((sae[name][key] - ref).abs().max()))
    for name in LAYOUTS:
        if name == "one":
            continue
        assert sae[name].keys() == sae["one"].keys()
        for key, ref in sae["one"].items():
            scale = max(1.0, float(ref.abs().max()))
            tol = STEPS * torch.finfo(torch.float32).eps * (1 + 8 * LR * B ** 0.5) * scale
            diff = float((sae[name][key].double() - ref.double()).abs().max())
            assert diff <= tol, (name, key, diff, tol)
