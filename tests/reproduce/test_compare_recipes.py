"""lit_sae.reproduce.compare / compare_sparsify (the library under scripts/compare_recipes.py): the shared batch
order, the test metrics (against float64 hand computations), the init levers, lit-sae's training side, sparsify's
schedule presets and the LR-sweep table; sparsify's side runs only where its venv is installed."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_sae.reproduce import compare as cr
from lit_sae.reproduce import compare_sparsify as csp
from lit_sae.sae.model import TopKSAE
from lit_sae.train.module import SAEModule


def test_batch_order_is_a_permutation_per_epoch_and_seeded():
    order = cr.batch_order(n_rows=10, batch_size=4, total_tokens=22, seed=3)
    assert order.shape == (5, 4) and order.dtype == np.int64  # 22 // 4 steps
    flat = order.reshape(-1)
    assert sorted(flat[:10]) == list(range(10))  # the first epoch reads every row exactly once
    assert sorted(flat[10:20]) == list(range(10))  # and so does the second
    assert np.array_equal(order, cr.batch_order(10, 4, 22, seed=3))
    assert not np.array_equal(order, cr.batch_order(10, 4, 22, seed=4))
    with pytest.raises(ValueError, match="at least one batch"):
        cr.batch_order(10, 4, 3, seed=0)


def test_ordered_batches_read_the_ordered_rows():
    train = np.arange(30, dtype=np.float16).reshape(10, 3)
    order = np.array([[7, 2], [0, 9]])
    ds = cr.OrderedBatches(train, order)
    assert len(ds) == 2
    batch = ds[0]["acts"]
    assert batch.dtype == torch.float32
    assert batch.tolist() == [[6.0, 7.0, 8.0], [21.0, 22.0, 23.0]]  # rows 2 and 7, ascending


def _reference_metrics(sae: TopKSAE, x: np.ndarray) -> dict:
    """Float64 NMSE / L0 / never-fired fraction computed by hand from the weights."""
    W_enc, b_enc = sae.W_enc.detach().double().numpy(), sae.b_enc.detach().double().numpy()
    W_dec, b_pre = sae.W_dec.detach().double().numpy(), sae.b_pre.detach().double().numpy()
    xd = x.astype(np.float64)
    pre = np.maximum((xd - b_pre) @ W_enc.T + b_enc, 0.0)
    idx = np.argsort(-pre, axis=1)[:, : sae.k]
    vals = np.take_along_axis(pre, idx, axis=1)
    x_hat = np.einsum("bk,bkd->bd", vals, W_dec[idx]) + b_pre
    nmse = ((xd - x_hat) ** 2).sum() / ((xd - xd.mean(0)) ** 2).sum()
    fired = np.zeros(sae.n_latents, bool)
    fired[idx[vals > 0]] = True
    return {"nmse": nmse, "l0": (vals > 0).sum(1).mean(), "dead_fraction": 1 - fired.mean()}


def test_test_metrics_match_a_float64_hand_computation():
    torch.manual_seed(0)
    sae = TopKSAE(8, 24, 3)
    with torch.no_grad():
        sae.b_pre.normal_()
        # only 4 latents can fire, each on part of the tokens: some rows have fewer than k active latents, and 20
        # latents never fire
        sae.b_enc.fill_(-100.0)[:4] = 0.0
        sae.W_enc.mul_(4.0)
    x = (np.random.default_rng(0).standard_normal((300, 8)) + 2.0).astype(np.float16)
    got = cr.test_metrics(sae, x, chunk=64)  # several chunks: the split-wide sums must be exact
    want = _reference_metrics(sae, x)
    assert got["nmse"] == pytest.approx(want["nmse"], rel=1e-5)
    assert got["l0"] == pytest.approx(want["l0"])
    assert got["dead_fraction"] == pytest.approx(want["dead_fraction"])
    assert 0 < want["dead_fraction"] < 1 and want["l0"] < 3


def test_never_firing_in_the_top_4k_by_hand():
    """k = 1 over 24 latents whose pre-activations are their biases 5, 4, 3, 2, 1, -1, ...: latent 0 is every
    token's top 1, latents 0-3 its top 4k = 4 (latent 4 is positive but ranks 5th): 23/24 never fire at k, 20/24
    never in the top 4k."""
    sae = TopKSAE(8, 24, 1)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.copy_(torch.tensor([5.0, 4, 3, 2, 1] + [-1.0] * 19))
    got = cr.test_metrics(sae, np.random.default_rng(0).standard_normal((50, 8)).astype(np.float16))
    assert got["dead_fraction"] == pytest.approx(23 / 24) and got["dead_fraction_4k"] == pytest.approx(20 / 24)


def test_extra_levers_mean_b_pre_and_data_encoder_scale():
    torch.manual_seed(1)
    module = SAEModule(d_in=6, n_latents=32, k=4)
    sample = torch.randn(500, 6) * 3 + 5
    cr.apply_extra_levers(module, sample, "mean", "data")
    sae = module.sae
    assert torch.allclose(sae.b_pre, sample.mean(0), atol=1e-5)
    values, indices = sae.encode(sample)
    d = sae._decode_n(values, indices)
    alpha = float(((sample - sae.b_pre) * d).sum() / d.pow(2).sum())
    assert alpha == pytest.approx(1.0, abs=1e-4)  # after rescaling, the initial reconstruction has the best scale
    with pytest.raises(ValueError, match="b_pre_init"):
        cr.apply_extra_levers(module, sample, "mode", "fixed")


def test_parse_overrides():
    assert cr.parse_overrides(["lr=8e-4", "betas=[0.9, 0.99]", "ema_decay=null"]) == {
        "lr": 8e-4,
        "betas": [0.9, 0.99],
        "ema_decay": None,
    }
    with pytest.raises(ValueError, match="KEY=VALUE"):
        cr.parse_overrides(["lr"])
    assert cr.quickstart_model_settings()["k"] == 32


def _toy_data(n=2048, d=8, seed=0):
    rng = np.random.default_rng(seed)
    dictionary = rng.standard_normal((32, d))
    codes = rng.exponential(1.0, (n, 32)) * (rng.random((n, 32)) < 0.1)
    return (codes @ dictionary + 3.0).astype(np.float16)


def test_train_lit_sae_learns_and_returns_ema_weights():
    train, test = _toy_data(), _toy_data(512, seed=1)
    order = cr.batch_order(len(train), 256, 256 * 40, seed=0)
    settings = {
        **cr.quickstart_model_settings(),
        "n_latents": 64,
        "k": 4,
        "lr": None,  # the LR law at n 64 (the quickstart's 8e-4 is tuned for n 4096)
        "init_tokens": 1024,
        "ema_decay": 0.9,
        "dead_after_tokens": 2048,
    }
    torch.manual_seed(0)
    untrained = TopKSAE(8, 64, 4, encoder_init_norm=0.5)
    untrained.init_from_data_(torch.from_numpy(train[:1024].astype(np.float32)))
    sae = cr.train_lit_sae(train, order, settings, seed=0)
    assert not sae.training
    after, before = cr.test_metrics(sae, test)["nmse"], cr.test_metrics(untrained, test)["nmse"]
    assert after < 0.85 * before  # toy data: 40 steps take the NMSE from 0.30 to 0.22
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)  # EMA weights with folded norms


def _sparsify_python():
    root = os.environ.get("LIT_SAE_INTEROP_DIR")
    python = Path(root, "venvs", "sparsify", "bin", "python") if root else None
    return python if python is not None and python.exists() else None


@pytest.mark.slow
@pytest.mark.skipif(_sparsify_python() is None, reason="sparsify's venv: set LIT_SAE_INTEROP_DIR (check_interop.sh)")
def test_sparsify_runner_trains_on_the_same_batches(tmp_path):
    train, test = _toy_data(), _toy_data(512, seed=1)
    np.save(tmp_path / "train.npy", train)
    np.save(tmp_path / "order.npy", cr.batch_order(len(train), 256, 256 * 40, seed=0))
    out = tmp_path / "sp"
    for spec in ("--warmup-steps 4", "constant"):
        out = tmp_path / spec.replace(" ", "_")
        proc = csp.start_sparsify(str(_sparsify_python()), tmp_path, out, 64, 4, seed=0,
                                  args=csp.sparsify_args(spec, 40, lr=1e-3), threads=1)
        sae = csp.finish_sparsify(proc, out)
        assert (sae.n_latents, sae.k) == (64, 4)
        assert cr.test_metrics(sae, test)["nmse"] < 0.5
        info = json.loads((out / "train_info.json").read_text())
        assert info["lr"] == 1e-3 and info["schedule"] == ("constant" if spec == "constant" else "linear")
    assert subprocess.run([str(_sparsify_python()), "-c", "import sparsify"]).returncode == 0


def test_sparsify_presets_and_lrs():
    assert csp.sparsify_args("constant", 200) == ["--schedule", "constant"]
    assert csp.sparsify_args("decay", 200, lr=4e-4) == ["--schedule", "linear", "--warmup-steps", "20", "--lr",
                                                         "0.0004"]
    assert csp.sparsify_args("--warmup-steps 20", 200) == ["--warmup-steps", "20"]
    assert csp.sparsify_args("", 200) == []
    assert csp.parse_lrs("2e-4,4e-4") == [2e-4, 4e-4] and csp.parse_lrs(None) == [None]
    with pytest.raises(ValueError, match="--lrs"):
        csp.parse_lrs("2e-4,fast")
    with pytest.raises(ValueError, match="positive"):
        csp.parse_lrs("0")


def _row(lr, seed, lit, sp, spec="constant"):
    return {"name": f"q lr={lr} {spec}", "lr": lr, "seed": seed, "tokens": 8192, "batch_size": 4096, "sparsify_args": spec,
            "lit_nmse": lit, "sparsify_nmse": sp, "lit_dead_fraction": 0.0, "sparsify_dead_fraction": 0.0}


def test_lr_sweep_table_pairs_equal_lrs_and_each_best():
    rows = [_row(4e-4, 0, 0.30, 0.32), _row(4e-4, 1, 0.32, 0.34), _row(8e-4, 0, 0.20, 0.25), _row(8e-4, 1, 0.22,
            0.27), _row(1.6e-3, 0, 0.25, 0.22), _row(1.6e-3, 1, 0.25, 0.22), _row(8e-4, 0, 0.9, 0.9, spec="decay")]
    table = csp.summarize_lr_sweep(rows, "constant")
    lines = table.splitlines()
    assert "| 0.0004 | 2 | 0.3100 | 0.3300 | 0.939 |" in lines  # seed means; ratio of the means at equal lr
    assert "| 0.0008 | 2 | 0.2100 | 0.2600 | 0.808 |" in lines  # the decay row is another race
    assert "| each at its best | | 0.2100 (lr 0.0008) | 0.2200 (lr 0.0016) | 0.955 |" in lines
    assert csp.summarize_lr_sweep(rows, "--warmup-steps 20") == ""
    assert "| q lr=0.0008 constant | 8,192 | 4096 | 2 | 0.2100 | 0.2600 | 0.807 (0.800-0.815) |" in csp.summarize(rows,
                                                                                                         "constant")
